"""The manager's MQTT subscriber: every component status message goes to the project lifecycle.

One persistent paho client (fixed client id, ``clean_session=False``, QoS 1) subscribed to
``flops/+/+/+``; paho's network thread reconnects by itself and the subscription is renewed on
every (re)connect. Because the session is persistent, the broker queues the QoS 1 status
messages published while the manager is down and delivers them when it connects again;
:meth:`StatusListener.wait_for_backlog` tells when those have been handled.
"""

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from flops_utils.logging import logger
from flops_utils.mqtt_topics import ALL_STATUS_TOPICS, ParsedTopic, parse_status_topic
from flops_utils.net import wait_for_port
from flops_utils.notifications import parse_mqtt_url

StatusHandler = Callable[[ParsedTopic, dict[str, Any]], None]
"""Called with the parsed topic and the decoded JSON payload of one status message."""

CONNECT_TIMEOUT_S = 10.0

SYNC_TOPIC_PREFIX = "flops-manager/sync"
"""The listener publishes a marker to ``<prefix>/<client_id>`` after each (re)connect; it is
not a status topic (those start with ``flops/``)."""


class StatusListener:
    """Subscribes to all FLOps status topics and hands each message to ``handler``.

    Args:
        mqtt_url: ``mqtt://HOST:PORT`` of the broker.
        handler: see :data:`StatusHandler`; exceptions it raises are logged, never fatal.
        client_id: MQTT client id; keep it stable so the broker queues messages across
            reconnects.
    """

    def __init__(
        self, mqtt_url: str, handler: StatusHandler, client_id: str = "flops-manager"
    ) -> None:
        self.handler = handler
        self._host, self._port = parse_mqtt_url(mqtt_url)
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
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
        the marker comes back, everything queued before it has been received, and ``handler``
        runs in the receiving thread, so it has been handled too.
        """
        return self._synced.wait(timeout_s)

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if getattr(rc, "is_failure", False):
            return
        client.subscribe([(ALL_STATUS_TOPICS, 1), (self._sync_topic, 1)])
        client.publish(self._sync_topic, self._sync_token, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self._sync_topic:
            if message.payload.decode(errors="replace") == self._sync_token:
                self._synced.set()
            return
        topic = parse_status_topic(message.topic)
        if topic is None:
            return
        try:
            payload = json.loads(message.payload or b"{}")
            if not isinstance(payload, dict):
                raise ValueError("payload is not a JSON object")
        except ValueError as exc:
            logger.warning("ignoring malformed status message on %s: %s", message.topic, exc)
            return
        try:
            self.handler(topic, payload)
        except Exception:
            logger.exception("handling %s failed", message.topic)
