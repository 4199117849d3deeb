"""The learner process: trains the ML repository's model on this node's data with Flower.

Started as ``python -m learner`` (or ``flops-learner``) by an orchestrator, configured by
environment variables (:mod:`flops_utils.env_vars`):

- ``FLOPS_PROJECT_ID``, ``FLOPS_MQTT_URL``: where status messages go (required).
- ``FLOPS_AGGREGATOR_ADDRESS``: ``HOST:PORT`` of the aggregator (required).
- ``FLOPS_ML_REPO_DIR``: the ML repository root (defaults to the working directory).
- ``FLOPS_LEARNER_NAME``: this learner's name in status messages (defaults to ``learner``).
- ``FLOPS_DATA_SERVER``, ``FLOPS_DATA_TAGS``: read by the repository's ``load_dataset()``.
- ``FLOPS_USER_PYTHON``: the interpreter of the repository's own environment; the
  repository's ``ModelManager`` runs in a model worker process started with it
  (:class:`flops_utils.model_worker_client.ModelWorker`; default: this interpreter).
- ``FLOPS_CONNECT_TIMEOUT_S``: seconds to retry reaching the aggregator (defaults to 60).

It publishes ``flops/<project_id>/learner/{started,success,failed}`` (instance = the learner
name) and exits with one of the codes in :data:`EXIT_CODES`.
"""

import contextlib
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from flops_utils import env_vars
from flops_utils.env_config import EnvReader
from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.model_worker_client import (
    ModelWorker,
    ModelWorkerDataError,
    ModelWorkerStartError,
)
from flops_utils.notifications import StatusNotifier, notify_once
from flops_utils.types import Component, ComponentStatus
from flops_utils.user_code import UserCodeError, describe_exception, one_line
from learner.flower_client import (
    AggregatorUnreachable,
    preload,
    run_client,
)

DEFAULT_CONNECT_TIMEOUT_S = 60.0

# Repositories often import MLflow (the examples' dependencies list it); keep its usage
# telemetry from trying the internet.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class ExitCode(IntEnum):
    """The learner's exit codes; :data:`EXIT_CODES` gives each one's meaning and fix."""

    OK = 0
    USER_CODE_ERROR = 1
    CONFIG_ERROR = 2
    AGGREGATOR_UNREACHABLE = 3
    DATA_UNAVAILABLE = 4
    INTERNAL_ERROR = 5


EXIT_CODES: dict[ExitCode, tuple[str, str]] = {
    ExitCode.OK: ("Training finished; the aggregator ended the session.", "-"),
    ExitCode.USER_CODE_ERROR: (
        "The ML repository's code (model_manager.py / data_manager.py) raised.",
        "Fix the repository; the failed message names the method and the exception.",
    ),
    ExitCode.CONFIG_ERROR: (
        "A FLOPS_* environment variable is missing or malformed, FLOPS_ML_REPO_DIR holds "
        "no model_manager.py, or the repository's environment (FLOPS_USER_PYTHON) cannot run "
        "the model worker.",
        "Start the learner through FLOps (the orchestrator sets these) or set them by hand.",
    ),
    ExitCode.AGGREGATOR_UNREACHABLE: (
        "The aggregator could not be reached, or the connection broke before training ended.",
        "Check the aggregator's status messages and FLOPS_AGGREGATOR_ADDRESS.",
    ),
    ExitCode.DATA_UNAVAILABLE: (
        "The node's data server is unreachable or holds none of the SLA's data tags.",
        "Start the node's data server and push data with the SLA's tags (e.g. POST /mocks).",
    ),
    ExitCode.INTERNAL_ERROR: ("An unexpected error inside FLOps.", "Report it with the log."),
}
"""Exit code → (meaning, fix)."""


class ConfigError(FlopsError):
    """The learner's environment is incomplete or malformed."""

    code = "learner_config_error"


class DataUnavailable(FlopsError):
    """Loading the node's local data failed for a reason FLOps reported (no such tag, ...)."""

    code = "data_unavailable"


ERROR_EXIT_CODES: dict[type[FlopsError], ExitCode] = {
    UserCodeError: ExitCode.USER_CODE_ERROR,
    ConfigError: ExitCode.CONFIG_ERROR,
    ModelWorkerStartError: ExitCode.CONFIG_ERROR,
    AggregatorUnreachable: ExitCode.AGGREGATOR_UNREACHABLE,
    DataUnavailable: ExitCode.DATA_UNAVAILABLE,
}
"""Exception type → exit code; anything else is :attr:`ExitCode.INTERNAL_ERROR`."""


