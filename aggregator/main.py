"""The aggregator process: runs the SLA's Flower strategy over the learners (classic) or over
the cluster aggregators (hierarchical FL's root), or a cluster of learners for the root
(:mod:`aggregator.cluster`), and tracks it in MLflow.

Started as ``python -m aggregator`` (or ``flops-aggregator``) by an orchestrator, configured
by environment variables (:mod:`flops_utils.env_vars`; an option of ``flops-aggregator
--help`` sets the variable it names, :mod:`flops_utils.role_cli`):

- ``FLOPS_PROJECT_ID``, ``FLOPS_MQTT_URL``: where status messages go (required).
- ``FLOPS_AGGREGATOR_ADDRESS``: ``HOST:PORT`` the Flower server binds (required).
- ``FLOPS_MLFLOW_URL``: ``http://HOST:PORT`` of the MLflow tracking server (required).
- ``FLOPS_SLA``: the validated SLA as JSON (required); read are ``training_configuration.
  {training_rounds, min_available_clients, min_fit_clients, min_evaluate_clients,
  round_timeout_s, strategy}``, ``ml_model_flavor`` and ``customerID``, with the SLA's
  defaults (``strategy`` defaults to FedAvg).
- ``FLOPS_ML_REPO_DIR``: the ML repository root (defaults to the working directory).
- ``FLOPS_CONNECT_TIMEOUT_S``: seconds to wait for the learners (defaults to 300).
- ``FLOPS_STRAGGLER_NOTICE_S``: seconds after which, and then every which, a learner that has
  not answered a round is reported (defaults to ``min(30, round_timeout_s / 2)``; 0: never).
- ``FLOPS_MQTT_DRAIN_TIMEOUT_S``: seconds the final status message waits for the broker to
  take the queued messages (defaults to 60; :mod:`flops_utils.notifications`).
- ``MLFLOW_HTTP_REQUEST_*``: the MLflow client's retries (:mod:`aggregator.tracking`).
- ``FLOPS_REGISTERED_MODEL``: the registered model the final model becomes a version of
  (default ``flops-<project_id>``); ``FLOPS_PROVENANCE``: the manager's JSON of the project's
  repository, commit, environment, data rows and URL, recorded in the run
  (:mod:`aggregator.run_record`, which also names the per-learner metrics).
- ``FLOPS_AGGREGATOR_ROLE``: ``classic`` (default), ``root`` or ``cluster``. The root also
  reads ``FLOPS_CLUSTERS`` (required: the participating clusters); the cluster aggregator
  reads ``FLOPS_ROOT_AGGREGATOR_ADDRESS``, ``FLOPS_CLUSTER`` (required) and ``FLOPS_LEARNERS``
  (optional), and no ``FLOPS_ML_REPO_DIR`` (see :mod:`aggregator.cluster`).

The root aggregator runs ``training_cycles`` rounds (cycles) of the SLA's strategy over the
cluster aggregators, each needing :func:`~flops_utils.contract.training.root_clusters_needed`
of them and given ``training_rounds * round_timeout_s + FLOPS_CONNECT_TIMEOUT_S`` seconds per
call; every instruction's config carries the cycle and the root's MLflow run id. It starts
from the ModelManager's parameters and logs and registers the final model like the classic
aggregator; its messages are the classic ones with cycles for rounds (``started`` adds
``role`` ``root`` and ``cycles``, ``progress`` adds ``cycle``, ``learners`` counts cluster
aggregators) and its MLflow metrics have ``step = cycle``.

MQTT (``flops/<project_id>/aggregator/<status>``): ``started`` once learners can connect
(data ``{"address", "rounds", "strategy"}``, ``strategy`` being ``{"name", ...parameters}``
with every default filled in), ``progress`` after each round (data ``{"stage": "round",
"round", "rounds", "loss", "accuracy", "learners", "seconds"}``), while a round waits for a
learner (``{"stage": "straggler", "learner", "round", "phase", "waited_s",
"round_timeout_s"}``), when a round drops learners (``{"stage": "learners_dropped", "round",
"phase", "learners", "timed_out", "remaining", "needed", "going_on"}``; texts in
:mod:`aggregator.learner_events`) and once after the last round (data ``{"stage":
"training_done", "rounds", "loss", "accuracy"}``), then ``success``
(data ``{"experiment_id", "run_id", "model_uri", "registered_model", "model_version",
"registered_model_uri", "loss", "accuracy", "rounds", "seconds"}``) or ``failed`` (message =
the error on one line, data ``{"error", "exit_code"}``, plus ``"cause":
"tracking_server_unreachable"`` when the MLflow tracking server did not answer); the
payloads are the models of :mod:`flops_utils.contract.messages`. The process exits with a
:class:`~flops_utils.contract.exit_codes.ExitCode` (:data:`~flops_utils.contract.exit_codes.
EXIT_CODES` gives each one's meaning and fix).
"""

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from aggregator.cluster import run_cluster
from aggregator.config import CYCLE_KEY, PARENT_RUN_KEY, AggregatorConfig, ConfigError
from aggregator.flower_server import (
    ConfigFn,
    RoundResult,
    TrainingSettings,
    preload,
    run_server,
)
from aggregator.learner_events import learner_event_publisher
from aggregator.run_record import (
    Participation,
    client_prefix,
    provenance_params,
    provenance_tags,
    round_metrics,
    software_versions,
)
from aggregator.signals import stop_cleanly_on_sigterm
from aggregator.tracking import (
    MODEL_NAME,
    LoggedModel,
    MlflowTracker,
    ModelLoggingError,
)
from flops_utils import env_vars
from flops_utils.contract.entry import run_role
from flops_utils.contract.exit_codes import Role
from flops_utils.contract.lifecycle import Stage
from flops_utils.contract.messages import (
    AggregatorStarted,
    AggregatorSuccess,
    RoundProgress,
    TrainingDone,
)
from flops_utils.contract.tracking import CUSTOMER_TAG, REPO_URL_TAG, without_credentials
from flops_utils.contract.training import AggregatorRole
from flops_utils.model_worker_client import (
    ModelSaveFailed,
    ModelWorker,
    RemoteUserCodeError,
)
from flops_utils.notifications import StatusNotifier
from flops_utils.role_cli import (
    STATUS_ENV,
    EnvVar,
    MqttUrlOption,
    ProjectIdOption,
    RepoDirOption,
    RoleApp,
    UserPythonOption,
    VersionOption,
    export_options,
)
from flops_utils.types import ComponentStatus
from flops_utils.user_code import UserCodeError, call_user_code

