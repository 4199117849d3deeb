"""The status notifier across a broker outage (issue: survive faults): messages published
while a real Mosquitto is down (SIGKILL) are queued without blocking and delivered once a
broker runs again on the same port and workdir; a broker that never returns costs at most the
drain timeout."""

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_testing import admin_access, close, connect, credential_of
from waiting import wait_until

from flops_manager.broker import MosquittoBroker
from flops_utils.notifications import DRAIN_TIMEOUT_ENV, StatusNotifier
from flops_utils.types import Component, ComponentStatus

QUICK_S = 1.0
"""How long a ``notify`` may take while the broker is down (it must not wait for a PUBACK)."""


class _Subscriber:
    """A persistent-session subscriber (as the manager's listener): the broker keeps its
    subscription and queues its QoS 1 messages across its own restart."""

    def __init__(self, broker: MosquittoBroker, project_id: str) -> None:
        self.payloads: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client, code = connect(
            broker, broker.admin, client_id=f"listener-{project_id}", clean_session=False
        )
        assert not code.is_failure, code
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.subscribe(f"flops/{project_id}/#", qos=1)
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.payloads.append(json.loads(message.payload))

    def messages(self) -> list[str]:
        """The ``message`` texts received so far (a QoS 1 resend may repeat one)."""
        with self._lock:
            return [payload["message"] for payload in self.payloads]


def _persisted(workdir: Path, since: float) -> bool:
    """Whether Mosquitto saved its state (the subscription) after ``since`` (epoch s)."""
    database = workdir / "mosquitto.db"
    return database.exists() and database.stat().st_mtime > since


def _kill(broker: MosquittoBroker) -> None:
    assert broker.pid is not None
    os.killpg(broker.pid, signal.SIGKILL)
    broker.stop()  # reaps it


def _timed_notify(notifier: StatusNotifier, text: str) -> float:
    began = time.monotonic()
    notifier.notify(ComponentStatus.PROGRESS, text)
    return time.monotonic() - began


@pytest.mark.parametrize("anonymous", [True, False], ids=["anonymous", "credential"])
def test_messages_queued_during_an_outage_arrive_after_the_restart(
    tmp_path: Path, project_id: str, caplog: pytest.LogCaptureFixture, anonymous: bool
) -> None:
    # Prepare: with authentication, the notifier has a credential the manager would grant
    # (bound to its client id); the broker keeps it across its restart.
    workdir = tmp_path / "mosquitto"
    broker = MosquittoBroker(workdir, anonymous=anonymous).start()
    restarted: MosquittoBroker | None = None
    subscriber = _Subscriber(broker, project_id)
    username = password = None
    if not anonymous:
        granted = admin_access(broker).grant(project_id, "learner-node-1", Component.LEARNER)
        credential = credential_of(granted)
        username, password = credential.username, credential.password
    notifier = StatusNotifier(
        broker.url, project_id, Component.LEARNER, "node-1", username, password
    )
    try:
        subscribed_at = time.time()
        notifier.notify(ComponentStatus.STARTED, "before the outage")
        wait_until(lambda: "before the outage" in subscriber.messages(), 10, "first message")
        wait_until(lambda: _persisted(workdir, subscribed_at), 15, "Mosquitto's autosave")

        _kill(broker)
        caplog.set_level(logging.WARNING, logger="flops")
        texts = [f"during the outage {n}" for n in range(3)]
        durations = [_timed_notify(notifier, text) for text in texts]
        assert max(durations) < QUICK_S + 2, durations  # the first may race the disconnect
        assert sorted(durations)[1] < QUICK_S, durations
        assert notifier.pending() == [f"flops/{project_id}/learner/progress"] * 3
        outage_logs = [r for r in caplog.records if "messages queued" in r.getMessage()]
        assert len(outage_logs) == 1, [r.getMessage() for r in caplog.records]

        restarted = MosquittoBroker(workdir, port=broker.port, anonymous=anonymous).start()
        notifier.close()
        assert notifier.pending() == []
        wait_until(
            lambda: set(texts) <= set(subscriber.messages()), 20, lambda: str(subscriber.messages())
        )
    finally:
        notifier.close()
        close(subscriber.client)
        if restarted is not None:
            restarted.stop()
        broker.stop()


def test_a_broker_that_never_returns_costs_the_drain_timeout(
    tmp_path: Path,
    project_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(DRAIN_TIMEOUT_ENV, "2")
    broker = MosquittoBroker(tmp_path / "mosquitto", anonymous=True).start()
    notifier = StatusNotifier(broker.url, project_id, Component.LEARNER, "node-1")
    try:
        notifier.notify(ComponentStatus.STARTED, "before the outage")
        _kill(broker)
        wait_until(lambda: _timed_notify(notifier, "queued") < QUICK_S, 10, "a quick notify")
        caplog.set_level(logging.WARNING, logger="flops")

        began = time.monotonic()
        notifier.notify(ComponentStatus.FAILED, "the final message")
        waited_s = time.monotonic() - began
        assert 1.8 <= waited_s < 5, waited_s
        lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
        assert lost and "learner/failed" in lost[0] and "learner/progress" in lost[0], lost

        began = time.monotonic()
        notifier.close()  # the lost messages are not waited for a second time
        assert time.monotonic() - began < QUICK_S
    finally:
        notifier.close()
        broker.stop()
