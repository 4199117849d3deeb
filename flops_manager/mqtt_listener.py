"""The manager's MQTT subscriber: every component status message goes to the project lifecycle.

One persistent paho client (fixed client id, ``clean_session=False``, QoS 1) subscribed to
``flops/+/+/+``; paho's network thread reconnects by itself and the subscription is renewed on
every (re)connect.
"""

import json
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

    def start(self) -> None:
        """Connect (asynchronously, retried in the background) and start the network thread.

        Waits up to ``CONNECT_TIMEOUT_S`` seconds for the broker's port, logging when it is not
        reachable yet; paho keeps retrying.
        """
        if not wait_for_port(self._host, self._port, CONNECT_TIMEOUT_S):
            logger.warning("MQTT broker %s:%d not reachable yet", self._host, self._port)
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        client.subscribe(ALL_STATUS_TOPICS, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
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