__all__ = ["AggregatorConfig", "ConfigError", "main", "run"]


def run(config: AggregatorConfig, notifier: StatusNotifier) -> None:
    """Run the aggregator of ``config.role``: :func:`run_top` for the classic and the root
    aggregator, :func:`aggregator.cluster.run_cluster` for a cluster aggregator."""
    if config.role is AggregatorRole.CLUSTER:
        run_cluster(config, notifier)
    else:
        run_top(config, notifier)


class _TopPlan:
    """What differs between the classic and the root aggregator: the rounds (cycles), the
    server settings and the extra fields of their messages."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.root = config.role is AggregatorRole.ROOT
        self.rounds = config.training_cycles if self.root else config.training_rounds
        self.settings: TrainingSettings = (
            config.root_settings() if self.root else config.training_settings()
        )
        self.word = "cycle" if self.root else "round"
        self.started_extra: dict[str, Any] = (
            {"role": AggregatorRole.ROOT.value, "cycles": self.rounds} if self.root else {}
        )
        expected = config.clusters if self.root else config.provenance.learners
        self.participation = Participation(frozenset(expected))
        self.prefix = client_prefix(self.settings.clients_name)

    def run_params(self, config: AggregatorConfig) -> dict[str, Any]:
        """The run's parameters: the SLA and the provenance (:mod:`aggregator.run_record`)."""
        versions = software_versions()
        return {**config.sla, **provenance_params(config.provenance, versions)}

    def run_tags(self, config: AggregatorConfig) -> dict[str, str]:
        """The run's provenance tags (:func:`aggregator.run_record.provenance_tags`)."""
        return provenance_tags(
            config.project_id,
            config.customer_id,
            config.provenance,
            config.strategy.name,
            software_versions(),
        )

    def record_round(self, tracker: MlflowTracker, result: RoundResult) -> None:
        """Log the round's metrics (each client's too) and the participants so far."""
        lost = self.participation.record(result)
        tracker.log_metrics(result.round, round_metrics(result, self.prefix, lost))
        tracker.set_tags(self.participation.tags())

    def config_fn(self, run_id: str) -> ConfigFn | None:
        """The root's instruction config: the cycle and the parent MLflow run id."""
        if not self.root:
            return None
        return lambda cycle: {CYCLE_KEY: cycle, PARENT_RUN_KEY: run_id}

    def progress(self, result: RoundResult) -> RoundProgress:
        """The ``progress`` data of a finished round (the root's: a cycle)."""
        extra: dict[str, Any] = {"cycle": result.round} if self.root else {}
        return RoundProgress(
            stage=Stage.ROUND,
            round=result.round,
            rounds=self.rounds,
            loss=result.loss,
            accuracy=result.accuracy,
            learners=result.learners,
            seconds=round(result.seconds, 3),
            **extra,
        )


