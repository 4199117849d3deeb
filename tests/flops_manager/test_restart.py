"""The manager survives its own restart.

Real processes throughout: ``flops-manager`` runs as a subprocess on one ``FLOPS_HOME`` and a
fixed port, with its embedded Mosquitto and MLflow; two data servers hold MNIST; the example
repository trains with Flower. The tests kill (SIGKILL) or stop (SIGTERM) the manager while a
project trains and start it again.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import paho.mqtt.client as mqtt
import pytest
import requests
from flow_testing import processes_mentioning
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_until

from flops_manager.broker import MosquittoBroker
from flops_manager.builds import VenvProjectBuilder
from flops_manager.client import ManagerClient
from flops_manager.demo import example_sla, local_nodes
from flops_manager.embedded import mlflow_admin
from flops_manager.orchestrators.local import LocalOrchestrator
from flops_manager.process_identity import ProcessIdentity
from flops_manager.projects import ProjectLifecycle, ProjectStatus
from flops_manager.records import Phase, ProjectRecord
from flops_manager.store import EmbeddedProjectStore
from flops_manager.suite import STOPPED_REASON
from flops_utils.mqtt_topics import parse_status_topic
from flops_utils.net import find_free_port

pytestmark = pytest.mark.slow
ROUNDS = 8
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
TRAINING_TIMEOUT_S = 240.0
FINISH_TIMEOUT_S = 120.0


class ManagerProcess:
    """``python -m flops_manager.main`` on ``home`` and ``port``, started and stopped at will."""

    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *args: str) -> "ManagerProcess":
        self.starts += 1
        env = {
            **os.environ,
            "FLOPS_HOME": str(self.home),
            "FLOPS_MANAGER_PORT": str(self.port),
        }
        for name in ("FLOPS_MQTT_URL", "FLOPS_MLFLOW_URL", "FLOPS_DB_URL"):
            env.pop(name, None)
        with (self.home.parent / f"manager-{self.starts}.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flops_manager.main", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the manager exited: {self.log_tail()}"
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the manager did not answer in {START_TIMEOUT_S} s: {self.log_tail()}")

    def stop(self, sig: signal.Signals) -> int:
        """Send ``sig`` to the manager process (only to it) and return its exit code."""
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=STOP_TIMEOUT_S)
        self.process = None
        return code

    def token(self) -> str | None:
        """The API token the manager created in ``$FLOPS_HOME/api-token`` (if auth is on)."""
        token_file = self.home / "api-token"
        return token_file.read_text().strip() if token_file.exists() else None

    def client(self) -> ManagerClient:
        return ManagerClient(self.url, token=self.token())

    def log_tail(self) -> str:
        return (self.home.parent / f"manager-{self.starts}.log").read_text()[-3000:]


@pytest.fixture
def manager(shared_manager: ManagerProcess) -> ManagerProcess:
    """The module's manager, started again if an earlier test left it stopped."""
    if shared_manager.process is None or shared_manager.process.poll() is not None:
        shared_manager.start()
    return shared_manager


@pytest.fixture(scope="module")
def shared_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerProcess]:
    """A running manager with two nodes holding MNIST (tag mnist), shared by the tests of this
    module to save the first start (MLflow); at the end every process started under its
    FLOPS_HOME is stopped."""
    home = Path(tmp_path_factory.mktemp("restart")) / "flops-home"
    running = ManagerProcess(home, find_free_port()).start()
    try:
        with local_nodes(
            2,
            home.parent / "nodes",
            running.url,
            token=running.token(),
            register_interval_s=1.0,
        ):
            running.client().wait_for_nodes(2, timeout_s=30)
            running.client().provide_mocks(dataset="mnist", tag="mnist")
            yield running
    finally:
        if running.process is not None and running.process.poll() is None:
            running.stop(signal.SIGTERM)
        for pid in processes_mentioning(str(home)):
            _kill_group(pid)


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


def wait_for(
    client: ManagerClient, project_id: str, rounds: int, timeout_s: float = TRAINING_TIMEOUT_S
) -> dict[str, Any]:
    """Poll until the project trains and has recorded at least ``rounds`` rounds."""
    deadline = time.monotonic() + timeout_s
    while True:
        project = client.project(project_id)
        assert project["status"] in ("pending", "building", "deploying", "training"), project[
            "status_message"
        ]
        if project["status"] == "training" and len(project["rounds"]) >= rounds:
            return project
        if time.monotonic() > deadline:
            raise TimeoutError(f"project {project_id}: {project['status']} after {timeout_s} s")
        time.sleep(0.1)


