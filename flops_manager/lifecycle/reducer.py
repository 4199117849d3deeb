"""The project lifecycle as a pure function: ``transition(record, event, now_s)``.

``pending → building → deploying → training → post_training → completed``, or ``failed`` (with
the reason) / ``cancelled`` from any non-terminal status. Every status change records the time
spent in the phase it leaves under ``phases`` and appends a ``status`` entry to the event log.

:func:`transition` does no I/O and reads no clock: it returns the new record and the
:mod:`~flops_manager.lifecycle.actions` to execute once that record is persisted. A terminal
project changes no more, with two exceptions that only clean up: cancelling a finished project
stops its trained-model server, and a deployment or trained-model server that finishes after
the project ended is stopped.
"""

from collections.abc import Callable
from typing import Any

from flops_manager.lifecycle import actions as act
from flops_manager.lifecycle import events as ev
from flops_manager.records import (
    ClusterRecord,
    ClusterRoundMetrics,
    Event,
    Metrics,
    MlflowRecord,
    Phase,
    ProjectRecord,
    RoundMetrics,
    ServiceReport,
)
from flops_manager.sla import ProjectSLA
from flops_utils.contract.exit_codes import ExitCode, describe_exit
from flops_utils.contract.lifecycle import (
    ACTIVE,
    Component,
    ComponentStatus,
    ProjectStatus,
    Stage,
)
from flops_utils.contract.services import (
    AGGREGATOR_SERVICE,
    learner_service,
    role_of,
    service_name,
)
from flops_utils.contract.training import (
    TrainingConfiguration,
    learners_needed,
    root_clusters_needed,
)

Result = tuple[ProjectRecord, list[act.Action]]
"""The new record and the actions to execute after persisting it."""

NEXT: dict[ProjectStatus, ProjectStatus] = {
    ProjectStatus.PENDING: ProjectStatus.BUILDING,
    ProjectStatus.BUILDING: ProjectStatus.DEPLOYING,
    ProjectStatus.DEPLOYING: ProjectStatus.TRAINING,
    ProjectStatus.TRAINING: ProjectStatus.POST_TRAINING,
    ProjectStatus.POST_TRAINING: ProjectStatus.COMPLETED,
}
"""The forward path."""

MLFLOW_KEYS = (
    "experiment_id",
    "run_id",
    "model_uri",
    "registered_model",
    "model_version",
    "registered_model_uri",
)
"""Keys of the aggregator's ``success`` data kept under ``mlflow``."""

_RUNNING = frozenset({ProjectStatus.TRAINING, ProjectStatus.POST_TRAINING})

UPSTREAM_LOST_CAUSE = "aggregator_unreachable"
"""``data.cause`` of a learner's (cluster aggregator's) ``failed`` message when it lost the
connection to its aggregator (root aggregator); its exit code is then
:attr:`~flops_utils.contract.exit_codes.ExitCode.AGGREGATOR_UNREACHABLE`."""


def transition(
    record: ProjectRecord, event: ev.LifecycleEvent, now_s: float, recovering: bool = False
) -> Result:
    """Apply ``event`` to ``record`` at time ``now_s`` (seconds since the epoch).

    ``recovering``: the manager restarted and the MQTT backlog is being applied; failure
    reports and service exits of the project are then held back (a :class:`~.actions.Hold`
    action) until ``RecoveryFinished`` judges them together. Returns the new record (the
    input is not modified) and the actions, in order. Raises ``KeyError`` for an event kind
    it does not know.
    """
    return _HANDLERS[event.kind](record, event, now_s, recovering)


# -- building blocks ---------------------------------------------------------------------------
def _log_event(
    record: ProjectRecord, kind: str, status: str, message: str, now_s: float, component: str = ""
) -> ProjectRecord:
    entry = Event(
        timestamp=now_s, type=kind, status=status, message=message, component=component or None
    )
    return record.model_copy(update={"events": [*record.events, entry]})


def _update(record: ProjectRecord, **fields: Any) -> ProjectRecord:
    return record.model_copy(update=fields)