def run_top(config: AggregatorConfig, notifier: StatusNotifier) -> None:
    """Train, track and register the model as the classic or the root aggregator; publish
    ``started``, ``progress`` and ``success``.

    Raises what failed (the entry wrapper maps it to its exit code and publishes ``failed``):
    :class:`UserCodeError`, ``TrainingFailed``, ``AddressUnavailable``, ``TrackingError``,
    ``ModelLoggingError``, ``ModelWorkerStartError``; the MLflow run is marked ``FAILED``.
    """
    began = time.monotonic()
    plan = _TopPlan(config)
    tracker = MlflowTracker(config.mlflow_url, config.project_id, config.registered_model)
    if config.repo_dir is None:
        raise ConfigError("The classic and the root aggregator need FLOPS_ML_REPO_DIR.")

    def on_listening(address: str) -> None:
        started = AggregatorStarted(
            address=address,
            rounds=plan.rounds,
            strategy=config.strategy.model_dump(mode="json"),
            **plan.started_extra,
        )
        notifier.notify(ComponentStatus.STARTED, f"aggregator listening on {address}", started)

    def on_round(result: RoundResult) -> None:
        plan.record_round(tracker, result)
        accuracy = "n/a" if result.accuracy is None else f"{result.accuracy:.4f}"
        notifier.notify(
            ComponentStatus.PROGRESS,
            f"{plan.word} {result.round}/{plan.rounds}: loss {result.loss:.4f}, "
            f"accuracy {accuracy}",
            plan.progress(result),
        )

    stop_cleanly_on_sigterm(tracker, notifier)
    try:
        tracker.check_reachable()
        flower = preload()  # Flower's imports overlap the model worker's start
        with ModelWorker(config.repo_dir) as model_manager:
            initial = call_user_code(
                "ModelManager.get_model_parameters", model_manager.get_model_parameters
            )
            flower.join()  # before MLflow's imports: both import protobuf and grpc
            run_id = tracker.start_run(plan.run_params(config), tags=plan.run_tags(config))
            on_learners = learner_event_publisher(
                notifier,
                plan.settings.clients_name,
                plan.settings.timeout_name,
                plan.settings.round_timeout_s,
            )
            result = run_server(
                plan.settings,
                initial,
                on_round,
                on_listening,
                plan.config_fn(run_id),
                on_learners,
            )
            last = result.rounds[-1] if result.rounds else None
            notifier.notify(
                ComponentStatus.PROGRESS,
                f"training done after {len(result.rounds)} {plan.word}s; logging the model",
                TrainingDone(
                    stage=Stage.TRAINING_DONE,
                    rounds=len(result.rounds),
                    loss=last.loss if last else None,
                    accuracy=last.accuracy if last else None,
                ),
            )
            logged = _log_final_model(
                model_manager, tracker, config, result.parameters, plan.rounds
            )
        success = AggregatorSuccess(
            experiment_id=tracker.experiment_id,
            run_id=run_id,
            model_uri=logged.model_uri,
            registered_model=logged.registered_model,
            model_version=logged.version,
            registered_model_uri=logged.registered_model_uri,
            loss=last.loss if last else None,
            accuracy=last.accuracy if last else None,
            rounds=len(result.rounds),
            seconds=round(time.monotonic() - began, 3),
        )
        tracker.end_run("FINISHED")
    except Exception:
        tracker.end_run("FAILED")
        raise
    finally:
        tracker.end_run("KILLED")  # a no-op unless interrupted (KeyboardInterrupt, SystemExit)
    notifier.notify(
        ComponentStatus.SUCCESS,
        f"training finished after {success.rounds} {plan.word}s; model "
        f"{logged.registered_model_uri}",
        success,
    )


def _log_final_model(
    model_manager: ModelWorker,
    tracker: MlflowTracker,
    config: AggregatorConfig,
    parameters: list[np.ndarray[Any, Any]],
    step: int,
) -> LoggedModel:
    """Save the final model in the model worker (the repository's environment, with its
    MLflow) and upload and register it with this process's MLflow client; ``step`` is the
    last round (cycle for the root).

    Raises :class:`UserCodeError` when ``set_model_parameters``/``get_model`` raised,
    :class:`ModelLoggingError` when the model cannot be saved with the SLA's flavor, and
    :class:`TrackingError` when the tracking server fails.
    """
    with tempfile.TemporaryDirectory(prefix="flops-model-") as scratch:
        model_dir = Path(scratch) / MODEL_NAME
        try:
            saved = model_manager.save_model(config.flavor.value, model_dir, parameters)
        except RemoteUserCodeError as exc:  # the message names the method
            raise UserCodeError(str(exc)) from None
        except ModelSaveFailed as exc:
            raise ModelLoggingError(exc.message) from None
        model_tags = {CUSTOMER_TAG: config.customer_id}
        if config.provenance.repo_url:
            model_tags[REPO_URL_TAG] = without_credentials(config.provenance.repo_url)
        return tracker.log_saved_model(
            model_dir, config.flavor, step=step, saved_with=saved, model_tags=model_tags
        )


