"""The aggregator's Flower adapter: the SLA's Flower strategy over the learners, with
per-round callbacks.

This is the only aggregator module that imports ``flwr``. It runs Flower's gRPC-bidi server
(the ``start_server`` API: about 0.25 s per round here, against about 16 s for Flower 1.41's
SuperLink engine); swapping the engine means rewriting this module only.

Measured with two learners on loopback: about 0.01 s of Flower overhead per round with a tiny
model, about 1 s per round for the MNIST example (local training dominates).

It does what ``flwr.server.start_server`` does (start the gRPC server, ``run_fl``, stop it),
with three changes so that a broken round ends training instead of hanging or silently
skipping: the wait for learners is bounded (``connect_timeout_s``), every round has a timeout
(``round_timeout_s``), and a round with any failed learner, or with fewer learners than the
SLA's minimum, raises :class:`TrainingFailed` (Flower's strategies with
``accept_failures=False`` would only skip the aggregation and carry on with the old model).

The strategy is the SLA's ``training_configuration.strategy`` (:mod:`flops_manager.sla`):
FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, FedMedian or FedTrimmedAvg, each Flower's own
class with the SLA's parameters. One mixin placed before that class in the MRO adds the
checks above and the per-round reporting, so every strategy behaves alike towards FLOps.
"""

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from numpy.typing import NDArray

from flops_utils.contract.training import DEFAULT_STRATEGY, StrategyConfig
from flops_utils.errors import FlopsError
from flops_utils.logging import logger

if TYPE_CHECKING:
    from flwr.server.strategy import FedAvg

# Flower reads this at import time; without it every start sends a telemetry event to the
# internet (which this machine does not have).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

NDArrays = list[NDArray[Any]]

DEFAULT_CONNECT_TIMEOUT_S = 300.0
"""Seconds the aggregator waits for ``min_available_clients`` learners before each round."""

DEFAULT_ROUND_TIMEOUT_S = 3600.0
"""Per-round timeout (seconds) when the SLA sets none, so that a stuck learner cannot hang
training forever."""


class TrainingFailed(FlopsError):
    """Federated training could not complete a round."""

    code = "training_failed"


class LearnersMissing(TrainingFailed):
    """Fewer learners than the SLA's minimum connected in time."""

    code = "learners_missing"


class RoundFailed(TrainingFailed):
    """A learner failed, disconnected or timed out during a round."""

    code = "round_failed"


class AddressUnavailable(FlopsError):
    """The aggregator could not bind its Flower server address."""

    code = "aggregator_address_unavailable"


@dataclass(frozen=True)
class TrainingSettings:
    """How the Flower server runs.

    ``address``: ``HOST:PORT`` to bind; ``num_rounds``: training rounds; ``min_*``: the SLA's
    client minimums; ``round_timeout_s``: seconds a learner may take per fit or evaluate call;
    ``connect_timeout_s``: seconds to wait for ``min_available_clients`` learners;
    ``strategy``: the Flower strategy and its parameters (defaults to FedAvg).
    """

    address: str
    num_rounds: int
    min_available_clients: int = 1
    min_fit_clients: int = 1
    min_evaluate_clients: int = 1
    round_timeout_s: float = DEFAULT_ROUND_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    strategy: StrategyConfig = DEFAULT_STRATEGY


@dataclass(frozen=True)
class RoundResult:
    """One finished round: federated-evaluation ``loss`` and ``accuracy`` (both weighted by
    the learners' evaluation sample counts), the sample counts, the number of learners and
    the round's wall time in seconds (fit + evaluate, from the moment the learners were
    sampled, so waiting for learners to connect is not included)."""

    round: int
    loss: float
    accuracy: float | None
    fit_examples: int
    evaluate_examples: int
    learners: int
    seconds: float


@dataclass
class TrainingResult:
    """The outcome of :func:`run_server`: the final global ``parameters`` (the strategy's
    last aggregate), one :class:`RoundResult` per round, and the total wall time in seconds."""

    parameters: NDArrays
    rounds: list[RoundResult] = field(default_factory=list)
    seconds: float = 0.0