def wait_for_round_in_log(project: dict[str, Any], round_number: int) -> None:
    """Wait until the aggregator's log says it finished ``round_number`` (it publishes the
    round's status message right after)."""
    handle = next(h for h in project["admin"]["service_handles"] if h["name"] == "aggregator")
    log, needle = Path(handle["log_path"]), f"round {round_number}: loss"
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while needle not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {needle!r} in {log}"
        time.sleep(0.05)


def service_identities(project: dict[str, Any]) -> dict[str, ProcessIdentity]:
    identities = {}
    for handle in project["admin"]["service_handles"]:
        identity = ProcessIdentity.from_dict(handle)
        assert identity is not None
        identities[handle["name"]] = identity
    return identities


def start_project(manager: ManagerProcess) -> str:
    sla = example_sla(ROUNDS, min_available_clients=2, min_fit_clients=2, min_evaluate_clients=2)
    return manager.client().create_project(sla)


def assert_completed_with_every_round(manager: ManagerProcess, project: dict[str, Any]) -> None:
    assert project["status"] == "completed", project["status_message"]
    assert [r["round"] for r in project["rounds"]] == list(range(1, ROUNDS + 1))
    run_id = project["mlflow"]["run_id"]
    assert run_id
    import mlflow

    admin = mlflow_admin(manager.home)  # the embedded MLflow has authentication on
    assert admin is not None
    with mock.patch.dict(os.environ, admin.env()):
        tracking = mlflow.MlflowClient(manager.client().tracking_url())
        steps = sorted(m.step for m in tracking.get_metric_history(run_id, "accuracy"))
        status = tracking.get_run(run_id).info.status
    assert steps == list(range(1, ROUNDS + 1))
    assert status == "FINISHED"


def embedded_pids(home: Path) -> dict[str, int]:
    state = json.loads((home / "embedded.json").read_text())
    return {name: entry["process"]["pid"] for name, entry in state.items()}


# -- the tests ---------------------------------------------------------------------------------
def test_killed_manager_reattaches_and_the_project_completes(manager: ManagerProcess) -> None:
    # Prepare: a project in its second round.
    project_id = start_project(manager)
    before = wait_for(manager.client(), project_id, rounds=1)
    nodes = sorted(n["node_id"] for n in manager.client().nodes())
    tracking_url = manager.client().tracking_url()
    components = embedded_pids(manager.home)

    # Execute: kill the manager; start it again once a round was reported while it was down.
    assert manager.stop(signal.SIGKILL) == -signal.SIGKILL
    services = service_identities(before)
    assert all(identity.is_alive() for identity in services.values())
    wait_for_round_in_log(before, len(before["rounds"]) + 1)
    manager.start()
    project = manager.client().wait_for_project(project_id, FINISH_TIMEOUT_S)

    # Assert: same broker and MLflow processes, every round recorded once (also those
    # published while the manager was down), events kept.
    assert embedded_pids(manager.home) == components
    assert manager.client().tracking_url() == tracking_url
    assert_completed_with_every_round(manager, project)
    assert project["events"][: len(before["events"])] == before["events"]
    notes = [e["message"] for e in project["events"] if e["type"] == "manager"]
    assert notes == [
        "manager restarted; re-attached 3 running service(s): "
        "aggregator, learner-node-1, learner-node-2"
    ]
    assert sorted(n["node_id"] for n in manager.client().nodes()) == nodes
    assert manager.client().project(project_id)["status"] == "completed"
    assert all(identity.wait(10) for identity in services.values())


def test_killed_manager_reattaches_a_hierarchical_project_mid_cycle_and_it_completes(
    manager: ManagerProcess,
) -> None:
    # Prepare: hierarchical FL over the one cluster (local) of the two nodes, 2 cycles of 3
    # rounds; the manager is killed once the cluster reported a round.
    sla = example_sla(
        3,
        mode="hierarchical",
        training_cycles=2,
        min_available_clients=2,
        min_fit_clients=2,
        min_evaluate_clients=2,
    )
    project_id = manager.client().create_project(sla)

    def a_cluster_round() -> dict[str, Any] | None:
        project = manager.client().project(project_id)
        assert project["status"] in ("pending", "building", "deploying", "training"), project
        tree = project.get("hierarchy") or {"clusters": [{"rounds": []}]}
        return project if tree["clusters"][0]["rounds"] else None

    before = wait_until(a_cluster_round, TRAINING_TIMEOUT_S, interval_s=0.1)

    # Execute
    manager.stop(signal.SIGKILL)
    services = service_identities(before)
    manager.start()
    project = manager.client().wait_for_project(project_id, FINISH_TIMEOUT_S + 120)

    # Assert: every role re-attached; the cluster's rounds of both cycles recorded once
    assert project["status"] == "completed", project["status_message"]
    notes = [e["message"] for e in project["events"] if e["type"] == "manager"]
    assert notes == [
        "manager restarted; re-attached 4 running service(s): "
        "aggregator, cluster-aggregator-local, learner-node-1, learner-node-2"
    ]
    rounds = project["hierarchy"]["clusters"][0]["rounds"]
    assert [r["step"] for r in rounds] == list(range(1, 7))
    assert [c["round"] for c in project["hierarchy"]["root"]["cycles"]] == [1, 2]
    assert all(identity.wait(10) for identity in services.values())


