"""Federated training end to end: an aggregator and two learners as child processes.

Real components only (``conftest.py``): Mosquitto, an MLflow tracking server, two Arrow
Flight data servers holding IID MNIST partitions (tag ``mnist``), Flower over loopback, and
the example ML repository ``examples/mnist_sklearn`` in the FLOps user contract. The SLA sets
no strategy, so this is FedAvg; ``test_strategies.py`` runs the others.
"""

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_server.mnist import load_mnist
from observatory.mlflow_server import MlflowServer

EXAMPLE_REPO = Path(__file__).resolve().parents[2] / "examples" / "mnist_sklearn"
pytestmark = pytest.mark.slow
ROUNDS = 3
MIN_ACCURACY = 0.8


@pytest.fixture(scope="module")
def training(run_training: Any) -> Any:
    """One project (aggregator + two learners) run to the end: a ``TrainingRun``."""
    sla = json.loads((EXAMPLE_REPO / "sla.json").read_text())
    sla["training_configuration"]["training_rounds"] = ROUNDS
    return run_training(sla)


def test_every_process_exits_0(training: Any) -> None:
    # Assert
    for name, (code, output) in training.results.items():
        assert code == 0, f"{name} exited {code}:\n{output[-4000:]}"


def test_status_messages_trace_the_training(training: Any) -> None:
    # Prepare
    recorder = training.recorder

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
    assert started[0]["data"]["strategy"] == {"name": "FedAvg"}  # the SLA sets none
    rounds = [m["data"] for m in progress if m["data"]["stage"] == "round"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["learners"] == 2 and 0 <= r["accuracy"] <= 1 for r in rounds)
    assert progress[-1]["data"]["stage"] == "training_done"
    assert len(success) == 1
    data = success[0]["data"]
    assert data["rounds"] == ROUNDS
    assert data["registered_model"] == f"flops-{training.project_id}"
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
        f"whole project {training.seconds:.1f} s"
    )


def test_mlflow_run_has_every_round_and_the_registered_model(
    training: Any, mlflow_server: MlflowServer
) -> None:
    # Prepare
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    name = f"flops-{training.project_id}"
    success = training.recorder.find("aggregator/success")[0]["data"]

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
    assert run.data.params["training_configuration.strategy.name"] == "FedAvg"
    assert sorted(m.step for m in losses) == list(range(1, ROUNDS + 1))
    assert sorted(m.step for m in accuracies) == list(range(1, ROUNDS + 1))
    final = max(accuracies, key=lambda m: m.step).value
    assert final == pytest.approx(success["accuracy"])
    assert final >= MIN_ACCURACY
    assert version.run_id == run.info.run_id


def test_mlflow_run_has_each_learners_results_per_round(
    training: Any, mlflow_server: MlflowServer
) -> None:
    # Prepare
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    run_id = training.recorder.find("aggregator/success")[0]["data"]["run_id"]
    metrics = ("fit_examples", "fit_seconds", "evaluate_examples", "loss", "accuracy")

    # Execute
    steps = {
        f"learner.{node}/{metric}": sorted(
            m.step for m in client.get_metric_history(run_id, f"learner.{node}/{metric}")
        )
        for node in ("node-a", "node-b")
        for metric in metrics
    }
    run = client.get_run(run_id)

    # Assert: without the manager's provenance, the participants still come from Flower.
    assert steps == {key: list(range(1, ROUNDS + 1)) for key in steps}
    assert run.data.tags["flops.participants"] == "node-a,node-b"
    assert run.data.tags["flops.flower_version"]
    assert "None" not in run.data.params.values()


def test_registered_model_predicts_digits(
    training: Any, mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    with warnings.catch_warnings():  # MLflow warns about its own type hints on import
        warnings.simplefilter("ignore", UserWarning)
        import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    success = training.recorder.find("aggregator/success")[0]["data"]
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
