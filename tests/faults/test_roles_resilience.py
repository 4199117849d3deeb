"""The runtime roles under faults (issue: survive faults), with real processes: an aggregator
and MNIST learners (``python -m aggregator`` / ``python -m learner``), Mosquitto, MLflow
tracking servers and Arrow Flight data servers, all on loopback.

- A learner stopped (SIGSTOP) mid-training is reported as a straggler while the round waits,
  dropped at ``round_timeout_s``, and training completes with the other two (the minimum); once
  continued it fails naming its aggregator as the cause.
- The MLflow server SIGKILLed mid-training and restarted on its port: every round's metrics
  still reach the run. Never restarted: the aggregator fails naming the tracking server.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mqtt_testing import MqttRecorder
from waiting import wait_until

from data_server.mock_provider import provide_mock_data
from data_server.server import DataServer
from flops_manager.broker import MosquittoBroker
from flops_utils.contract.exit_codes import ExitCode
from flops_utils.net import find_free_port
from observatory.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow

EXAMPLE_REPO = Path(__file__).resolve().parents[2] / "examples" / "mnist_sklearn"
NODES = ("node-a", "node-b", "node-c")
STRAGGLER_TEXT = re.compile(r"learner node-c has not answered round \d+ for \d+ s")
PROJECT_TIMEOUT_S = 240.0
"""Seconds a project of these tests may take before its processes are killed."""


@pytest.fixture(scope="module")
def mnist_thirds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Three data servers, each holding a third of MNIST (IID) under the tag ``mnist``."""
    root = Path(tmp_path_factory.mktemp("thirds"))
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(DataServer(root / name)) for name in NODES]
        locations = {name: server.location for name, server in zip(NODES, servers, strict=True)}
        provide_mock_data("mnist", locations, tag="mnist", partitioning="iid")
        yield locations


class _Project:
    """One project's processes, each in a process group of its own (a learner's model worker
    included), their output in ``logs``."""

    def __init__(self, broker: MosquittoBroker, logs: Path) -> None:
        self.project_id = uuid.uuid4().hex[:12]
        self.recorder = MqttRecorder(broker, self.project_id)
        self.address = f"127.0.0.1:{find_free_port()}"
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        base = {k: v for k, v in os.environ.items() if not k.startswith("FLOPS_")}
        self.env = {
            **base,
            "FLOPS_PROJECT_ID": self.project_id,
            "FLOPS_MQTT_URL": broker.url,
            "FLOPS_ML_REPO_DIR": str(EXAMPLE_REPO),
            "FLOPS_AGGREGATOR_ADDRESS": self.address,
        }

    def start(self, name: str, module: str, env: dict[str, str]) -> None:
        with (self.logs / f"{self.project_id}-{name}.log").open("w") as out:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", module],
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_training(
        self, mlflow_url: str, sla: dict[str, Any], nodes: dict[str, str], **env: str
    ) -> None:
        """The aggregator (``env`` added to its environment) and one learner per node."""
        aggregator_env = {"FLOPS_MLFLOW_URL": mlflow_url, "FLOPS_SLA": json.dumps(sla), **env}
        self.start("aggregator", "aggregator", aggregator_env)
        for node, location in nodes.items():
            learner_env = {
                "FLOPS_DATA_SERVER": location,
                "FLOPS_DATA_TAGS": "mnist",
                "FLOPS_LEARNER_NAME": node,
            }
            self.start(node, "learner", learner_env)

    def wait(self, names: list[str], timeout_s: float = PROJECT_TIMEOUT_S) -> dict[str, int]:
        """The exit codes of ``names`` once they ended (``AssertionError`` after
        ``timeout_s``, with the aggregator's log)."""
        deadline = time.monotonic() + timeout_s
        codes = {}
        for name in names:
            try:
                codes[name] = self.processes[name].wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} still runs; log:\n{self.log(name)[-3000:]}") from None
        return codes

    def log(self, name: str) -> str:
        return (self.logs / f"{self.project_id}-{name}.log").read_text()

    def progress(self, stage: str) -> list[dict[str, Any]]:
        """The aggregator's ``progress`` payloads of ``stage``."""
        return [
            payload
            for payload in self.recorder.find("aggregator/progress")
            if payload["data"].get("stage", "round") == stage
        ]

    def close(self) -> None:
        """Kill every process group still there (SIGCONT first: a stopped one), reap them and
        check that none is left."""
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        for name, process in self.processes.items():
            wait_until(_group_ended(process.pid), 10, f"{name}'s process group ends")
        self.recorder.close()


def _group_ended(pgid: int) -> Callable[[], bool]:
    """A predicate: whether no process of group ``pgid`` is left."""

    def ended() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    return ended


@pytest.fixture
def project(mqtt_broker: MosquittoBroker, tmp_path: Path) -> Iterator[_Project]:
    project = _Project(mqtt_broker, tmp_path)
    try:
        yield project
    finally:
        project.close()


def _sla(rounds: int, minimum: int, round_timeout_s: float | None = None) -> dict[str, Any]:
    """The example's SLA with ``rounds`` rounds, every minimum ``minimum``."""
    sla: dict[str, Any] = json.loads((EXAMPLE_REPO / "sla.json").read_text())
    training = sla["training_configuration"]
    training["training_rounds"] = rounds
    for key in ("min_available_clients", "min_fit_clients", "min_evaluate_clients"):
        training[key] = minimum
    if round_timeout_s is not None:
        training["round_timeout_s"] = round_timeout_s
    return sla