def test_sigterm_leaves_the_project_running_and_the_restart_completes_it(
    manager: ManagerProcess,
) -> None:
    # Prepare
    project_id = start_project(manager)
    before = wait_for(manager.client(), project_id, rounds=2)
    components = embedded_pids(manager.home)

    # Execute: a clean stop, then a start.
    assert manager.stop(signal.SIGTERM) == 0
    services = service_identities(before)
    still_running = {name for name, identity in services.items() if identity.is_alive()}
    manager.start()
    project = manager.client().wait_for_project(project_id, FINISH_TIMEOUT_S)

    # Assert: the stop left services, broker and MLflow running; the project completed.
    assert still_running == {"aggregator", "learner-node-1", "learner-node-2"}
    assert embedded_pids(manager.home) == components
    assert_completed_with_every_round(manager, project)
    assert project["events"][: len(before["events"])] == before["events"]


def test_learner_killed_while_the_manager_is_down_fails_the_project(
    manager: ManagerProcess,
) -> None:
    # Prepare
    project_id = start_project(manager)
    before = wait_for(manager.client(), project_id, rounds=1)
    services = service_identities(before)

    # Execute: kill the manager, then learner-node-1; start the manager again.
    manager.stop(signal.SIGKILL)
    os.killpg(services["learner-node-1"].pid, signal.SIGKILL)
    assert services["learner-node-1"].wait(10)
    manager.start()
    project = manager.client().wait_for_project(project_id, FINISH_TIMEOUT_S)

    # Assert: failed, naming the learner first; no service of the project is left running.
    assert project["status"] == "failed"
    message = project["status_message"]
    assert message.startswith(
        "while the manager was down, learner-node-1 stopped without reporting a result"
    ), message
    assert project["events"][: len(before["events"])] == before["events"]
    assert all(identity.wait(15) for identity in services.values())


def test_a_clean_stop_with_nothing_running_leaves_no_process(manager: ManagerProcess) -> None:
    # Execute
    assert manager.stop(signal.SIGTERM) == 0

    # Assert: MLflow, Mosquitto (and the registry, where buildah and docker-registry are
    # installed) stopped with the manager (no project needed them).
    state = json.loads((manager.home / "embedded.json").read_text())
    components = [ProcessIdentity.from_dict(entry["process"]) for entry in state.values()]
    assert {"mqtt", "mlflow"} <= set(state) <= {"mqtt", "mlflow", "registry"}, state
    assert all(c is not None and c.wait(10) for c in components)
    assert processes_mentioning(str(manager.home)) == []


# -- pieces, without the whole flow -------------------------------------------------------------
def test_restarted_broker_delivers_messages_queued_for_a_persistent_session(
    tmp_path: Path,
) -> None:
    # Prepare: a persistent subscriber that goes away; a message for it; the broker restarts.
    port = find_free_port()
    received: list[bytes] = []
    with MosquittoBroker(tmp_path, port=port, anonymous=True) as broker:
        _session(broker.port, received).disconnect()
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="publisher")
        publisher.connect("127.0.0.1", port)
        publisher.loop_start()
        publisher.publish("flops/p/aggregator/progress", b"round 1", qos=1).wait_for_publish(5)
        publisher.disconnect()
        publisher.loop_stop()

    # Execute
    with MosquittoBroker(tmp_path, port=port, anonymous=True) as broker:
        subscriber = _session(broker.port, received)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        subscriber.disconnect()
        subscriber.loop_stop()

    # Assert
    assert received == [b"round 1"]


