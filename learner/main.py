"""The learner process: trains the ML repository's model on this node's data with Flower.

Started as ``python -m learner`` (or ``flops-learner``) by an orchestrator, configured by
environment variables (:mod:`flops_utils.env_vars`; an option of ``flops-learner --help`` sets
the variable it names, :mod:`flops_utils.role_cli`):

- ``FLOPS_PROJECT_ID``, ``FLOPS_MQTT_URL``: where status messages go (required).
- ``FLOPS_AGGREGATOR_ADDRESS``: ``HOST:PORT`` of the aggregator (required).
- ``FLOPS_ML_REPO_DIR``: the ML repository root (defaults to the working directory).
- ``FLOPS_LEARNER_NAME``: this learner's name in status messages (defaults to ``learner``).
- ``FLOPS_DATA_SERVER``, ``FLOPS_DATA_TAGS``: read by the repository's ``load_dataset()``.
- ``FLOPS_USER_PYTHON``: the interpreter of the repository's own environment; the
  repository's ``ModelManager`` runs in a model worker process started with it
  (:class:`flops_utils.model_worker_client.ModelWorker`; default: this interpreter).
- ``FLOPS_CONNECT_TIMEOUT_S``: seconds to retry reaching the aggregator (defaults to 60).
- ``FLOPS_TLS_CA_CERT``, ``FLOPS_FLOWER_TOKEN``: optional; connect to the aggregator with
  TLS, verifying its certificate against this CA and the project's name, and authenticate
  with the project's token (:mod:`flops_utils.flower_security`).

It publishes ``flops/<project_id>/learner/{started,success,failed}`` (instance = the learner
name; payloads: :mod:`flops_utils.contract.messages`) and exits with a
:class:`~flops_utils.contract.exit_codes.ExitCode`.
"""

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from flops_utils import env_vars
from flops_utils.contract.entry import run_role
from flops_utils.contract.exit_codes import Role
from flops_utils.contract.messages import LearnerStarted, LearnerSuccess
from flops_utils.env_config import EnvReader
from flops_utils.errors import FlopsError
from flops_utils.flower_security import ClientSecurity, SecurityConfigError
from flops_utils.logging import logger
from flops_utils.model_worker_client import ModelWorker, ModelWorkerDataError
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
from learner.flower_client import preload, run_client

DEFAULT_CONNECT_TIMEOUT_S = 60.0

# Repositories often import MLflow (the examples' dependencies list it); keep its usage
# telemetry from trying the internet.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class ConfigError(FlopsError):
    """The learner's environment is incomplete or malformed."""

    code = "learner_config_error"


class DataUnavailable(FlopsError):
    """Loading the node's local data failed for a reason FLOps reported (no such tag, ...)."""

    code = "data_unavailable"


@dataclass(frozen=True)
class LearnerConfig:
    """The learner's settings, read from the environment by :meth:`from_env`;
    ``flower_security`` is how it connects to the aggregator (TLS CA and client token)."""

    project_id: str
    mqtt_url: str
    aggregator_address: str
    repo_dir: Path
    name: str
    data_tags: tuple[str, ...]
    connect_timeout_s: float
    flower_security: ClientSecurity = field(default_factory=ClientSecurity, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "LearnerConfig":
        """Read and check the ``FLOPS_*`` variables. Raises :class:`ConfigError`."""
        read = EnvReader(env, ConfigError, "the orchestrator sets it when it starts a learner")
        project_id, mqtt_url = read.status_target()
        address = read.host_port(
            env_vars.AGGREGATOR_ADDRESS, "the aggregator's address, e.g. 127.0.0.1:8080"
        )
        repo_dir = read.repo_dir()
        connect_timeout_s = read.seconds(env_vars.CONNECT_TIMEOUT_S, DEFAULT_CONNECT_TIMEOUT_S)
        tags = tuple(t.strip() for t in env.get(env_vars.DATA_TAGS, "").split(",") if t.strip())
        try:
            security = ClientSecurity.from_env(env, project_id)
        except SecurityConfigError as exc:
            raise ConfigError(str(exc)) from None
        return cls(
            project_id=project_id,
            mqtt_url=mqtt_url,
            aggregator_address=address,
            repo_dir=repo_dir,
            name=env.get(env_vars.LEARNER_NAME) or "learner",
            data_tags=tags,
            connect_timeout_s=connect_timeout_s,
            flower_security=security,
        )


def run(config: LearnerConfig, notifier: StatusNotifier) -> None:
    """Load the model and data, train with the aggregator, publish the outcome.

    Publishes ``started`` (:class:`LearnerStarted`), then ``success``
    (:class:`LearnerSuccess`). Raises what failed (the entry wrapper maps it to its exit code
    and publishes ``failed``): ``UserCodeError``, :class:`DataUnavailable`,
    ``AggregatorUnreachable``, ``ModelWorkerStartError``.
    """
    began = time.monotonic()
    notifier.notify(
        ComponentStatus.STARTED,
        f"learner {config.name} started",
        LearnerStarted(aggregator=config.aggregator_address, data_tags=list(config.data_tags)),
    )
    preload()  # Flower's imports overlap the model worker's start
    with ModelWorker(config.repo_dir) as model_manager:
        _load_data(model_manager)
        stats = run_client(
            model_manager,
            config.aggregator_address,
            config.connect_timeout_s,
            config.flower_security,
            name=config.name,
        )
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
        LearnerSuccess(
            fit_rounds=stats.fit_rounds,
            evaluate_rounds=stats.evaluate_rounds,
            num_examples=stats.fit_examples,
            loss=stats.last_loss,
            accuracy=stats.last_accuracy,
            seconds=round(seconds, 3),
        ),
    )


