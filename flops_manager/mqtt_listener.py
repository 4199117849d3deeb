"""The manager's MQTT subscriber: every component status message goes to the project lifecycle.

One persistent paho client (a client id stable across restarts, ``clean_session=False``, QoS 1;
the manager's admin credential on a broker with authentication, see
``flops_manager.mqtt_access``) subscribed to ``flops/+/+/+``; paho's network thread reconnects
by itself and the subscription is renewed on every (re)connect. Because the session is
persistent, the broker queues the QoS 1 status messages published while the manager is down and
delivers them when it connects again;
:meth:`StatusListener.wait_for_backlog` tells when those have been received.

Acknowledgements are manual: a valid message is acknowledged only when the handler calls the
``ack`` it was given, i.e. after the lifecycle persisted its effect. A message that is not
acknowledged (the manager stopped first) is delivered again after the next connect. A message
that is not a valid status message is logged and acknowledged at once.
"""

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from flops_utils.contract.messages import parse_status_message
from flops_utils.contract.topics import ALL_STATUS_TOPICS, ParsedTopic
from flops_utils.logging import logger
from flops_utils.net import wait_for_port
from flops_utils.notifications import parse_mqtt_url

Ack = Callable[[], None]
"""Acknowledges one message to the broker; safe to call from any thread, once."""

StatusHandler = Callable[[ParsedTopic, dict[str, Any], Ack], None]
"""Called with the parsed topic, the validated payload (``instance``, ``message``, ``data``
…) and the ``ack`` to call once the message's effect is persisted."""

CONNECT_TIMEOUT_S = 10.0

SYNC_TOPIC_PREFIX = "flops-manager/sync"
"""The listener publishes a marker to ``<prefix>/<client_id>`` after each (re)connect; it is
not a status topic (those start with ``flops/``)."""


class StatusListener:
    """Subscribes to all FLOps status topics and hands each message to ``handler``.

    Args:
        mqtt_url: ``mqtt://HOST:PORT`` of the broker.
        handler: see :data:`StatusHandler`; an exception it raises is logged and the message
            acknowledged (a message that cannot be handled must not come back forever).
        client_id: MQTT client id; keep it stable so the broker queues messages across
            reconnects (the manager uses ``mqtt_access.listener_client_id(home)``).
        username / password: the credential to connect with (``None``: anonymous); it needs
            to subscribe ``flops/+/+/+`` and to publish and subscribe its sync topic.

    ``connects`` counts the successful (re)connections; ``refused`` is the broker's last
    refusal (e.g. ``Not authorized``), logged as an error once per reason. ``connected`` is
    whether the listener is connected now; ``last_connected_at`` the ``time.monotonic()`` of
    its latest successful (re)connection (``None`` before the first) and ``disconnected_since``
    that of the loss of the current disconnection (``None`` while connected or before the first
    connection). After a broker restart paho reconnects by itself (every 1 to 5 s) and the
    subscriptions are renewed, so the status messages queued for the session arrive then.
    """

    def __init__(
        self,
        mqtt_url: str,
        handler: StatusHandler,
        client_id: str = "flops-manager",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.handler = handler
        self.connects = 0
        self.refused = ""
        self.connected = False
        self.last_connected_at: float | None = None
        self.disconnected_since: float | None = None
        self._stopping = False
        self._host, self._port = parse_mqtt_url(mqtt_url)
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            manual_ack=True,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        self._sync_topic = f"{SYNC_TOPIC_PREFIX}/{client_id}"
        self._sync_token = uuid.uuid4().hex
        self._synced = threading.Event()

    def start(self) -> None:
        """Connect (asynchronously, retried in the background) and start the network thread.

        Waits up to ``CONNECT_TIMEOUT_S`` seconds for the broker's port, logging when it is not
        reachable yet; paho keeps retrying.
        """
        if not wait_for_port(self._host, self._port, CONNECT_TIMEOUT_S):
            logger.warning("MQTT broker %s:%d not reachable yet", self._host, self._port)
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def wait_for_backlog(self, timeout_s: float) -> bool:
        """Wait until the messages the broker had queued for this client (published while it
        was away) have all been handed to ``handler``; ``False`` after ``timeout_s`` seconds.

        How: after subscribing, the listener publishes a marker with a token of its own to a
        topic only it subscribes to. The broker delivers a client's messages in order, so when
        the marker comes back, everything queued before it has been handed over (the
        lifecycle's ``finish_recovery`` then waits until those are applied).
        """
        return self._synced.wait(timeout_s)

    def stop(self) -> None:
        """Disconnect and stop the network thread; messages not acknowledged yet come again
        to the next client with the same id."""
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if getattr(rc, "is_failure", False):
            if str(rc) != self.refused:
                logger.error("the MQTT broker refused the manager's connection: %s", rc)
            self.refused = str(rc)
            return
        self.connects += 1
        self.refused = ""
        now = time.monotonic()
        if self.disconnected_since is not None:
            logger.info(
                "the manager reconnected to the MQTT broker after %.1f s",
                now - self.disconnected_since,
            )
        self.connected = True
        self.last_connected_at = now
        self.disconnected_since = None
        client.subscribe([(ALL_STATUS_TOPICS, 1), (self._sync_topic, 1)])
        client.publish(self._sync_topic, self._sync_token, qos=1)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        was_connected, self.connected = self.connected, False
        if was_connected:
            self.disconnected_since = time.monotonic()
            if not self._stopping:
                logger.warning("the manager lost the MQTT broker (%s); reconnecting", rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        ack = self._acker(message)
        if message.topic == self._sync_topic:
            if message.payload.decode(errors="replace") == self._sync_token:
                self._synced.set()
            ack()
            return
        try:
            status = parse_status_message(message.topic, bytes(message.payload))
        except ValueError as exc:
            logger.warning("ignoring malformed status message on %s: %s", message.topic, exc)
            ack()
            return
        topic = ParsedTopic(status.project_id, status.component, status.status)
        try:
            self.handler(topic, status.model_dump(mode="json"), ack)
        except Exception:
            logger.exception("handling %s failed", message.topic)
            ack()

    def _acker(self, message: mqtt.MQTTMessage) -> Ack:
        """Acknowledges ``message`` once (QoS 0 messages need none)."""
        done = threading.Event()

        def ack() -> None:
            if message.qos == 0 or done.is_set():
                return
            done.set()
            self._client.ack(message.mid, message.qos)

        return ack
