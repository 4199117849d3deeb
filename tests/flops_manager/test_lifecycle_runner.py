"""The lifecycle's runner (per-project queues, persisting before acknowledging, timers) and
the MQTT listener's manual acknowledgements, with a real store and a real Mosquitto."""

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from flops_manager.broker import MosquittoBroker
from flops_manager.lifecycle import events as ev
from flops_manager.lifecycle.actions import Action
from flops_manager.lifecycle.runner import LifecycleRunner
from flops_manager.mqtt_listener import StatusListener
from flops_manager.records import Phase, ProjectRecord
from flops_manager.store import EmbeddedProjectStore
from flops_utils.contract.lifecycle import Component, ComponentStatus, ProjectStatus
from flops_utils.contract.topics import ParsedTopic

AGGREGATOR = Component.AGGREGATOR


class Recorder:
    """Collects the actions the runner hands over, per project."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, str]] = []

    def __call__(self, record: ProjectRecord, actions: list[Action]) -> None:
        self.actions += [(record.project_id, a.kind.value) for a in actions]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedProjectStore]:
    opened = EmbeddedProjectStore(tmp_path / "db")
    yield opened
    opened.close()


@pytest.fixture
def runner(store: EmbeddedProjectStore) -> Iterator[LifecycleRunner]:
    running = LifecycleRunner(store, Recorder())
    yield running
    running.close()


def insert(store: EmbeddedProjectStore, project_id: str, status: str = "training") -> None:
    store.insert_project(
        ProjectRecord(
            _id=project_id,
            project_id=project_id,
            customer_id="c",
            status=ProjectStatus(status),
            status_message="",
            created_at=time.time(),
            updated_at=time.time(),
            sla={"ml_repo_url": "https://example.com/repo.git"},
            services=["aggregator"],
            phases={status: Phase(started_at=time.time())},
        )
    )


def round_event(number: int) -> ev.StatusReceived:
    return ev.StatusReceived(AGGREGATOR, ComponentStatus.PROGRESS, data={"round": number})


def test_events_of_a_project_are_applied_in_order_and_projects_in_parallel(
    runner: LifecycleRunner, store: EmbeddedProjectStore
) -> None:
    for project_id in ("a", "b"):
        insert(store, project_id)

    for number in range(1, 31):
        for project_id in ("a", "b"):
            runner.post(project_id, round_event(number))
    assert runner.drain(10)

    for project_id in ("a", "b"):
        record = store.get_project(project_id)
        assert record is not None
        assert [r.round for r in record.rounds] == list(range(1, 31))
        assert [e.message for e in record.events][-1] == "round 30: loss None, accuracy None"


def test_an_event_is_acknowledged_only_after_its_change_is_persisted(
    runner: LifecycleRunner, store: EmbeddedProjectStore
) -> None:
    insert(store, "p1")
    seen_at_ack: list[list[int | None]] = []

    def ack() -> None:
        record = store.get_project("p1")
        assert record is not None
        seen_at_ack.append([r.round for r in record.rounds])

    result = runner.post("p1", round_event(1), ack).result(5)

    assert result is not None and [r.round for r in result.rounds] == [1]
    assert seen_at_ack == [[1]]


def test_a_poison_event_is_dropped_and_acknowledged_and_the_queue_goes_on(
    runner: LifecycleRunner, store: EmbeddedProjectStore
) -> None:
    insert(store, "p1")
    acked = threading.Event()
    poison = ev.StatusReceived(
        AGGREGATOR, ComponentStatus.SUCCESS, data={"model_version": {"not": "a version"}}
    )

    failed = runner.post("p1", poison, acked.set)
    after = runner.post("p1", round_event(1))

    assert isinstance(failed.exception(10), ValueError)
    assert acked.is_set()
    record = after.result(10)
    assert record is not None
    assert record.status is ProjectStatus.TRAINING
    assert [r.round for r in record.rounds] == [1]


def test_actions_run_after_persisting_and_timers_post_their_event(
    store: EmbeddedProjectStore,
) -> None:
    insert(store, "p1")
    recorder = Recorder()
    runner = LifecycleRunner(store, recorder)
    try:
        runner.post("p1", ev.ServiceExited("aggregator", 0)).result(5)
        runner.schedule(0.05, "p1", ev.GraceExpired("aggregator", 0))

        deadline = time.monotonic() + 5
        while (record := store.get_project("p1")) and not record.status.is_terminal:
            assert time.monotonic() < deadline, "the timer's event was not applied"
            time.sleep(0.02)
    finally:
        runner.close()

    assert record is not None
    assert record.status_message == "the aggregator exited without reporting a result; see its log"
    assert recorder.actions == [("p1", "await_grace"), ("p1", "stop_services"), ("p1", "log")]


def test_a_timer_waits_while_its_hold_says_so(store: EmbeddedProjectStore) -> None:
    insert(store, "p1")
    runner = LifecycleRunner(store, Recorder())
    asked: list[float] = []

    def broker_down() -> bool:  # down for the first three checks
        asked.append(time.monotonic())
        return len(asked) <= 3

    try:
        began = time.monotonic()
        runner.schedule(0.1, "p1", ev.GraceExpired("aggregator", 0), hold=broker_down)
        deadline = time.monotonic() + 5
        while (record := store.get_project("p1")) and not record.status.is_terminal:
            assert time.monotonic() < deadline, "the timer's event was not applied"
            time.sleep(0.02)
    finally:
        runner.close()

    assert len(asked) == 4
    assert asked[-1] - began >= 0.4  # four delays of 0.1 s
    assert record is not None and record.status is ProjectStatus.FAILED


def test_after_close_only_cancel_and_manager_stop_are_applied(
    runner: LifecycleRunner, store: EmbeddedProjectStore
) -> None:
    insert(store, "p1")
    acked = threading.Event()
    runner.close()

    dropped = runner.post("p1", round_event(1), acked.set).result(5)
    stopped = runner.apply("p1", ev.ManagerStopping("the manager stopped"), 5)

    assert dropped is None and not acked.is_set()  # the broker delivers it again later
    assert stopped is not None and stopped.status is ProjectStatus.FAILED
    assert stopped.rounds == []


# -- the MQTT listener with a real broker ------------------------------------------------------
def publish(broker: MosquittoBroker, topic: str, payload: dict[str, Any]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    client.publish(topic, json.dumps(payload), qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def listen(
    broker: MosquittoBroker, client_id: str, acking: bool
) -> tuple[StatusListener, list[tuple[ParsedTopic, dict[str, Any]]]]:
    received: list[tuple[ParsedTopic, dict[str, Any]]] = []

    def handler(topic: ParsedTopic, payload: dict[str, Any], ack: Any) -> None:
        received.append((topic, payload))
        if acking:
            ack()

    listener = StatusListener(broker.url, handler, client_id=client_id)
    listener.start()
    assert listener.wait_for_backlog(10)
    return listener, received


def test_a_message_not_acknowledged_is_delivered_again_after_a_reconnect(
    mqtt_broker: MosquittoBroker,
) -> None:
    client_id = f"manager-{uuid.uuid4().hex[:8]}"
    first, received = listen(mqtt_broker, client_id, acking=False)
    publish(mqtt_broker, "flops/p1/aggregator/progress", {"data": {"round": 1}})
    deadline = time.monotonic() + 5
    while not received:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.stop()

    second, again = listen(mqtt_broker, client_id, acking=True)
    second.stop()
    third, after_ack = listen(mqtt_broker, client_id, acking=True)
    third.stop()

    assert [(t.project_id, p["data"]) for t, p in received] == [("p1", {"round": 1})]
    assert [p["data"] for _, p in again] == [{"round": 1}]
    assert after_ack == []


def test_a_malformed_message_is_acknowledged_without_reaching_the_handler(
    mqtt_broker: MosquittoBroker,
) -> None:
    client_id = f"manager-{uuid.uuid4().hex[:8]}"
    first, received = listen(mqtt_broker, client_id, acking=True)
    publish(mqtt_broker, "flops/p1/aggregator/progress", {"data": {"round": "one"}})
    publish(mqtt_broker, "flops/p1/aggregator/progress", {"data": {"round": 2}})
    deadline = time.monotonic() + 5
    while not received:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.stop()
    second, again = listen(mqtt_broker, client_id, acking=True)
    second.stop()

    assert [p["data"] for _, p in received] == [{"round": 2}]
    assert again == []
