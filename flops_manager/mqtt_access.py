"""Per-project MQTT credentials, administered over Mosquitto's dynamic-security plugin.

The broker refuses anonymous clients (``flops_manager.broker``). The manager holds one admin
credential (:class:`MqttCredential`, generated at the broker's first start and kept in the
broker's workdir under ``$FLOPS_HOME``) and, through :class:`MqttAccess`, gives every service of
a project a credential of its own:

- user name ``flops:<project_id>:<service_name>``, usable only with the client id equal to the
  user name (so that no service can connect with the manager listener's client id and take
  over its persistent session);
- role ``flops:<project_id>:<component>``: publish ``flops/<project_id>/<component>/+`` only;
  no subscription, no message delivered to it.

Administration is Mosquitto's topic API: JSON commands published to
``$CONTROL/dynamic-security/v1``, answers on ``$CONTROL/dynamic-security/v1/response``
(Mosquitto 2.0, ``plugins/dynamic-security/README.md``). The same code administers the embedded
broker and an external one that runs the plugin. :class:`NoMqttAccess` is the no-op of an
anonymous broker (``FLOPS_INSECURE=mqtt``).
"""

import base64
import hashlib
import json
import os
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from flops_utils import env_vars
from flops_utils.errors import FlopsError
from flops_utils.notifications import parse_mqtt_url
from flops_utils.types import Component

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
"""Where dynamic-security commands are published."""

RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
"""Where the plugin answers (every admin subscribed receives every answer)."""

ADMIN_USERNAME = "flops-manager"
"""User name of the manager's own credential."""

CREDENTIAL_FILE = "manager-credential.json"
"""The admin credential's file in the broker's workdir: ``{"username", "password"}``, 0600."""

PASSWORD_BYTES = 32
"""Random bytes of every generated password (``secrets.token_urlsafe``)."""

HASH_ITERATIONS = 101
"""PBKDF2 iterations of the stored password hashes: Mosquitto's own default
(``PW_DEFAULT_ITERATIONS`` in ``common/password_mosq.h``). Low, but the passwords are 256-bit
random secrets, which no dictionary attack on a leaked hash can guess."""

SALT_BYTES = 12
"""Salt length of the hashes, as ``mosquitto_ctrl dynsec init`` writes them."""

REQUEST_TIMEOUT_S = 10.0
"""Seconds one administration request may take (connect, subscribe, answer)."""

RECONNECT_TIMEOUT_S = 30.0
"""Seconds a request keeps retrying while the broker cannot be reached (it may be restarting:
``flops_manager.supervision`` restarts the embedded one on the same port within seconds)."""

RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0)
"""Pauses between two attempts to reach the broker (the last one repeats)."""

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SERVICE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_NOT_FOUND = ("Client not found", "Role not found")
_EXISTS = ("Role already exists",)


class MqttAccessError(FlopsError):
    """The broker refused or did not answer an administration request."""

    code = "mqtt_access_error"


class _BrokerUnreachable(MqttAccessError):
    """The connection to the broker could not be made or was lost: worth another attempt."""


@dataclass(frozen=True)
class MqttCredential:
    """An MQTT user name and password (the password stays out of ``repr``)."""

    username: str
    password: str = field(repr=False)

    def env(self) -> dict[str, str]:
        """``{FLOPS_MQTT_USERNAME: ..., FLOPS_MQTT_PASSWORD: ...}`` for a service."""
        return {env_vars.MQTT_USERNAME: self.username, env_vars.MQTT_PASSWORD: self.password}


def new_password() -> str:
    """A random password of :data:`PASSWORD_BYTES` bytes (URL-safe base64)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def read_credential(workdir: Path) -> MqttCredential | None:
    """The admin credential kept in ``workdir`` (see :data:`CREDENTIAL_FILE`); ``None`` when
    there is none or it is unreadable."""
    try:
        data = json.loads((workdir / CREDENTIAL_FILE).read_text())
        return MqttCredential(str(data["username"]), str(data["password"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_or_create_credential(workdir: Path) -> MqttCredential:
    """The admin credential of ``workdir``, generated (and written 0600, ``workdir`` 0700) at
    the first call."""
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(workdir, 0o700)
    existing = read_credential(workdir)
    if existing is not None:
        return existing
    credential = MqttCredential(ADMIN_USERNAME, new_password())
    tmp = workdir / f".{CREDENTIAL_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"username": credential.username, "password": credential.password}, out)
    os.replace(tmp, workdir / CREDENTIAL_FILE)
    return credential


def password_hash(password: str, salt: bytes | None = None) -> dict[str, Any]:
    """The dynamic-security plugin's stored form of ``password``: ``{"password", "salt",
    "iterations"}`` with base64 PBKDF2-HMAC-SHA512 (64 bytes) and salt, as ``mosquitto_ctrl
    dynsec init`` writes them (``plugins/dynamic-security/clients.c``)."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, HASH_ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": HASH_ITERATIONS,
    }


