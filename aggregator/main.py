"""The aggregator process: runs the SLA's Flower strategy over the learners and tracks it in
MLflow.

Started as ``python -m aggregator`` (or ``flops-aggregator``) by an orchestrator, configured
by environment variables (:mod:`flops_utils.env_vars`):

- ``FLOPS_PROJECT_ID``, ``FLOPS_MQTT_URL``: where status messages go (required).
- ``FLOPS_AGGREGATOR_ADDRESS``: ``HOST:PORT`` the Flower server binds (required).
- ``FLOPS_MLFLOW_URL``: ``http://HOST:PORT`` of the MLflow tracking server (required).
- ``FLOPS_SLA``: the validated SLA as JSON (required); read are ``training_configuration.
  {training_rounds, min_available_clients, min_fit_clients, min_evaluate_clients,
  round_timeout_s, strategy}``, ``ml_model_flavor`` and ``customerID``, with the SLA's
  defaults (``strategy`` defaults to FedAvg).
- ``FLOPS_ML_REPO_DIR``: the ML repository root (defaults to the working directory).
- ``FLOPS_CONNECT_TIMEOUT_S``: seconds to wait for the learners (defaults to 300).

MQTT (``flops/<project_id>/aggregator/<status>``): ``started`` once learners can connect
(data ``{"address", "rounds", "strategy"}``, ``strategy`` being ``{"name", ...parameters}``
with every default filled in), ``progress`` after each round (data ``{"stage": "round",
"round", "rounds", "loss", "accuracy", "learners", "seconds"}``) and once after the last
round (data ``{"stage": "training_done", "rounds", "loss", "accuracy"}``), then ``success``
(data ``{"experiment_id", "run_id", "model_uri", "registered_model", "model_version",
"registered_model_uri", "loss", "accuracy", "rounds", "seconds"}``) or ``failed`` (message =
the error on one line, data ``{"error", "exit_code"}``). The process exits with one of the
codes in :data:`EXIT_CODES`.
"""

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from pydantic import ValidationError

from aggregator.flower_server import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_ROUND_TIMEOUT_S,
    AddressUnavailable,
    RoundResult,
    TrainingFailed,
    TrainingSettings,
    preload,
    run_server,
)
from aggregator.tracking import (
    MODEL_NAME,
    LoggedModel,
    MlflowTracker,
    ModelLoggingError,
    TrackingError,
)
from flops_manager.sla import DEFAULT_STRATEGY, STRATEGY_ADAPTER, StrategyConfig
from flops_utils import env_vars
from flops_utils.env_config import EnvReader
from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.model_worker_client import (
    ModelSaveFailed,
    ModelWorker,
    ModelWorkerStartError,
    RemoteUserCodeError,
)
from flops_utils.notifications import StatusNotifier, notify_once
from flops_utils.types import Component, ComponentStatus, MLModelFlavor
from flops_utils.user_code import (
    UserCodeError,
    call_user_code,
    describe_exception,
)

STAGE_ROUND = "round"
"""``data["stage"]`` of the ``progress`` message sent after each round."""

STAGE_TRAINING_DONE = "training_done"
"""``data["stage"]`` of the ``progress`` message sent after the last round, before the model
is logged (the manager moves the project to ``post_training`` then)."""


class ExitCode(IntEnum):
    """The aggregator's exit codes; :data:`EXIT_CODES` gives each one's meaning and fix."""

    OK = 0
    USER_CODE_ERROR = 1
    CONFIG_ERROR = 2
    TRAINING_FAILED = 3
    TRACKING_UNAVAILABLE = 4
    MODEL_LOGGING_FAILED = 5
    INTERNAL_ERROR = 6
    TERMINATED = 143


