"""The one entry wrapper of every FLOps process: read the configuration, run, turn whatever was
raised into an :class:`~flops_utils.contract.exit_codes.ExitCode`, report it and return it.

- :func:`run_role` for the roles that report over MQTT (learner, aggregator, image builder):
  it creates the role's :class:`~flops_utils.notifications.StatusNotifier` and publishes a
  ``failed`` message (data :class:`~flops_utils.contract.messages.Failed`) for any error, a
  configuration error included when ``FLOPS_PROJECT_ID`` and ``FLOPS_MQTT_URL`` are usable.
- :func:`run_command` for a process without status messages (the data server).

Both log the traceback of an error first and its one-line description last (the last line of
output is what an orchestrator shows).
"""

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from flops_utils import env_vars
from flops_utils.contract.exit_codes import ExitCode, Role, exit_code_for
from flops_utils.contract.messages import Failed
from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.notifications import StatusNotifier, notify_once, parse_mqtt_url
from flops_utils.types import Component, ComponentStatus
from flops_utils.user_code import describe_exception, one_line

__all__ = ["Failure", "StatusTarget", "failure_of", "run_command", "run_role"]

C = TypeVar("C")

_COMPONENTS = {
    Role.LEARNER: Component.LEARNER,
    Role.AGGREGATOR: Component.AGGREGATOR,
    Role.BUILDER: Component.BUILDER,
}


@dataclass(frozen=True)
class Failure:
    """An error as a role reports it: its ``exit_code``, the machine-readable ``error`` name
    (the FLOps error's ``code``, else ``internal_error``), a one-line ``message`` and the
    error's ``cause`` attribute when it has one (see
    :class:`~flops_utils.contract.messages.Failed`)."""

    exit_code: ExitCode
    error: str
    message: str
    cause: str | None = None

    def data(self) -> Failed:
        """The ``data`` of the ``failed`` message (``cause`` only when set)."""
        if self.cause is None:
            return Failed(error=self.error, exit_code=int(self.exit_code))
        return Failed(error=self.error, exit_code=int(self.exit_code), cause=self.cause)


def failure_of(exc: BaseException) -> Failure:
    """The :class:`Failure` of ``exc``: a FLOps error keeps its message (on one line), any
    other exception becomes ``"Internal error: <Type>: <message>"``."""
    if isinstance(exc, FlopsError):
        cause = getattr(exc, "cause", None)
        cause = cause if isinstance(cause, str) and cause else None
        return Failure(exit_code_for(exc), exc.code, one_line(exc.message), cause)
    return Failure(
        ExitCode.INTERNAL_ERROR, "internal_error", f"Internal error: {describe_exception(exc)}"
    )


@dataclass(frozen=True)
class StatusTarget:
    """Where a role's status messages go: ``mqtt_url``, ``project_id``, ``component`` and the
    ``instance`` name (a learner's ``FLOPS_LEARNER_NAME``, a cluster aggregator's
    ``FLOPS_CLUSTER`` with the component ``cluster-aggregator``, else the component)."""

    mqtt_url: str
    project_id: str
    component: Component
    instance: str

    @classmethod
    def from_env(cls, role: Role, env: Mapping[str, str]) -> "StatusTarget | None":
        """The target of ``role`` from ``env``; ``None`` when the role sends no status
        messages or ``FLOPS_PROJECT_ID``/``FLOPS_MQTT_URL`` are missing or malformed."""
        component = _COMPONENTS.get(role)
        project_id = (env.get(env_vars.PROJECT_ID) or "").strip()
        mqtt_url = (env.get(env_vars.MQTT_URL) or "").strip()
        if component is None or not project_id:
            return None
        try:
            parse_mqtt_url(mqtt_url)
        except ValueError:
            return None
        instance = component.value
        if role is Role.LEARNER:
            instance = env.get(env_vars.LEARNER_NAME) or component.value
        cluster = (env.get(env_vars.CLUSTER) or "").strip()
        if role is Role.AGGREGATOR and env.get(env_vars.AGGREGATOR_ROLE) == "cluster" and cluster:
            component, instance = Component.CLUSTER_AGGREGATOR, cluster
        return cls(mqtt_url, project_id, component, instance)

    def notifier(self) -> StatusNotifier:
        """A notifier publishing as this target."""
        return StatusNotifier(self.mqtt_url, self.project_id, self.component, self.instance)


def run_role(
    role: Role,
    read_config: Callable[[], C],
    run: Callable[[C, StatusNotifier], int | None],
    env: Mapping[str, str] | None = None,
) -> ExitCode:
    """Run one process of ``role`` (learner, aggregator or image builder) and return its exit
    code.

    Args:
        role: which role this is; names the process in the log and picks the component.
        read_config: reads and checks the configuration; raises the role's configuration
            error (a ``FlopsError`` mapped to :attr:`ExitCode.CONFIG_ERROR`).
        run: does the work with the configuration and the role's notifier; returns an exit
            code (``None`` = OK) or raises. It publishes ``started``/``progress``/``success``
            itself; a ``failed`` message is published here.
        env: where ``FLOPS_PROJECT_ID``/``FLOPS_MQTT_URL`` are read (default ``os.environ``).

    Never raises (``SystemExit`` and ``KeyboardInterrupt`` pass).
    """
    env = os.environ if env is None else env
    target = StatusTarget.from_env(role, env)
    try:
        config = read_config()
    except Exception as exc:
        failure = _log_failure(role, exc, traceback=not isinstance(exc, FlopsError))
        if target is not None:
            with contextlib.suppress(ValueError):
                notify_once(
                    target.mqtt_url,
                    target.project_id,
                    target.component,
                    ComponentStatus.FAILED,
                    failure.message,
                    failure.data(),
                    instance=target.instance,
                )
        return failure.exit_code
    if target is None:  # the role's configuration checks both variables
        missing = RuntimeError(f"{env_vars.PROJECT_ID} or {env_vars.MQTT_URL} is unusable")
        return _log_failure(role, missing).exit_code
    notifier = target.notifier()
    try:
        return _code(run(config, notifier))
    except Exception as exc:
        failure = _log_failure(role, exc)
        notifier.notify(ComponentStatus.FAILED, failure.message, failure.data())
        return failure.exit_code
    finally:
        notifier.close()


def run_command(
    role: Role, read_config: Callable[[], C], run: Callable[[C], int | None]
) -> ExitCode:
    """Like :func:`run_role` for a process without status messages (the data server): read
    the configuration, run, log and return the exit code of what was raised."""
    try:
        config = read_config()
    except Exception as exc:
        return _log_failure(role, exc, traceback=not isinstance(exc, FlopsError)).exit_code
    try:
        return _code(run(config))
    except Exception as exc:
        return _log_failure(role, exc).exit_code


def _code(returned: int | None) -> ExitCode:
    return ExitCode.OK if returned is None else ExitCode(returned)


def _log_failure(role: Role, exc: BaseException, traceback: bool = True) -> Failure:
    """Log ``exc`` (its traceback first when ``traceback``) and return its failure."""
    failure = failure_of(exc)
    if traceback:
        logger.info("traceback of the failure:", exc_info=exc)
    logger.error(
        "%s failed (exit %d, %s): %s",
        role.value.replace("_", " "),
        failure.exit_code,
        failure.exit_code.label,
        failure.message,
    )
    return failure
