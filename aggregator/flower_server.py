"""The aggregators' Flower server adapter: the SLA's Flower strategy over the clients (the
learners, or the cluster aggregators for a root aggregator), with per-round callbacks.

This module and :mod:`aggregator.flower_client` are the only aggregator modules that import
``flwr``. It runs Flower's gRPC-bidi server (the ``start_server`` API: about 0.25 s per round
here, against about 16 s for Flower 1.41's SuperLink engine); swapping the engine means
rewriting these two modules only.

Measured with two learners on loopback: about 0.01 s of Flower overhead per round with a tiny
model, about 1 s per round for the MNIST example (local training dominates).

:class:`FlowerServer` serves all three aggregator roles: it binds the address once, then runs
rounds (:meth:`FlowerServer.train`, a fresh strategy per call, so a cluster aggregator runs
one per cycle with the root's parameters), single evaluation rounds
(:meth:`FlowerServer.evaluate`), and finally disconnects its clients (they exit cleanly) and
stops. It drives Flower's ``Server.fit_round`` / ``Server.evaluate_round`` itself instead of
``run_fl`` (which disconnects the clients at its end), with three checks so that a broken
round ends training instead of hanging or silently skipping: the wait for clients is bounded
(``connect_timeout_s``), every round has a timeout (``round_timeout_s``), and a round whose
results number fewer than the phase's minimum raises :class:`RoundFailed`.

Failure rule: a round in which some clients failed goes on, aggregating over the results, as
long as the results still number at least ``max(min_fit_clients, min_available_clients)``
(training) or ``max(min_evaluate_clients, min_available_clients)`` (evaluation); a warning
names how many failed. The strategies run with ``accept_failures=True`` and the check is
FLOps' own (Flower's ``accept_failures=False`` would only skip the aggregation and carry on
with the old model).

The strategy is the SLA's ``training_configuration.strategy`` (:mod:`flops_manager.sla`):
FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, FedMedian or FedTrimmedAvg, each Flower's own
class with the SLA's parameters. One mixin placed before that class in the MRO adds the
checks above and records each phase's outcome, so every strategy behaves alike towards FLOps.

Stragglers: while a phase runs, a watch thread reports every client that has not answered
its instruction after ``straggler_notice_s`` (then at most every ``straggler_notice_s``) as a
:class:`Straggler`; when a phase ends without some clients' results, a
:class:`LearnersDropped` names them. Both go to the ``on_learners`` callback. Flower 1.41's
gRPC-bidi server enforces ``round_timeout_s`` itself: the servicer aborts the client's stream
with ``DEADLINE_EXCEEDED`` (``FlowerServiceServicer.Join``), which closes its bridge, so
``fit_round``/``evaluate_round`` return that client as a failure (``GrpcBridgeClosed``) and
unregister it; the failure rule above then decides. Clients are named by the
``CLIENT_NAME_PROPERTY`` they return from ``get_properties``, asked once per connection at the
first round that samples them.

Security (``TrainingSettings.security``, a :class:`~flops_utils.flower_security.ServerSecurity`):
the server serves TLS with the project's certificate and refuses, with ``UNAUTHENTICATED``,
every call without the project's client token before Flower's servicer registers the client.
"""

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from numpy.typing import NDArray

from flops_utils.contract.training import CLIENT_NAME_PROPERTY, DEFAULT_STRATEGY, StrategyConfig
from flops_utils.errors import FlopsError
from flops_utils.flower_security import ServerSecurity
from flops_utils.logging import logger

if TYPE_CHECKING:
    from flwr.server import Server
    from flwr.server.strategy import FedAvg

# Flower reads this at import time; without it every start sends a telemetry event to the
# internet (which this machine does not have).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

NDArrays = list[NDArray[Any]]

ConfigFn = Callable[[int], dict[str, Any]]
"""``config_fn(server_round)``: the config sent to every client with its instruction (Flower's
``on_fit_config_fn`` / ``on_evaluate_config_fn``); values are Flower scalars."""

DEFAULT_CONNECT_TIMEOUT_S = 300.0
"""Seconds the aggregator waits for ``min_available_clients`` clients before each round."""

DEFAULT_ROUND_TIMEOUT_S = 3600.0
"""Per-round timeout (seconds) when the SLA sets none, so that a stuck learner cannot hang
training forever."""