EXIT_CODES: dict[ExitCode, tuple[str, str]] = {
    ExitCode.OK: ("Training finished; the model is logged and registered in MLflow.", "-"),
    ExitCode.USER_CODE_ERROR: (
        "The ML repository's ModelManager raised (constructor, get/set_model_parameters, "
        "get_model).",
        "Fix model_manager.py; the failed message names the method and the exception. "
        "ModelManager() must work without data.",
    ),
    ExitCode.CONFIG_ERROR: (
        "A FLOPS_* variable is missing or malformed, the SLA JSON is invalid, the Flower "
        "address cannot be bound, or the repository's environment (FLOPS_USER_PYTHON) cannot "
        "run the model worker.",
        "Start the aggregator through FLOps (the orchestrator sets these) or fix the value "
        "named in the message.",
    ),
    ExitCode.TRAINING_FAILED: (
        "Too few learners connected in time, or a learner failed, disconnected or exceeded "
        "round_timeout_s during a round.",
        "Read the learners' failed messages; check min_available_clients and round_timeout_s.",
    ),
    ExitCode.TRACKING_UNAVAILABLE: (
        "The MLflow tracking server is unreachable or rejected a request.",
        "Start the tracking server (flops-observatory) and check FLOPS_MLFLOW_URL.",
    ),
    ExitCode.MODEL_LOGGING_FAILED: (
        "The final model could not be logged with the SLA's ml_model_flavor (library missing "
        "or wrong model type).",
        "Install the flavor's library in the repository's dependencies or fix ml_model_flavor.",
    ),
    ExitCode.INTERNAL_ERROR: ("An unexpected error inside FLOps.", "Report it with the log."),
    ExitCode.TERMINATED: (
        "Stopped by SIGTERM (128 + 15), e.g. the project was cancelled; the MLflow run is "
        "marked KILLED.",
        "-",
    ),
}
"""Exit code → (meaning, fix)."""


class ConfigError(FlopsError):
    """The aggregator's environment or SLA is incomplete or malformed."""

    code = "aggregator_config_error"


ERROR_EXIT_CODES: dict[type[FlopsError], ExitCode] = {
    UserCodeError: ExitCode.USER_CODE_ERROR,
    ConfigError: ExitCode.CONFIG_ERROR,
    ModelWorkerStartError: ExitCode.CONFIG_ERROR,
    AddressUnavailable: ExitCode.CONFIG_ERROR,
    TrainingFailed: ExitCode.TRAINING_FAILED,
    TrackingError: ExitCode.TRACKING_UNAVAILABLE,
    ModelLoggingError: ExitCode.MODEL_LOGGING_FAILED,
}
"""Exception type → exit code; the most specific class in an error's MRO wins."""


def exit_code_for(exc: BaseException) -> ExitCode:
    """The :class:`ExitCode` for ``exc`` from :data:`ERROR_EXIT_CODES` (else internal error)."""
    for cls in type(exc).__mro__:
        if cls in ERROR_EXIT_CODES:
            return ERROR_EXIT_CODES[cls]
    return ExitCode.INTERNAL_ERROR


@dataclass(frozen=True)
class AggregatorConfig:
    """The aggregator's settings, read from the environment by :meth:`from_env`.

    ``sla`` is the SLA as parsed JSON (logged to MLflow as parameters) with
    ``training_configuration.strategy`` replaced by ``strategy`` in full, so that the run
    records the strategy's name and every parameter in effect; the other fields are taken
    from it with the SLA's defaults (rounds 3, client minimums 1, flavor pytorch, strategy
    FedAvg). ``round_timeout_s`` falls back to :data:`DEFAULT_ROUND_TIMEOUT_S` when the SLA
    sets none.
    """

    project_id: str
    mqtt_url: str
    address: str
    mlflow_url: str
    repo_dir: Path
    sla: dict[str, Any]
    flavor: MLModelFlavor
    training_rounds: int
    min_available_clients: int
    min_fit_clients: int
    min_evaluate_clients: int
    round_timeout_s: float
    connect_timeout_s: float
    strategy: StrategyConfig = DEFAULT_STRATEGY

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "AggregatorConfig":
        """Read and check the ``FLOPS_*`` variables and the SLA. Raises :class:`ConfigError`."""
        read = EnvReader(env, ConfigError, "the orchestrator sets it when it starts an aggregator")
        project_id = read.required(env_vars.PROJECT_ID)
        mqtt_url = read.mqtt_url()
        address = read.host_port(
            env_vars.AGGREGATOR_ADDRESS,
            "the address the Flower server should bind, e.g. 0.0.0.0:8080",
        )
        mlflow_url = read.required(env_vars.MLFLOW_URL)
        if not mlflow_url.startswith(("http://", "https://")):
            raise ConfigError(f"{env_vars.MLFLOW_URL}={mlflow_url!r} is not http://HOST:PORT.")
        repo_dir = read.repo_dir()
        try:
            sla = json.loads(read.required(env_vars.SLA))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{env_vars.SLA} is not valid JSON ({exc}).") from exc
        if not isinstance(sla, dict):
            raise ConfigError(f"{env_vars.SLA} must be a JSON object (the project's SLA).")
        training = sla.get("training_configuration") or {}
        if not isinstance(training, dict):
            raise ConfigError("SLA training_configuration must be an object.")
        flavor_name = sla.get("ml_model_flavor", MLModelFlavor.PYTORCH.value)
        try:
            flavor = MLModelFlavor(flavor_name)
        except ValueError as exc:
            valid = ", ".join(f.value for f in MLModelFlavor)
            raise ConfigError(
                f"SLA ml_model_flavor {flavor_name!r} is not one of {valid}."
            ) from exc
        counts = {
            name: _positive_int(training, name, default)
            for name, default in (
                ("training_rounds", 3),
                ("min_available_clients", 1),
                ("min_fit_clients", 1),
                ("min_evaluate_clients", 1),
            )
        }
        round_timeout = training.get("round_timeout_s")
        if round_timeout is not None and (
            not isinstance(round_timeout, int | float) or round_timeout <= 0
        ):
            raise ConfigError(
                f"SLA training_configuration.round_timeout_s={round_timeout!r} must be a "
                "positive number of seconds."
            )
        strategy = _strategy(training)
        training = {**training, "strategy": strategy.model_dump(mode="json")}
        connect_timeout_s = read.seconds(env_vars.CONNECT_TIMEOUT_S, DEFAULT_CONNECT_TIMEOUT_S)
        return cls(
            project_id=project_id,
            mqtt_url=mqtt_url,
            address=address,
            mlflow_url=mlflow_url,
            repo_dir=repo_dir,
            sla={**sla, "training_configuration": training},
            flavor=flavor,
            training_rounds=counts["training_rounds"],
            min_available_clients=counts["min_available_clients"],
            min_fit_clients=counts["min_fit_clients"],
            min_evaluate_clients=counts["min_evaluate_clients"],
            round_timeout_s=float(round_timeout or DEFAULT_ROUND_TIMEOUT_S),
            connect_timeout_s=connect_timeout_s,
            strategy=strategy,
        )

    def training_settings(self) -> TrainingSettings:
        """The Flower server settings for this configuration."""
        return TrainingSettings(
            address=self.address,
            num_rounds=self.training_rounds,
            min_available_clients=self.min_available_clients,
            min_fit_clients=self.min_fit_clients,
            min_evaluate_clients=self.min_evaluate_clients,
            round_timeout_s=self.round_timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            strategy=self.strategy,
        )


