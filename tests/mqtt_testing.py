"""MQTT helpers for tests: a real subscriber recording one project's status messages, and a
real publisher with a credential of its own.

A broker of the fixtures may require authentication (``MosquittoBroker(anonymous=False)``):
:class:`MqttRecorder` then subscribes with the broker's admin credential, and a test that
publishes grants itself a credential with ``flops_manager.mqtt_access.MqttAccess``."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any, TypedDict

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_until

from flops_manager.broker import MosquittoBroker
from flops_manager.mqtt_access import MqttAccess, MqttCredential


def admin_access(broker: MosquittoBroker) -> MqttAccess:
    """:class:`MqttAccess` with the admin credential of ``broker`` (started, with the plugin)."""
    assert broker.admin is not None, "the broker has no admin credential"
    return MqttAccess(broker.url, broker.admin.username, broker.admin.password)


def credential_of(env: dict[str, str]) -> MqttCredential:
    """The credential in the env vars :meth:`MqttAccess.grant` returned."""
    return MqttCredential(env["FLOPS_MQTT_USERNAME"], env["FLOPS_MQTT_PASSWORD"])


def connect(
    broker: MosquittoBroker,
    credential: MqttCredential | None,
    client_id: str | None = None,
    clean_session: bool = True,
) -> tuple[mqtt.Client, Any]:
    """Connect a paho client to ``broker`` with ``credential`` (``None``: anonymous) and
    ``client_id`` (default: the user name, else a random one); returns the running client and
    the broker's CONNACK reason code (``.is_failure`` when refused). ``AssertionError`` when no
    CONNACK comes within 10 s."""
    answered = threading.Event()
    codes: list[Any] = []

    def on_connect(client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        codes.append(rc)
        if rc.is_failure:
            client.disconnect()
        answered.set()

    if client_id is None:
        client_id = credential.username if credential else f"test-{uuid.uuid4().hex[:8]}"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session
    )
    if credential is not None:
        client.username_pw_set(credential.username, credential.password)
    client.on_connect = on_connect
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert answered.wait(10), "no CONNACK from the broker"
    return client, codes[0]


def publish(client: mqtt.Client, topic: str, payload: bytes | str) -> None:
    """Publish ``payload`` with QoS 1 and wait for the broker's PUBACK (Mosquitto acknowledges
    a publish it drops for lack of rights too)."""
    info = client.publish(topic, payload, qos=1)
    info.wait_for_publish(timeout=10)
    assert info.is_published(), f"no PUBACK for {topic}"


def close(client: mqtt.Client) -> None:
    """Disconnect and stop ``client``'s network thread."""
    client.disconnect()
    client.loop_stop()


class MqttRecorder:
    """Records every message under ``flops/<project_id>/#`` (a real paho subscriber, with the
    broker's admin credential when it has one).

    ``messages``: ``[(topic, payload dict)]`` in arrival order. The constructor returns once
    the subscription is acknowledged (``AssertionError`` after 10 s).
    """

    def __init__(self, broker: MosquittoBroker, project_id: str) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2)
        if broker.admin is not None:
            self._client.username_pw_set(broker.admin.username, broker.admin.password)
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


class ManagerMqtt(TypedDict):
    """The ``ManagerConfig`` fields of an external broker."""

    mqtt_url: str
    mqtt_admin_username: str
    mqtt_admin_password: str


def manager_mqtt(broker: MosquittoBroker) -> ManagerMqtt:
    """``ManagerConfig`` fields for a manager using ``broker`` (an external broker to it):
    its URL and admin credential, so that the manager issues per-project credentials."""
    assert broker.admin is not None, "the broker has no admin credential"
    return ManagerMqtt(
        mqtt_url=broker.url,
        mqtt_admin_username=broker.admin.username,
        mqtt_admin_password=broker.admin.password,
    )