def preload() -> threading.Thread:
    """Import Flower's server side in a daemon thread and return it (started).

    The aggregator calls it before it starts the model worker, so that the two imports overlap
    (see ``learner.flower_client.preload``); :func:`run_server` later finds the modules
    imported. An import error surfaces there, not here.
    """

    def load() -> None:
        with contextlib.suppress(Exception):
            from flwr.server.server import run_fl  # noqa: F401
            from flwr.server.superlink.fleet.grpc_bidi.grpc_server import (  # noqa: F401
                start_grpc_server,
            )

    thread = threading.Thread(target=load, name="flower-preload", daemon=True)
    thread.start()
    return thread


def weighted_accuracy(metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Average the learners' ``accuracy`` weighted by their sample counts.

    ``metrics`` is Flower's ``[(num_examples, {"accuracy": float, ...}), ...]``; learners
    without ``accuracy`` are left out. Returns ``{"accuracy": float}`` or ``{}``.
    """
    pairs = [(n, float(m["accuracy"])) for n, m in metrics if "accuracy" in m]
    total = sum(n for n, _ in pairs)
    if not pairs or total <= 0:
        return {}
    return {"accuracy": sum(n * acc for n, acc in pairs) / total}


def _sum_examples(metrics: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    return {"num_examples": sum(n for n, _ in metrics)}


def _describe_failures(failures: list[Any]) -> str:
    """Summarise Flower failures (exceptions or ``(proxy, res)`` with a non-OK status)."""
    texts = []
    for failure in failures[:3]:
        if isinstance(failure, BaseException):
            detail = " ".join(str(failure).split())[:200]
            texts.append(
                f"{type(failure).__name__}: {detail}" if detail else type(failure).__name__
            )
        else:
            status = getattr(failure[1], "status", None)
            texts.append(str(getattr(status, "message", failure))[:200])
    return "; ".join(texts)


def _build_strategy(
    settings: TrainingSettings,
    initial_parameters: NDArrays,
    result: TrainingResult,
    on_round: Callable[[RoundResult], None] | None,
) -> "FedAvg":
    """The SLA's Flower strategy, raising on a broken round and reporting each finished one.

    Every supported strategy derives from Flower's ``FedAvg``; the class built here is
    ``_FlopsRounds`` mixed in before it (``class FlopsFedAdam(_FlopsRounds, FedAdam)``), so
    ``super()`` in the mixin reaches the chosen strategy's own configure and aggregate steps.
    """
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import strategy as flower_strategies
    from flwr.server.strategy import FedAvg

    name = settings.strategy.name
    chosen: type[FedAvg] = getattr(flower_strategies, name)

    class _FlopsRounds(FedAvg):
        """FLOps' additions to any FedAvg-derived Flower strategy (a mixin)."""

        _round_began = 0.0
        _phase_began = 0.0
        _fit_examples = 0

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            instructions = super().configure_fit(server_round, parameters, client_manager)
            self._round_began = self._phase_began = time.monotonic()  # learners are here
            self._check_count(server_round, "training", len(instructions), self.min_fit_clients)
            return instructions

        def configure_evaluate(
            self, server_round: int, parameters: Any, client_manager: Any
        ) -> Any:
            instructions = super().configure_evaluate(server_round, parameters, client_manager)
            need = self.min_evaluate_clients
            self._check_count(server_round, "evaluation", len(instructions), need)
            self._phase_began = time.monotonic()
            return instructions

        def _check_count(self, server_round: int, phase: str, got: int, need: int) -> None:
            if got < max(need, self.min_available_clients):
                raise LearnersMissing(
                    f"Round {server_round} {phase}: only {got} learner(s) connected within "
                    f"{settings.connect_timeout_s:.0f}s, the SLA needs "
                    f"{max(need, self.min_available_clients)}; check that every learner "
                    "started and reaches the aggregator, or lower min_available_clients."
                )

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            self._check_results(server_round, "training", results, failures)
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            if parameters is None:
                raise RoundFailed(f"Round {server_round}: {name} produced no parameters.")
            result.parameters = parameters_to_ndarrays(parameters)
            self._fit_examples = sum(res.num_examples for _, res in results)
            return parameters, metrics

        def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
            self._check_results(server_round, "evaluation", results, failures)
            loss, metrics = super().aggregate_evaluate(server_round, results, failures)
            if loss is None:
                raise RoundFailed(f"Round {server_round}: the evaluation produced no loss.")
            accuracy = metrics.get("accuracy")
            round_result = RoundResult(
                round=server_round,
                loss=float(loss),
                accuracy=None if accuracy is None else float(accuracy),
                fit_examples=self._fit_examples,
                evaluate_examples=sum(res.num_examples for _, res in results),
                learners=len(results),
                seconds=time.monotonic() - self._round_began,
            )
            result.rounds.append(round_result)
            logger.info(
                "round %d: loss %.4f accuracy %s (%d learners, %.2fs)",
                server_round,
                round_result.loss,
                round_result.accuracy,
                round_result.learners,
                round_result.seconds,
            )
            if on_round is not None:
                on_round(round_result)
            return loss, metrics

        def _check_results(
            self, server_round: int, phase: str, results: list[Any], failures: list[Any]
        ) -> None:
            if not failures:
                return
            total = len(results) + len(failures)
            # Flower reports a timeout as a closed stream; the elapsed time tells them apart.
            if time.monotonic() - self._phase_began >= settings.round_timeout_s:
                hint = (
                    f"round_timeout_s ({settings.round_timeout_s:g}s) was exceeded; raise it in "
                    "the SLA if the learners need longer"
                )
            else:
                hint = "see the learners' failed messages for the cause"
            raise RoundFailed(
                f"Round {server_round} {phase}: {len(failures)} of {total} learner(s) "
                f"failed or timed out ({_describe_failures(failures)}); {hint}."
            )

    strategy_class: type[FedAvg] = type(f"Flops{name}", (_FlopsRounds, chosen), {})
    parameters = settings.strategy.flower_kwargs()
    logger.info("strategy %s %s", name, parameters)
    return strategy_class(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=settings.min_fit_clients,
        min_evaluate_clients=settings.min_evaluate_clients,
        min_available_clients=settings.min_available_clients,
        initial_parameters=ndarrays_to_parameters(initial_parameters),
        accept_failures=False,
        fit_metrics_aggregation_fn=_sum_examples,
        evaluate_metrics_aggregation_fn=weighted_accuracy,
        **parameters,
    )


def run_server(
    settings: TrainingSettings,
    initial_parameters: NDArrays,
    on_round: Callable[[RoundResult], None] | None = None,
    on_listening: Callable[[str], None] | None = None,
) -> TrainingResult:
    """Run ``settings.num_rounds`` rounds of ``settings.strategy`` with the learners that
    connect.

    Args:
        settings: address, rounds, client minimums and timeouts.
        initial_parameters: the global model's starting parameters (list of NumPy arrays).
        on_round: called after each round's federated evaluation, in order; an exception it
            raises ends training and propagates.
        on_listening: called with the bound ``HOST:PORT`` once learners can connect.

    Returns the :class:`TrainingResult`. Raises :class:`AddressUnavailable` when the address
    can't be bound, :class:`LearnersMissing` when too few learners connect within
    ``connect_timeout_s``, and :class:`RoundFailed` when a learner fails, disconnects or
    exceeds ``round_timeout_s``. On every exit the gRPC server is stopped, so connected
    learners see the connection end.
    """
    from flwr.server import Server, ServerConfig, SimpleClientManager
    from flwr.server.server import run_fl
    from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server

    connect_timeout_s = settings.connect_timeout_s

    class _BoundedClientManager(SimpleClientManager):
        """Waits at most ``connect_timeout_s`` for learners (Flower's default is 24 h)."""

        def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
            ready = super().wait_for(num_clients, int(min(timeout, connect_timeout_s)))
            if not ready:
                logger.error(
                    "only %d of %d learners connected within %.0fs",
                    self.num_available(),
                    num_clients,
                    connect_timeout_s,
                )
            return ready

    result = TrainingResult(parameters=list(initial_parameters))
    strategy = _build_strategy(settings, initial_parameters, result, on_round)
    client_manager = _BoundedClientManager()
    server = Server(client_manager=client_manager, strategy=strategy)
    try:
        grpc_server = start_grpc_server(
            client_manager=client_manager, server_address=settings.address
        )
    except (SystemExit, RuntimeError) as exc:
        raise AddressUnavailable(
            f"Cannot listen on {settings.address} ({exc}); free the port or set "
            "FLOPS_AGGREGATOR_ADDRESS to another HOST:PORT."
        ) from exc
    began = time.monotonic()
    try:
        logger.info("Flower server listening on %s", settings.address)
        if on_listening is not None:
            on_listening(settings.address)
        run_fl(
            server=server,
            config=ServerConfig(
                num_rounds=settings.num_rounds, round_timeout=settings.round_timeout_s
            ),
        )
    finally:
        grpc_server.stop(grace=1)
    result.seconds = time.monotonic() - began
    return result