def _strategy(training: Mapping[str, Any]) -> StrategyConfig:
    """``training_configuration.strategy`` validated, FedAvg when missing or null."""
    raw = training.get("strategy")
    if raw is None:
        return DEFAULT_STRATEGY
    try:
        return STRATEGY_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(["training_configuration.strategy", *(str(p) for p in error["loc"])])
            + f": {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        raise ConfigError(f"SLA {problems}.") from exc


def _positive_int(training: Mapping[str, Any], name: str, default: int) -> int:
    value = training.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"SLA training_configuration.{name}={value!r} must be a positive integer."
        )
    return value


def run(config: AggregatorConfig, notifier: StatusNotifier) -> ExitCode:
    """Train, track and register the model; publish status. Returns the exit code.

    Never raises: every error becomes a ``failed`` message and its :class:`ExitCode`.
    """
    began = time.monotonic()
    tracker = MlflowTracker(config.mlflow_url, config.project_id)

    def on_listening(address: str) -> None:
        notifier.notify(
            ComponentStatus.STARTED,
            f"aggregator listening on {address}",
            {
                "address": address,
                "rounds": config.training_rounds,
                "strategy": config.strategy.model_dump(mode="json"),
            },
        )

    def on_round(result: RoundResult) -> None:
        tracker.log_round(result.round, result.loss, result.accuracy)
        accuracy = "n/a" if result.accuracy is None else f"{result.accuracy:.4f}"
        notifier.notify(
            ComponentStatus.PROGRESS,
            f"round {result.round}/{config.training_rounds}: loss {result.loss:.4f}, "
            f"accuracy {accuracy}",
            {
                "stage": STAGE_ROUND,
                "round": result.round,
                "rounds": config.training_rounds,
                "loss": result.loss,
                "accuracy": result.accuracy,
                "learners": result.learners,
                "seconds": round(result.seconds, 3),
            },
        )

    _stop_cleanly_on_sigterm(tracker, notifier)
    try:
        tracker.check_reachable()
        flower = preload()  # Flower's imports overlap the model worker's start
        with ModelWorker(config.repo_dir) as model_manager:
            initial = call_user_code(
                "ModelManager.get_model_parameters", model_manager.get_model_parameters
            )
            flower.join()  # before MLflow's imports: both import protobuf and grpc
            customer = str(config.sla.get("customerID", ""))
            run_id = tracker.start_run(config.sla, tags={"flops.customer_id": customer})
            result = run_server(config.training_settings(), initial, on_round, on_listening)
            last = result.rounds[-1] if result.rounds else None
            notifier.notify(
                ComponentStatus.PROGRESS,
                f"training done after {len(result.rounds)} rounds; logging the model",
                {
                    "stage": STAGE_TRAINING_DONE,
                    "rounds": len(result.rounds),
                    "loss": last.loss if last else None,
                    "accuracy": last.accuracy if last else None,
                },
            )
            logged = _log_final_model(model_manager, tracker, config, result.parameters)
        data = {
            "experiment_id": tracker.experiment_id,
            "run_id": run_id,
            "model_uri": logged.model_uri,
            "registered_model": logged.registered_model,
            "model_version": logged.version,
            "registered_model_uri": logged.registered_model_uri,
            "loss": last.loss if last else None,
            "accuracy": last.accuracy if last else None,
            "rounds": len(result.rounds),
            "seconds": round(time.monotonic() - began, 3),
        }
        tracker.end_run("FINISHED")
    except Exception as exc:
        code = exit_code_for(exc)
        message = (
            exc.message
            if isinstance(exc, FlopsError)
            else f"Internal error: {describe_exception(exc)}"
        )
        message = " ".join(message.split())[:1000]
        # The traceback first: the last line of output is what an orchestrator shows.
        logger.info("traceback of the failure:", exc_info=exc)
        logger.error("aggregator failed (exit %d): %s", code, message)
        tracker.end_run("FAILED")
        error = exc.code if isinstance(exc, FlopsError) else "internal_error"
        notifier.notify(ComponentStatus.FAILED, message, {"error": error, "exit_code": int(code)})
        return code
    finally:
        tracker.end_run("KILLED")  # a no-op unless interrupted (KeyboardInterrupt, SystemExit)
    notifier.notify(
        ComponentStatus.SUCCESS,
        f"training finished after {data['rounds']} rounds; model {logged.registered_model_uri}",
        data,
    )
    return ExitCode.OK