MAX_STRAGGLER_NOTICE_S = 30.0
"""The default ``straggler_notice_s`` is ``min(MAX_STRAGGLER_NOTICE_S, round_timeout_s / 2)``."""


class TrainingFailed(FlopsError):
    """Federated training could not complete a round."""

    code = "training_failed"


class LearnersMissing(TrainingFailed):
    """Fewer learners than the SLA's minimum connected in time."""

    code = "learners_missing"


class RoundFailed(TrainingFailed):
    """Too many learners failed, disconnected or timed out during a round."""

    code = "round_failed"


class AddressUnavailable(FlopsError):
    """The aggregator could not bind its Flower server address."""

    code = "aggregator_address_unavailable"


@dataclass(frozen=True)
class TrainingSettings:
    """How the Flower server runs.

    ``address``: ``HOST:PORT`` to bind; ``num_rounds``: rounds per :meth:`FlowerServer.train`
    (cycles for a root aggregator); ``min_*``: the client minimums; ``round_timeout_s``:
    seconds a client may take per fit or evaluate call; ``connect_timeout_s``: seconds to
    wait for ``min_available_clients`` clients; ``strategy``: the Flower strategy and its
    parameters (defaults to FedAvg); ``clients_name``: what the clients are, for messages
    (``learner``, or ``cluster aggregator`` at the root); ``timeout_name``: what the timeout
    is called in messages; ``timeout_hint``: how to give the
    clients longer, ending a timeout's message; ``security``: TLS and the clients' token
    (:class:`~flops_utils.flower_security.ServerSecurity`; the default is plain gRPC
    without client authentication); ``straggler_notice_s``: see :attr:`notice_s`.
    """

    address: str
    num_rounds: int
    min_available_clients: int = 1
    min_fit_clients: int = 1
    min_evaluate_clients: int = 1
    round_timeout_s: float = DEFAULT_ROUND_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    strategy: StrategyConfig = DEFAULT_STRATEGY
    clients_name: str = "learner"
    timeout_name: str = "round_timeout_s"
    timeout_hint: str = "raise round_timeout_s in the SLA if the learners need longer"
    security: ServerSecurity = field(default_factory=ServerSecurity)
    straggler_notice_s: float | None = None

    @property
    def notice_s(self) -> float:
        """Seconds after which (and then every which) a client that has not answered is
        reported: ``straggler_notice_s``, by default ``min(30, round_timeout_s / 2)``; 0
        turns the reports off."""
        if self.straggler_notice_s is not None:
            return max(self.straggler_notice_s, 0.0)
        return min(MAX_STRAGGLER_NOTICE_S, self.round_timeout_s / 2)


@dataclass(frozen=True)
class ClientRound:
    """What one client (``name``: its :data:`CLIENT_NAME_PROPERTY`) returned in a round:
    its training ``fit_examples`` and ``fit_metrics`` (e.g. the learner's ``fit_seconds``),
    and its evaluation ``evaluate_examples``, ``loss`` and ``evaluate_metrics`` (e.g.
    ``accuracy``); ``None``/empty for a phase it returned nothing in. Only numeric metrics
    are kept."""

    name: str
    fit_examples: int | None = None
    fit_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_examples: int | None = None
    loss: float | None = None
    evaluate_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundResult:
    """One finished round: federated-evaluation ``loss`` and ``accuracy`` (both weighted by
    the clients' evaluation sample counts), the sample counts, the number of clients that
    returned evaluation results (``learners``) and the round's wall time in seconds (fit +
    evaluate, from the moment the clients were sampled, so waiting for clients to connect is
    not included). ``clients``: each client's own results (sorted by name); ``dropped``: the
    names of the clients sampled in the round whose training or evaluation results are
    missing (sorted)."""

    round: int
    loss: float
    accuracy: float | None
    fit_examples: int
    evaluate_examples: int
    learners: int
    seconds: float
    clients: tuple[ClientRound, ...] = ()
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvaluationResult:
    """One federated evaluation: ``loss`` and ``accuracy`` weighted by the clients' sample
    counts, ``examples`` (their sum) and ``learners`` (clients that returned results)."""

    loss: float
    accuracy: float | None
    examples: int
    learners: int


