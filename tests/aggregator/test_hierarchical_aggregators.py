"""Hierarchical FL: a root aggregator over cluster aggregators over learners.

Two levels, both with real Flower over loopback and real cluster aggregator processes
(``python -m aggregator`` with ``FLOPS_AGGREGATOR_ROLE=cluster``, Mosquitto, MLflow):

- exact numbers: learners in threads whose models are fixed offsets and the root in this
  process, so the cluster models and the global model can be checked against FedAvg computed
  by hand;
- end to end (``e2e``): a root, two cluster aggregators and four learners as processes
  training the MNIST example on four data servers.
"""

import contextlib
import json
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mqtt_testing import MqttRecorder
from waiting import wait_until

from aggregator.cluster import global_step
from aggregator.config import CYCLE_KEY, PARENT_RUN_KEY, AggregatorConfig
from aggregator.flower_server import RoundResult, TrainingResult, run_server
from aggregator.tracking import MlflowTracker
from data_server.mnist import load_mnist
from flops_manager.broker import MosquittoBroker
from flops_utils.net import find_free_port, wait_for_port
from observatory.mlflow_server import MlflowServer

EXAMPLE_REPO = Path(__file__).resolve().parents[2] / "examples" / "mnist_sklearn"
TIMEOUT_S = 60.0
ROUNDS = 2
CYCLES = 2

CLUSTERS = {"a": [1, 2], "b": [3, 4]}
"""Cluster name -> its learners' ``k``: learner ``k`` returns ``parameters + k``."""

GROWING = {"a"}
"""Clusters whose learner ``k`` reports ``10 * k * j`` training examples in its ``j``-th fit
(the others report ``10 * k``), so that counting a cluster's examples over all its rounds
instead of the last one would change the root's weights."""

_DECODE_LOCK = threading.Lock()
"""Serialises the learner threads' parameter decoding (see ``test_strategies.py``: CPython
3.11's ``ast`` is not safe when threads of one process compile at the same time)."""


def _sla(**training: Any) -> dict[str, Any]:
    return {
        "ml_model_flavor": "sklearn",
        "training_configuration": {
            "training_rounds": ROUNDS,
            "training_cycles": CYCLES,
            "min_available_clients": 2,
            "min_fit_clients": 2,
            "min_evaluate_clients": 2,
            **training,
        },
    }


class _OffsetLearner:
    """A Flower client: fit returns ``parameters + k``; evaluate returns loss ``k``,
    accuracy ``k / 10`` over ``5 * k`` examples."""

    def __init__(self, k: int, growing: bool) -> None:
        self.k, self.growing = k, growing
        self.fits = 0
        self.error: Exception | None = None

    def examples(self) -> int:
        return 10 * self.k * (self.fits if self.growing else 1)

    def client(self) -> Any:
        from flwr.client import Client
        from flwr.common import (
            Code,
            EvaluateRes,
            FitRes,
            Status,
            ndarrays_to_parameters,
            parameters_to_ndarrays,
        )

        outer = self

        class _Client(Client):
            def fit(self, ins: Any) -> Any:
                with _DECODE_LOCK:
                    parameters = parameters_to_ndarrays(ins.parameters)
                outer.fits += 1
                return FitRes(
                    status=Status(code=Code.OK, message=""),
                    parameters=ndarrays_to_parameters([p + outer.k for p in parameters]),
                    num_examples=outer.examples(),
                    metrics={},
                )

            def evaluate(self, ins: Any) -> Any:
                return EvaluateRes(
                    status=Status(code=Code.OK, message=""),
                    loss=float(outer.k),
                    num_examples=5 * outer.k,
                    metrics={"accuracy": outer.k / 10},
                )

        return _Client()


def _expected(cycles: int) -> tuple[float, list[int]]:
    """FedAvg by hand: the value of every global parameter after ``cycles`` (from 0), and
    the examples the root aggregated per cycle (sum of the clusters' last-round counts)."""
    fits = {k: 0 for ks in CLUSTERS.values() for k in ks}
    value, counts = 0.0, []
    for _ in range(cycles):
        models = []
        for cluster, ks in CLUSTERS.items():
            cluster_value, last = value, 0
            for _ in range(ROUNDS):
                for k in ks:
                    fits[k] += 1
                ns = [10 * k * (fits[k] if cluster in GROWING else 1) for k in ks]
                cluster_value = sum(
                    n * (cluster_value + k) for n, k in zip(ns, ks, strict=True)
                ) / sum(ns)
                last = sum(ns)
            models.append((cluster_value, last))
        value = sum(n * v for v, n in models) / sum(n for _, n in models)
        counts.append(sum(n for _, n in models))
    return value, counts


