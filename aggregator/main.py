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
the error on one line, data ``{"error", "exit_code"}``); the payloads are the models of
:mod:`flops_utils.contract.messages`. The process exits with a
:class:`~flops_utils.contract.exit_codes.ExitCode` (:data:`~flops_utils.contract.exit_codes.
EXIT_CODES` gives each one's meaning and fix).
"""

import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from pydantic import ValidationError

from aggregator.flower_server import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_ROUND_TIMEOUT_S,
    RoundResult,
    TrainingSettings,
    preload,
    run_server,
)
from aggregator.tracking import (
    MODEL_NAME,
    LoggedModel,
    MlflowTracker,
    ModelLoggingError,
)
from flops_utils import env_vars
from flops_utils.contract.entry import run_role
from flops_utils.contract.exit_codes import ExitCode, Role
from flops_utils.contract.lifecycle import Stage
from flops_utils.contract.messages import (
    AggregatorStarted,
    AggregatorSuccess,
    Failed,
    RoundProgress,
    TrainingDone,
)
from flops_utils.contract.training import (
    AggregatorSLA,
    StrategyConfig,
    TrainingConfiguration,
    describe_validation_error,
)
from flops_utils.env_config import EnvReader
from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.model_worker_client import (
    ModelSaveFailed,
    ModelWorker,
    RemoteUserCodeError,
)
from flops_utils.notifications import StatusNotifier
from flops_utils.types import ComponentStatus, MLModelFlavor
from flops_utils.user_code import UserCodeError, call_user_code


class ConfigError(FlopsError):
    """The aggregator's environment or SLA is incomplete or malformed."""

    code = "aggregator_config_error"


@dataclass(frozen=True)
class AggregatorConfig:
    """The aggregator's settings, read from the environment by :meth:`from_env`.

    ``sla`` is the SLA as parsed JSON (logged to MLflow as parameters) with
    ``training_configuration.strategy`` replaced by ``strategy`` in full, so that the run
    records the strategy's name and every parameter in effect; ``training``, ``flavor`` and
    ``customer_id`` are read from it by :class:`~flops_utils.contract.training.AggregatorSLA`,
    with the SLA's defaults (rounds 3, client minimums 1, flavor pytorch, strategy FedAvg,
    customer ``Admin``).
    """

    project_id: str
    mqtt_url: str
    address: str
    mlflow_url: str
    repo_dir: Path
    sla: dict[str, Any]
    customer_id: str
    flavor: MLModelFlavor
    training: TrainingConfiguration
    connect_timeout_s: float

    @property
    def training_rounds(self) -> int:
        """Flower rounds to run."""
        return self.training.training_rounds

    @property
    def strategy(self) -> StrategyConfig:
        """The Flower strategy with every parameter in effect."""
        return self.training.strategy

    @property
    def round_timeout_s(self) -> float:
        """Seconds a round may take: the SLA's, else :data:`DEFAULT_ROUND_TIMEOUT_S`."""
        return float(self.training.round_timeout_s or DEFAULT_ROUND_TIMEOUT_S)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "AggregatorConfig":
        """Read and check the ``FLOPS_*`` variables and the SLA. Raises :class:`ConfigError`."""
        read = EnvReader(env, ConfigError, "the orchestrator sets it when it starts an aggregator")
        project_id, mqtt_url = read.status_target()
        address = read.host_port(
            env_vars.AGGREGATOR_ADDRESS,
            "the address the Flower server should bind, e.g. 0.0.0.0:8080",
        )
        mlflow_url = read.required(env_vars.MLFLOW_URL)
        if not mlflow_url.startswith(("http://", "https://")):
            raise ConfigError(f"{env_vars.MLFLOW_URL}={mlflow_url!r} is not http://HOST:PORT.")
        repo_dir = read.repo_dir()
        document, sla = _read_sla(read.required(env_vars.SLA))
        logged_training = {
            **document.get("training_configuration", {}),
            "strategy": sla.training_configuration.strategy.model_dump(mode="json"),
        }
        return cls(
            project_id=project_id,
            mqtt_url=mqtt_url,
            address=address,
            mlflow_url=mlflow_url,
            repo_dir=repo_dir,
            sla={**document, "training_configuration": logged_training},
            customer_id=sla.customerID,
            flavor=sla.ml_model_flavor,
            training=sla.training_configuration,
            connect_timeout_s=read.seconds(env_vars.CONNECT_TIMEOUT_S, DEFAULT_CONNECT_TIMEOUT_S),
        )

    def training_settings(self) -> TrainingSettings:
        """The Flower server settings for this configuration."""
        return TrainingSettings(
            address=self.address,
            num_rounds=self.training_rounds,
            min_available_clients=self.training.min_available_clients,
            min_fit_clients=self.training.min_fit_clients,
            min_evaluate_clients=self.training.min_evaluate_clients,
            round_timeout_s=self.round_timeout_s,
            connect_timeout_s=self.connect_timeout_s,
            strategy=self.strategy,
        )


def _read_sla(raw: str) -> tuple[dict[str, Any], AggregatorSLA]:
    """``FLOPS_SLA`` as parsed JSON and as :class:`AggregatorSLA`. Raises
    :class:`ConfigError` naming the field path of every problem."""
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{env_vars.SLA} is not valid JSON ({exc}).") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{env_vars.SLA} must be a JSON object (the project's SLA).")
    try:
        return document, AggregatorSLA.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(f"SLA {describe_validation_error(exc)}.") from None