@dataclass(frozen=True)
class Straggler:
    """A client (``learner``: its name) that has not answered the ``phase`` (``training`` or
    ``evaluation``) instruction of ``round`` for ``waited_s`` seconds."""

    learner: str
    round: int
    phase: str
    waited_s: float


@dataclass(frozen=True)
class LearnersDropped:
    """The ``phase`` of ``round`` ended without the results of ``learners`` (names, sorted):
    they failed or disconnected, or (``timed_out``) the phase reached ``round_timeout_s``.
    ``remaining`` results came back, ``needed`` were needed; ``going_on`` is whether
    training goes on."""

    round: int
    phase: str
    learners: list[str]
    timed_out: bool
    remaining: int
    needed: int
    going_on: bool


LearnerEvent = Straggler | LearnersDropped
OnLearners = Callable[[LearnerEvent], None]
"""``on_learners(event)``: called from the round's threads (the watch thread for a
:class:`Straggler`); an exception it raises is logged and ignored."""


@dataclass
class TrainingResult:
    """The outcome of :meth:`FlowerServer.train` / :func:`run_server`: the final
    ``parameters`` (the strategy's last aggregate), one :class:`RoundResult` per round, and
    the total wall time in seconds."""

    parameters: NDArrays
    rounds: list[RoundResult] = field(default_factory=list)
    seconds: float = 0.0


def preload() -> threading.Thread:
    """Import Flower's server side in a daemon thread and return it (started).

    The aggregator calls it before it starts the model worker, so that the two imports overlap
    (see ``learner.flower_client.preload``); :class:`FlowerServer` later finds the modules
    imported. An import error surfaces there, not here.
    """

    def load() -> None:
        with contextlib.suppress(Exception):
            from flwr.server import Server  # noqa: F401
            from flwr.server.superlink.fleet.grpc_bidi.flower_service_servicer import (  # noqa: F401
                FlowerServiceServicer,
            )
            from flwr.supercore.grpc import generic_create_grpc_server  # noqa: F401

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


@dataclass
class _PhaseOutcomes:
    """What the strategy mixin records of the current round, for :class:`FlowerServer`:
    besides the totals, each client's results by name (``fit_clients``: examples and fit
    metrics; ``evaluate_clients``: examples, loss and metrics) and the names of the clients
    whose results are missing (``dropped``)."""

    round_began: float = 0.0
    phase_began: float = 0.0
    fit_examples: int = 0
    evaluation: EvaluationResult | None = None
    fit_clients: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)
    evaluate_clients: dict[str, tuple[int, float, dict[str, float]]] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)

    def begin_round(self) -> None:
        """Forget the previous round's clients."""
        self.fit_clients, self.evaluate_clients, self.dropped = {}, {}, set()

    def clients(self) -> tuple[ClientRound, ...]:
        """Each client's :class:`ClientRound` of this round, sorted by name."""
        rounds = []
        for name in sorted(set(self.fit_clients) | set(self.evaluate_clients)):
            fit = self.fit_clients.get(name)
            evaluation = self.evaluate_clients.get(name)
            rounds.append(
                ClientRound(
                    name=name,
                    fit_examples=fit[0] if fit else None,
                    fit_metrics=fit[1] if fit else {},
                    evaluate_examples=evaluation[0] if evaluation else None,
                    loss=evaluation[1] if evaluation else None,
                    evaluate_metrics=evaluation[2] if evaluation else {},
                )
            )
        return tuple(rounds)