def test_the_hand_computed_fedavg_is_right_for_one_cycle() -> None:
    # Cluster a: rounds of +5/3 (examples 10+20, then 20+40): 10/3, 60 examples last round.
    # Cluster b: rounds of +25/7 (examples 30+40): 50/7, 70 examples.
    # Root: (60 * 10/3 + 70 * 50/7) / 130 = 700/130.
    value, counts = _expected(1)
    assert value == pytest.approx(700 / 130, rel=1e-12)
    assert counts == [130]


def _root_env(project_id: str, address: str, mqtt: MosquittoBroker, mlflow: str) -> dict[str, str]:
    return {
        "FLOPS_PROJECT_ID": project_id,
        "FLOPS_MQTT_URL": mqtt.url,
        "FLOPS_MLFLOW_URL": mlflow,
        "FLOPS_ML_REPO_DIR": str(EXAMPLE_REPO),
        "FLOPS_SLA": json.dumps(_sla(round_timeout_s=30)),
        "FLOPS_AGGREGATOR_ROLE": "root",
        "FLOPS_AGGREGATOR_ADDRESS": address,
        "FLOPS_CLUSTERS": ",".join(CLUSTERS),
        "FLOPS_CONNECT_TIMEOUT_S": "30",
    }


@pytest.fixture(scope="module")
def exact_run(
    start_aggregator: Any, mqtt_broker: MosquittoBroker, mlflow_server: MlflowServer
) -> Iterator[dict[str, Any]]:
    """Two cycles of the root (this process) over the cluster aggregators ``a`` and ``b``
    (processes), each over two :class:`_OffsetLearner` threads."""
    from flwr.client import start_client

    project_id = uuid.uuid4().hex[:12]
    recorder = MqttRecorder(mqtt_broker, project_id)
    root_address = f"127.0.0.1:{find_free_port()}"
    config = AggregatorConfig.from_env(
        _root_env(project_id, root_address, mqtt_broker, mlflow_server.url)
    )
    parent = MlflowTracker(mlflow_server.url, project_id)
    parent_run_id = parent.start_run({"root": "in the test"})
    rounds: list[RoundResult] = []
    outcome: dict[str, Any] = {}

    def serve() -> None:
        try:
            outcome["result"] = run_server(
                config.root_settings(),
                [np.zeros(2), np.zeros((2, 2))],
                on_round=rounds.append,
                config_fn=lambda cycle: {CYCLE_KEY: cycle, PARENT_RUN_KEY: parent_run_id},
            )
        except Exception as exc:
            outcome["error"] = exc

    root = threading.Thread(target=serve, daemon=True)
    root.start()
    clusters, addresses = {}, {}
    for cluster, ks in CLUSTERS.items():
        addresses[cluster] = f"127.0.0.1:{find_free_port()}"
        clusters[cluster] = start_aggregator(
            project_id,
            _sla(round_timeout_s=30),
            {
                "FLOPS_AGGREGATOR_ROLE": "cluster",
                "FLOPS_AGGREGATOR_ADDRESS": addresses[cluster],
                "FLOPS_ROOT_AGGREGATOR_ADDRESS": root_address,
                "FLOPS_CLUSTER": cluster,
                "FLOPS_LEARNERS": ",".join(f"learner-{k}" for k in ks),
                "FLOPS_CONNECT_TIMEOUT_S": "30",
            },
        )

    def learn(learner: _OffsetLearner, client: Any, address: str) -> None:
        assert wait_for_port("127.0.0.1", int(address.rsplit(":", 1)[1]), TIMEOUT_S)
        try:
            start_client(server_address=address, client=client)
        except Exception as exc:
            learner.error = exc

    threads, learners = [], []
    for cluster, ks in CLUSTERS.items():
        for k in ks:
            learner = _OffsetLearner(k, cluster in GROWING)
            learners.append(learner)
            # Built here, not in the threads (see _DECODE_LOCK).
            arguments = (learner, learner.client(), addresses[cluster])
            threads.append(threading.Thread(target=learn, args=arguments, daemon=True))
    for thread in threads:
        thread.start()
    root.join(TIMEOUT_S * 2)
    for thread in threads:
        thread.join(TIMEOUT_S)
    deadline = time.monotonic() + TIMEOUT_S
    exits = {name: process.finish(deadline) for name, process in clusters.items()}
    parent.end_run("FINISHED")
    with contextlib.suppress(AssertionError):  # a failed cluster sends none: tests say so
        wait_until(lambda: len(recorder.find("cluster-aggregator/success")) >= 2, 10)
    yield {
        "outcome": outcome,
        "rounds": rounds,
        "exits": exits,
        "learners": learners,
        "recorder": recorder,
        "parent_run_id": parent_run_id,
        "project_id": project_id,
        "config": config,
    }
    recorder.close()