def _final(project: _Project, component: str, instance: str, status: str) -> dict[str, Any]:
    """The ``status`` message of ``component``'s ``instance`` (waits up to 10 s)."""
    return wait_until(
        lambda: next(
            (
                p
                for p in project.recorder.find(f"{component}/{status}")
                if p["instance"] == instance
            ),
            None,
        ),
        10,
        lambda: f"no {component}/{status} of {instance}; got {project.recorder.topics()}",
    )


def test_a_stalled_learner_is_reported_dropped_and_training_completes(
    project: _Project, mlflow_server: MlflowServer, mnist_thirds: dict[str, str]
) -> None:
    # Prepare: 3 learners, the SLA needs 2, a round may take 8 s; stragglers reported every 2 s.
    rounds = 5
    sla = _sla(rounds, minimum=2, round_timeout_s=8)
    project.start_training(mlflow_server.url, sla, mnist_thirds, FLOPS_STRAGGLER_NOTICE_S="2")

    # Execute: stop node-c once round 1 is done.
    wait_until(lambda: project.progress("round"), 120, lambda: project.log("aggregator")[-2000:])
    os.kill(project.processes["node-c"].pid, signal.SIGSTOP)
    codes = project.wait(["aggregator", "node-a", "node-b"])

    # Assert: training completed, node-c reported while the round waited, then dropped.
    assert codes == {"aggregator": 0, "node-a": 0, "node-b": 0}, project.log("aggregator")
    assert [p["data"]["round"] for p in project.progress("round")] == list(range(1, rounds + 1))
    stragglers = project.progress("straggler")
    assert stragglers, project.log("aggregator")[-3000:]
    for payload in stragglers:
        assert re.fullmatch(
            r"learner node-c has not answered round \d+ for \d+ s", payload["message"]
        )
        assert payload["data"]["learner"] == "node-c" and payload["data"]["waited_s"] >= 2
    assert len({p["data"]["round"] for p in stragglers}) == 1
    dropped = project.progress("learners_dropped")
    assert [(d["data"]["learners"], d["data"]["timed_out"]) for d in dropped] == [
        (["node-c"], True)
    ]
    assert dropped[0]["data"]["round"] == stragglers[0]["data"]["round"]
    assert (
        "dropped learner(s) node-c (no answer within round_timeout_s 8s)" in (dropped[0]["message"])
    )
    run_id = _final(project, "aggregator", "aggregator", "success")["data"]["run_id"]
    history = mlflow.MlflowClient(mlflow_server.url).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, rounds + 1))

    # ... and node-c, continued, fails naming its aggregator as the cause.
    os.kill(project.processes["node-c"].pid, signal.SIGCONT)
    assert project.wait(["node-c"], 60) == {"node-c": ExitCode.AGGREGATOR_UNREACHABLE}
    failed = _final(project, "learner", "node-c", "failed")
    assert failed["data"]["cause"] == "aggregator_unreachable"
    assert failed["data"]["error"] == "aggregator_unreachable"


@pytest.fixture
def own_mlflow(tmp_path: Path) -> Iterator[MlflowServer]:
    """An MLflow server of the test's own, to be killed."""
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        yield server
    finally:
        server.stop()


def _kill_mlflow(server: MlflowServer) -> None:
    assert server.pid is not None
    os.killpg(server.pid, signal.SIGKILL)
    server.stop()  # reaps it


# A restart of MLflow mid-training is tested through the manager, where the supervisor
# restarts it: tests/faults/test_training_faults.py.


def test_a_dead_mlflow_server_fails_the_aggregator_naming_it(
    project: _Project, own_mlflow: MlflowServer, mnist_thirds: dict[str, str]
) -> None:
    # Prepare: retries shortened to 0 + 4 s (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2).
    nodes = {node: mnist_thirds[node] for node in NODES[:2]}
    project.start_training(
        own_mlflow.url, _sla(50, minimum=2), nodes, MLFLOW_HTTP_REQUEST_MAX_RETRIES="2"
    )

    # Execute
    wait_until(lambda: project.progress("round"), 120, lambda: project.log("aggregator")[-2000:])
    _kill_mlflow(own_mlflow)
    codes = project.wait(["aggregator", *nodes], 120)

    # Assert: the aggregator names the tracking server; the learners name their aggregator.
    assert codes["aggregator"] == ExitCode.TRACKING_UNAVAILABLE, project.log("aggregator")
    failed = _final(project, "aggregator", "aggregator", "failed")
    assert failed["message"].startswith(
        f"the MLflow tracking server at {own_mlflow.url} did not answer: Connection refused "
        "(trying to log "
    ), failed["message"]
    assert "retried for about 4s" in failed["message"]
    assert failed["data"] == {
        "error": "tracking_error",
        "exit_code": int(ExitCode.TRACKING_UNAVAILABLE),
        "cause": "tracking_server_unreachable",
    }
    for node in nodes:
        assert codes[node] == ExitCode.AGGREGATOR_UNREACHABLE, project.log(node)
        assert _final(project, "learner", node, "failed")["data"]["cause"] == (
            "aggregator_unreachable"
        )