def _move(
    record: ProjectRecord, status: ProjectStatus, message: str, now_s: float
) -> ProjectRecord:
    """``record`` in ``status``: the phase it leaves ends, the new one starts (unless
    terminal), and a ``status`` event is appended."""
    phases = dict(record.phases)
    current = phases.get(record.status.value)
    if current is not None and current.started_at is not None:
        phases[record.status.value] = current.model_copy(
            update={"ended_at": now_s, "seconds": round(now_s - current.started_at, 3)}
        )
    if not status.is_terminal:
        phases[status.value] = Phase(started_at=now_s)
    moved = _update(record, status=status, status_message=message, phases=phases)
    return _log_event(moved, "status", status.value, message, now_s)


def _advance(record: ProjectRecord, status: ProjectStatus, message: str, now_s: float) -> Result:
    """Move forward to ``status`` when it is the next step, else change nothing."""
    if NEXT.get(record.status) is not status:
        return record, []
    return _move(record, status, message, now_s), []


def _end(
    record: ProjectRecord,
    status: ProjectStatus,
    message: str,
    now_s: float,
    background: bool = True,
) -> Result:
    """End the project in the terminal ``status`` and stop its services; nothing for a
    project that ended already (``completed`` only follows ``post_training``)."""
    if record.status.is_terminal:
        return record, []
    if status is ProjectStatus.COMPLETED and record.status is not ProjectStatus.POST_TRAINING:
        return record, []
    level = "warning" if status is ProjectStatus.FAILED else "info"
    return _move(record, status, message, now_s), [
        act.StopServices(background=background),
        act.Log(level, f"project {record.project_id} {status.value}: {message}"),
    ]


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def clip(text: str, limit: int = 300) -> str:
    """``text`` quoted, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def exit_reason(service: str, returncode: int, last_line: str) -> str:
    """The failure reason for ``service`` ending with ``returncode``: the contract's
    description of the code and fix, and the service's last log line when known."""
    text = f"{service} {describe_exit(service, returncode)}"
    return text + (f"; last log line: {clip(last_line)}" if last_line else "")


def _learners(record: ProjectRecord) -> list[str]:
    return [s for s in record.services if role_of(s) is Component.LEARNER]


def _started_text(record: ProjectRecord) -> str:
    """What a deployment started, for the event log."""
    learners = len(_learners(record))
    if not record.hierarchical:
        return f"started the aggregator and {learners} learner(s)"
    return (
        f"started the root aggregator, {len(record.clusters)} cluster aggregator(s) and "
        f"{learners} learner(s)"
    )


def _training(record: ProjectRecord) -> TrainingConfiguration | None:
    try:
        return ProjectSLA.model_validate(record.sla).training_configuration
    except ValueError:
        return None


def _learner_lost(record: ProjectRecord, service: str, reason: str, now_s: float) -> Result | None:
    """The result of going on without the failed learner or cluster aggregator ``service``,
    or ``None`` when the project must fail.

    Classic FL: training goes on while the project is ``training`` and the learners left
    number at least :func:`~flops_utils.contract.training.learners_needed` (Flower waits for
    ``min_available_clients`` before each round); the loss is recorded in ``lost_learners``
    and an event. Hierarchical FL: the same rule per cluster (see :func:`_cluster_member_lost`).
    A service already lost (its ``failed`` message and its exit both arrive) changes nothing.
    """
    if service == AGGREGATOR_SERVICE or record.status is not ProjectStatus.TRAINING:
        return None
    training = _training(record)
    if training is None:
        return None
    if record.hierarchical:
        return _cluster_member_lost(record, training, service, reason, now_s)
    if service in record.lost_learners:
        return record, []
    learners = _learners(record)
    if service not in learners:
        return None
    needed = learners_needed(training)
    remaining = len(learners) - len(record.lost_learners) - 1
    if remaining < needed:
        return None
    text = f"{reason}; training goes on with {remaining} learner(s) (at least {needed} needed)"
    lost = _update(record, lost_learners=sorted({*record.lost_learners, service}))
    lost = _log_event(lost, "component", ComponentStatus.FAILED.value, text, now_s, service)
    return lost, [act.Log("warning", f"project {record.project_id}: {text}")]


