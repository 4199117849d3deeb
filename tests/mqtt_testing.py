"""A real MQTT subscriber for tests: records the status messages of one project."""

from __future__ import annotations

import json
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_until

from flops_manager.broker import MosquittoBroker


class MqttRecorder:
    """Records every message under ``flops/<project_id>/#`` (a real paho subscriber).

    ``messages``: ``[(topic, payload dict)]`` in arrival order. The constructor returns once
    the subscription is acknowledged (``AssertionError`` after 10 s).
    """

    def __init__(self, broker: MosquittoBroker, project_id: str) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.on_connect = lambda c, *_: c.subscribe(f"flops/{project_id}/#", qos=1)
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        assert subscribed.wait(10), "could not subscribe to the broker"

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, json.loads(message.payload)))

    def find(self, suffix: str) -> list[dict[str, Any]]:
        """Payloads of the messages whose topic ends with ``suffix`` (e.g. ``learner/failed``),
        in arrival order."""
        with self._lock:
            return [payload for topic, payload in self.messages if topic.endswith(suffix)]

    def wait_for(self, suffix: str, timeout_s: float = 10) -> list[dict[str, Any]]:
        """:meth:`find` once it finds something; ``AssertionError`` after ``timeout_s``."""
        return wait_until(
            lambda: self.find(suffix),
            timeout_s,
            lambda: f"no {suffix} message; got {self.topics()}",
        )

    def topics(self) -> list[str]:
        """The topics received so far, in arrival order."""
        with self._lock:
            return [topic for topic, _ in self.messages]

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()
