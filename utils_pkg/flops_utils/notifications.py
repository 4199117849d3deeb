"""Publishing component status messages over MQTT (QoS 1, JSON payloads).

A runtime role creates one :class:`StatusNotifier` and calls :meth:`StatusNotifier.notify`;
the payload is a :class:`~flops_utils.contract.messages.StatusMessage` (``{"v", "project_id",
"component", "status", "instance", "message", "data", "timestamp"}``, ``timestamp`` in
seconds since the epoch) whose ``data`` is checked against its model.

On a broker with authentication the notifier connects with the credential the manager issued
to the service (``FLOPS_MQTT_USERNAME``/``FLOPS_MQTT_PASSWORD``), and with its user name as
client id (the broker binds the credential to that id).

Broker outages: paho keeps every QoS 1 message the broker has not acknowledged (published
while disconnected, or sent but not yet acknowledged) and sends it again after it reconnects
(``Client._messages_reconnect_reset_out`` and the resend in ``_handle_connack``, paho 2.2); the
notifier keeps the same client id across reconnects, so a broker with authentication still
accepts it. While the broker is down, :meth:`StatusNotifier.notify` queues and returns at
once (logging ``broker unreachable; messages queued`` once per outage); a final message
(``success``/``failed``) and :meth:`StatusNotifier.close` wait until every queued message is
acknowledged, for at most ``FLOPS_MQTT_DRAIN_TIMEOUT_S`` seconds (default
:data:`DEFAULT_DRAIN_TIMEOUT_S`: long enough for the manager to restart its embedded broker),
and log what was lost then.
"""

import os
import threading
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
"""Seconds :meth:`StatusNotifier.notify` waits for the broker's PUBACK while connected."""
CONNECT_TIMEOUT_S = 10.0
"""Seconds the first :meth:`StatusNotifier.notify` waits for the first connection."""

DRAIN_TIMEOUT_ENV = env_vars.MQTT_DRAIN_TIMEOUT_S
"""Environment variable: seconds a final message and :meth:`StatusNotifier.close` wait for
the queued messages to be acknowledged."""
DEFAULT_DRAIN_TIMEOUT_S = 60.0
"""Default of ``FLOPS_MQTT_DRAIN_TIMEOUT_S``: the manager notices a dead embedded broker and
restarts it on its port within seconds; a minute leaves room for a slow restart."""

_POLL_S = 0.05
"""Slice of the waits for a PUBACK, so that a wait notices a lost connection."""

_FINAL_STATUSES = frozenset({ComponentStatus.SUCCESS, ComponentStatus.FAILED})

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


