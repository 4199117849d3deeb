"""The cluster aggregator of hierarchical FL: a Flower client of the root aggregator and a
Flower server over its cluster's learners, in one process.

At start it binds ``FLOPS_AGGREGATOR_ADDRESS`` (its learners connect there and stay connected
across cycles), publishes ``started`` and connects to the root at
``FLOPS_ROOT_AGGREGATOR_ADDRESS`` (retrying for up to ``FLOPS_CONNECT_TIMEOUT_S``). Then, per
instruction of the root:

- fit (cycle ``c``, the root's parameters): ``training_rounds`` rounds of the SLA's strategy
  over its learners (a fresh strategy instance starting from the root's parameters); returns
  the cluster model and, as its example count, the sum of its learners' ``num_examples`` in
  the last round (a count per round, not summed over rounds, so that the root weighs clusters
  by their data);
- evaluate (the global parameters): one evaluation round of its learners; returns the
  example-weighted loss, the evaluation examples and ``{"accuracy": weighted accuracy}``.

It publishes as component ``cluster-aggregator``, instance ``FLOPS_CLUSTER``: ``started``
(:class:`~flops_utils.contract.messages.AggregatorStarted`, ``role`` ``cluster``),
``progress`` per round (:class:`~flops_utils.contract.messages.RoundProgress` with ``cycle``,
``step = (cycle - 1) * training_rounds + round``, ``cluster`` and the example counts), and
``success`` (:class:`~flops_utils.contract.messages.ClusterAggregatorSuccess`) once the root
ends training, after telling its learners to end. MLflow: one run
``flops-<project_id>-<cluster>`` in the project's experiment, nested under the root's run
(tag ``mlflow.parentRunId``), with the parameters ``cluster``, ``learners`` and
``training_rounds``, the metrics ``loss``/``accuracy``, the round's counts and each
learner's results (:mod:`aggregator.run_record`) per round at the global step; it
ends ``FINISHED``, ``FAILED`` on an error, ``KILLED`` on SIGTERM. It runs no user code (the
parameters come from the root).
"""

import time
from typing import Any

from aggregator.config import CYCLE_KEY, PARENT_RUN_KEY, AggregatorConfig
from aggregator.flower_client import NDArrays, run_root_client
from aggregator.flower_server import FlowerServer, RoundResult
from aggregator.learner_events import learner_event_publisher
from aggregator.run_record import Participation, client_prefix, round_metrics
from aggregator.signals import stop_cleanly_on_sigterm
from aggregator.tracking import MlflowTracker
from flops_utils.contract.lifecycle import Stage
from flops_utils.contract.messages import (
    AggregatorStarted,
    ClusterAggregatorSuccess,
    RoundProgress,
)
from flops_utils.contract.training import AggregatorRole
from flops_utils.logging import logger
from flops_utils.notifications import StatusNotifier
from flops_utils.types import ComponentStatus

__all__ = ["ClusterWork", "global_step", "run_cluster"]


def global_step(cycle: int, server_round: int, training_rounds: int) -> int:
    """The project-wide step of round ``server_round`` (1-based) of cycle ``cycle``
    (1-based): ``(cycle - 1) * training_rounds + server_round``."""
    return (cycle - 1) * training_rounds + server_round