def _session(port: int, received: list[bytes]) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="manager", clean_session=False)
    subscribed = threading.Event()
    client.on_message = lambda c, u, m: received.append(bytes(m.payload))
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("flops/+/+/+", qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert subscribed.wait(5), "the broker did not acknowledge the subscription"
    return client


@pytest.fixture
def lifecycle(tmp_path: Path) -> Iterator[ProjectLifecycle]:
    """A lifecycle on a fresh store with the local orchestrator (exit grace 0.2 s)."""
    store = EmbeddedProjectStore(tmp_path / "db")
    holder: list[ProjectLifecycle] = []
    orchestrator = LocalOrchestrator(
        tmp_path / "services", lambda *args: holder[0].on_service_exit(*args)
    )
    running = ProjectLifecycle(
        store,
        VenvProjectBuilder(tmp_path / "envs"),
        orchestrator,
        tmp_path,
        "mqtt://127.0.0.1:9",
        "",
        exit_grace_s=0.2,
    )
    holder.append(running)
    yield running
    running.close()
    orchestrator.close()


def _insert(lifecycle: ProjectLifecycle, status: str, **fields: Any) -> None:
    sla = example_sla(1)
    sla["ml_repo_url"] = "file:///nonexistent/restart-repo.git"
    now = time.time()
    lifecycle.store.insert_project(
        ProjectRecord(
            _id="p1",
            project_id="p1",
            customer_id="c",
            status=ProjectStatus(status),
            status_message="",
            created_at=now,
            updated_at=now,
            sla=sla,
            phases={status: Phase(started_at=now)},
            **fields,
        )
    )


def _sleeper(tmp_path: Path) -> dict[str, Any]:
    """A real service-like process (own session, log file) and its handle."""
    log = tmp_path / "learner-node-1.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "print('learning', flush=True); import time; time.sleep(60)"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    identity = ProcessIdentity.of(process.pid)
    assert identity is not None
    deadline = time.monotonic() + 10
    while "learning" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"name": "learner-node-1", **identity.to_dict(), "log_path": str(log)}


def test_an_interrupted_build_is_resumed(lifecycle: ProjectLifecycle) -> None:
    # Prepare: a project the previous manager was building (from an unclonable URL).
    _insert(lifecycle, "building")

    # Execute
    lifecycle.begin_recovery()
    lifecycle.finish_recovery()

    # Assert: the build ran again and failed with the git error.
    deadline = time.monotonic() + 30
    while lifecycle.get("p1").status == "building" and time.monotonic() < deadline:
        time.sleep(0.05)
    project = lifecycle.get("p1")
    assert project.status == "failed"
    assert "nonexistent/restart-repo.git" in project.status_message
    assert project.events[0].message == "manager restarted; building the environment again"


def test_an_interrupted_deployment_fails_and_its_started_services_stop(
    lifecycle: ProjectLifecycle, tmp_path: Path
) -> None:
    # Prepare: one of two services had started when the previous manager died.
    handle = _sleeper(tmp_path)
    identity = ProcessIdentity.from_dict(handle)
    assert identity is not None
    _insert(
        lifecycle,
        "deploying",
        services=["aggregator", "learner-node-1"],
        service_handles=[handle],
    )

    # Execute
    lifecycle.begin_recovery()
    lifecycle.finish_recovery()

    # Assert
    project = lifecycle.get("p1")
    assert project.status == "failed"
    assert "restarted while deploying" in project.status_message
    assert "POST the SLA again" in project.status_message
    assert identity.wait(5)


def test_a_service_gone_before_the_restart_is_named_with_its_last_log_line(
    lifecycle: ProjectLifecycle, tmp_path: Path
) -> None:
    # Prepare: a training project whose learner ended while no manager watched it.
    handle = _sleeper(tmp_path)
    identity = ProcessIdentity.from_dict(handle)
    assert identity is not None
    os.killpg(identity.pid, signal.SIGKILL)
    assert identity.wait(5)
    _insert(lifecycle, "training", services=["learner-node-1"], service_handles=[handle])

    # Execute
    lifecycle.begin_recovery()
    lifecycle.finish_recovery()

    # Assert
    project = lifecycle.get("p1")
    assert project.status == "failed"
    assert project.status_message == (
        "while the manager was down, learner-node-1 stopped without reporting a result "
        "(last log line: 'learning')"
    )