def numeric_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """The numbers among a client's Flower ``metrics`` (ints, floats; not bools, strings or
    bytes) as floats."""
    return {
        str(k): float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def client_name(proxy: Any, clients_name: str) -> str:
    """The name of the client behind ``proxy``: the :data:`CLIENT_NAME_PROPERTY` it returned
    (kept in ``proxy.properties`` by :func:`_client_names`), else ``"<clients_name>
    <cid[:8]>"``."""
    return str(proxy.properties.get(CLIENT_NAME_PROPERTY) or f"{clients_name} {proxy.cid[:8]}")


class _RoundWatch:
    """The clients of the running phase that have not answered yet, and a daemon thread that
    reports each of them as a :class:`Straggler` once it waited ``notice_s`` seconds, then
    at most every ``notice_s`` seconds (``notice_s`` 0: no reports).

    :meth:`begin` starts a phase with the sampled clients (cid to name), :meth:`answered`
    marks one that returned (a result or a failure), :meth:`end` closes the phase and returns
    the names of those whose results are missing; :meth:`close` stops the thread.
    """

    def __init__(self, notice_s: float, report: OnLearners | None) -> None:
        self.notice_s = notice_s
        self.report = report
        self._lock = threading.Lock()
        self._round = 0
        self._phase = ""
        self._began = 0.0
        self._names: dict[str, str] = {}
        self._waiting: dict[str, float] = {}  # cid -> waited seconds of the next report
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if notice_s > 0 and report is not None:
            self._thread = threading.Thread(target=self._run, name="straggler-watch", daemon=True)
            self._thread.start()

    def begin(self, server_round: int, phase: str, names: dict[str, str]) -> None:
        """A phase of ``server_round`` starts with the clients ``names`` (cid to name)."""
        with self._lock:
            self._round, self._phase, self._began = server_round, phase, time.monotonic()
            self._names = dict(names)
            self._waiting = dict.fromkeys(names, self.notice_s)

    def answered(self, cid: str) -> None:
        """The client ``cid`` returned from its instruction."""
        with self._lock:
            self._waiting.pop(cid, None)

    def end(self, returned: set[str]) -> list[str]:
        """Close the phase; returns the sorted names of its clients whose cids are not in
        ``returned`` (the cids with a result)."""
        with self._lock:
            missing = sorted(name for cid, name in self._names.items() if cid not in returned)
            self._names, self._waiting = {}, {}
        return missing

    def close(self) -> None:
        """Stop the watch thread."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(self.notice_s / 4, 1.0)):
            for straggler in self._due():
                _report(self.report, straggler)

    def _due(self) -> list[Straggler]:
        """The stragglers to report now, each at most once per ``notice_s``."""
        now = time.monotonic()
        due = []
        with self._lock:
            waited_s = now - self._began
            for cid, next_s in self._waiting.items():
                if waited_s >= next_s:
                    self._waiting[cid] = next_s + self.notice_s
                    name = self._names[cid]
                    due.append(Straggler(name, self._round, self._phase, round(waited_s, 1)))
        return due


def _report(report: OnLearners | None, event: LearnerEvent) -> None:
    """Hand ``event`` to ``report``; log, never raise, what it raises."""
    if report is None:
        return
    try:
        report(event)
    except Exception as exc:  # a report must not end training
        logger.warning("could not report %s: %s", event, exc)


def _watched(proxy: Any, watch: _RoundWatch) -> Any:
    """``proxy`` (a Flower ``ClientProxy``) wrapped so that ``watch`` learns when its
    ``fit``/``evaluate`` returns; the other calls pass through."""
    from flwr.server.client_proxy import ClientProxy

    class _WatchedProxy(ClientProxy):
        def __init__(self) -> None:
            super().__init__(proxy.cid)
            self.properties = proxy.properties

        def get_properties(self, ins: Any, timeout: Any, group_id: Any) -> Any:
            return proxy.get_properties(ins, timeout, group_id)

        def get_parameters(self, ins: Any, timeout: Any, group_id: Any) -> Any:
            return proxy.get_parameters(ins, timeout, group_id)

        def fit(self, ins: Any, timeout: Any, group_id: Any) -> Any:
            try:
                return proxy.fit(ins, timeout=timeout, group_id=group_id)
            finally:
                watch.answered(proxy.cid)

        def evaluate(self, ins: Any, timeout: Any, group_id: Any) -> Any:
            try:
                return proxy.evaluate(ins, timeout=timeout, group_id=group_id)
            finally:
                watch.answered(proxy.cid)

        def reconnect(self, ins: Any, timeout: Any, group_id: Any) -> Any:
            return proxy.reconnect(ins, timeout, group_id)

    return _WatchedProxy()


def _client_names(proxies: list[Any], clients_name: str, timeout_s: float) -> dict[str, str]:
    """cid to name of ``proxies``: the :data:`CLIENT_NAME_PROPERTY` each returns from
    ``get_properties`` (asked once per connection, all at once, kept in the proxy's
    ``properties``), else ``"<clients_name> <cid[:8]>"``."""
    from flwr.common import Code, GetPropertiesIns

    def ask(proxy: Any) -> None:
        try:
            res = proxy.get_properties(GetPropertiesIns(config={}), timeout_s, None)
        except Exception as exc:  # a client that is gone fails its instruction next
            logger.warning("could not ask a %s for its name: %s", clients_name, exc)
            return
        name = res.properties.get(CLIENT_NAME_PROPERTY) if res.status.code == Code.OK else None
        proxy.properties[CLIENT_NAME_PROPERTY] = str(name) if name else ""

    unknown = [p for p in proxies if CLIENT_NAME_PROPERTY not in p.properties]
    threads = [threading.Thread(target=ask, args=(p,), daemon=True) for p in unknown]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {p.cid: client_name(p, clients_name) for p in proxies}


def _build_strategy(
    settings: TrainingSettings,
    initial_parameters: NDArrays,
    outcomes: _PhaseOutcomes,
    config_fn: ConfigFn | None,
    watch: _RoundWatch,
) -> "FedAvg":
    """The SLA's Flower strategy with FLOps' checks, recording each phase in ``outcomes``
    and telling ``watch`` which clients each phase waits for (their proxies wrapped, see
    :func:`_watched`).

    Every supported strategy derives from Flower's ``FedAvg``; the class built here is
    ``_FlopsRounds`` mixed in before it (``class FlopsFedAdam(_FlopsRounds, FedAdam)``), so
    ``super()`` in the mixin reaches the chosen strategy's own configure and aggregate steps.
    ``config_fn`` becomes both ``on_fit_config_fn`` and ``on_evaluate_config_fn``.
    """
    from flwr.common import ndarrays_to_parameters
    from flwr.server import strategy as flower_strategies
    from flwr.server.strategy import FedAvg

    name = settings.strategy.name
    chosen: type[FedAvg] = getattr(flower_strategies, name)
    clients = f"{settings.clients_name}(s)"

    class _FlopsRounds(FedAvg):
        """FLOps' additions to any FedAvg-derived Flower strategy (a mixin)."""

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            instructions = super().configure_fit(server_round, parameters, client_manager)
            outcomes.round_began = outcomes.phase_began = time.monotonic()  # clients are here
            outcomes.begin_round()
            self._check_count(server_round, "training", len(instructions), self.min_fit_clients)
            return self._watch(server_round, "training", instructions)

        def configure_evaluate(
            self, server_round: int, parameters: Any, client_manager: Any
        ) -> Any:
            instructions = super().configure_evaluate(server_round, parameters, client_manager)
            need = self.min_evaluate_clients
            self._check_count(server_round, "evaluation", len(instructions), need)
            outcomes.phase_began = time.monotonic()
            return self._watch(server_round, "evaluation", instructions)

        def _watch(self, server_round: int, phase: str, instructions: list[Any]) -> list[Any]:
            """Name the sampled clients, start watching them, wrap their proxies."""
            proxies = [proxy for proxy, _ in instructions]
            names = _client_names(proxies, settings.clients_name, settings.round_timeout_s)
            watch.begin(server_round, phase, names)
            return [(_watched(proxy, watch), ins) for proxy, ins in instructions]

        def _check_count(self, server_round: int, phase: str, got: int, need: int) -> None:
            need = max(need, self.min_available_clients)
            if got < need:
                raise LearnersMissing(
                    f"Round {server_round} {phase}: only {got} {clients} connected within "
                    f"{settings.connect_timeout_s:.0f}s, the SLA needs {need}; check that "
                    f"every {settings.clients_name} started and reaches the aggregator, or "
                    "lower min_available_clients."
                )

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            need = self.min_fit_clients
            self._check_results(server_round, "training", results, failures, need)
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            if parameters is None:
                raise RoundFailed(f"Round {server_round}: {name} produced no parameters.")
            outcomes.fit_examples = sum(res.num_examples for _, res in results)
            outcomes.fit_clients = {
                client_name(proxy, settings.clients_name): (
                    int(res.num_examples),
                    numeric_metrics(res.metrics),
                )
                for proxy, res in results
            }
            return parameters, metrics

        def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
            need = self.min_evaluate_clients
            self._check_results(server_round, "evaluation", results, failures, need)
            loss, metrics = super().aggregate_evaluate(server_round, results, failures)
            if loss is None:
                raise RoundFailed(f"Round {server_round}: the evaluation produced no loss.")
            accuracy = metrics.get("accuracy")
            outcomes.evaluation = EvaluationResult(
                loss=float(loss),
                accuracy=None if accuracy is None else float(accuracy),
                examples=sum(res.num_examples for _, res in results),
                learners=len(results),
            )
            outcomes.evaluate_clients = {
                client_name(proxy, settings.clients_name): (
                    int(res.num_examples),
                    float(res.loss),
                    numeric_metrics(res.metrics),
                )
                for proxy, res in results
            }
            return loss, metrics

        def _check_results(
            self,
            server_round: int,
            phase: str,
            results: list[Any],
            failures: list[Any],
            phase_minimum: int,
        ) -> None:
            """The failure rule: go on while ``len(results)`` reaches the phase's minimum.
            Reports the clients without a result (:class:`LearnersDropped`) either way."""
            missing = watch.end({proxy.cid for proxy, _ in results})
            outcomes.dropped.update(missing)
            if not failures:
                return
            total = len(results) + len(failures)
            need = max(phase_minimum, self.min_available_clients)
            # Flower reports a timeout as a closed stream; the elapsed time tells them apart.
            timed_out = time.monotonic() - outcomes.phase_began >= settings.round_timeout_s
            going_on = len(results) >= need
            dropped = LearnersDropped(
                server_round, phase, missing, timed_out, len(results), need, going_on
            )
            _report(watch.report, dropped)
            what = (
                f"Round {server_round} {phase}: {len(failures)} of {total} {clients} failed "
                f"or timed out ({_describe_failures(failures)})"
            )
            if missing:
                what += f", dropped: {', '.join(missing)}"
            if going_on:
                logger.warning(
                    "%s; going on with the other %d (the SLA needs %d)", what, len(results), need
                )
                return
            if timed_out:
                hint = f"{settings.timeout_name} ({settings.round_timeout_s:g}s) was exceeded; "
                hint += settings.timeout_hint
            else:
                hint = f"see the {settings.clients_name}s' failed messages for the cause"
            raise RoundFailed(f"{what}; {len(results)} left, the SLA needs {need}; {hint}.")

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
        accept_failures=True,
        fit_metrics_aggregation_fn=_sum_examples,
        evaluate_metrics_aggregation_fn=weighted_accuracy,
        on_fit_config_fn=config_fn,
        on_evaluate_config_fn=config_fn,
        **parameters,
    )