class ClusterWork:
    """Answers the root's fit and evaluate instructions with the cluster's learners.

    Args:
        config: the cluster aggregator's configuration.
        server: its started Flower server (the learners connect there).
        tracker: where its child run goes (started at the first fit, under the root's run).
        notifier: publishes its ``progress``.
        current_cycle: a one-element list it keeps at the cycle being served (shared with
            whoever reports learner events).

    ``cycles`` and ``rounds`` count what it did.
    """

    def __init__(
        self,
        config: AggregatorConfig,
        server: FlowerServer,
        tracker: MlflowTracker | None,
        notifier: StatusNotifier | None,
        current_cycle: list[int] | None = None,
    ) -> None:
        self.config = config
        self.current_cycle = current_cycle if current_cycle is not None else [0]
        self.server = server
        self.tracker = tracker
        self.notifier = notifier
        self.cycles = 0
        self.rounds = 0
        self.participation = Participation(frozenset(config.learners))

    def fit(
        self, parameters: NDArrays, config: dict[str, Any]
    ) -> tuple[NDArrays, int, dict[str, Any]]:
        """One cycle: ``training_rounds`` rounds from ``parameters``; returns ``(cluster
        parameters, learners' num_examples summed over the last round, {})``."""
        cycle = int(config.get(CYCLE_KEY, self.cycles + 1))
        self.current_cycle[0] = cycle
        self._start_run(config.get(PARENT_RUN_KEY))
        logger.info("cycle %d: %d rounds", cycle, self.config.training_rounds)
        result = self.server.train(
            parameters, on_round=lambda r: self._on_round(cycle, r), config_fn=None
        )
        self.cycles += 1
        self.rounds += len(result.rounds)
        return result.parameters, result.rounds[-1].fit_examples, {}

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """One evaluation round of ``parameters``; returns ``(example-weighted loss,
        evaluation examples, {"accuracy": example-weighted accuracy})``."""
        cycle = int(config.get(CYCLE_KEY, self.cycles))
        self.current_cycle[0] = cycle
        evaluation = self.server.evaluate(parameters, server_round=cycle)
        metrics = {} if evaluation.accuracy is None else {"accuracy": evaluation.accuracy}
        return evaluation.loss, evaluation.examples, metrics

    def _start_run(self, parent_run_id: Any) -> None:
        if self.tracker is None or self.tracker.run_id is not None:
            return
        tags = {"flops.cluster": self.config.cluster, "flops.customer_id": self.config.customer_id}
        if parent_run_id:
            tags["mlflow.parentRunId"] = str(parent_run_id)
        params = {
            "cluster": self.config.cluster,
            "learners": ",".join(self.config.learners),
            "training_rounds": self.config.training_rounds,
        }
        run_name = f"{self.tracker.name}-{self.config.cluster}"
        self.tracker.start_run(params, tags=tags, run_name=run_name)

    def _on_round(self, cycle: int, result: RoundResult) -> None:
        rounds = self.config.training_rounds
        step = global_step(cycle, result.round, rounds)
        if self.tracker is not None:
            lost = self.participation.record(result)
            prefix = client_prefix(self.server.settings.clients_name)
            self.tracker.log_metrics(step, round_metrics(result, prefix, lost))
            self.tracker.set_tags(self.participation.tags())
        if self.notifier is None:
            return
        accuracy = "n/a" if result.accuracy is None else f"{result.accuracy:.4f}"
        self.notifier.notify(
            ComponentStatus.PROGRESS,
            f"cluster {self.config.cluster} cycle {cycle} round {result.round}/{rounds}: "
            f"loss {result.loss:.4f}, accuracy {accuracy}",
            RoundProgress(
                stage=Stage.ROUND,
                round=result.round,
                rounds=rounds,
                cycle=cycle,
                step=step,
                cluster=self.config.cluster,
                loss=result.loss,
                accuracy=result.accuracy,
                learners=result.learners,
                fit_examples=result.fit_examples,
                evaluate_examples=result.evaluate_examples,
                seconds=round(result.seconds, 3),
            ),
        )


def run_cluster(config: AggregatorConfig, notifier: StatusNotifier) -> None:
    """Serve the root aggregator with the cluster's learners until the root ends training;
    publish ``started``, ``progress`` and ``success``.

    Raises what failed (the entry wrapper maps it to its exit code and publishes ``failed``):
    ``TrainingFailed`` (too few learners), ``RootUnreachable``, ``AddressUnavailable``,
    ``TrackingError``; the MLflow run is marked ``FAILED``.
    """
    began = time.monotonic()
    tracker = MlflowTracker(config.mlflow_url, config.project_id)
    stop_cleanly_on_sigterm(tracker, notifier, f"cluster aggregator of {config.cluster}")
    settings = config.training_settings()
    cycle = [0]  # the cycle running now, for the learner events
    on_learners = learner_event_publisher(
        notifier,
        settings.clients_name,
        settings.timeout_name,
        settings.round_timeout_s,
        lambda: {"cycle": cycle[0], "cluster": config.cluster},
    )
    try:
        tracker.check_reachable()
        with FlowerServer(settings, on_learners) as server:
            started = AggregatorStarted(
                address=config.address,
                rounds=config.training_rounds,
                strategy=config.strategy.model_dump(mode="json"),
                role=AggregatorRole.CLUSTER.value,
                cycles=config.training_cycles,
                cluster=config.cluster,
            )
            notifier.notify(
                ComponentStatus.STARTED,
                f"cluster aggregator of {config.cluster} listening on {config.address}",
                started,
            )
            tracker.prepare()  # MLflow's import, before the first cycle
            work = ClusterWork(config, server, tracker, notifier, cycle)
            run_root_client(
                work,
                config.root_address,
                config.connect_timeout_s,
                config.root_security,
                name=config.cluster,
            )
            server.disconnect()
        tracker.end_run("FINISHED")
    except Exception:
        tracker.end_run("FAILED")
        raise
    finally:
        tracker.end_run("KILLED")  # a no-op unless interrupted (KeyboardInterrupt, SystemExit)
    notifier.notify(
        ComponentStatus.SUCCESS,
        f"cluster aggregator of {config.cluster} finished after {work.cycles} cycles "
        f"({work.rounds} rounds)",
        ClusterAggregatorSuccess(
            cluster=config.cluster,
            run_id=tracker.run_id,
            cycles=work.cycles,
            rounds=work.rounds,
            seconds=round(time.monotonic() - began, 3),
        ),
    )