def run(config: AggregatorConfig, notifier: StatusNotifier) -> None:
    """Train, track and register the model; publish ``started``, ``progress`` and
    ``success``.

    Raises what failed (the entry wrapper maps it to its exit code and publishes ``failed``):
    :class:`UserCodeError`, ``TrainingFailed``, ``AddressUnavailable``, ``TrackingError``,
    ``ModelLoggingError``, ``ModelWorkerStartError``; the MLflow run is marked ``FAILED``.
    """
    began = time.monotonic()
    tracker = MlflowTracker(config.mlflow_url, config.project_id)

    def on_listening(address: str) -> None:
        started = AggregatorStarted(
            address=address,
            rounds=config.training_rounds,
            strategy=config.strategy.model_dump(mode="json"),
        )
        notifier.notify(ComponentStatus.STARTED, f"aggregator listening on {address}", started)

    def on_round(result: RoundResult) -> None:
        tracker.log_round(result.round, result.loss, result.accuracy)
        accuracy = "n/a" if result.accuracy is None else f"{result.accuracy:.4f}"
        notifier.notify(
            ComponentStatus.PROGRESS,
            f"round {result.round}/{config.training_rounds}: loss {result.loss:.4f}, "
            f"accuracy {accuracy}",
            RoundProgress(
                stage=Stage.ROUND,
                round=result.round,
                rounds=config.training_rounds,
                loss=result.loss,
                accuracy=result.accuracy,
                learners=result.learners,
                seconds=round(result.seconds, 3),
            ),
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
            run_id = tracker.start_run(config.sla, tags={"flops.customer_id": config.customer_id})
            result = run_server(config.training_settings(), initial, on_round, on_listening)
            last = result.rounds[-1] if result.rounds else None
            notifier.notify(
                ComponentStatus.PROGRESS,
                f"training done after {len(result.rounds)} rounds; logging the model",
                TrainingDone(
                    stage=Stage.TRAINING_DONE,
                    rounds=len(result.rounds),
                    loss=last.loss if last else None,
                    accuracy=last.accuracy if last else None,
                ),
            )
            logged = _log_final_model(model_manager, tracker, config, result.parameters)
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
        f"training finished after {success.rounds} rounds; model {logged.registered_model_uri}",
        success,
    )


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
            Failed(error="terminated", exit_code=int(ExitCode.TERMINATED)),
        )
        notifier.close()
        os._exit(ExitCode.TERMINATED)

    signal.signal(signal.SIGTERM, on_sigterm)


def main() -> None:
    """Entry point of ``python -m aggregator`` / ``flops-aggregator``; exits with an
    :class:`~flops_utils.contract.exit_codes.ExitCode`."""
    sys.exit(run_role(Role.AGGREGATOR, lambda: AggregatorConfig.from_env(os.environ), run))