def listener_client_id(home: Path) -> str:
    """The manager listener's MQTT client id for ``home``: ``flops-manager-<16 hex>`` (SHA-256 of
    the resolved path), stable across restarts so that the broker keeps its session."""
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()
    return f"{ADMIN_USERNAME}-{digest[:16]}"


def service_username(project_id: str, service_name: str) -> str:
    """``flops:<project_id>:<service_name>``, also the client id the credential must use.

    Raises ``ValueError`` for a project id outside ``[A-Za-z0-9_-]{1,64}`` or a service name
    outside ``[A-Za-z0-9_.-]{1,128}``.
    """
    _check_project(project_id)
    if not _SERVICE.match(service_name):
        raise ValueError(f"service name {service_name!r} is not [A-Za-z0-9_.-]{{1,128}}")
    return f"flops:{project_id}:{service_name}"


def project_role(project_id: str, component: Component) -> str:
    """``flops:<project_id>:<component>``: the role of a project's services of ``component``."""
    _check_project(project_id)
    return f"flops:{project_id}:{component.value}"


def project_role_acls(project_id: str, component: Component) -> list[dict[str, Any]]:
    """The ACLs of :func:`project_role`: publish ``flops/<project_id>/<component>/+``; every
    subscription and every delivery denied."""
    return [
        {
            "acltype": "publishClientSend",
            "topic": f"flops/{project_id}/{component.value}/+",
            "allow": True,
        },
        {"acltype": "subscribePattern", "topic": "#", "allow": False},
        {"acltype": "publishClientReceive", "topic": "#", "allow": False},
    ]


class MqttAccessControl(Protocol):
    """What the manager calls to give a project's services MQTT access and take it back."""

    def grant(self, project_id: str, service_name: str, component: Component) -> dict[str, str]:
        """The env vars of one service's credential (empty: no credential needed)."""
        ...

    def revoke(self, project_id: str) -> None:
        """Delete every credential of ``project_id``."""
        ...


class NoMqttAccess:
    """The :class:`MqttAccessControl` of an anonymous broker: grants nothing, revokes nothing."""

    def grant(self, project_id: str, service_name: str, component: Component) -> dict[str, str]:
        """``{}``: the service connects anonymously."""
        return {}

    def revoke(self, project_id: str) -> None:
        """Nothing to revoke."""