@dataclass(frozen=True)
class LearnerConfig:
    """The learner's settings, read from the environment by :meth:`from_env`."""

    project_id: str
    mqtt_url: str
    aggregator_address: str
    repo_dir: Path
    name: str
    data_tags: tuple[str, ...]
    connect_timeout_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "LearnerConfig":
        """Read and check the ``FLOPS_*`` variables. Raises :class:`ConfigError`."""
        read = EnvReader(env, ConfigError, "the orchestrator sets it when it starts a learner")
        project_id = read.required(env_vars.PROJECT_ID)
        mqtt_url = read.mqtt_url()
        address = read.host_port(
            env_vars.AGGREGATOR_ADDRESS, "the aggregator's address, e.g. 127.0.0.1:8080"
        )
        repo_dir = read.repo_dir()
        connect_timeout_s = read.seconds(env_vars.CONNECT_TIMEOUT_S, DEFAULT_CONNECT_TIMEOUT_S)
        tags = tuple(t.strip() for t in env.get(env_vars.DATA_TAGS, "").split(",") if t.strip())
        return cls(
            project_id=project_id,
            mqtt_url=mqtt_url,
            aggregator_address=address,
            repo_dir=repo_dir,
            name=env.get(env_vars.LEARNER_NAME) or "learner",
            data_tags=tags,
            connect_timeout_s=connect_timeout_s,
        )


def run(config: LearnerConfig, notifier: StatusNotifier) -> ExitCode:
    """Load the model and data, train with the aggregator, publish the outcome.

    Publishes ``started`` (data ``{"aggregator", "data_tags"}``), then ``success`` (data
    ``{"fit_rounds", "evaluate_rounds", "num_examples", "loss", "accuracy", "seconds"}``) or
    ``failed`` (message = the error on one line, data ``{"error", "exit_code"}``).
    Returns the exit code; never raises.
    """
    began = time.monotonic()
    notifier.notify(
        ComponentStatus.STARTED,
        f"learner {config.name} started",
        {"aggregator": config.aggregator_address, "data_tags": list(config.data_tags)},
    )
    preload()  # Flower's imports overlap the model worker's start
    try:
        with ModelWorker(config.repo_dir) as model_manager:
            _load_data(model_manager)
            stats = run_client(model_manager, config.aggregator_address, config.connect_timeout_s)
    except Exception as exc:
        code, message = _classify(exc)
        # The traceback first: the last line of output is what an orchestrator shows.
        logger.info("traceback of the failure:", exc_info=exc)
        logger.error("learner %s failed (exit %d): %s", config.name, code, message)
        error = exc.code if isinstance(exc, FlopsError) else "internal_error"
        notifier.notify(ComponentStatus.FAILED, message, {"error": error, "exit_code": int(code)})
        return code
    seconds = time.monotonic() - began
    logger.info(
        "learner %s done: %d fit rounds, %.2fs mean fit time",
        config.name,
        stats.fit_rounds,
        sum(stats.fit_seconds) / max(len(stats.fit_seconds), 1),
    )
    notifier.notify(
        ComponentStatus.SUCCESS,
        f"learner {config.name} finished {stats.fit_rounds} rounds",
        {
            "fit_rounds": stats.fit_rounds,
            "evaluate_rounds": stats.evaluate_rounds,
            "num_examples": stats.fit_examples,
            "loss": stats.last_loss,
            "accuracy": stats.last_accuracy,
            "seconds": round(seconds, 3),
        },
    )
    return ExitCode.OK


def _load_data(model_manager: ModelWorker) -> None:
    try:
        model_manager.set_model_data()
    except ModelWorkerDataError as exc:
        raise DataUnavailable(f"Loading the local data failed: {exc.message}") from exc
    except UserCodeError:
        raise
    except Exception as exc:
        message = f"ModelManager.set_model_data raised {describe_exception(exc)}"
        raise UserCodeError(message) from exc


def _classify(exc: BaseException) -> tuple[ExitCode, str]:
    """Map an exception to (exit code, one-line message) with :data:`ERROR_EXIT_CODES`."""
    if isinstance(exc, FlopsError):
        for cls in type(exc).__mro__:
            if cls in ERROR_EXIT_CODES:
                return ERROR_EXIT_CODES[cls], one_line(exc.message)
    return ExitCode.INTERNAL_ERROR, f"Internal error: {describe_exception(exc)}"


def main() -> None:
    """Entry point of ``python -m learner`` / ``flops-learner``; exits with an :class:`ExitCode`."""
    try:
        config = LearnerConfig.from_env(os.environ)
    except ConfigError as exc:
        logger.error("learner configuration error (exit %d): %s", ExitCode.CONFIG_ERROR, exc)
        _report_config_error(os.environ, exc)
        sys.exit(ExitCode.CONFIG_ERROR)
    notifier = StatusNotifier(config.mqtt_url, config.project_id, Component.LEARNER, config.name)
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
                Component.LEARNER,
                ComponentStatus.FAILED,
                one_line(exc.message),
                {"error": exc.code, "exit_code": int(ExitCode.CONFIG_ERROR)},
                instance=env.get(env_vars.LEARNER_NAME) or "learner",
            )
