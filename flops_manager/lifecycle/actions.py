"""What the reducer asks for: side effects the runner executes after persisting a transition.

Actions are immutable plain data; :class:`flops_manager.lifecycle.runner.LifecycleRunner`
executes them (long work on its worker pool) once the new record is stored.
"""

from dataclasses import dataclass, field
from enum import StrEnum

from flops_manager.lifecycle.events import LifecycleEvent


class ActionKind(StrEnum):
    """The kind of an :class:`Action`, one per class."""

    START_BUILD = "start_build"
    DEPLOY = "deploy"
    STOP_SERVICES = "stop_services"
    AWAIT_GRACE = "await_grace"
    RUN_POST_TRAINING = "run_post_training"
    STOP_INFERENCE = "stop_inference"
    HOLD = "hold"
    LOG = "log"


@dataclass(frozen=True)
class Action:
    """Base of the reducer's actions; :attr:`kind` names the concrete class."""

    kind: ActionKind = field(init=False)


@dataclass(frozen=True)
class StartBuild(Action):
    """Build the project's environment on the worker pool; it reports back with
    ``BuildFinished`` or ``PipelineFailed``."""

    kind: ActionKind = field(init=False, default=ActionKind.START_BUILD)


@dataclass(frozen=True)
class Deploy(Action):
    """Start the project's services on the worker pool; reports ``ServiceStarted`` for each,
    then ``DeploymentFinished`` or ``PipelineFailed``."""

    kind: ActionKind = field(init=False, default=ActionKind.DEPLOY)


@dataclass(frozen=True)
class StopServices(Action):
    """Stop every service of the project; on the worker pool when ``background``."""

    background: bool = True
    kind: ActionKind = field(init=False, default=ActionKind.STOP_SERVICES)


@dataclass(frozen=True)
class AwaitGrace(Action):
    """Post ``event`` to the project's queue once the exit grace period has passed."""

    event: LifecycleEvent
    kind: ActionKind = field(init=False, default=ActionKind.AWAIT_GRACE)


@dataclass(frozen=True)
class RunPostTraining(Action):
    """Run the SLA's post-training steps for the trained model on the worker pool; reports
    ``PostTrainingProgress`` events, then ``PostTrainingFinished`` or ``PostTrainingFailed``."""

    kind: ActionKind = field(init=False, default=ActionKind.RUN_POST_TRAINING)


@dataclass(frozen=True)
class StopInference(Action):
    """Stop the project's trained-model server."""

    kind: ActionKind = field(init=False, default=ActionKind.STOP_INFERENCE)


@dataclass(frozen=True)
class Hold(Action):
    """During a restart's recovery: remember that ``service`` is gone (with its last log
    line ``last_line``) or the failure reason ``failure``, for ``RecoveryFinished``."""

    service: str | None = None
    last_line: str = ""
    failure: str | None = None
    kind: ActionKind = field(init=False, default=ActionKind.HOLD)


@dataclass(frozen=True)
class Log(Action):
    """Write ``message`` to the manager's log at ``level`` (``info`` / ``warning``)."""

    level: str
    message: str
    kind: ActionKind = field(init=False, default=ActionKind.LOG)