def _cluster_member_lost(
    record: ProjectRecord,
    training: TrainingConfiguration,
    service: str,
    reason: str,
    now_s: float,
) -> Result | None:
    """Hierarchical FL: a learner of a cluster is lost while its cluster keeps
    ``learners_needed`` learners; otherwise, or when the service is the cluster's
    aggregator, the whole cluster is lost (:func:`_cluster_lost`). Anything of a cluster
    already lost changes nothing."""
    cluster = record.cluster_of(service)
    if cluster is None:
        return None
    if cluster.lost is not None or service in cluster.lost_learners:
        return record, []
    if service != cluster.service:
        needed = learners_needed(training)
        remaining = len(cluster.nodes) - len(cluster.lost_learners) - 1
        if remaining >= needed:
            text = (
                f"{reason}; cluster {cluster.name} goes on with {remaining} learner(s) "
                f"(at least {needed} needed)"
            )
            changed = cluster.model_copy(
                update={"lost_learners": sorted({*cluster.lost_learners, service})}
            )
            lost = _replace_cluster(record, changed)
            lost = _update(lost, lost_learners=sorted({*record.lost_learners, service}))
            lost = _log_event(lost, "component", ComponentStatus.FAILED.value, text, now_s, service)
            return lost, [act.Log("warning", f"project {record.project_id}: {text}")]
        reason = (
            f"{reason}; cluster {cluster.name} has {remaining} learner(s) left, {needed} needed"
        )
    return _cluster_lost(record, training, cluster, reason, now_s)


def _cluster_lost(
    record: ProjectRecord,
    training: TrainingConfiguration,
    cluster: ClusterRecord,
    reason: str,
    now_s: float,
) -> Result | None:
    """The root goes on without ``cluster`` while the clusters left number at least
    :func:`~flops_utils.contract.training.root_clusters_needed`; else ``None`` (the project
    fails, the reason naming the cluster)."""
    needed = root_clusters_needed(training, len(record.clusters))
    remaining = sum(1 for c in record.clusters if c.lost is None) - 1
    if remaining < needed:
        return None
    text = (
        f"cluster {cluster.name} lost ({reason}); training goes on with {remaining} "
        f"cluster(s) (at least {needed} needed)"
    )
    lost = _replace_cluster(record, cluster.model_copy(update={"lost": reason}))
    lost = _log_event(lost, "component", ComponentStatus.FAILED.value, text, now_s, cluster.service)
    return lost, [act.Log("warning", f"project {record.project_id}: {text}")]


def _replace_cluster(record: ProjectRecord, cluster: ClusterRecord) -> ProjectRecord:
    clusters = [cluster if c.name == cluster.name else c for c in record.clusters]
    return _update(record, clusters=clusters)


def _failure_reason(record: ProjectRecord, service: str, reason: str) -> str:
    """``reason``, naming the cluster when ``service`` belongs to one and the reason does
    not say so already."""
    cluster = record.cluster_of(service)
    if cluster is None or f"cluster {cluster.name}" in reason:
        return reason
    training = _training(record)
    needed = root_clusters_needed(training, len(record.clusters)) if training else 1
    return (
        f"cluster {cluster.name} lost ({reason}); fewer than the {needed} cluster(s) the root "
        "aggregator needs are left"
    )


def _fail_or_lose(record: ProjectRecord, service: str, reason: str, now_s: float) -> Result:
    return _learner_lost(record, service, reason, now_s) or _end(
        record, ProjectStatus.FAILED, _failure_reason(record, service, reason), now_s
    )


def _aggregator_succeeded(
    record: ProjectRecord, result: dict[str, Any], now_s: float, run: bool
) -> Result:
    """Record the trained model (``mlflow``, final ``metrics``) once, move ``training`` to
    ``post_training`` and, with ``run``, start the post-training steps."""
    if record.status not in _RUNNING:
        return record, []
    first = record.mlflow is None
    if first:
        mlflow = MlflowRecord(
            **{
                k: (str(result[k]) if k != "model_version" else result[k])
                for k in MLFLOW_KEYS
                if result.get(k) is not None
            }
        )
        metrics = Metrics(**{k: result.get(k) for k in ("round", "rounds", "loss", "accuracy")})
        record = _update(record, mlflow=mlflow, metrics=metrics)
    if record.status is ProjectStatus.TRAINING:
        record = _move(record, ProjectStatus.POST_TRAINING, Stage.TRAINING_DONE.value, now_s)
    return record, [act.RunPostTraining()] if run and first else []


def _label(component: Component, instance: str) -> str:
    """How a message's publisher is named in texts: ``aggregator``, ``learner node-2``."""
    return component.value if instance in ("", component.value) else f"{component.value} {instance}"


