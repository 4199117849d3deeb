"""Authenticated, per-project MQTT (issue: secure by default, attack 2).

Real Mosquitto with the dynamic-security plugin (``secure_mqtt_broker``), the manager's real
``StatusListener`` and real paho clients: anonymous clients cannot connect, a project's
credential publishes only its own project's, own component's status topics and reads nothing,
nobody but the manager connects with the listener's client id, and a revoked credential stops
working.
"""

import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_testing import admin_access, close, connect, credential_of, publish
from waiting import wait_until

from flops_manager.broker import MosquittoBroker
from flops_manager.mqtt_access import (
    CREDENTIAL_FILE,
    MqttAccess,
    MqttCredential,
    listener_client_id,
)
from flops_manager.mqtt_listener import StatusListener
from flops_utils.contract.messages import StatusMessage
from flops_utils.contract.topics import ParsedTopic
from flops_utils.notifications import CONNECT_TIMEOUT_S, MqttConnectionRefused, StatusNotifier
from flops_utils.types import Component, ComponentStatus

SUCCESS = {"accuracy": 1.0, "model_uri": "models:/forged/1", "run_id": "forged"}


class Listener:
    """The manager's real listener (admin credential, its own client id) with a recording
    handler: ``received`` holds ``(topic, payload)`` of every status message handed over."""

    def __init__(self, broker: MosquittoBroker, home: Path) -> None:
        assert broker.admin is not None
        self.received: list[tuple[ParsedTopic, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.client_id = listener_client_id(home)
        self.listener = StatusListener(
            broker.url,
            self._handle,
            client_id=self.client_id,
            username=broker.admin.username,
            password=broker.admin.password,
        )
        self.listener.start()
        assert self.listener.wait_for_backlog(10), "the listener did not connect"

    def _handle(self, topic: ParsedTopic, payload: dict[str, Any], ack: Any) -> None:
        with self._lock:
            self.received.append((topic, payload))
        ack()

    def of(self, project_id: str) -> list[tuple[ParsedTopic, dict[str, Any]]]:
        with self._lock:
            return [(t, p) for t, p in self.received if t.project_id == project_id]


@pytest.fixture
def listener(secure_mqtt_broker: MosquittoBroker, tmp_path: Path) -> Iterator[Listener]:
    running = Listener(secure_mqtt_broker, tmp_path)
    yield running
    running.listener.stop()


@pytest.fixture
def access(secure_mqtt_broker: MosquittoBroker) -> MqttAccess:
    return admin_access(secure_mqtt_broker)


def new_project() -> str:
    return uuid.uuid4().hex[:12]


def payload(project_id: str, component: Component, status: ComponentStatus) -> bytes:
    """A valid status message (a forged one would be handled like a real one)."""
    data = SUCCESS if status is ComponentStatus.SUCCESS else None
    if status is ComponentStatus.PROGRESS:
        data = {"round": 1}
    return StatusMessage.build(project_id, component, status, data=data).payload()


def topic(project_id: str, component: Component, status: ComponentStatus) -> str:
    return f"flops/{project_id}/{component.value}/{status.value}"


def marker(
    broker: MosquittoBroker, access: MqttAccess, listener: Listener, project_id: str
) -> None:
    """Publish a legitimate learner ``progress`` of ``project_id`` and wait until the listener
    has it: the broker delivers in order, so whatever was accepted before it arrived first."""
    granted = credential_of(access.grant(project_id, "learner-marker", Component.LEARNER))
    client, rc = connect(broker, granted)
    assert not rc.is_failure, rc
    progress = ComponentStatus.PROGRESS
    publish(
        client,
        topic(project_id, Component.LEARNER, progress),
        payload(project_id, Component.LEARNER, progress),
    )
    close(client)
    wait_until(
        lambda: [t for t, _ in listener.of(project_id) if t.status is progress],
        10,
        "the listener did not receive the legitimate marker",
    )


def test_an_anonymous_client_cannot_publish_a_project_success(
    secure_mqtt_broker: MosquittoBroker, access: MqttAccess, listener: Listener
) -> None:
    # Prepare: a project whose state a stranger would like to set.
    project_id = new_project()
    success = ComponentStatus.SUCCESS

    # Execute: an anonymous client connects to publish the aggregator's success.
    client, rc = connect(secure_mqtt_broker, None)
    if not rc.is_failure:  # on an open broker the forgery goes through
        publish(
            client,
            topic(project_id, Component.AGGREGATOR, success),
            payload(project_id, Component.AGGREGATOR, success),
        )
    close(client)
    marker(secure_mqtt_broker, access, listener, project_id)

    # Assert: refused; the listener got the marker and nothing else.
    assert rc.is_failure and "authorized" in str(rc).lower(), rc
    assert [t.status for t, _ in listener.of(project_id)] == [ComponentStatus.PROGRESS]


def test_a_project_credential_publishes_only_its_own_project_and_component(
    secure_mqtt_broker: MosquittoBroker, access: MqttAccess, listener: Listener
) -> None:
    # Prepare: a learner credential of project A; project B is someone else's.
    project_a, project_b = new_project(), new_project()
    learner = credential_of(access.grant(project_a, "learner-node1", Component.LEARNER))
    client, rc = connect(secure_mqtt_broker, learner)
    assert not rc.is_failure, rc
    success, failed = ComponentStatus.SUCCESS, ComponentStatus.FAILED

    # Execute: forge B's aggregator success and failure, and A's own aggregator success.
    publish(
        client,
        topic(project_b, Component.AGGREGATOR, success),
        payload(project_b, Component.AGGREGATOR, success),
    )
    publish(
        client,
        topic(project_b, Component.LEARNER, failed),
        payload(project_b, Component.LEARNER, failed),
    )
    publish(
        client,
        topic(project_a, Component.AGGREGATOR, success),
        payload(project_a, Component.AGGREGATOR, success),
    )
    # ... and its own, allowed, learner status
    publish(
        client,
        topic(project_a, Component.LEARNER, failed),
        payload(project_a, Component.LEARNER, failed),
    )
    close(client)
    marker(secure_mqtt_broker, access, listener, project_b)

    # Assert: only the learner's own status came through.
    assert listener.of(project_b) == [
        (t, p) for t, p in listener.of(project_b) if t.status is ComponentStatus.PROGRESS
    ]
    received_a = wait_until(lambda: listener.of(project_a), 5, "A's own learner status is missing")
    assert [(t.component, t.status) for t, _ in received_a] == [(Component.LEARNER, failed)]


def test_a_project_credential_cannot_read_other_projects_messages(
    secure_mqtt_broker: MosquittoBroker, access: MqttAccess, listener: Listener
) -> None:
    # Prepare: a snooping learner of project A subscribes to everything.
    project_a, project_b = new_project(), new_project()
    snooper = credential_of(access.grant(project_a, "learner-snoop", Component.LEARNER))
    seen: list[str] = []
    granted: list[list[Any]] = []
    subscribed = threading.Event()
    client, rc = connect(secure_mqtt_broker, snooper)
    assert not rc.is_failure, rc
    client.on_message = lambda _c, _u, m: seen.append(m.topic)

    def on_subscribe(_c: Any, _u: Any, _mid: Any, codes: list[Any], _p: Any) -> None:
        granted.append(codes)
        subscribed.set()

    client.on_subscribe = on_subscribe
    client.subscribe([("#", 1), (f"flops/{project_b}/#", 1), (f"flops/{project_a}/#", 1)])
    assert subscribed.wait(10)

    # Execute: project B's aggregator announces its address and metrics.
    aggregator = credential_of(access.grant(project_b, "aggregator", Component.AGGREGATOR))
    publisher, rc = connect(secure_mqtt_broker, aggregator)
    assert not rc.is_failure, rc
    started = ComponentStatus.PROGRESS
    publish(
        publisher,
        topic(project_b, Component.AGGREGATOR, started),
        payload(project_b, Component.AGGREGATOR, started),
    )
    close(publisher)
    wait_until(lambda: listener.of(project_b), 10, "the manager did not receive B's message")
    marker(secure_mqtt_broker, access, listener, project_a)
    close(client)

    # Assert: every subscription refused, nothing delivered to the snooper.
    assert all(code.is_failure for code in granted[0]), granted
    assert seen == []


def test_nobody_else_can_take_the_listeners_client_id(
    secure_mqtt_broker: MosquittoBroker, access: MqttAccess, listener: Listener
) -> None:
    # Prepare: the manager's listener is connected with its persistent session.
    project_id = new_project()
    learner = credential_of(access.grant(project_id, "learner-node1", Component.LEARNER))
    assert secure_mqtt_broker.admin is not None
    wrong = MqttCredential(secure_mqtt_broker.admin.username, "not-the-password")
    assert listener.listener.connects == 1

    # Execute: connect with the listener's client id: anonymously, with a project's
    # credential, with the admin name and a wrong password.
    answers = []
    for credential in (None, learner, wrong):
        client, rc = connect(secure_mqtt_broker, credential, listener.client_id, False)
        answers.append(rc)
        close(client)
    marker(secure_mqtt_broker, access, listener, project_id)

    # Assert: all refused; the listener never lost its connection and still receives.
    assert all(rc.is_failure for rc in answers), answers
    assert listener.listener.connects == 1
    assert listener.listener.refused == ""


def test_a_revoked_or_replaced_credential_stops_working(
    secure_mqtt_broker: MosquittoBroker, access: MqttAccess, listener: Listener
) -> None:
    # Prepare: two services of a project; one credential is replaced by a second grant.
    project_id = new_project()
    first = credential_of(access.grant(project_id, "learner-node1", Component.LEARNER))
    replaced = credential_of(access.grant(project_id, "learner-node1", Component.LEARNER))
    aggregator = credential_of(access.grant(project_id, "aggregator", Component.AGGREGATOR))
    connected, rc = connect(secure_mqtt_broker, aggregator)
    assert not rc.is_failure, rc
    disconnected = threading.Event()
    connected.on_disconnect = lambda *_: disconnected.set()
    old, old_rc = connect(secure_mqtt_broker, first)
    close(old)

    # Execute: the project ends.
    access.revoke(project_id)
    access.revoke(project_id)  # idempotent
    after = [connect(secure_mqtt_broker, c) for c in (replaced, aggregator)]
    for client, _ in after:
        close(client)
    notifier = StatusNotifier(
        secure_mqtt_broker.url,
        project_id,
        Component.AGGREGATOR,
        username=aggregator.username,
        password=aggregator.password,
    )
    began = time.monotonic()
    with pytest.raises(MqttConnectionRefused, match="refused"):
        notifier.notify(ComponentStatus.SUCCESS, "forged", SUCCESS)
    refused_after_s = time.monotonic() - began
    notifier.notify(ComponentStatus.SUCCESS, "forged", SUCCESS)  # logged, not raised again
    notifier.close()
    marker(secure_mqtt_broker, access, listener, new_project())

    # Assert: the old password was refused; after revoke every credential of the project is
    # refused, the connected service was disconnected, and the refusal was quick and clear.
    assert old_rc.is_failure, old_rc
    assert all(rc.is_failure for _, rc in after), [rc for _, rc in after]
    assert disconnected.wait(10), "the revoked service stayed connected"
    close(connected)
    assert refused_after_s < CONNECT_TIMEOUT_S / 2
    assert listener.of(project_id) == []


def test_a_notifier_connects_with_the_credential_in_its_environment(
    secure_mqtt_broker: MosquittoBroker,
    access: MqttAccess,
    listener: Listener,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the env vars the manager gives an aggregator.
    project_id = new_project()
    for name, value in access.grant(project_id, "aggregator", Component.AGGREGATOR).items():
        monkeypatch.setenv(name, value)

    # Execute
    notifier = StatusNotifier(secure_mqtt_broker.url, project_id, Component.AGGREGATOR)
    notifier.notify(ComponentStatus.SUCCESS, "done", SUCCESS)
    notifier.close()

    # Assert
    received = wait_until(lambda: listener.of(project_id), 10, "no success received")
    assert [(t.component, t.status) for t, _ in received] == [
        (Component.AGGREGATOR, ComponentStatus.SUCCESS)
    ]


def test_the_admin_credential_is_private_and_survives_a_broker_restart(
    tmp_path: Path,
) -> None:
    # Prepare: a broker issues a credential, then stops.
    workdir = tmp_path / "mosquitto"
    with MosquittoBroker(workdir) as broker:
        assert broker.admin is not None
        admin, port = broker.admin, broker.port
        env = admin_access(broker).grant("p1", "learner-node1", Component.LEARNER)
        cmdline = Path(f"/proc/{broker.pid}/cmdline").read_bytes().decode(errors="replace")

    # Execute: a new broker on the same workdir and port.
    with MosquittoBroker(workdir, port=port) as again:
        client, rc = connect(again, credential_of(env))
        close(client)

        # Assert: same admin credential, the issued credential still works, and the secrets
        # are in owner-only files, never on the command line.
        assert again.admin == admin
        assert not rc.is_failure, rc
    assert admin.password not in cmdline
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
    private = (CREDENTIAL_FILE, "dynamic-security.json", "mosquitto.db", "mosquitto.conf")
    for name in (*private, "mosquitto.log"):
        mode = stat.S_IMODE((workdir / name).stat().st_mode)
        assert mode & 0o077 == 0, f"{name} is {oct(mode)}"
    assert admin.password not in (workdir / "dynamic-security.json").read_text()
    assert os.environ.get("FLOPS_MQTT_PASSWORD") is None


def test_an_anonymous_broker_still_accepts_anyone(tmp_path: Path) -> None:
    # Prepare: FLOPS_INSECURE=mqtt (the session's mqtt_broker fixture runs this way too).
    with MosquittoBroker(tmp_path / "open", anonymous=True) as broker:
        client, rc = connect(broker, None)
        received: list[str] = []
        subscribed = threading.Event()
        client.on_message = lambda _c, _u, m: received.append(m.topic)
        client.on_subscribe = lambda *_: subscribed.set()
        client.subscribe("flops/#", qos=1)
        assert subscribed.wait(10)

        # Execute
        publish(client, "flops/p1/learner/started", b"{}")
        topics = wait_until(lambda: received, 10, "nothing received")
        close(client)

    # Assert
    assert not rc.is_failure, rc
    assert topics == ["flops/p1/learner/started"]