def test_the_root_sizes_its_cycles_for_whole_clusters(exact_run: dict[str, Any]) -> None:
    # Prepare
    settings = exact_run["config"].root_settings()

    # Assert: 2 clusters, SLA minimum 2; a call may take 2 rounds * 30 s + 30 s to connect.
    assert (settings.num_rounds, settings.min_fit_clients, settings.min_available_clients) == (
        CYCLES,
        2,
        2,
    )
    assert settings.round_timeout_s == ROUNDS * 30 + 30


def test_the_global_model_is_fedavg_of_the_cluster_models(exact_run: dict[str, Any]) -> None:
    # Prepare
    for name, (code, output) in exact_run["exits"].items():
        assert code == 0, f"cluster {name} exited {code}:\n{output[-4000:]}"
    assert "error" not in exact_run["outcome"], exact_run["outcome"].get("error")
    result: TrainingResult = exact_run["outcome"]["result"]
    value, counts = _expected(CYCLES)

    # Assert: every parameter took the FedAvg-of-FedAvg value; the root weighed each cluster
    # by its last round's examples.
    assert [p.shape for p in result.parameters] == [(2,), (2, 2)]
    for parameter in result.parameters:
        np.testing.assert_allclose(parameter, np.full_like(parameter, value), rtol=1e-12)
    rounds: list[RoundResult] = exact_run["rounds"]
    assert [r.round for r in rounds] == [1, 2]
    assert [r.fit_examples for r in rounds] == counts == [130, 190]
    # Evaluation: loss k over 5k examples per learner, weighted: sum(5k * k) / sum(5k) = 3
    # (Flower's messages carry the loss as a 32-bit float, hence the tolerance).
    for r in rounds:
        assert (r.learners, r.evaluate_examples) == (2, 50)
        assert r.loss == pytest.approx(3.0, rel=1e-6)
        assert r.accuracy == pytest.approx(0.3, rel=1e-12)
    assert all(learner.error is None for learner in exact_run["learners"])
    assert [learner.fits for learner in exact_run["learners"]] == [ROUNDS * CYCLES] * 4


def test_the_cluster_aggregators_report_each_round(exact_run: dict[str, Any]) -> None:
    # Prepare
    recorder: MqttRecorder = exact_run["recorder"]

    # Execute
    started = recorder.find("cluster-aggregator/started")
    progress = recorder.find("cluster-aggregator/progress")
    success = recorder.find("cluster-aggregator/success")

    # Assert
    assert sorted(m["instance"] for m in started) == ["a", "b"]
    assert all(m["data"]["role"] == "cluster" and m["data"]["cycles"] == CYCLES for m in started)
    for cluster, ks in CLUSTERS.items():
        data = [m["data"] for m in progress if m["instance"] == cluster]
        assert [d["step"] for d in data] == [1, 2, 3, 4]
        assert [(d["cycle"], d["round"]) for d in data] == [(1, 1), (1, 2), (2, 1), (2, 2)]
        assert [global_step(d["cycle"], d["round"], ROUNDS) for d in data] == [1, 2, 3, 4]
        assert all(d["cluster"] == cluster and d["learners"] == len(ks) for d in data)
        expected_loss = sum(5 * k * k for k in ks) / sum(5 * k for k in ks)
        assert all(d["loss"] == pytest.approx(expected_loss) for d in data)
        assert all(d["evaluate_examples"] == sum(5 * k for k in ks) for d in data)
        fit = [d["fit_examples"] for d in data]
        assert fit == ([30, 60, 90, 120] if cluster in GROWING else [70] * 4)
    assert sorted((m["instance"], m["data"]["cycles"], m["data"]["rounds"]) for m in success) == [
        ("a", CYCLES, CYCLES * ROUNDS),
        ("b", CYCLES, CYCLES * ROUNDS),
    ]
    assert not recorder.find("/failed")


def test_each_cluster_has_a_child_run_under_the_roots(
    exact_run: dict[str, Any], mlflow_server: MlflowServer
) -> None:
    # Prepare
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    parent_id = exact_run["parent_run_id"]
    experiment = client.get_experiment_by_name(f"flops-{exact_run['project_id']}")
    assert experiment is not None

    # Execute
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )

    # Assert
    names = {run.info.run_name: run for run in children}
    assert sorted(names) == [f"flops-{exact_run['project_id']}-{c}" for c in CLUSTERS]
    for cluster, ks in CLUSTERS.items():
        run = names[f"flops-{exact_run['project_id']}-{cluster}"]
        assert run.info.status == "FINISHED"
        assert run.data.params == {
            "cluster": cluster,
            "learners": ",".join(f"learner-{k}" for k in ks),
            "training_rounds": str(ROUNDS),
        }
        losses = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in losses) == [1, 2, 3, 4]