# -- the handlers, one per event kind ----------------------------------------------------------
def _build_requested(
    record: ProjectRecord, event: ev.BuildRequested, now_s: float, recovering: bool
) -> Result:
    if record.status is ProjectStatus.PENDING:
        moved, _ = _advance(record, ProjectStatus.BUILDING, "building the environment", now_s)
        return moved, [act.StartBuild()]
    if record.status is ProjectStatus.BUILDING and event.resumed:
        text = "manager restarted; building the environment again"
        return _log_event(record, "manager", "restarted", text, now_s), [act.StartBuild()]
    return record, []


def _build_finished(
    record: ProjectRecord, event: ev.BuildFinished, now_s: float, recovering: bool
) -> Result:
    if record.status is not ProjectStatus.BUILDING:
        return record, []
    services = [
        AGGREGATOR_SERVICE,
        *(c.service for c in record.clusters),
        *(learner_service(n) for n in record.nodes),
    ]
    record = _update(record, environment=event.environment, services=services, service_handles=[])
    for note in event.notes:
        record = _log_event(record, "builder", "note", note, now_s, Component.BUILDER.value)
    moved, _ = _advance(record, ProjectStatus.DEPLOYING, event.message, now_s)
    return moved, [act.Deploy()]


def _pipeline_failed(
    record: ProjectRecord, event: ev.PipelineFailed, now_s: float, recovering: bool
) -> Result:
    if record.status.is_terminal:  # a deployment racing the end: stop what it started
        return record, [act.StopServices()]
    return _end(record, ProjectStatus.FAILED, event.reason, now_s)


def _service_started(
    record: ProjectRecord, event: ev.ServiceStarted, now_s: float, recovering: bool
) -> Result:
    if record.status.is_terminal:
        return record, []
    return _update(record, service_handles=[*record.service_handles, event.handle]), []


def _deployment_finished(
    record: ProjectRecord, event: ev.DeploymentFinished, now_s: float, recovering: bool
) -> Result:
    if record.status.is_terminal:  # cancelled while deploying: stop what the deployment started
        return record, [act.StopServices()]
    if record.status is not ProjectStatus.DEPLOYING:
        return record, []
    text = _started_text(record)
    record = _update(record, aggregator_address=event.address)
    return _advance(record, ProjectStatus.TRAINING, text, now_s)


def _status_received(
    record: ProjectRecord, event: ev.StatusReceived, now_s: float, recovering: bool
) -> Result:
    if record.status.is_terminal:
        return record, []
    label = _label(event.component, event.instance)
    service = service_name(event.component, event.instance)
    aggregator = event.component is Component.AGGREGATOR
    if event.status in (ComponentStatus.SUCCESS, ComponentStatus.FAILED):
        report = ServiceReport(service=service, status=event.status.value, timestamp=now_s)
        record = _update(record, service_reports=[*record.service_reports, report])
    if event.status is ComponentStatus.FAILED:
        reason = f"{label} failed: {event.message or 'no reason given'}"
        if recovering:
            held = _log_event(record, "component", "failed", reason, now_s, label)
            return held, [act.Hold(failure=reason)]
        if event.data.get("cause") == UPSTREAM_LOST_CAUSE and not aggregator:
            return _upstream_lost(record, service, reason, now_s, label)
        return _fail_or_lose(record, service, reason, now_s)
    if event.status is ComponentStatus.PROGRESS and event.data.get("stage") in _LEARNER_STAGES:
        return _learner_progress(record, event, label, now_s)
    if aggregator and event.status is ComponentStatus.PROGRESS:
        if event.data.get("stage") == Stage.TRAINING_DONE.value:
            message = event.message or Stage.TRAINING_DONE.value
            return _advance(record, ProjectStatus.POST_TRAINING, message, now_s)
        return _record_round(record, event.data, now_s), []
    if aggregator and event.status is ComponentStatus.SUCCESS:
        record = _update(record, aggregator_result=dict(event.data))
        return _aggregator_succeeded(record, event.data, now_s, run=not recovering)
    if event.component is Component.CLUSTER_AGGREGATOR:
        return _cluster_status(record, event, service, label, now_s), []
    text = event.message or f"{label} {event.status.value}"
    return _log_event(record, "component", event.status.value, text, now_s, label), []


