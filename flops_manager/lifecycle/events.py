"""The typed inputs of the project lifecycle: everything that can change a project.

Pipeline steps, component status messages (MQTT), service exits (the orchestrator's watcher),
timer expiry, user and manager actions and restart findings all become one of these events;
:func:`flops_manager.lifecycle.reducer.transition` applies them one at a time per project.
They are immutable and hold plain data only (no clients, no callbacks).
"""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from flops_utils.contract.lifecycle import Component, ComponentStatus


class EventKind(StrEnum):
    """The kind of a :class:`LifecycleEvent`, one per class."""

    BUILD_REQUESTED = "build_requested"
    BUILD_FINISHED = "build_finished"
    PIPELINE_FAILED = "pipeline_failed"
    SERVICE_STARTED = "service_started"
    DEPLOYMENT_FINISHED = "deployment_finished"
    STATUS_RECEIVED = "status_received"
    SERVICE_EXITED = "service_exited"
    GRACE_EXPIRED = "grace_expired"
    CANCEL_REQUESTED = "cancel_requested"
    POST_TRAINING_PROGRESS = "post_training_progress"
    POST_TRAINING_FAILED = "post_training_failed"
    POST_TRAINING_FINISHED = "post_training_finished"
    SERVICES_FOUND = "services_found"
    RECOVERY_FINISHED = "recovery_finished"
    MANAGER_STOPPING = "manager_stopping"


@dataclass(frozen=True)
class LifecycleEvent:
    """Base of the lifecycle's events; :attr:`kind` names the concrete class."""

    kind: EventKind = field(init=False)


@dataclass(frozen=True)
class BuildRequested(LifecycleEvent):
    """Start (``resumed=False``, a new ``pending`` project) or resume after a manager restart
    (``resumed=True``, a ``pending`` or ``building`` project) building the environment."""

    resumed: bool = False
    kind: EventKind = field(init=False, default=EventKind.BUILD_REQUESTED)


@dataclass(frozen=True)
class BuildFinished(LifecycleEvent):
    """The environment is ready: ``environment`` is its stored document, ``notes`` sentences
    for the user, ``message`` the status message of the move to ``deploying``."""

    environment: dict[str, Any]
    notes: tuple[str, ...]
    message: str
    kind: EventKind = field(init=False, default=EventKind.BUILD_FINISHED)


@dataclass(frozen=True)
class PipelineFailed(LifecycleEvent):
    """Building or deploying failed; ``reason`` is the user-facing failure reason."""

    reason: str
    kind: EventKind = field(init=False, default=EventKind.PIPELINE_FAILED)


@dataclass(frozen=True)
class ServiceStarted(LifecycleEvent):
    """The orchestrator started one service; ``handle`` finds it again after a restart."""

    handle: dict[str, Any]
    kind: EventKind = field(init=False, default=EventKind.SERVICE_STARTED)


@dataclass(frozen=True)
class DeploymentFinished(LifecycleEvent):
    """Every service started; ``address`` (``HOST:PORT``) is where the learners reach the
    aggregator."""

    address: str
    kind: EventKind = field(init=False, default=EventKind.DEPLOYMENT_FINISHED)


@dataclass(frozen=True)
class StatusReceived(LifecycleEvent):
    """One component status message (``flops/<project>/<component>/<status>``): the
    publishing ``instance`` (empty for the component itself), its ``message`` and ``data``."""

    component: Component
    status: ComponentStatus
    instance: str = ""
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    kind: EventKind = field(init=False, default=EventKind.STATUS_RECEIVED)


@dataclass(frozen=True)
class ServiceExited(LifecycleEvent):
    """A service ended on its own: ``returncode`` (``None`` when unknown: a service
    re-attached after a restart; ``-N`` for signal N) and its ``last_line`` of output."""

    service: str
    returncode: int | None
    last_line: str = ""
    kind: EventKind = field(init=False, default=EventKind.SERVICE_EXITED)


@dataclass(frozen=True)
class GraceExpired(LifecycleEvent):
    """The grace period after a :class:`ServiceExited` with code 0 or unknown is over; the
    fields repeat the exit's. Also posted after a learner or cluster aggregator lost its
    upstream aggregator (``returncode`` 3, ``reason``: its own report), so that the
    aggregator's report or exit, which names the real cause, is applied first."""

    service: str
    returncode: int | None
    last_line: str = ""
    reason: str = ""
    kind: EventKind = field(init=False, default=EventKind.GRACE_EXPIRED)


@dataclass(frozen=True)
class CancelRequested(LifecycleEvent):
    """The user cancels the project (or stops its trained-model server once it finished)."""

    kind: EventKind = field(init=False, default=EventKind.CANCEL_REQUESTED)


@dataclass(frozen=True)
class PostTrainingProgress(LifecycleEvent):
    """A post-training step did something: an event ``status`` (``built``, ``deployed``,
    ``skipped``) with ``message``, and record ``fields`` to set (``model_image``,
    ``inference_url``)."""

    status: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    kind: EventKind = field(init=False, default=EventKind.POST_TRAINING_PROGRESS)


@dataclass(frozen=True)
class PostTrainingFailed(LifecycleEvent):
    """Post-training step ``step`` failed with ``message`` for the model ``model_uri``."""

    step: str
    message: str
    model_uri: str
    kind: EventKind = field(init=False, default=EventKind.POST_TRAINING_FAILED)


@dataclass(frozen=True)
class PostTrainingFinished(LifecycleEvent):
    """Every post-training step is done."""

    kind: EventKind = field(init=False, default=EventKind.POST_TRAINING_FINISHED)


@dataclass(frozen=True)
class ServicesFound(LifecycleEvent):
    """After a manager restart: the project's services as re-attaching found them.

    ``known``: the project had service handles at all. ``running``: names of those still
    running; ``gone``: name → last log line of those that ended while no manager watched.
    """

    known: bool
    running: tuple[str, ...] = ()
    gone: dict[str, str] = field(default_factory=dict)
    kind: EventKind = field(init=False, default=EventKind.SERVICES_FOUND)


@dataclass(frozen=True)
class RecoveryFinished(LifecycleEvent):
    """The MQTT backlog is applied: judge the re-attached project. ``running`` / ``gone`` as
    in :class:`ServicesFound` plus the exits seen since; ``failures``: failure reasons held
    back meanwhile, in arrival order."""

    running: tuple[str, ...] = ()
    gone: dict[str, str] = field(default_factory=dict)
    failures: tuple[str, ...] = ()
    kind: EventKind = field(init=False, default=EventKind.RECOVERY_FINISHED)


@dataclass(frozen=True)
class ManagerStopping(LifecycleEvent):
    """The manager stops for good and ends unfinished projects with ``reason``."""

    reason: str
    kind: EventKind = field(init=False, default=EventKind.MANAGER_STOPPING)