# End to end: the MNIST example, a root, two clusters of two learners each.

MNIST_CLUSTERS = {"a": ["node-a1", "node-a2"], "b": ["node-b1", "node-b2"]}
MIN_ACCURACY = 0.85


@pytest.fixture(scope="module")
def mnist_run(run_hierarchical: Any) -> Any:
    """One hierarchical project on MNIST run to the end (a ``TrainingRun``)."""
    sla = json.loads((EXAMPLE_REPO / "sla.json").read_text())
    sla["training_configuration"].update(training_rounds=ROUNDS, training_cycles=CYCLES)
    return run_hierarchical(sla, MNIST_CLUSTERS)


@pytest.mark.e2e
@pytest.mark.slow
def test_mnist_hierarchical_training_completes(mnist_run: Any) -> None:
    # Prepare
    recorder = mnist_run.recorder

    # Execute
    started = recorder.find("/aggregator/started")
    progress = [m["data"] for m in recorder.find("/aggregator/progress")]
    success = recorder.find("/aggregator/success")
    cluster_progress = recorder.find("cluster-aggregator/progress")
    cluster_success = recorder.find("cluster-aggregator/success")
    learners_done = recorder.find("learner/success")

    # Assert: every process exits 0.
    for name, (code, output) in mnist_run.results.items():
        assert code == 0, f"{name} exited {code}:\n{output[-4000:]}"
    assert not recorder.find("/failed")
    # The root: cycles as rounds, both clusters in each.
    assert [(m["data"]["role"], m["data"]["cycles"], m["data"]["rounds"]) for m in started] == [
        ("root", CYCLES, CYCLES)
    ]
    cycles = [d for d in progress if d["stage"] == "round"]
    assert [(d["round"], d["cycle"], d["rounds"]) for d in cycles] == [(1, 1, 2), (2, 2, 2)]
    assert all(d["learners"] == 2 for d in cycles)
    assert progress[-1]["stage"] == "training_done"
    [done] = success
    assert done["data"]["rounds"] == CYCLES
    assert done["data"]["accuracy"] >= MIN_ACCURACY
    # The clusters: a step per round, 2 learners each; the learners: every round.
    for cluster in MNIST_CLUSTERS:
        steps = [m["data"]["step"] for m in cluster_progress if m["instance"] == cluster]
        assert steps == [1, 2, 3, 4]
    assert sorted(m["data"]["rounds"] for m in cluster_success) == [4, 4]
    assert sorted(m["data"]["fit_rounds"] for m in learners_done) == [4] * 4
    print(f"\nhierarchical MNIST project: {mnist_run.seconds:.1f} s")


@pytest.mark.e2e
@pytest.mark.slow
def test_mnist_hierarchical_mlflow_layout(
    mnist_run: Any, mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    from mlflow import MlflowClient

    with warnings.catch_warnings():  # MLflow warns about its own type hints on import
        warnings.simplefilter("ignore", UserWarning)
        import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    found = mnist_run.recorder.find("/aggregator/success")
    assert found, "the root published no success"
    success = found[0]["data"]

    # Execute
    parent = client.get_run(success["run_id"])
    children = client.search_runs(
        [success["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{success['run_id']}'",
    )
    model = mlflow.pyfunc.load_model(success["registered_model_uri"])
    mnist = load_mnist().select(range(200)).with_format("numpy")
    x = np.asarray(mnist["image"], dtype=np.float32).reshape(200, -1) / 255.0
    predictions = np.asarray(model.predict(x))

    # Assert: the parent run has a metric per cycle, each child one per round (global step).
    assert parent.info.status == "FINISHED"
    assert parent.data.params["training_configuration.training_cycles"] == str(CYCLES)
    for metric in ("loss", "accuracy"):
        history = client.get_metric_history(parent.info.run_id, metric)
        assert sorted(m.step for m in history) == [1, 2]
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["cluster"] in MNIST_CLUSTERS
        for metric in ("loss", "accuracy"):
            history = client.get_metric_history(child.info.run_id, metric)
            assert sorted(m.step for m in history) == [1, 2, 3, 4]
    accuracy = float(np.mean(predictions == np.asarray(mnist["label"])))
    assert accuracy >= MIN_ACCURACY