_LEARNER_STAGES = frozenset({Stage.STRAGGLER.value, Stage.LEARNERS_DROPPED.value})
"""``progress`` stages an aggregator (cluster aggregator) sends about its learners."""


def _learner_progress(
    record: ProjectRecord, event: ev.StatusReceived, label: str, now_s: float
) -> Result:
    """A straggler notice, or learners dropped from a round.

    ``straggler``: an event naming the learner (``learner X has not answered round R for N
    s``). ``learners_dropped`` with ``going_on``: each dropped learner is a lost learner (the
    lost-learner rule of :func:`_learner_lost`; one already lost changes nothing); a root
    aggregator's dropped clients are clusters, whose own reports decide. Without
    ``going_on`` only an event: the aggregator's ``failed`` message follows.
    """
    data = event.data
    if data.get("stage") == Stage.STRAGGLER.value:
        learner = service_name(Component.LEARNER, str(data.get("learner") or ""))
        text = event.message or f"{learner} has not answered round {data.get('round')}"
        return _log_event(record, "learner", "straggler", text, now_s, learner), []
    text = event.message or f"{label} dropped learner(s) {data.get('learners')}"
    logged = _log_event(record, "component", "progress", text, now_s, label)
    if not data.get("going_on") or (
        record.hierarchical and event.component is Component.AGGREGATOR
    ):
        return logged, []
    actions: list[act.Action] = []
    for name in data.get("learners") or []:
        service = service_name(Component.LEARNER, str(name))
        lost = _learner_lost(logged, service, f"{label} dropped {service} from the round", now_s)
        if lost is not None:
            logged, more = lost
            actions += more
    return logged, actions


def _record_round(record: ProjectRecord, data: dict[str, Any], now_s: float) -> ProjectRecord:
    """Append the round's (hierarchical FL: the cycle's) metrics once (QoS 1 may deliver a
    message twice)."""
    entry = RoundMetrics(**{k: data.get(k) for k in ("round", "loss", "accuracy")})
    if any(r.round == entry.round for r in record.rounds):
        return record
    unit = "cycle" if record.hierarchical else "round"
    text = f"{unit} {entry.round}: loss {_fmt(entry.loss)}, accuracy {_fmt(entry.accuracy)}"
    record = _update(
        record,
        rounds=[*record.rounds, entry],
        metrics=Metrics(round=entry.round, loss=entry.loss, accuracy=entry.accuracy),
    )
    return _log_event(record, "round", "progress", text, now_s, AGGREGATOR_SERVICE)


def _cluster_status(
    record: ProjectRecord, event: ev.StatusReceived, service: str, label: str, now_s: float
) -> ProjectRecord:
    """A cluster aggregator's ``started`` (its address), ``progress`` (a round of its
    cluster, appended once) or ``success`` (its MLflow child run)."""
    cluster = record.cluster_of(service)
    if cluster is None:
        return record
    data = event.data
    text = event.message or f"{label} {event.status.value}"
    if event.status is ComponentStatus.STARTED and data.get("address"):
        cluster = cluster.model_copy(update={"address": str(data["address"])})
    elif event.status is ComponentStatus.SUCCESS and data.get("run_id"):
        cluster = cluster.model_copy(update={"run_id": str(data["run_id"])})
    elif event.status is ComponentStatus.PROGRESS:
        entry = ClusterRoundMetrics(
            **{k: data.get(k) for k in ClusterRoundMetrics.model_fields if k in data}
        )
        if any((r.cycle, r.round) == (entry.cycle, entry.round) for r in cluster.rounds):
            return record
        cluster = cluster.model_copy(update={"rounds": [*cluster.rounds, entry]})
        text = (
            f"cluster {cluster.name} cycle {entry.cycle} round {entry.round}: loss "
            f"{_fmt(entry.loss)}, accuracy {_fmt(entry.accuracy)}"
        )
        return _log_event(
            _replace_cluster(record, cluster), "round", "progress", text, now_s, label
        )
    return _log_event(
        _replace_cluster(record, cluster), "component", event.status.value, text, now_s, label
    )