def _load_data(model_manager: ModelWorker) -> None:
    """Call the repository's ``set_model_data``; raises :class:`DataUnavailable` for a data
    problem FLOps reported, ``UserCodeError`` for anything else it raised."""
    try:
        call_user_code("ModelManager.set_model_data", model_manager.set_model_data)
    except UserCodeError as exc:
        if isinstance(exc.__cause__, ModelWorkerDataError):
            message = f"Loading the local data failed: {exc.__cause__.message}"
            raise DataUnavailable(message) from exc.__cause__
        raise


app = RoleApp(
    "flops-learner",
    "Train the ML repository's model on this node's data with Flower, as a learner of the "
    "project's aggregator (an orchestrator starts it with FLOPS_* variables).",
    env_only=[
        EnvVar(env_vars.TLS_CA_CERT, "PEM of the project's CA: connect to the aggregator with TLS"),
        EnvVar(env_vars.FLOWER_TOKEN, "the project's Flower client secret"),
        EnvVar(env_vars.DATA_TOKEN, "the token presented to the node's data server"),
        EnvVar(env_vars.DATA_SERVER_CERT, "PEM certificate of the node's data server"),
        *STATUS_ENV,
    ],
)


@app.main_command()
def _learner(
    ctx: typer.Context,
    project_id: ProjectIdOption = None,
    mqtt_url: MqttUrlOption = None,
    aggregator_address: Annotated[
        str | None,
        typer.Option(
            envvar=env_vars.AGGREGATOR_ADDRESS,
            help="HOST:PORT of the aggregator (required).",
            show_default=False,
        ),
    ] = None,
    repo_dir: RepoDirOption = None,
    name: Annotated[
        str | None,
        typer.Option(
            envvar=env_vars.LEARNER_NAME,
            help="This learner's name in status messages.",
            show_default="learner",
        ),
    ] = None,
    data_server: Annotated[
        str | None,
        typer.Option(
            envvar=env_vars.DATA_SERVER,
            help="The node's data server, grpc://HOST:PORT (read by load_dataset()).",
            show_default=False,
        ),
    ] = None,
    data_tags: Annotated[
        str | None,
        typer.Option(
            envvar=env_vars.DATA_TAGS,
            help="Comma-separated data tags of the SLA (read by load_dataset()).",
            show_default=False,
        ),
    ] = None,
    user_python: UserPythonOption = None,
    connect_timeout_s: Annotated[
        str | None,
        typer.Option(
            envvar=env_vars.CONNECT_TIMEOUT_S,
            metavar="SECONDS",
            help="Seconds to retry reaching the aggregator.",
            show_default=str(int(DEFAULT_CONNECT_TIMEOUT_S)),
        ),
    ] = None,
    version: VersionOption = False,
) -> int:
    """The learner's command: options set their variables, then :func:`run` as the
    orchestrator starts it."""
    export_options(ctx)
    return run_role(Role.LEARNER, lambda: LearnerConfig.from_env(os.environ), run)


def main() -> None:
    """Entry point of ``python -m learner`` / ``flops-learner``; exits with an
    :class:`~flops_utils.contract.exit_codes.ExitCode` (2 also for a command-line error)."""
    sys.exit(app.run())
