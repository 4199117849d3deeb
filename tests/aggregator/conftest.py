"""Fixtures of the aggregator tests: MNIST data servers and whole training runs.

A training run is real end to end: an aggregator and one learner per data server as child
processes (``python -m aggregator`` / ``python -m learner``), Mosquitto, an MLflow tracking
server, two Arrow Flight data servers holding IID MNIST halves (tag ``mnist``), Flower over
loopback, and the example ML repository ``examples/mnist_sklearn``.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mqtt_testing import MqttRecorder
from waiting import wait_until

from data_server.mock_provider import provide_mock_data
from data_server.server import DataServer
from flops_manager.broker import MosquittoBroker
from flops_utils.net import find_free_port
from observatory.mlflow_server import MlflowServer

EXAMPLE_REPO = Path(__file__).resolve().parents[2] / "examples" / "mnist_sklearn"
PYTHON = str(Path(sys.executable))
TRAINING_TIMEOUT_S = 150
"""Seconds a project may take before its processes are killed."""


class _Process:
    """A child process whose output goes to a file (a pipe could fill up and block it while
    another process is being waited for)."""

    def __init__(self, module: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.popen = subprocess.Popen(
                [PYTHON, "-m", module], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def finish(self, deadline: float) -> tuple[int, str]:
        """Wait until ``deadline`` (monotonic), then kill; returns ``(exit code, output)``."""
        try:
            code = self.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
            code = -9
        return code, self.log.read_text()


@dataclass
class TrainingRun:
    """One finished project: ``results`` maps ``aggregator`` and each node id to
    ``(exit code, output)``; ``seconds`` is the wall time until every process ended."""

    project_id: str
    sla: dict[str, Any]
    results: dict[str, tuple[int, str]]
    recorder: MqttRecorder
    seconds: float


RunTraining = Callable[[dict[str, Any]], TrainingRun]
"""``run_training(sla)``: run one project with ``sla`` (as JSON) to the end."""


@pytest.fixture(scope="package")
def mnist_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two data servers, each holding half of MNIST (IID) under the tag ``mnist``."""
    root = Path(tmp_path_factory.mktemp("nodes"))
    with DataServer(root / "node-a") as a, DataServer(root / "node-b") as b:
        locations = {"node-a": a.location, "node-b": b.location}
        provide_mock_data("mnist", locations, tag="mnist", partitioning="iid")
        yield locations


@pytest.fixture(scope="package")
def run_training(
    tmp_path_factory: pytest.TempPathFactory,
    mqtt_broker: MosquittoBroker,
    mlflow_server: MlflowServer,
    mnist_nodes: dict[str, str],
) -> Iterator[RunTraining]:
    """Runs one project (an aggregator and a learner per MNIST node) to the end per call.

    Projects run one after the other: two at once on this 2-core machine took twice as long
    as in turn (measured 74 s against 37 s for two 2-round projects).
    """
    recorders: list[MqttRecorder] = []
    logs = Path(tmp_path_factory.mktemp("training-logs"))

    def run(sla: dict[str, Any]) -> TrainingRun:
        began = time.monotonic()
        project_id = uuid.uuid4().hex[:12]
        recorder = MqttRecorder(mqtt_broker, project_id)
        recorders.append(recorder)
        processes = _start_project(project_id, sla, mqtt_broker, mlflow_server, mnist_nodes, logs)
        deadline = began + TRAINING_TIMEOUT_S
        results = {name: process.finish(deadline) for name, process in processes.items()}
        seconds = time.monotonic() - began
        _await_final_messages(recorder, len(processes))
        return TrainingRun(project_id, sla, results, recorder, seconds)

    yield run
    for recorder in recorders:
        recorder.close()


def _await_final_messages(recorder: MqttRecorder, count: int, timeout_s: float = 5.0) -> None:
    """Wait until ``count`` final status messages (``success`` / ``failed``) have arrived: a
    process publishes its last one (QoS 1) just before it exits. A process killed before it
    could publish sends none, so a timeout is not an error here."""

    def finals() -> bool:
        return len(recorder.find("/success")) + len(recorder.find("/failed")) >= count

    with contextlib.suppress(AssertionError):
        wait_until(finals, timeout_s, "final status messages")


def _start_project(
    project_id: str,
    sla: dict[str, Any],
    mqtt_broker: MosquittoBroker,
    mlflow_server: MlflowServer,
    mnist_nodes: dict[str, str],
    logs: Path,
) -> dict[str, _Process]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLOPS_")}
    common = {
        **base,
        "FLOPS_PROJECT_ID": project_id,
        "FLOPS_MQTT_URL": mqtt_broker.url,
        "FLOPS_ML_REPO_DIR": str(EXAMPLE_REPO),
        "FLOPS_AGGREGATOR_ADDRESS": f"127.0.0.1:{find_free_port()}",
    }
    processes = {
        "aggregator": _Process(
            "aggregator",
            {**common, "FLOPS_MLFLOW_URL": mlflow_server.url, "FLOPS_SLA": json.dumps(sla)},
            logs / f"{project_id}-aggregator.log",
        )
    }
    for node_id, location in mnist_nodes.items():
        processes[node_id] = _Process(
            "learner",
            {
                **common,
                "FLOPS_DATA_SERVER": location,
                "FLOPS_DATA_TAGS": "mnist",
                "FLOPS_LEARNER_NAME": node_id,
            },
            logs / f"{project_id}-{node_id}.log",
        )
    return processes
