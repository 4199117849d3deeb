"""Publishing component status messages over MQTT (QoS 1, JSON payloads).

A runtime role creates one :class:`StatusNotifier` and calls :meth:`StatusNotifier.notify`;
the payload is a :class:`~flops_utils.contract.messages.StatusMessage` (``{"v", "project_id",
"component", "status", "instance", "message", "data", "timestamp"}``, ``timestamp`` in
seconds since the epoch) whose ``data`` is checked against its model.

On a broker with authentication the notifier connects with the credential the manager issued
to the service (``FLOPS_MQTT_USERNAME``/``FLOPS_MQTT_PASSWORD``), and with its user name as
client id (the broker binds the credential to that id).
"""

import os
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from flops_utils import env_vars
from flops_utils.contract.messages import MessageData, StatusMessage
from flops_utils.contract.topics import status_topic
from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.types import Component, ComponentStatus

PUBLISH_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0

REFUSED_CREDENTIALS = frozenset({134, 135})
"""CONNACK reason codes that another attempt cannot change: bad user name or password, not
authorized (MQTT 5 numbering; paho maps the MQTT 3.1.1 return codes 4 and 5 to them)."""


class MqttConnectionRefused(FlopsError):
    """The broker refused the service's MQTT credential (missing, wrong or revoked)."""

    code = "mqtt_connection_refused"


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """Return ``(host, port)`` of ``mqtt://HOST:PORT`` (port defaults to 1883).

    Raises ``ValueError`` for another scheme or a missing host.
    """
    parsed = urlparse(url)
    if parsed.scheme != "mqtt" or not parsed.hostname:
        raise ValueError(f"MQTT URL {url!r} is not of the form mqtt://HOST:PORT")
    return parsed.hostname, parsed.port or 1883


class StatusNotifier:
    """A persistent MQTT client that publishes one component's status messages.

    Args:
        mqtt_url: ``mqtt://HOST:PORT`` of the broker.
        project_id: the project the component belongs to.
        component: which component this is.
        instance: a name for this instance (e.g. ``learner-node1``); defaults to the component.
        username / password: the MQTT credential; default ``FLOPS_MQTT_USERNAME`` /
            ``FLOPS_MQTT_PASSWORD`` from the environment; no user name: anonymous.

    The client reconnects by itself (paho's loop thread). The first ``notify`` waits up to
    ``CONNECT_TIMEOUT_S`` seconds for the first connection (so that a process failing right
    after its start does not lose its ``failed`` message), and every ``notify`` waits for the
    broker's PUBACK for at most ``PUBLISH_TIMEOUT_S`` seconds. Both log, never raise, when they
    time out: the orchestrator's process watch is the fallback for a lost message. A broker
    that refuses the credential is different: the client stops trying, and the next ``notify``
    raises :class:`MqttConnectionRefused` at once (later ones log it and return).
    """

    def __init__(
        self,
        mqtt_url: str,
        project_id: str,
        component: Component,
        instance: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.project_id = project_id
        self.component = component
        self.instance = instance or component.value
        host, port = parse_mqtt_url(mqtt_url)
        if username is None:
            username = os.environ.get(env_vars.MQTT_USERNAME) or None
            password = os.environ.get(env_vars.MQTT_PASSWORD) if username else None
        self.refused = ""
        self._refusal_raised = False
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=username or f"{self.instance}-{uuid.uuid4().hex[:8]}",
        )
        if username:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        self._client.connect_async(host, port, keepalive=30)
        self._client.loop_start()
        self._waited_for_connection = False

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if getattr(rc, "value", 0) in REFUSED_CREDENTIALS:
            self.refused = str(rc)
            client.disconnect()  # retrying with the same credential cannot succeed

    def _wait_for_first_connection(self) -> None:
        if not self._waited_for_connection:
            self._waited_for_connection = True
            deadline = time.monotonic() + CONNECT_TIMEOUT_S
            while (
                not self._client.is_connected() and not self.refused and time.monotonic() < deadline
            ):
                time.sleep(0.02)
            if not self._client.is_connected() and not self.refused:
                logger.warning(
                    "MQTT broker not reachable after %ss; publishing anyway", CONNECT_TIMEOUT_S
                )
        self._raise_refusal()

    def _raise_refusal(self) -> None:
        """Raise :class:`MqttConnectionRefused` the first time the broker refused the
        credential; log it afterwards."""
        if not self.refused:
            return
        message = (
            f"the MQTT broker refused the connection of {self.instance} of project "
            f"{self.project_id}: {self.refused} (check {env_vars.MQTT_USERNAME} and "
            f"{env_vars.MQTT_PASSWORD}; the manager revokes them when the project ends)"
        )
        if self._refusal_raised:
            logger.error("not published: %s", message)
            return
        self._refusal_raised = True
        raise MqttConnectionRefused(message)

    def notify(
        self,
        status: ComponentStatus,
        message: str = "",
        data: MessageData | dict[str, Any] | None = None,
    ) -> None:
        """Publish ``status`` with a human-readable ``message`` and ``data`` (its model of
        :mod:`flops_utils.contract.messages`, or a dict validated against that model).

        Raises ``ValueError`` when ``data`` does not fit its model (a bug of the caller) and
        ``MqttConnectionRefused`` when the broker refused the credential (once; later calls
        log it and return without publishing).
        """
        payload = StatusMessage.build(
            self.project_id,
            self.component,
            status,
            instance=self.instance,
            message=message,
            data=data,
        ).payload()
        topic = status_topic(self.project_id, self.component, status)
        self._wait_for_first_connection()
        if self.refused:
            return
        info = self._client.publish(topic, payload, qos=1)
        try:
            info.wait_for_publish(timeout=PUBLISH_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:
            logger.warning("could not publish %s: %s", topic, exc)
            return
        if not info.is_published():
            logger.warning("broker did not acknowledge %s within %ss", topic, PUBLISH_TIMEOUT_S)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()


def notify_once(
    mqtt_url: str,
    project_id: str,
    component: Component,
    status: ComponentStatus,
    message: str,
    data: MessageData | dict[str, Any] | None = None,
    instance: str | None = None,
) -> None:
    """Publish a single status message with a short-lived :class:`StatusNotifier`.

    For a process that fails before it has a notifier of its own (e.g. a configuration error).
    Raises ``ValueError`` for a malformed ``mqtt_url``; a refused credential is logged.
    """
    notifier = StatusNotifier(mqtt_url, project_id, component, instance)
    try:
        notifier.notify(status, message, data)
    except MqttConnectionRefused as exc:
        logger.error("not published: %s", exc.message)
    finally:
        notifier.close()
