"""The SLA's Flower strategy drives the aggregation, with FLOps' checks kept for every one.

Two levels, both with real Flower over loopback:

- in process: :class:`aggregator.flower_server.FlowerServer` with three Flower clients in
  threads whose models are fixed numbers, so each strategy's aggregate can be checked
  exactly (and FedProx's ``proximal_mu`` seen in the fit config);
- end to end (``conftest.py``): aggregator and learner processes training the MNIST example
  with FedMedian and FedAdam, checked through MQTT and the MLflow run.
"""

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from waiting import wait_until

from aggregator.flower_server import FlowerServer, RoundFailed, TrainingResult, TrainingSettings
from flops_utils.contract.training import STRATEGY_ADAPTER, STRATEGY_NAMES, StrategyConfig
from flops_utils.net import find_free_port
from observatory.mlflow_server import MlflowServer

EXAMPLE_REPO = Path(__file__).resolve().parents[2] / "examples" / "mnist_sklearn"
TIMEOUT_S = 30.0

LEARNERS = [(1.0, 1), (2.0, 1), (9.0, 2)]
"""The in-process learners: ``(value every parameter takes after fit, training samples)``."""

FEDAVG = (1.0 * 1 + 2.0 * 1 + 9.0 * 2) / 4
"""FedAvg of :data:`LEARNERS` (weighted by samples); the global model starts at 0."""


_DECODE_LOCK = threading.Lock()
"""Serialises the learner threads' parameter decoding: ``np.load`` parses each array header
with ``ast.literal_eval``, and CPython 3.11 can fail with "AST constructor recursion depth
mismatch" when threads of one process compile at the same time (separate learner processes,
as FLOps runs them, never share that state)."""


class _FixedClient:
    """A Flower client whose fit returns ``value`` everywhere; records fit configs."""

    def __init__(self, value: float, samples: int, fail: bool = False) -> None:
        self.value, self.samples, self.fail = value, samples, fail
        self.fit_configs: list[dict[str, Any]] = []
        self.error: Exception | None = None

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
                outer.fit_configs.append(dict(ins.config))
                if outer.fail:
                    raise ValueError("boom")
                fitted = [np.full_like(p, outer.value) for p in parameters]
                return FitRes(
                    status=Status(code=Code.OK, message=""),
                    parameters=ndarrays_to_parameters(fitted),
                    num_examples=outer.samples,
                    metrics={},
                )

            def evaluate(self, ins: Any) -> Any:
                return EvaluateRes(
                    status=Status(code=Code.OK, message=""),
                    loss=0.5,
                    num_examples=outer.samples,
                    metrics={"accuracy": 0.75},
                )

        return _Client()