class FlowerServer:
    """A Flower gRPC-bidi server whose clients stay connected across :meth:`train` calls.

    Args:
        settings: address, rounds, client minimums, timeouts and strategy.
        on_learners: gets the stragglers and the dropped clients of every phase
            (:data:`OnLearners`); ``None``: they are only logged.

    Use as a context manager (or call :meth:`start` and :meth:`stop`): :meth:`start` binds,
    :meth:`train` runs rounds, :meth:`evaluate` one evaluation round, :meth:`disconnect`
    tells the clients to end (they exit cleanly), and leaving the context stops the server
    (clients still connected then see their connection break).
    """

    def __init__(self, settings: TrainingSettings, on_learners: OnLearners | None = None) -> None:
        self.settings = settings
        self.on_learners = on_learners
        self._grpc_server: Any = None
        self._server: Server | None = None

    def start(self) -> str:
        """Bind ``settings.address`` and accept clients; returns the address.

        Serves TLS and refuses clients without the token as ``settings.security`` says.
        Raises :class:`AddressUnavailable` when the address can't be bound.
        """
        from flwr.server import Server

        client_manager = _bounded_client_manager(self.settings.connect_timeout_s)
        self._server = Server(client_manager=client_manager)
        try:
            self._grpc_server = _start_grpc_server(
                client_manager, self.settings.address, self.settings.security
            )
        except (SystemExit, RuntimeError) as exc:
            raise AddressUnavailable(
                f"Cannot listen on {self.settings.address} ({exc}); free the port or set "
                "FLOPS_AGGREGATOR_ADDRESS to another HOST:PORT."
            ) from exc
        logger.info(
            "Flower server listening on %s (%s)",
            self.settings.address,
            self.settings.security.describe(),
        )
        return self.settings.address

    def __enter__(self) -> "FlowerServer":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def connected(self) -> int:
        """How many clients are connected now."""
        return 0 if self._server is None else self._server.client_manager().num_available()

    def train(
        self,
        initial_parameters: NDArrays,
        num_rounds: int | None = None,
        on_round: Callable[[RoundResult], None] | None = None,
        config_fn: ConfigFn | None = None,
    ) -> TrainingResult:
        """Run ``num_rounds`` (default ``settings.num_rounds``) rounds of a fresh strategy
        instance starting from ``initial_parameters``.

        Each round is one fit round and one evaluation round of the clients; ``on_round`` is
        called after each (an exception it raises ends training and propagates);
        ``config_fn(round)`` is sent with every instruction. Returns the
        :class:`TrainingResult`. Raises :class:`LearnersMissing` when too few clients connect
        within ``connect_timeout_s`` and :class:`RoundFailed` when too few results come back.
        """
        server = self._require_server()
        rounds = self.settings.num_rounds if num_rounds is None else num_rounds
        outcomes = _PhaseOutcomes()
        watch = self._watch()
        strategy = _build_strategy(self.settings, initial_parameters, outcomes, config_fn, watch)
        server.set_strategy(strategy)
        initial = strategy.initialize_parameters(server.client_manager())
        assert initial is not None  # FedAvg returns its initial_parameters
        server.parameters = initial
        result = TrainingResult(parameters=list(initial_parameters))
        began = time.monotonic()
        try:
            self._rounds(server, rounds, outcomes, result, on_round)
        finally:
            watch.close()
        result.seconds = time.monotonic() - began
        return result

    def _watch(self) -> _RoundWatch:
        return _RoundWatch(self.settings.notice_s, self.on_learners)

    def _rounds(
        self,
        server: "Server",
        rounds: int,
        outcomes: _PhaseOutcomes,
        result: TrainingResult,
        on_round: Callable[[RoundResult], None] | None,
    ) -> None:
        """Run ``rounds`` fit and evaluation rounds, appending to ``result``."""
        from flwr.common import parameters_to_ndarrays

        for server_round in range(1, rounds + 1):
            fit = server.fit_round(server_round=server_round, timeout=self.settings.round_timeout_s)
            if fit is None or fit[0] is None:  # the mixin raises first; kept for safety
                raise RoundFailed(f"Round {server_round}: no client was sampled for training.")
            server.parameters = fit[0]
            result.parameters = parameters_to_ndarrays(fit[0])
            evaluation = self._evaluate_round(server, server_round, outcomes)
            round_result = RoundResult(
                round=server_round,
                loss=evaluation.loss,
                accuracy=evaluation.accuracy,
                fit_examples=outcomes.fit_examples,
                evaluate_examples=evaluation.examples,
                learners=evaluation.learners,
                seconds=time.monotonic() - outcomes.round_began,
                clients=outcomes.clients(),
                dropped=tuple(sorted(outcomes.dropped)),
            )
            result.rounds.append(round_result)
            _log_round(round_result)
            if on_round is not None:
                on_round(round_result)

    def evaluate(
        self, parameters: NDArrays, server_round: int = 1, config_fn: ConfigFn | None = None
    ) -> EvaluationResult:
        """One federated evaluation of ``parameters`` by the connected clients (a fresh
        strategy, the same minimums and failure rule as :meth:`train`).

        Returns the :class:`EvaluationResult`; raises like :meth:`train`.
        """
        from flwr.common import ndarrays_to_parameters

        server = self._require_server()
        outcomes = _PhaseOutcomes()
        watch = self._watch()
        strategy = _build_strategy(self.settings, parameters, outcomes, config_fn, watch)
        server.set_strategy(strategy)
        server.parameters = ndarrays_to_parameters(parameters)
        try:
            return self._evaluate_round(server, server_round, outcomes)
        finally:
            watch.close()

    def _evaluate_round(
        self, server: "Server", server_round: int, outcomes: _PhaseOutcomes
    ) -> EvaluationResult:
        outcomes.evaluation = None
        server.evaluate_round(server_round=server_round, timeout=self.settings.round_timeout_s)
        if outcomes.evaluation is None:  # the mixin raises first; kept for safety
            raise RoundFailed(f"Round {server_round}: no client was sampled for evaluation.")
        return outcomes.evaluation

    def disconnect(self) -> None:
        """Tell every connected client to end its session (Flower's ``Reconnect`` without a
        delay): learners then exit with success."""
        if self._server is not None:
            self._server.disconnect_all_clients(timeout=self.settings.round_timeout_s)

    def stop(self) -> None:
        """Stop the gRPC server (idempotent); clients still connected see the stream end."""
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=1)
            self._grpc_server = None

    def _require_server(self) -> "Server":
        if self._server is None or self._grpc_server is None:
            raise RuntimeError("FlowerServer.start() was not called (or stop() was).")
        return self._server


