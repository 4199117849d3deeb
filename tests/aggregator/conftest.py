"""Fixtures of the aggregator tests: MNIST data servers and whole training runs.

A training run is real end to end: an aggregator and one learner per data server as child
processes (``python -m aggregator`` / ``python -m learner``), Mosquitto, an MLflow tracking
server, two Arrow Flight data servers holding IID MNIST halves (tag ``mnist``), Flower over
loopback, and the example ML repository ``examples/mnist_sklearn``.

Hierarchical FL (``start_aggregator``, ``mnist_quarters``): a root and cluster aggregators as
child processes (``FLOPS_AGGREGATOR_ROLE``), with learners on four data servers holding IID
MNIST quarters.
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
HIERARCHICAL_TIMEOUT_S = 300
"""The same for a hierarchical project: seven processes (and five model workers) share the
two cores; measured 105 to 135 s while other tests ran."""


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


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_restored() -> Iterator[None]:
    """An in-process ``MlflowTracker`` calls ``mlflow.set_tracking_uri``, which sets MLflow's
    process-wide URI and ``MLFLOW_TRACKING_URI``: put both back after each test, so that a
    later test's own ``MLFLOW_TRACKING_URI`` is the one MLflow uses."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    tracking = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if tracking is not None:
        tracking._tracking_uri = None  # type: ignore[attr-defined]
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


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


StartAggregator = Callable[[str, dict[str, Any], dict[str, str]], "_Process"]
"""``start_aggregator(project_id, sla, env)``: start ``python -m aggregator`` for the project
with the session's broker and MLflow server, ``sla`` as ``FLOPS_SLA`` and ``env`` on top
(``FLOPS_AGGREGATOR_ROLE``, ``FLOPS_AGGREGATOR_ADDRESS``, ...); its log is named after
``FLOPS_CLUSTER`` or the role."""


@pytest.fixture(scope="package")
def start_aggregator(
    tmp_path_factory: pytest.TempPathFactory,
    mqtt_broker: MosquittoBroker,
    mlflow_server: MlflowServer,
) -> Iterator[StartAggregator]:
    """Starts aggregator processes (see :data:`StartAggregator`); kills those still running
    at the end of the package."""
    logs = Path(tmp_path_factory.mktemp("aggregator-logs"))
    started: list[_Process] = []

    def start(project_id: str, sla: dict[str, Any], env: dict[str, str]) -> _Process:
        base = {k: v for k, v in os.environ.items() if not k.startswith("FLOPS_")}
        name = env.get("FLOPS_CLUSTER") or env.get("FLOPS_AGGREGATOR_ROLE", "classic")
        process = _Process(
            "aggregator",
            {
                **base,
                "FLOPS_PROJECT_ID": project_id,
                "FLOPS_MQTT_URL": mqtt_broker.url,
                "FLOPS_MLFLOW_URL": mlflow_server.url,
                "FLOPS_ML_REPO_DIR": str(EXAMPLE_REPO),
                "FLOPS_SLA": json.dumps(sla),
                **env,
            },
            logs / f"{project_id}-{name}.log",
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait(timeout=10)


@pytest.fixture(scope="package")
def mnist_quarters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Four data servers, each holding a quarter of MNIST (IID) under the tag ``mnist``."""
    root = Path(tmp_path_factory.mktemp("quarters"))
    names = ("node-a1", "node-a2", "node-b1", "node-b2")
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(DataServer(root / name)) for name in names]
        locations = {name: server.location for name, server in zip(names, servers, strict=True)}
        provide_mock_data("mnist", locations, tag="mnist", partitioning="iid")
        yield locations


def start_learner(
    project_id: str, node_id: str, data_server: str, aggregator: str, mqtt_url: str, log: Path
) -> _Process:
    """Start ``python -m learner`` on ``data_server`` (tag ``mnist``) for ``aggregator``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLOPS_")}
    return _Process(
        "learner",
        {
            **base,
            "FLOPS_PROJECT_ID": project_id,
            "FLOPS_MQTT_URL": mqtt_url,
            "FLOPS_ML_REPO_DIR": str(EXAMPLE_REPO),
            "FLOPS_AGGREGATOR_ADDRESS": aggregator,
            "FLOPS_DATA_SERVER": data_server,
            "FLOPS_DATA_TAGS": "mnist",
            "FLOPS_LEARNER_NAME": node_id,
        },
        log,
    )


RunHierarchical = Callable[[dict[str, Any], dict[str, list[str]]], TrainingRun]
"""``run_hierarchical(sla, clusters)``: run one hierarchical project to the end: a root, a
cluster aggregator per key of ``clusters`` and a learner per node id of its list (the nodes of
``mnist_quarters``). ``results`` keys: ``aggregator`` (the root), ``cluster-<name>``, node ids."""


@pytest.fixture(scope="package")
def run_hierarchical(
    tmp_path_factory: pytest.TempPathFactory,
    mqtt_broker: MosquittoBroker,
    start_aggregator: StartAggregator,
    mnist_quarters: dict[str, str],
) -> Iterator[RunHierarchical]:
    """Runs hierarchical projects (see :data:`RunHierarchical`), one after the other."""
    recorders: list[MqttRecorder] = []
    logs = Path(tmp_path_factory.mktemp("hierarchical-logs"))

    def run(sla: dict[str, Any], clusters: dict[str, list[str]]) -> TrainingRun:
        began = time.monotonic()
        project_id = uuid.uuid4().hex[:12]
        recorder = MqttRecorder(mqtt_broker, project_id)
        recorders.append(recorder)
        root_address = f"127.0.0.1:{find_free_port()}"
        processes = {
            "aggregator": start_aggregator(
                project_id,
                sla,
                {
                    "FLOPS_AGGREGATOR_ROLE": "root",
                    "FLOPS_AGGREGATOR_ADDRESS": root_address,
                    "FLOPS_CLUSTERS": ",".join(clusters),
                },
            )
        }
        for cluster, nodes in clusters.items():
            address = f"127.0.0.1:{find_free_port()}"
            processes[f"cluster-{cluster}"] = start_aggregator(
                project_id,
                sla,
                {
                    "FLOPS_AGGREGATOR_ROLE": "cluster",
                    "FLOPS_AGGREGATOR_ADDRESS": address,
                    "FLOPS_ROOT_AGGREGATOR_ADDRESS": root_address,
                    "FLOPS_CLUSTER": cluster,
                    "FLOPS_LEARNERS": ",".join(nodes),
                },
            )
            for node in nodes:
                processes[node] = start_learner(
                    project_id,
                    node,
                    mnist_quarters[node],
                    address,
                    mqtt_broker.url,
                    logs / f"{project_id}-{node}.log",
                )
        deadline = began + HIERARCHICAL_TIMEOUT_S
        results = {name: process.finish(deadline) for name, process in processes.items()}
        seconds = time.monotonic() - began
        _await_final_messages(recorder, len(processes))
        return TrainingRun(project_id, sla, results, recorder, seconds)

    yield run
    for recorder in recorders:
        recorder.close()