def _service_exited(
    record: ProjectRecord, event: ev.ServiceExited, now_s: float, recovering: bool
) -> Result:
    if recovering:
        return record, [act.Hold(service=event.service, last_line=event.last_line)]
    if record.status.is_terminal:
        return record, []
    grace = ev.GraceExpired(event.service, event.returncode, event.last_line)
    if event.returncode is None:
        return record, [act.AwaitGrace(grace)]
    if event.returncode != 0:
        reason = exit_reason(event.service, event.returncode, event.last_line)
        if (
            event.returncode == ExitCode.AGGREGATOR_UNREACHABLE
            and event.service != AGGREGATOR_SERVICE
        ):
            return _upstream_lost(record, event.service, reason, now_s)
        return _fail_or_lose(record, event.service, reason, now_s)
    if event.service == AGGREGATOR_SERVICE:
        return record, [act.AwaitGrace(grace)]
    return record, []


def _upstream_lost(
    record: ProjectRecord, service: str, reason: str, now_s: float, label: str = ""
) -> Result:
    """A learner (cluster aggregator) lost its aggregator (root aggregator): log it and judge
    it after the exit grace period, so that the aggregator's own report or exit, which names
    the real cause, comes first. A learner leaving after training changes nothing; before
    training it fails the project at once, as any other failure then."""
    if record.status is ProjectStatus.POST_TRAINING:
        return record, []
    if record.status is not ProjectStatus.TRAINING:
        return _fail_or_lose(record, service, reason, now_s)
    component = label or service
    logged = _log_event(record, "component", ComponentStatus.FAILED.value, reason, now_s, component)
    grace = ev.GraceExpired(service, int(ExitCode.AGGREGATOR_UNREACHABLE), reason=reason)
    return logged, [act.AwaitGrace(grace)]


def _grace_expired(
    record: ProjectRecord, event: ev.GraceExpired, now_s: float, recovering: bool
) -> Result:
    if record.status.is_terminal:
        return record, []
    if event.reason:  # a service that lost its upstream aggregator, judged now
        if record.status is not ProjectStatus.TRAINING:
            return record, []
        return _fail_or_lose(record, event.service, event.reason, now_s)
    report = record.final_reports().get(event.service)
    if report == ComponentStatus.SUCCESS.value:
        return record, []
    if event.returncode == 0:  # the aggregator exited: did it report its result?
        if record.status not in _RUNNING:
            return record, []
        text = "the aggregator exited without reporting a result; see its log"
        return _end(record, ProjectStatus.FAILED, text, now_s)
    if event.service != AGGREGATOR_SERVICE and record.status is ProjectStatus.POST_TRAINING:
        return record, []  # a learner leaving after training
    text = (
        f"{event.service} stopped without reporting a result (exit code unknown: it was "
        "re-attached after a manager restart)"
        + (f"; last log line: {clip(event.last_line)}" if event.last_line else "")
    )
    return _fail_or_lose(record, event.service, text, now_s)


def _cancel_requested(
    record: ProjectRecord, event: ev.CancelRequested, now_s: float, recovering: bool
) -> Result:
    if not record.status.is_terminal:
        return _end(record, ProjectStatus.CANCELLED, "cancelled by the user", now_s, False)
    if record.inference_url is None:
        return record, []
    stopped = _update(record, inference_url=None)
    text = "trained-model server stopped"
    return _log_event(stopped, "post_training", "stopped", text, now_s), [act.StopInference()]


def _post_training_progress(
    record: ProjectRecord, event: ev.PostTrainingProgress, now_s: float, recovering: bool
) -> Result:
    if record.status.is_terminal:  # ended meanwhile: do not leave a model server running
        return record, [act.StopInference()] if "inference_url" in event.fields else []
    if record.status is not ProjectStatus.POST_TRAINING:
        return record, []
    record = ProjectRecord.model_validate({**record.document(), **event.fields})
    return _log_event(record, "post_training", event.status, event.message, now_s), []


def _post_training_failed(
    record: ProjectRecord, event: ev.PostTrainingFailed, now_s: float, recovering: bool
) -> Result:
    if record.status is not ProjectStatus.POST_TRAINING:
        return record, []
    text = (
        f"training completed and the model is in MLflow as {event.model_uri}, but "
        f"{event.step} failed: {event.message}"
    )
    return _end(record, ProjectStatus.FAILED, text, now_s)