def _run(
    strategy: StrategyConfig,
    rounds: int = 1,
    failing: float | None = None,
    minimum: int = len(LEARNERS),
) -> tuple[TrainingResult, list[_FixedClient]]:
    """Train ``rounds`` rounds of ``strategy`` over :data:`LEARNERS` in this process, every
    client minimum of the SLA set to ``minimum``; the learner whose value is ``failing``
    raises in fit (its Flower client ends, as a learner that dies mid-training)."""
    from flwr.client import start_client

    settings = TrainingSettings(
        address=f"127.0.0.1:{find_free_port()}",
        num_rounds=rounds,
        min_available_clients=minimum,
        min_fit_clients=minimum,
        min_evaluate_clients=minimum,
        round_timeout_s=TIMEOUT_S,
        connect_timeout_s=TIMEOUT_S,
        strategy=strategy,
    )
    clients = [_FixedClient(value, samples, value == failing) for value, samples in LEARNERS]
    listening = threading.Event()
    outcome: dict[str, Any] = {}

    def serve() -> None:
        # As run_server, but round 1 waits for every learner (not only for the minimum).
        try:
            with FlowerServer(settings) as flower:
                listening.set()
                wait_until(lambda: flower.connected() == len(LEARNERS), TIMEOUT_S)
                outcome["result"] = flower.train([np.zeros(2), np.zeros((2, 2))])
                flower.disconnect()
        except Exception as exc:
            outcome["error"] = exc
        finally:
            listening.set()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    assert listening.wait(TIMEOUT_S), "the Flower server did not start"

    def learn(client: _FixedClient, flower_client: Any) -> None:
        try:
            start_client(server_address=settings.address, client=flower_client)
        except Exception as exc:  # the stream breaks when the server ends a failed round
            client.error = exc

    # Flower clients are built here, not in the threads: CPython 3.11 can fail with
    # "AST constructor recursion depth mismatch" when threads compile code at the same time.
    threads = [threading.Thread(target=learn, args=(c, c.client()), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    server.join(TIMEOUT_S * 2)
    for thread in threads:
        thread.join(TIMEOUT_S)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"], clients


def _adam_step(eta: float, beta_1: float, beta_2: float, tau: float, delta: float) -> float:
    """Flower's FedAdam update after round 1 from a zero model (bias-corrected step)."""
    m, v = (1 - beta_1) * delta, (1 - beta_2) * delta**2
    eta_norm = eta * math.sqrt(1 - beta_2**2) / (1 - beta_1**2)
    return eta_norm * m / (math.sqrt(v) + tau)


def _yogi_step(eta: float, beta_1: float, beta_2: float, tau: float, delta: float) -> float:
    """Flower's FedYogi update after round 1 from a zero model (v starts at 0)."""
    m, v = (1 - beta_1) * delta, (1 - beta_2) * delta**2
    return eta * m / (math.sqrt(v) + tau)


CASES: list[tuple[dict[str, Any], float]] = [
    ({"name": "FedAvg"}, FEDAVG),
    ({"name": "FedProx", "proximal_mu": 0.25}, FEDAVG),
    ({"name": "FedMedian"}, 2.0),
    ({"name": "FedTrimmedAvg", "beta": 0.34}, 2.0),  # cuts 1 of 3 at each end
    ({"name": "FedTrimmedAvg"}, 4.0),  # beta 0.2 cuts nothing of 3: the unweighted mean
    ({"name": "FedAdam"}, _adam_step(0.1, 0.9, 0.99, 1e-9, FEDAVG)),
    ({"name": "FedAdam", "eta": 0.5, "beta_1": 0.5}, _adam_step(0.5, 0.5, 0.99, 1e-9, FEDAVG)),
    ({"name": "FedYogi"}, _yogi_step(0.01, 0.9, 0.99, 1e-3, FEDAVG)),
    ({"name": "FedAdagrad", "eta": 0.3}, 0.3 * FEDAVG / (FEDAVG + 1e-9)),
]
"""``(SLA strategy, value of every global parameter after one round)``, from Flower's code."""


@pytest.mark.parametrize(
    ("sla_strategy", "expected"), CASES, ids=[json.dumps(case) for case, _ in CASES]
)
def test_each_strategy_aggregates_as_flower_defines_it(
    sla_strategy: dict[str, Any], expected: float
) -> None:
    # Prepare
    strategy = STRATEGY_ADAPTER.validate_python(sla_strategy)

    # Execute
    result, clients = _run(strategy)

    # Assert: the aggregate is the strategy's; the FLOps round report is there for each.
    assert [p.shape for p in result.parameters] == [(2,), (2, 2)]
    for parameter in result.parameters:
        assert parameter == pytest.approx(np.full_like(parameter, expected), rel=1e-6)
    [round_1] = result.rounds
    assert (round_1.round, round_1.learners, round_1.fit_examples) == (1, 3, 4)
    assert (round_1.loss, round_1.accuracy) == (0.5, 0.75)
    assert [c.error for c in clients] == [None] * 3
    mu = [c.fit_configs[0].get("proximal_mu") for c in clients]
    assert mu == [sla_strategy.get("proximal_mu")] * 3


def test_every_sla_strategy_is_covered_above() -> None:
    # Assert
    assert {case["name"] for case, _ in CASES} == set(STRATEGY_NAMES)


def test_adaptive_strategy_keeps_its_state_across_rounds() -> None:
    # Prepare: two rounds of FedAdagrad (beta_1 = 0): the second step uses the first's v.
    strategy = STRATEGY_ADAPTER.validate_python({"name": "FedAdagrad", "eta": 0.3})
    first = 0.3 * FEDAVG / (FEDAVG + 1e-9)
    delta_2 = FEDAVG - first
    second = first + 0.3 * delta_2 / (math.sqrt(FEDAVG**2 + delta_2**2) + 1e-9)

    # Execute
    result, _ = _run(strategy, rounds=2)

    # Assert
    assert [r.round for r in result.rounds] == [1, 2]
    assert result.parameters[0] == pytest.approx(np.full(2, second), rel=1e-6)


def test_a_learner_failing_below_the_minimum_fails_the_round_with_any_strategy() -> None:
    # Prepare: all 3 learners are needed; the mixin's failure check runs before FedMedian's
    # own aggregation, which would otherwise aggregate the two results left.
    strategy = STRATEGY_ADAPTER.validate_python({"name": "FedMedian"})

    # Execute / Assert
    with pytest.raises(
        RoundFailed, match=r"Round 1 training: 1 of 3 learner\(s\) failed.*2 left, the SLA needs 3"
    ):
        _run(strategy, failing=9.0)


def test_a_learner_dying_mid_training_is_tolerated_while_the_minimum_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: 3 learners, the SLA needs 2; the one of value 9 dies in its first fit.
    strategy = STRATEGY_ADAPTER.validate_python({"name": "FedAvg"})

    # Execute
    with caplog.at_level("WARNING", logger="flops"):
        result, clients = _run(strategy, rounds=2, failing=9.0, minimum=2)

    # Assert: both rounds ran over the two others: FedAvg of (1, 1 sample) and (2, 1 sample).
    assert [(r.round, r.learners, r.fit_examples) for r in result.rounds] == [(1, 2, 2), (2, 2, 2)]
    for parameter in result.parameters:
        assert parameter == pytest.approx(np.full_like(parameter, 1.5))
    assert [c.error is None for c in clients] == [True, True, False]
    assert "Round 1 training: 1 of 3 learner(s) failed" in caplog.text
    assert "going on with the other 2 (the SLA needs 2)" in caplog.text


# End to end: the MNIST example with FedMedian and FedAdam, two rounds each.

ROUNDS = 2
MIN_ACCURACY = 0.5
MNIST_STRATEGIES: list[dict[str, Any]] = [{"name": "FedMedian"}, {"name": "FedAdam", "eta": 0.05}]


@pytest.fixture(scope="module")
def trainings(run_training: Any) -> dict[str, Any]:
    """One project per strategy of :data:`MNIST_STRATEGIES`, one after the other."""
    runs = {}
    for strategy in MNIST_STRATEGIES:
        sla = json.loads((EXAMPLE_REPO / "sla.json").read_text())
        sla["training_configuration"].update(training_rounds=ROUNDS, strategy=strategy)
        runs[strategy["name"]] = run_training(sla)
    return runs


@pytest.mark.parametrize("name", ["FedMedian", "FedAdam"])
def test_mnist_training_completes_with_the_strategy(
    trainings: dict[str, Any], mlflow_server: MlflowServer, name: str
) -> None:
    # Prepare
    from mlflow import MlflowClient

    run = trainings[name]
    expected = STRATEGY_ADAPTER.validate_python(run.sla["training_configuration"]["strategy"])
    client = MlflowClient(tracking_uri=mlflow_server.url)

    # Execute
    started = run.recorder.find("aggregator/started")
    progress = [m["data"] for m in run.recorder.find("aggregator/progress")]
    success = run.recorder.find("aggregator/success")
    mlflow_run = client.get_run(success[0]["data"]["run_id"]) if success else None

    # Assert: every process ended well, after the strategy's rounds.
    for process, (code, output) in run.results.items():
        assert code == 0, f"{process} exited {code}:\n{output[-4000:]}"
    assert f"strategy {name} " in run.results["aggregator"][1]
    assert started[0]["data"]["strategy"] == expected.model_dump(mode="json")
    rounds = [d for d in progress if d["stage"] == "round"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["learners"] == 2 and math.isfinite(r["loss"]) for r in rounds)
    assert all(0 <= r["accuracy"] <= 1 for r in rounds)
    assert rounds[-1]["accuracy"] >= MIN_ACCURACY  # it learns (chance: 0.1)
    assert [m["data"]["rounds"] for m in success] == [ROUNDS]
    assert not run.recorder.find("/failed")
    # The MLflow run has a metric per round and the strategy with every parameter in effect.
    assert mlflow_run is not None and mlflow_run.info.status == "FINISHED"
    run_id = mlflow_run.info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "accuracy")] == [1, 2]
    params = mlflow_run.data.params
    recorded = {
        key.removeprefix("training_configuration.strategy."): value
        for key, value in params.items()
        if key.startswith("training_configuration.strategy.")
    }
    assert recorded == {key: str(value) for key, value in expected.model_dump().items()}
    print(
        f"\n{name}: {[round(r['seconds'], 2) for r in rounds]} s per round, "
        f"accuracy {rounds[-1]['accuracy']:.3f}, project {run.seconds:.1f} s"
    )