def read_drain_timeout_s(env: dict[str, str] | None = None) -> float:
    """``FLOPS_MQTT_DRAIN_TIMEOUT_S`` from ``env`` (default ``os.environ``), else
    :data:`DEFAULT_DRAIN_TIMEOUT_S`; an unreadable or negative value is logged and ignored."""
    raw = (os.environ if env is None else env).get(DRAIN_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_DRAIN_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        logger.warning(
            "%s=%r is not a number of seconds >= 0; using %gs",
            DRAIN_TIMEOUT_ENV,
            raw,
            DEFAULT_DRAIN_TIMEOUT_S,
        )
        return DEFAULT_DRAIN_TIMEOUT_S
    return value


class StatusNotifier:
    """A persistent MQTT client that publishes one component's status messages.

    Args:
        mqtt_url: ``mqtt://HOST:PORT`` of the broker.
        project_id: the project the component belongs to.
        component: which component this is.
        instance: a name for this instance (e.g. ``learner-node1``); defaults to the component.
        username / password: the MQTT credential; default ``FLOPS_MQTT_USERNAME`` /
            ``FLOPS_MQTT_PASSWORD`` from the environment; no user name: anonymous.
        drain_timeout_s: seconds a final message and :meth:`close` wait for the queued
            messages to be acknowledged; default ``FLOPS_MQTT_DRAIN_TIMEOUT_S``
            (:func:`read_drain_timeout_s`).

    The client reconnects by itself (paho's loop thread, every 1 to 5 s). The first ``notify``
    waits up to ``CONNECT_TIMEOUT_S`` seconds for the first connection (so that a process
    failing right after its start does not lose its ``failed`` message). While connected,
    ``notify`` waits for the broker's PUBACK for at most ``PUBLISH_TIMEOUT_S`` seconds (less
    when the connection breaks meanwhile); while disconnected it queues the message and
    returns at once. A ``success`` or ``failed`` message, and :meth:`close`, wait for every
    queued message (:meth:`drain`). None of these raise when the broker is away: the
    orchestrator's process watch is the fallback for a lost message. A broker that refuses the
    credential is different: the client stops trying, and the next ``notify`` raises
    :class:`MqttConnectionRefused` at once (later ones log it and return).
    """

    def __init__(
        self,
        mqtt_url: str,
        project_id: str,
        component: Component,
        instance: str | None = None,
        username: str | None = None,
        password: str | None = None,
        drain_timeout_s: float | None = None,
    ) -> None:
        self.project_id = project_id
        self.component = component
        self.instance = instance or component.value
        self.drain_timeout_s = (
            read_drain_timeout_s() if drain_timeout_s is None else drain_timeout_s
        )
        host, port = parse_mqtt_url(mqtt_url)
        if username is None:
            username = os.environ.get(env_vars.MQTT_USERNAME) or None
            password = os.environ.get(env_vars.MQTT_PASSWORD) if username else None
        self.refused = ""
        self._refusal_raised = False
        self._lock = threading.Lock()
        self._queued: list[tuple[str, mqtt.MQTTMessageInfo]] = []
        self._outage_logged = False
        # One client id for the notifier's life: the broker binds a credential to it, and
        # paho resends the unacknowledged messages under it after a reconnect.
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
            return
        if self._outage_logged:
            logger.info("MQTT broker reachable again; sending the queued messages")
        self._outage_logged = False

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

        Returns once the broker acknowledged it, or at once while the broker is unreachable
        (the message stays queued); a ``success``/``failed`` message waits for every queued
        message as :meth:`drain` does. Raises ``ValueError`` when ``data`` does not fit its
        model (a bug of the caller) and ``MqttConnectionRefused`` when the broker refused the
        credential (once; later calls log it and return without publishing).
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
        info = self._publish(topic, payload)
        if info is None:
            return
        if status in _FINAL_STATUSES:
            self.drain()
        elif self._client.is_connected():
            if not self._await(info, time.monotonic() + PUBLISH_TIMEOUT_S, while_connected=True):
                logger.warning("broker did not acknowledge %s yet; it stays queued", topic)
        else:
            self._log_outage()

    def _publish(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo | None:
        """Hand the message to paho and remember it until acknowledged; ``None`` when paho
        refused it (a full queue)."""
        info = self._client.publish(topic, payload, qos=1)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            # paho keeps the message and sends it after reconnecting, but marks its info
            # failed, which would make wait_for_publish raise at once; it is queued.
            info.rc = mqtt.MQTT_ERR_SUCCESS
        elif info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            logger.warning("could not publish %s: %s", topic, mqtt.error_string(info.rc))
            return None
        with self._lock:
            self._queued = [(t, i) for t, i in self._queued if not i.is_published()]
            self._queued.append((topic, info))
        return info

    def _log_outage(self) -> None:
        if not self._outage_logged:
            self._outage_logged = True
            logger.warning("MQTT broker unreachable; messages queued")

    def _await(
        self, info: mqtt.MQTTMessageInfo, deadline: float, while_connected: bool = False
    ) -> bool:
        """Wait until ``info`` is acknowledged or ``deadline`` (monotonic) passes; with
        ``while_connected``, also stop once the connection is lost. Returns whether it was
        acknowledged."""
        while not info.is_published() and time.monotonic() < deadline and not self.refused:
            if while_connected and not self._client.is_connected():
                self._log_outage()
                return False
            info.wait_for_publish(timeout=min(_POLL_S, max(deadline - time.monotonic(), 0.0)))
        return info.is_published()

    def pending(self) -> list[str]:
        """The topics of the messages not acknowledged yet, oldest first."""
        with self._lock:
            return [topic for topic, info in self._queued if not info.is_published()]

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until the broker acknowledged every queued message, for at most
        ``timeout_s`` seconds (default: ``drain_timeout_s``).

        Returns whether all were acknowledged; otherwise logs the topics of those lost and
        forgets them (a later :meth:`drain` does not wait for them again; paho still sends
        them if the broker comes back before the process ends).
        """
        deadline = time.monotonic() + (self.drain_timeout_s if timeout_s is None else timeout_s)
        with self._lock:
            queued = list(self._queued)
        if any(not info.is_published() for _, info in queued) and not self._client.is_connected():
            logger.warning(
                "MQTT broker unreachable; waiting up to %.0fs for it to take %d queued message(s)",
                max(deadline - time.monotonic(), 0.0),
                len(self.pending()),
            )
        for _, info in queued:
            self._await(info, deadline)
        lost = [topic for topic, info in queued if not info.is_published()]
        waited = {id(info) for _, info in queued}
        with self._lock:
            self._queued = [(t, i) for t, i in self._queued if id(i) not in waited]
        if lost:
            logger.error(
                "%d status message(s) lost: the MQTT broker did not acknowledge them within "
                "%.0fs: %s",
                len(lost),
                self.drain_timeout_s if timeout_s is None else timeout_s,
                ", ".join(lost),
            )
        return not lost

    def close(self) -> None:
        """Wait for the queued messages (:meth:`drain`), then disconnect and stop the
        network thread."""
        if not self.refused:
            self.drain()
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