class MqttAccess:
    """Issues and revokes per-service credentials on a broker running dynamic security.

    Args:
        mqtt_url: ``mqtt://HOST:PORT`` of the broker.
        admin_username / admin_password: a credential allowed to publish
            ``$CONTROL/dynamic-security/#`` and to read its answers.
        timeout_s: seconds one request may take.
        reconnect_timeout_s: seconds a request keeps retrying while the broker cannot be
            reached or drops the connection (a broker restart).

    Every call opens a short-lived connection, so a restarted broker is simply reached again;
    thread-safe. Raises ``MqttAccessError`` when the broker refuses the admin credential, does
    not answer in time (or cannot be reached for ``reconnect_timeout_s``) or rejects a command.
    """

    def __init__(
        self,
        mqtt_url: str,
        admin_username: str,
        admin_password: str,
        timeout_s: float = REQUEST_TIMEOUT_S,
        reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
    ) -> None:
        self.host, self.port = parse_mqtt_url(mqtt_url)
        self.admin = MqttCredential(admin_username, admin_password)
        self.timeout_s = timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s

    def grant(self, project_id: str, service_name: str, component: Component) -> dict[str, str]:
        """Create (or replace, with a new password) the credential of ``service_name`` of
        ``project_id``: it may publish only ``flops/<project_id>/<component>/+``, subscribe
        to nothing, and connect only with its user name as client id.

        Returns ``{FLOPS_MQTT_USERNAME: ..., FLOPS_MQTT_PASSWORD: ...}`` for the service's
        environment. Replacing a credential disconnects the clients using the old one.
        """
        username = service_username(project_id, service_name)
        role = project_role(project_id, component)
        credential = MqttCredential(username, new_password())
        self.request(
            [
                {
                    "command": "createRole",
                    "rolename": role,
                    "acls": project_role_acls(project_id, component),
                },
                {"command": "deleteClient", "username": username},
                {
                    "command": "createClient",
                    "username": username,
                    "password": credential.password,
                    "clientid": username,
                    "roles": [{"rolename": role}],
                },
            ]
        )
        return credential.env()

    def revoke(self, project_id: str) -> None:
        """Delete the credentials and roles of ``project_id`` (clients still connected with
        them are disconnected and cannot connect again). Idempotent."""
        prefix = f"flops:{project_id}:"
        _check_project(project_id)
        listed = self.request([{"command": "listClients"}, {"command": "listRoles"}])
        clients = [c for c in _names(listed[0], "clients") if c.startswith(prefix)]
        roles = [r for r in _names(listed[1], "roles") if r.startswith(prefix)]
        commands = [{"command": "deleteClient", "username": c} for c in clients]
        commands += [{"command": "deleteRole", "rolename": r} for r in roles]
        if commands:
            self.request(commands)

    def request(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send ``commands`` in one message and return the plugin's answers in order.

        "not found" answers to delete commands and "already exists" to ``createRole`` count
        as done; any other ``error`` raises ``MqttAccessError`` naming the command (never
        its arguments, which may hold a password).
        """
        answers = self._exchange(commands)
        for command, answer in zip(commands, answers, strict=True):
            error = answer.get("error")
            if error and error not in _NOT_FOUND + _EXISTS:
                raise MqttAccessError(f"the broker refused {command['command']}: {error}")
        return answers

    def _exchange(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One round trip, tried again while the broker cannot be reached, up to
        ``reconnect_timeout_s`` (the commands are idempotent: see :meth:`grant`)."""
        deadline = time.monotonic() + self.reconnect_timeout_s
        attempt = 0
        while True:
            tag = uuid.uuid4().hex
            tagged = [{**c, "correlationData": f"{tag}-{i}"} for i, c in enumerate(commands)]
            try:
                return _Exchange(self, tag, len(commands)).run(json.dumps({"commands": tagged}))
            except _BrokerUnreachable:
                delay_s = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
                if time.monotonic() + delay_s > deadline:
                    raise
                time.sleep(delay_s)
                attempt += 1


class _Exchange:
    """One request/answer round trip of :class:`MqttAccess` over a fresh connection."""

    def __init__(self, access: MqttAccess, tag: str, count: int) -> None:
        self.access = access
        self.tag = tag
        self.count = count
        self.answers: dict[str, dict[str, Any]] = {}
        self.refused = ""
        self.lost = False
        self.ready = threading.Event()
        self.done = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{ADMIN_USERNAME}-admin-{tag[:12]}"
        )
        self.client.username_pw_set(access.admin.username, access.admin.password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def run(self, payload: str) -> list[dict[str, Any]]:
        """Publish ``payload`` once subscribed; the answers in command order."""
        try:
            self.client.connect(self.access.host, self.access.port, keepalive=30)
        except OSError as exc:
            raise _BrokerUnreachable(f"cannot reach the MQTT broker: {exc}") from None
        self.client.loop_start()
        try:
            if not self.ready.wait(self.access.timeout_s) or self.refused or self.lost:
                raise self._failure("connect and subscribe")
            self.client.publish(CONTROL_TOPIC, payload, qos=1)
            if not self.done.wait(self.access.timeout_s) or self.lost:
                raise self._failure("answer")
            return [self.answers[f"{self.tag}-{i}"] for i in range(self.count)]
        finally:
            self.client.disconnect()
            self.client.loop_stop()

    def _failure(self, step: str) -> MqttAccessError:
        if self.refused:
            return MqttAccessError(
                f"the MQTT broker refused the manager's admin credential: {self.refused}"
            )
        if self.lost:
            return _BrokerUnreachable(f"the MQTT broker closed the connection before: {step}")
        return MqttAccessError(f"the MQTT broker did not {step} within {self.access.timeout_s}s")

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if self.done.is_set() or self.refused:
            return
        self.lost = True
        self.ready.set()
        self.done.set()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if getattr(rc, "is_failure", False):
            self.refused = str(rc)
            client.disconnect()
            self.ready.set()
            return
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload).get("responses", [])
        except (ValueError, AttributeError):
            return
        for answer in responses if isinstance(responses, list) else []:
            correlation = answer.get("correlationData") if isinstance(answer, dict) else None
            if isinstance(correlation, str) and correlation.startswith(f"{self.tag}-"):
                self.answers[correlation] = answer
        if len(self.answers) == self.count:
            self.done.set()


def _names(answer: dict[str, Any], key: str) -> list[str]:
    """The names listed in a ``listClients``/``listRoles`` answer."""
    data = answer.get("data")
    names = data.get(key) if isinstance(data, dict) else None
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _check_project(project_id: str) -> None:
    if not _NAME.match(project_id):
        raise ValueError(f"project id {project_id!r} is not [A-Za-z0-9_-]{{1,64}}")