def _log_final_model(
    model_manager: ModelWorker,
    tracker: MlflowTracker,
    config: AggregatorConfig,
    parameters: list[np.ndarray[Any, Any]],
) -> LoggedModel:
    """Save the final model in the model worker (the repository's environment, with its
    MLflow) and upload and register it with this process's MLflow client.

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
        return tracker.log_saved_model(
            model_dir, config.flavor, step=config.training_rounds, saved_with=saved
        )


def _stop_cleanly_on_sigterm(tracker: MlflowTracker, notifier: StatusNotifier) -> None:
    """On SIGTERM (an orchestrator stopping the project): mark the MLflow run ``KILLED``,
    publish ``failed`` and exit with :attr:`ExitCode.TERMINATED` at once.

    Exiting from the handler (instead of raising into Flower's blocked thread pool) keeps
    a stop from waiting for the learners' current round.
    """

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        logger.warning("SIGTERM: stopping the aggregator")
        tracker.end_run("KILLED")
        notifier.notify(
            ComponentStatus.FAILED,
            "The aggregator was stopped by SIGTERM (the project was cancelled or stopped).",
            {"error": "terminated", "exit_code": int(ExitCode.TERMINATED)},
        )
        notifier.close()
        os._exit(ExitCode.TERMINATED)

    signal.signal(signal.SIGTERM, on_sigterm)


def main() -> None:
    """Entry point of ``python -m aggregator`` / ``flops-aggregator``; exits with an
    :class:`ExitCode`."""
    try:
        config = AggregatorConfig.from_env(os.environ)
    except ConfigError as exc:
        logger.error("aggregator configuration error (exit %d): %s", ExitCode.CONFIG_ERROR, exc)
        _report_config_error(os.environ, exc)
        sys.exit(ExitCode.CONFIG_ERROR)
    notifier = StatusNotifier(config.mqtt_url, config.project_id, Component.AGGREGATOR)
    try:
        code = run(config, notifier)
    finally:
        notifier.close()
    sys.exit(code)


def _report_config_error(env: Mapping[str, str], exc: ConfigError) -> None:
    """Publish ``failed`` for a configuration error when the broker and project are known."""
    project_id, mqtt_url = env.get(env_vars.PROJECT_ID), env.get(env_vars.MQTT_URL, "")
    with contextlib.suppress(ValueError):
        if project_id:
            notify_once(
                mqtt_url,
                project_id,
                Component.AGGREGATOR,
                ComponentStatus.FAILED,
                " ".join(exc.message.split()),
                {"error": exc.code, "exit_code": int(ExitCode.CONFIG_ERROR)},
            )