def _post_training_finished(
    record: ProjectRecord, event: ev.PostTrainingFinished, now_s: float, recovering: bool
) -> Result:
    if record.status is not ProjectStatus.POST_TRAINING:
        return record, []
    accuracy = _fmt(record.metrics.accuracy if record.metrics else None)
    text = f"final accuracy {accuracy}; model registered as {model_uri(record)}"
    return _end(record, ProjectStatus.COMPLETED, text, now_s)


def model_uri(record: ProjectRecord) -> str:
    """The trained model's MLflow URI: the registered one, else the run's (``None`` text
    when the aggregator reported neither)."""
    mlflow = record.mlflow or MlflowRecord()
    return str(mlflow.registered_model_uri or mlflow.model_uri)


def _services_found(
    record: ProjectRecord, event: ev.ServicesFound, now_s: float, recovering: bool
) -> Result:
    if record.status not in ACTIVE:
        return record, []
    if not event.known and record.status is not ProjectStatus.DEPLOYING:
        text = (
            f"the manager restarted and has no record of this {record.status.value} project's "
            "services, so it cannot watch them; POST the SLA again."
        )
        return _end(record, ProjectStatus.FAILED, text, now_s)
    if record.status is not ProjectStatus.DEPLOYING:
        return record, []
    if not event.running or sorted(event.running) != sorted(record.services):
        text = (
            "the manager restarted while deploying the services, so their start cannot be "
            "confirmed; the ones started were stopped. POST the SLA again."
        )
        return _end(record, ProjectStatus.FAILED, text, now_s)
    text = f"{_started_text(record)} (confirmed after a manager restart)"
    return _advance(record, ProjectStatus.TRAINING, text, now_s)


def _recovery_finished(
    record: ProjectRecord, event: ev.RecoveryFinished, now_s: float, recovering: bool
) -> Result:
    if record.status not in ACTIVE:
        return record, []
    reports = record.final_reports()
    if reports.get(AGGREGATOR_SERVICE) == ComponentStatus.SUCCESS.value:
        text = "the aggregator reported success while the manager was down"
        noted = _log_event(record, "manager", "restarted", text, now_s)
        moved, _ = _aggregator_succeeded(noted, record.aggregator_result or {}, now_s, run=False)
        return moved, [act.RunPostTraining()]
    final = (ComponentStatus.SUCCESS.value, ComponentStatus.FAILED.value)
    silent = [
        f"{name} stopped without reporting a result"
        + (f" (last log line: {clip(line)})" if line else "")
        for name, line in event.gone.items()
        if reports.get(name) not in final
    ]
    reasons = silent + list(event.failures)
    if reasons:
        return _end(
            record, ProjectStatus.FAILED, "while the manager was down, " + "; ".join(reasons), now_s
        )
    names = ", ".join(event.running) or "none"
    text = f"manager restarted; re-attached {len(event.running)} running service(s): {names}"
    return _log_event(record, "manager", "restarted", text, now_s), []


def _manager_stopping(
    record: ProjectRecord, event: ev.ManagerStopping, now_s: float, recovering: bool
) -> Result:
    return _end(record, ProjectStatus.FAILED, event.reason, now_s, background=False)


_HANDLERS: dict[ev.EventKind, Callable[[ProjectRecord, Any, float, bool], Result]] = {
    ev.EventKind.BUILD_REQUESTED: _build_requested,
    ev.EventKind.BUILD_FINISHED: _build_finished,
    ev.EventKind.PIPELINE_FAILED: _pipeline_failed,
    ev.EventKind.SERVICE_STARTED: _service_started,
    ev.EventKind.DEPLOYMENT_FINISHED: _deployment_finished,
    ev.EventKind.STATUS_RECEIVED: _status_received,
    ev.EventKind.SERVICE_EXITED: _service_exited,
    ev.EventKind.GRACE_EXPIRED: _grace_expired,
    ev.EventKind.CANCEL_REQUESTED: _cancel_requested,
    ev.EventKind.POST_TRAINING_PROGRESS: _post_training_progress,
    ev.EventKind.POST_TRAINING_FAILED: _post_training_failed,
    ev.EventKind.POST_TRAINING_FINISHED: _post_training_finished,
    ev.EventKind.SERVICES_FOUND: _services_found,
    ev.EventKind.RECOVERY_FINISHED: _recovery_finished,
    ev.EventKind.MANAGER_STOPPING: _manager_stopping,
}
