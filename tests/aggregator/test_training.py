"""Federated training end to end: an aggregator and two learners as child processes.

Real components only: Mosquitto, an MLflow tracking server, two Arrow Flight data servers
holding IID MNIST partitions (tag ``mnist``), Flower over loopback, and the example ML
repository ``examples/mnist_sklearn`` in the FLOps user contract.
"""

import json
import os
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from data_server.mnist import load_mnist
from data_server.mock_provider import provide_mock_data
from data_server.server import DataServer
from flops_manager.broker import MosquittoBroker
from flops_utils.net import find_free_port
from observatory.mlflow_server import MlflowServer

EXAMPLE_REPO = Path(__file__).resolve().parents[2] / "examples" / "mnist_sklearn"
PYTHON = str(Path(sys.executable))
ROUNDS = 3
TRAINING_TIMEOUT_S = 150
MIN_ACCURACY = 0.8


class MqttRecorder:
    """Records every message under ``flops/<project_id>/#`` (a real paho subscriber)."""

    def __init__(self, broker: MosquittoBroker, project_id: str) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
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
        """Payloads of the messages whose topic ends with ``suffix``, in arrival order."""
        with self._lock:
            return [payload for topic, payload in self.messages if topic.endswith(suffix)]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture(scope="module")
def mnist_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two data servers, each holding half of MNIST (IID) under the tag ``mnist``."""
    root = Path(tmp_path_factory.mktemp("nodes"))
    with DataServer(root / "node-a") as a, DataServer(root / "node-b") as b:
        locations = {"node-a": a.location, "node-b": b.location}
        provide_mock_data("mnist", locations, tag="mnist", partitioning="iid")
        yield locations


@pytest.fixture(scope="module")
def training(
    mqtt_broker: MosquittoBroker, mlflow_server: MlflowServer, mnist_nodes: dict[str, str]
) -> Iterator[dict[str, Any]]:
    """Run one project (aggregator + two learners) to the end; yield what happened."""
    project_id = uuid.uuid4().hex[:12]
    recorder = MqttRecorder(mqtt_broker, project_id)
    sla = json.loads((EXAMPLE_REPO / "sla.json").read_text())
    sla["training_configuration"]["training_rounds"] = ROUNDS
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLOPS_")}
    common = {
        **base,
        "FLOPS_PROJECT_ID": project_id,
        "FLOPS_MQTT_URL": mqtt_broker.url,
        "FLOPS_ML_REPO_DIR": str(EXAMPLE_REPO),
        "FLOPS_AGGREGATOR_ADDRESS": f"127.0.0.1:{find_free_port()}",
    }
    began = time.monotonic()
    processes = {
        "aggregator": _start(
            "aggregator",
            {**common, "FLOPS_MLFLOW_URL": mlflow_server.url, "FLOPS_SLA": json.dumps(sla)},
        )
    }
    for node_id, location in mnist_nodes.items():
        processes[node_id] = _start(
            "learner",
            {
                **common,
                "FLOPS_DATA_SERVER": location,
                "FLOPS_DATA_TAGS": "mnist",
                "FLOPS_LEARNER_NAME": node_id,
            },
        )
    results = {name: _finish(process) for name, process in processes.items()}
    seconds = time.monotonic() - began
    time.sleep(0.3)  # the last QoS 1 deliveries
    yield {
        "project_id": project_id,
        "results": results,
        "recorder": recorder,
        "seconds": seconds,
    }
    recorder.close()


def _start(module: str, env: dict[str, str]) -> "subprocess.Popen[str]":
    return subprocess.Popen(
        [PYTHON, "-m", module], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: "subprocess.Popen[str]") -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=TRAINING_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate(timeout=10)
        return -9, output
    return process.returncode, output


def test_every_process_exits_0(training: dict[str, Any]) -> None:
    # Assert
    for name, (code, output) in training["results"].items():
        assert code == 0, f"{name} exited {code}:\n{output[-4000:]}"


def test_status_messages_trace_the_training(training: dict[str, Any]) -> None:
    # Prepare
    recorder: MqttRecorder = training["recorder"]

    # Execute
    started = recorder.find("aggregator/started")
    progress = recorder.find("aggregator/progress")
    success = recorder.find("aggregator/success")
    learners_started = recorder.find("learner/started")
    learners_done = recorder.find("learner/success")

    # Assert
    assert [m["data"]["address"] for m in started] == [
        f"127.0.0.1:{started[0]['data']['address'].rsplit(':', 1)[1]}"
    ]
    rounds = [m["data"] for m in progress if m["data"]["stage"] == "round"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["learners"] == 2 and 0 <= r["accuracy"] <= 1 for r in rounds)
    assert progress[-1]["data"]["stage"] == "training_done"
    assert len(success) == 1
    data = success[0]["data"]
    assert data["rounds"] == ROUNDS
    assert data["registered_model"] == f"flops-{training['project_id']}"
    assert data["model_version"] >= 1
    assert data["model_uri"].startswith("models:/")
    assert data["accuracy"] >= MIN_ACCURACY
    assert sorted(m["instance"] for m in learners_started) == ["node-a", "node-b"]
    assert sorted(m["instance"] for m in learners_done) == ["node-a", "node-b"]
    assert all(m["data"]["fit_rounds"] == ROUNDS for m in learners_done)
    assert not recorder.find("/failed")
    seconds = [r["seconds"] for r in rounds]
    print(
        f"\nrounds: {seconds} s (mean {sum(seconds) / len(seconds):.2f} s); "
        f"whole project {training['seconds']:.1f} s"
    )


def test_mlflow_run_has_every_round_and_the_registered_model(
    training: dict[str, Any], mlflow_server: MlflowServer
) -> None:
    # Prepare
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    name = f"flops-{training['project_id']}"
    success = training["recorder"].find("aggregator/success")[0]["data"]

    # Execute
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    accuracies = client.get_metric_history(runs[0].info.run_id, "accuracy")
    version = client.get_model_version(name, str(success["model_version"]))

    # Assert
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == success["run_id"]
    assert experiment.experiment_id == success["experiment_id"]
    assert (run.info.run_name, run.info.status) == (name, "FINISHED")
    assert run.data.params["training_configuration.training_rounds"] == str(ROUNDS)
    assert run.data.params["ml_model_flavor"] == "sklearn"
    assert sorted(m.step for m in losses) == list(range(1, ROUNDS + 1))
    assert sorted(m.step for m in accuracies) == list(range(1, ROUNDS + 1))
    final = max(accuracies, key=lambda m: m.step).value
    assert final == pytest.approx(success["accuracy"])
    assert final >= MIN_ACCURACY
    assert version.run_id == run.info.run_id


def test_registered_model_predicts_digits(
    training: dict[str, Any], mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    with warnings.catch_warnings():  # MLflow warns about its own type hints on import
        warnings.simplefilter("ignore", UserWarning)
        import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    success = training["recorder"].find("aggregator/success")[0]["data"]
    mnist = load_mnist().select(range(200)).with_format("numpy")
    x = np.asarray(mnist["image"], dtype=np.float32).reshape(200, -1) / 255.0
    y = np.asarray(mnist["label"])

    # Execute
    model = mlflow.pyfunc.load_model(success["registered_model_uri"])
    predictions = np.asarray(model.predict(x))
    as_float64 = np.asarray(model.predict(x[:5].astype(np.float64)))

    # Assert: digits from float32 (what the repository trains on) and float64 input alike.
    assert predictions.shape == (200,)
    assert set(np.unique(predictions)) <= set(range(10))
    assert float(np.mean(predictions == y)) >= MIN_ACCURACY
    assert list(as_float64) == list(predictions[:5])