def test_a_reattached_service_that_stops_later_fails_the_project(
    lifecycle: ProjectLifecycle, tmp_path: Path
) -> None:
    # Prepare: a training project whose learner still runs; the lifecycle re-attaches it.
    handle = _sleeper(tmp_path)
    identity = ProcessIdentity.from_dict(handle)
    assert identity is not None
    _insert(lifecycle, "training", services=["learner-node-1"], service_handles=[handle])
    lifecycle.begin_recovery()
    lifecycle.finish_recovery()
    assert lifecycle.get("p1").status == "training"
    assert lifecycle.orchestrator.running_services("p1") == ["learner-node-1"]

    # Execute: it dies (not a child of this process: its exit code is unknown).
    os.killpg(identity.pid, signal.SIGKILL)

    # Assert
    deadline = time.monotonic() + 10
    while lifecycle.get("p1").status == "training" and time.monotonic() < deadline:
        time.sleep(0.05)
    project = lifecycle.get("p1")
    assert project.status == "failed"
    assert project.status_message == (
        "learner-node-1 stopped without reporting a result (exit code unknown: it was "
        "re-attached after a manager restart); last log line: 'learning'"
    )


def _message(lifecycle: ProjectLifecycle, topic: str, **payload: Any) -> None:
    parsed = parse_status_topic(topic)
    assert parsed is not None
    lifecycle.on_status(parsed, payload)


def test_success_queued_while_the_manager_was_down_completes_the_project(
    lifecycle: ProjectLifecycle, tmp_path: Path
) -> None:
    # Prepare: the aggregator finished and exited while no manager ran.
    handle = {**_sleeper(tmp_path), "name": "aggregator"}
    identity = ProcessIdentity.from_dict(handle)
    assert identity is not None
    os.killpg(identity.pid, signal.SIGKILL)
    assert identity.wait(5)
    _insert(lifecycle, "training", services=["aggregator"], service_handles=[handle])

    # Execute: the broker's backlog arrives between the two halves of the recovery.
    lifecycle.begin_recovery()
    _message(lifecycle, "flops/p1/aggregator/progress", data={"round": 1, "accuracy": 0.9})
    _message(lifecycle, "flops/p1/aggregator/progress", data={"round": 1, "accuracy": 0.9})
    _message(lifecycle, "flops/p1/aggregator/progress", data={"stage": "training_done"})
    _message(lifecycle, "flops/p1/aggregator/success", data={"run_id": "r1", "accuracy": 0.9})
    lifecycle.finish_recovery()

    # Assert: completed; the round delivered twice (QoS 1) is recorded once.
    deadline = time.monotonic() + 5
    while lifecycle.get("p1").status != "completed" and time.monotonic() < deadline:
        time.sleep(0.02)
    project = lifecycle.get("p1")
    assert project.status == "completed", project.status_message
    assert project.mlflow is not None and project.mlflow.run_id == "r1"
    assert [r.round for r in project.rounds] == [1]


def test_failures_queued_while_down_come_after_the_service_that_died_silently(
    lifecycle: ProjectLifecycle, tmp_path: Path
) -> None:
    # Prepare: learner-node-1 was killed; the aggregator noticed and reported a failure.
    handle = _sleeper(tmp_path)
    identity = ProcessIdentity.from_dict(handle)
    assert identity is not None
    os.killpg(identity.pid, signal.SIGKILL)
    assert identity.wait(5)
    _insert(lifecycle, "training", services=["learner-node-1"], service_handles=[handle])

    # Execute
    lifecycle.begin_recovery()
    _message(lifecycle, "flops/p1/aggregator/failed", message="Round 2 training: 1 learner failed")
    assert lifecycle.drain(5)
    held = lifecycle.get("p1").status
    lifecycle.finish_recovery()

    # Assert: held back until the end of the recovery, then both named, the silent one first.
    assert held == "training"
    project = lifecycle.get("p1")
    assert project.status == "failed"
    assert project.status_message == (
        "while the manager was down, learner-node-1 stopped without reporting a result "
        "(last log line: 'learning'); aggregator failed: Round 2 training: 1 learner failed"
    )


def test_a_full_stop_fails_unfinished_projects_and_stops_their_services(
    lifecycle: ProjectLifecycle, tmp_path: Path
) -> None:
    # Prepare: a training project with a running (re-attached) service.
    handle = _sleeper(tmp_path)
    identity = ProcessIdentity.from_dict(handle)
    assert identity is not None
    _insert(lifecycle, "training", services=["learner-node-1"], service_handles=[handle])
    lifecycle.begin_recovery()
    lifecycle.finish_recovery()

    # Execute: what ManagerSuite.stop() (flops-manager --stop-projects) does.
    ended = lifecycle.fail_unfinished(STOPPED_REASON)

    # Assert
    assert ended == ["p1"]
    assert lifecycle.get("p1").status == "failed"
    assert lifecycle.get("p1").status_message == STOPPED_REASON
    assert identity.wait(5)