def _start_grpc_server(client_manager: Any, address: str, security: ServerSecurity) -> Any:
    """Flower's gRPC-bidi server on ``address`` (started), with ``security``'s TLS
    certificates and token interceptor.

    The same as Flower's ``start_grpc_server`` (its servicer, its default limits), which
    accepts no interceptors; ``generic_create_grpc_server`` raises ``SystemExit`` when the
    port is in use and ``RuntimeError`` when it can't be bound.
    """
    from flwr.proto.transport_pb2_grpc import add_FlowerServiceServicer_to_server
    from flwr.server.superlink.fleet.grpc_bidi.flower_service_servicer import (
        FlowerServiceServicer,
    )
    from flwr.supercore.grpc import generic_create_grpc_server

    interceptors = security.interceptors()
    server = generic_create_grpc_server(
        servicer_and_add_fn=(
            FlowerServiceServicer(client_manager),
            add_FlowerServiceServicer_to_server,
        ),
        server_address=address,
        certificates=security.certificates(),
        interceptors=interceptors or None,
    )
    server.start()
    return server


def _bounded_client_manager(connect_timeout_s: float) -> Any:
    """A Flower ``SimpleClientManager`` that waits at most ``connect_timeout_s`` for clients
    (Flower's default is 24 h)."""
    from flwr.server import SimpleClientManager

    class _BoundedClientManager(SimpleClientManager):
        def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
            ready = super().wait_for(num_clients, int(min(timeout, connect_timeout_s)))
            if not ready:
                logger.error(
                    "only %d of %d clients connected within %.0fs",
                    self.num_available(),
                    num_clients,
                    connect_timeout_s,
                )
            return ready

    return _BoundedClientManager()