def _option(envvar: str, help: str, default: str | None = None, metavar: str = "TEXT") -> Any:
    """A string option setting ``envvar`` (checked by :meth:`AggregatorConfig.from_env`)."""
    return typer.Option(
        envvar=envvar,
        help=help,
        metavar=metavar,
        show_default=default if default is not None else False,
    )


app = RoleApp(
    "flops-aggregator",
    "Run the SLA's Flower strategy over the project's learners (classic), over the cluster "
    "aggregators (root) or over a cluster's learners (cluster), and track it in MLflow (an "
    "orchestrator starts it with FLOPS_* variables).",
    env_only=[
        EnvVar(env_vars.SLA, "the project's validated SLA as JSON (required)"),
        EnvVar(env_vars.PROVENANCE, "the manager's provenance JSON, recorded in the MLflow run"),
        EnvVar(env_vars.TLS_CERT, "PEM certificate chain of the Flower server", "plain gRPC"),
        EnvVar(env_vars.TLS_KEY, "PEM private key of FLOPS_TLS_CERT"),
        EnvVar(
            env_vars.TLS_CA_CERT,
            "cluster aggregator: PEM of the project's CA, to verify the root aggregator",
        ),
        EnvVar(env_vars.FLOWER_TOKEN, "the project's Flower client secret"),
        EnvVar("MLFLOW_TRACKING_USERNAME", "the project's MLflow user (with _PASSWORD)"),
        *STATUS_ENV,
    ],
)


@app.main_command()
def _aggregator(
    ctx: typer.Context,
    project_id: ProjectIdOption = None,
    mqtt_url: MqttUrlOption = None,
    aggregator_address: Annotated[
        str | None,
        _option(env_vars.AGGREGATOR_ADDRESS, "HOST:PORT the Flower server binds (required)."),
    ] = None,
    mlflow_url: Annotated[
        str | None,
        _option(env_vars.MLFLOW_URL, "The MLflow tracking server, http://HOST:PORT (required)."),
    ] = None,
    repo_dir: RepoDirOption = None,
    user_python: UserPythonOption = None,
    role: Annotated[
        str | None,
        _option(env_vars.AGGREGATOR_ROLE, "classic, root or cluster.", "classic", "ROLE"),
    ] = None,
    clusters: Annotated[
        str | None,
        _option(env_vars.CLUSTERS, "Root: comma-separated clusters taking part (required)."),
    ] = None,
    cluster: Annotated[
        str | None,
        _option(env_vars.CLUSTER, "Cluster aggregator: its cluster's name (required)."),
    ] = None,
    root_aggregator_address: Annotated[
        str | None,
        _option(env_vars.ROOT_AGGREGATOR_ADDRESS, "Cluster aggregator: HOST:PORT of the root."),
    ] = None,
    learners: Annotated[
        str | None,
        _option(env_vars.LEARNERS, "Cluster aggregator: comma-separated learner names."),
    ] = None,
    registered_model: Annotated[
        str | None,
        _option(
            env_vars.REGISTERED_MODEL,
            "The MLflow registered model the final model becomes a version of.",
            "flops-<project id>",
        ),
    ] = None,
    connect_timeout_s: Annotated[
        str | None,
        _option(env_vars.CONNECT_TIMEOUT_S, "Seconds to wait for the learners.", "300", "SECONDS"),
    ] = None,
    straggler_notice_s: Annotated[
        str | None,
        _option(
            env_vars.STRAGGLER_NOTICE_S,
            "Seconds after which (and then every which) a learner that has not answered a "
            "round is reported; 0: never.",
            "min(30, round_timeout_s / 2)",
            "SECONDS",
        ),
    ] = None,
    version: VersionOption = False,
) -> int:
    """The aggregator's command: options set their variables, then :func:`run` as the
    orchestrator starts it."""
    export_options(ctx)
    return run_role(Role.AGGREGATOR, lambda: AggregatorConfig.from_env(os.environ), run)


def main() -> None:
    """Entry point of ``python -m aggregator`` / ``flops-aggregator``; exits with an
    :class:`~flops_utils.contract.exit_codes.ExitCode` (2 also for a command-line error)."""
    sys.exit(app.run())