def _log_round(result: RoundResult) -> None:
    logger.info(
        "round %d: loss %.4f accuracy %s (%d clients, %.2fs)",
        result.round,
        result.loss,
        result.accuracy,
        result.learners,
        result.seconds,
    )


def run_server(
    settings: TrainingSettings,
    initial_parameters: NDArrays,
    on_round: Callable[[RoundResult], None] | None = None,
    on_listening: Callable[[str], None] | None = None,
    config_fn: ConfigFn | None = None,
    on_learners: OnLearners | None = None,
) -> TrainingResult:
    """Run ``settings.num_rounds`` rounds of ``settings.strategy`` with the clients that
    connect, then disconnect them (the classic and the root aggregator's whole training).

    Args:
        settings: address, rounds, client minimums and timeouts.
        initial_parameters: the global model's starting parameters (list of NumPy arrays).
        on_round: called after each round's federated evaluation, in order; an exception it
            raises ends training and propagates.
        on_listening: called with the bound ``HOST:PORT`` once clients can connect.
        config_fn: ``config_fn(round)`` is sent to the clients with every instruction.
        on_learners: gets the stragglers and dropped clients (:data:`OnLearners`).

    Returns the :class:`TrainingResult`. Raises :class:`AddressUnavailable` when the address
    can't be bound, :class:`LearnersMissing` when too few clients connect within
    ``connect_timeout_s``, and :class:`RoundFailed` when too few results come back in a
    round. On every exit the gRPC server is stopped; after success the clients are told to
    end first, after a failure they see the connection end.
    """
    with FlowerServer(settings, on_learners) as server:
        if on_listening is not None:
            on_listening(settings.address)
        result = server.train(initial_parameters, on_round=on_round, config_fn=config_fn)
        server.disconnect()
    return result
