"""The project lifecycle: accept an SLA, build, deploy, train, finish (DESIGN.md §3).

``pending → building → deploying → training → post_training → completed``, or ``failed`` (with
the reason) / ``cancelled``. Every transition is persisted with a timestamp and appended to the
project's event log; the time spent in each phase is recorded under ``phases``.

Orchestration work (cloning, building, starting services) runs on a worker pool, never in the
request thread. Component status messages arrive over MQTT (:meth:`ProjectLifecycle.on_status`)
and service exits from the orchestrator (:meth:`ProjectLifecycle.on_service_exit`).

Restarts (:meth:`ProjectLifecycle.begin_recovery`, then the MQTT backlog, then
:meth:`ProjectLifecycle.finish_recovery`): every project that was not finished when the
previous manager process ended is reconciled. ``pending`` and ``building`` projects are resumed
(building is idempotent: the environment cache is content-addressed and crash-safe).
``deploying`` ones are failed and their started services stopped (services of an interrupted
deployment cannot be told apart from a redeployment's), unless every service was started and
still runs, which makes them ``training``. ``training`` and ``post_training`` projects get their
running services re-attached; the status messages queued by the broker meanwhile are applied;
then a project with a service that is gone without having reported success, or that reported a
failure, fails with a reason naming the service and its last log line.
"""

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from flops_manager.builds import BuildResult, ProjectBuilder
from flops_manager.errors import Conflict, NotFound
from flops_manager.orchestrators.base import (
    Deployment,
    Orchestrator,
    Placement,
    ServiceHandle,
    ServiceSpec,
)
from flops_manager.sla import PostTrainingStep, ProjectSLA
from flops_manager.store import ProjectStore
from flops_utils import env_vars
from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.mqtt_topics import ParsedTopic
from flops_utils.net import find_free_port
from flops_utils.types import Component, ComponentStatus

TRAINING_DONE = "training_done"
"""``data["stage"]`` of the aggregator's ``progress`` message sent after the last round, before
it logs the final model: the project moves to ``post_training`` then."""

AGGREGATOR_EXIT_GRACE_S = 5.0
"""Seconds to wait for a service's final status message after it exited with code 0 or with
an unknown code (a re-attached service): the message may still be on its way."""

AGGREGATOR = "aggregator"
"""The aggregator's service name (learners are ``learner-<node_id>``)."""


class ProjectStatus(StrEnum):
    """Where a project is in its lifecycle; shared by the store, the REST API and the CLI."""

    PENDING = "pending"
    BUILDING = "building"
    DEPLOYING = "deploying"
    TRAINING = "training"
    POST_TRAINING = "post_training"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True for ``completed``, ``failed`` and ``cancelled``."""
        return self in TERMINAL


TERMINAL = frozenset({ProjectStatus.COMPLETED, ProjectStatus.FAILED, ProjectStatus.CANCELLED})

_NEXT: dict[ProjectStatus, ProjectStatus] = {
    ProjectStatus.PENDING: ProjectStatus.BUILDING,
    ProjectStatus.BUILDING: ProjectStatus.DEPLOYING,
    ProjectStatus.DEPLOYING: ProjectStatus.TRAINING,
    ProjectStatus.TRAINING: ProjectStatus.POST_TRAINING,
    ProjectStatus.POST_TRAINING: ProjectStatus.COMPLETED,
}
"""The forward path; ``failed`` and ``cancelled`` are reachable from every non-terminal state."""


ACTIVE = frozenset({ProjectStatus.DEPLOYING, ProjectStatus.TRAINING, ProjectStatus.POST_TRAINING})
"""States in which a project has services running."""


def service_name(component: Component, instance: str) -> str:
    """The orchestrator's name of the service that publishes as ``component``/``instance``:
    ``aggregator`` for the aggregator, ``learner-<instance>`` for a learner."""
    return component.value if instance in ("", component.value) else f"{component.value}-{instance}"


def final_reports(project: dict[str, Any]) -> dict[str, str]:
    """Service name → the last final status (``success`` / ``failed``) it reported over MQTT,
    from the project's ``service_reports`` list (``{"service", "status", "timestamp"}``)."""
    return {r["service"]: r["status"] for r in project.get("service_reports") or []}


@dataclass
class _Recovery:
    """What the restart found for one re-attached project: services ``gone`` (name → last log
    line) and failure reports held back (``failures``) until :meth:`finish_recovery`."""

    running: list[str]
    gone: dict[str, str]
    failures: list[str] = field(default_factory=list)


NODE_TTL_S = 120.0
"""A node whose data server has not registered for this many seconds is not used."""


def eligible_nodes(
    nodes: list[dict[str, Any]],
    data_tags: list[str],
    platforms: list[str] | None = None,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """The live nodes whose data server holds rows under at least one of ``data_tags`` and
    whose ``architecture`` is one of ``platforms`` (``None``: any).

    ``nodes`` are node documents (``tags``: ``{tag: rows}``, ``architecture``: ``linux/amd64``
    …, ``last_seen``: seconds since the epoch); a node not seen for ``NODE_TTL_S`` seconds is
    left out. The result keeps the order.
    """
    now = time.time() if now is None else now
    wanted = set(data_tags)
    return [
        n
        for n in nodes
        if any(n.get("tags", {}).get(t, 0) > 0 for t in wanted)
        and (platforms is None or n.get("architecture", "linux/amd64") in platforms)
        and now - n.get("last_seen", now) <= NODE_TTL_S
    ]


class ProjectLifecycle:
    """Runs projects from SLA to trained model and keeps their persisted state current.

    Args:
        store: where projects and nodes live.
        builder: makes the learner/aggregator environment from the ML repo.
        orchestrator: starts and stops the project's services.
        workdir: per-project scratch space (clones, logs) goes under ``workdir/<project_id>``.
        mqtt_url: broker the services publish their status to.
        mlflow_url: tracking server the aggregator logs to.
        max_workers: projects that can build/deploy at the same time.
        exit_grace_s: seconds to wait for a service's final status message after it exited
            with code 0 or an unknown code. Defaults to :data:`AGGREGATOR_EXIT_GRACE_S`.
    """

    def __init__(
        self,
        store: ProjectStore,
        builder: ProjectBuilder,
        orchestrator: Orchestrator,
        workdir: Path,
        mqtt_url: str,
        mlflow_url: str,
        max_workers: int = 4,
        exit_grace_s: float = AGGREGATOR_EXIT_GRACE_S,
    ) -> None:
        self.store = store
        self.builder = builder
        self.orchestrator = orchestrator
        self.workdir = workdir
        self.mqtt_url = mqtt_url
        self.mlflow_url = mlflow_url
        self.exit_grace_s = exit_grace_s
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="project")
        self._closing = False
        self._recovering: dict[str, _Recovery] = {}
        self._to_resume: list[str] = []
        self._completing: set[str] = set()

    # -- accepting work ------------------------------------------------------------------
    def create(self, sla: ProjectSLA) -> dict[str, Any]:
        """Accept a validated SLA, persist the project as ``pending`` and start working on it.

        Returns the project document. Raises ``Conflict`` when fewer nodes hold the SLA's data
        tags than ``min_available_clients`` (details list every node's tags). With
        ``max_clients``, the learners go to that many eligible nodes, most rows first.
        """
        training = sla.training_configuration
        nodes = self.store.list_nodes()
        platforms = [p.value for p in sla.supported_platforms]
        eligible = eligible_nodes(nodes, training.data_tags, platforms)
        if len(eligible) < training.min_available_clients:
            raise Conflict(
                f"{len(eligible)} worker node(s) of {'/'.join(platforms)} hold data tagged "
                f"{training.data_tags}, but min_available_clients is "
                f"{training.min_available_clients}. Register more nodes with that data (e.g. "
                "POST /api/flops/mocks), add their platform to supported_platforms, or lower "
                "min_available_clients.",
                details=[
                    {
                        "node_id": n["node_id"],
                        "architecture": n.get("architecture"),
                        "tags": n.get("tags", {}),
                    }
                    for n in nodes
                ],
            )
        if training.max_clients is not None:
            rows = {
                n["node_id"]: sum(n["tags"].get(t, 0) for t in training.data_tags) for n in eligible
            }
            eligible = sorted(eligible, key=lambda n: -rows[n["node_id"]])[: training.max_clients]
        project_id = uuid.uuid4().hex[:12]
        now = time.time()
        project: dict[str, Any] = {
            "_id": project_id,
            "project_id": project_id,
            "customer_id": sla.customerID,
            "status": ProjectStatus.PENDING.value,
            "status_message": "accepted",
            "created_at": now,
            "updated_at": now,
            "sla": sla.model_dump(mode="json"),
            "nodes": [n["node_id"] for n in eligible],
            "phases": {ProjectStatus.PENDING.value: {"started_at": now}},
            "events": [_event("status", ProjectStatus.PENDING.value, "project accepted", now)],
            "rounds": [],
            "services": [],
            "service_handles": [],
            "service_reports": [],
            "environment": None,
            "mlflow": None,
            "inference_url": None,
        }
        self.store.insert_project(project)
        self._pool.submit(self._run, project_id, sla, eligible, ProjectStatus.PENDING)
        return project

    def get(self, project_id: str) -> dict[str, Any]:
        """The project document; raises ``NotFound`` for an unknown id."""
        project = self.store.get_project(project_id)
        if project is None:
            raise NotFound(f"No project has id {project_id!r}; GET /api/flops/projects lists them.")
        return project

    def cancel(self, project_id: str) -> dict[str, Any]:
        """Stop every service of the project and mark it ``cancelled``; a finished project
        keeps its status, but its trained-model server (``inference_url``) is stopped."""
        project = self.get(project_id)
        if not ProjectStatus(project["status"]).is_terminal:
            self._finish(project_id, ProjectStatus.CANCELLED, "cancelled by the user")
        elif project.get("inference_url"):
            self.orchestrator.stop_inference(project_id)
            self.store.update_project(
                project_id,
                {"inference_url": None},
                event=_event("post_training", "stopped", "trained-model server stopped"),
            )
        return self.get(project_id)

    def close(self) -> None:
        """Stop accepting work. Queued projects stay ``pending`` and a build that is under way
        finishes in its thread without moving on: the next manager process resumes both."""
        self._closing = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def active_projects(self) -> list[str]:
        """Ids of the projects that have services running or starting (``deploying``,
        ``training``, ``post_training``), oldest first."""
        return [
            p["project_id"]
            for p in self.store.list_projects()
            if ProjectStatus(p["status"]) in ACTIVE
        ]

    def fail_unfinished(self, reason: str) -> list[str]:
        """Fail every unfinished project with ``reason`` and stop its services (a manager
        stopping for good). Returns their ids."""
        ended = []
        for project in self.store.list_projects():
            if not ProjectStatus(project["status"]).is_terminal:
                self._finish(project["project_id"], ProjectStatus.FAILED, reason)
                ended.append(project["project_id"])
        return ended

    # -- restart -------------------------------------------------------------------------
    def begin_recovery(self) -> list[str]:
        """First half of reconciling after a restart, before the MQTT backlog is applied.

        Re-attaches the running services of ``training`` / ``post_training`` projects (and of
        ``deploying`` ones whose deployment had finished), fails other ``deploying`` projects,
        notes ``pending`` / ``building`` ones to resume, and stops services of finished
        projects that still run. Until :meth:`finish_recovery`,
        failure reports and service exits of re-attached projects are held back, so that a
        service that died silently is named as the cause rather than the reactions of the
        others. Returns the ids of the projects it reconciles.
        """
        seen = []
        for project in self.store.list_projects():
            status = ProjectStatus(project["status"])
            project_id = project["project_id"]
            if status.is_terminal:
                self._stop_leftovers(project_id, project.get("service_handles") or [])
                continue
            seen.append(project_id)
            if status in (ProjectStatus.PENDING, ProjectStatus.BUILDING):
                self._to_resume.append(project_id)
                continue
            handles: list[ServiceHandle] = list(project.get("service_handles") or [])
            if not handles and status is not ProjectStatus.DEPLOYING:
                self._finish(
                    project_id,
                    ProjectStatus.FAILED,
                    f"the manager restarted and has no record of this {status.value} project's "
                    "services, so it cannot watch them; POST the SLA again.",
                )
                continue
            states = self.orchestrator.reattach(project_id, handles)
            running = [s.name for s in states if s.running]
            if status is ProjectStatus.DEPLOYING:
                expected = list(project.get("services") or [])
                if not running or sorted(running) != sorted(expected):
                    self._finish(
                        project_id,
                        ProjectStatus.FAILED,
                        "the manager restarted while deploying the services, so their start "
                        "cannot be confirmed; the ones started were stopped. POST the SLA again.",
                    )
                    continue
                self._transition(
                    project_id,
                    ProjectStatus.TRAINING,
                    f"started the aggregator and {len(expected) - 1} learner(s) "
                    "(confirmed after a manager restart)",
                )
            gone = {s.name: s.last_output for s in states if not s.running}
            with self._lock:
                self._recovering[project_id] = _Recovery(running, gone)
        return seen

    def _stop_leftovers(self, project_id: str, handles: list[ServiceHandle]) -> None:
        """Stop services of a finished project that still run (the previous manager ended
        between persisting the end of the project and stopping its services)."""
        if not handles:
            return
        running = [s.name for s in self.orchestrator.reattach(project_id, handles) if s.running]
        if running:
            logger.info("project %s is finished; stopping %s", project_id, ", ".join(running))
            self._stop_services(project_id)

    def finish_recovery(self) -> None:
        """Second half of reconciling after a restart, once the MQTT backlog is applied.

        A re-attached project whose aggregator reported success is completed; one with a
        service that is gone without reporting success, or with failure reports, fails with
        a reason naming those services (silent ones first, each with its last log line);
        otherwise its services keep being watched. ``pending`` / ``building`` projects are
        resumed on the worker pool.
        """
        with self._lock:
            recovering, self._recovering = self._recovering, {}
            to_resume, self._to_resume = self._to_resume, []
        for project_id, found in recovering.items():
            project = self.get(project_id)
            if ProjectStatus(project["status"]).is_terminal:
                continue
            reports = final_reports(project)
            if reports.get(AGGREGATOR) == ComponentStatus.SUCCESS.value:
                self._note(project_id, "the aggregator reported success while the manager was down")
                self._pool.submit(
                    self._post_training, project_id, project.get("aggregator_result") or {}
                )
                continue
            silent = [
                f"{name} stopped without reporting a result"
                + (f" (last log line: {_clip(line)})" if line else "")
                for name, line in found.gone.items()
                if reports.get(name)
                not in (ComponentStatus.SUCCESS.value, ComponentStatus.FAILED.value)
            ]
            reasons = silent + found.failures
            if reasons:
                self._finish(
                    project_id,
                    ProjectStatus.FAILED,
                    "while the manager was down, " + "; ".join(reasons),
                )
                continue
            names = ", ".join(found.running) or "none"
            self._note(
                project_id,
                f"manager restarted; re-attached {len(found.running)} running service(s): {names}",
            )
        for project_id in to_resume:
            self._pool.submit(self._resume, project_id)

    def _resume(self, project_id: str) -> None:
        project = self.get(project_id)
        status = ProjectStatus(project["status"])
        if status not in (ProjectStatus.PENDING, ProjectStatus.BUILDING):
            return
        try:
            sla = ProjectSLA.model_validate(project["sla"])
        except ValueError as exc:
            self._finish(project_id, ProjectStatus.FAILED, f"internal error: stored SLA: {exc}")
            return
        wanted = list(project.get("nodes") or [])
        nodes = [n for n in self.store.list_nodes() if n["node_id"] in wanted]
        if status is ProjectStatus.BUILDING:
            self._note(project_id, "manager restarted; building the environment again")
        self._run(project_id, sla, nodes, status)

    def _note(self, project_id: str, message: str) -> None:
        self.store.update_project(project_id, {}, event=_event("manager", "restarted", message))

    # -- the pipeline --------------------------------------------------------------------
    def _run(
        self,
        project_id: str,
        sla: ProjectSLA,
        nodes: list[dict[str, Any]],
        start: ProjectStatus,
    ) -> None:
        """Build, deploy, start training; ``start`` is ``pending`` for a new project and
        ``building`` when a build interrupted by a restart is resumed."""
        try:
            if start is ProjectStatus.PENDING and not self._transition(
                project_id, ProjectStatus.BUILDING, "building the environment"
            ):
                return
            env = self.builder.build(project_id, sla, self.workdir / project_id / "build")
            self.store.update_project(project_id, {"environment": env.document()})
            for note in env.notes:
                self.store.update_project(
                    project_id, {}, event=_event("builder", "note", note, component="builder")
                )
            cached = "reused from the cache" if env.cache_hit else f"built in {env.seconds:.1f} s"
            if not self._transition(
                project_id, ProjectStatus.DEPLOYING, f"environment {env.key[:12]} {cached}"
            ):
                return
            deployment = self._deployment(project_id, sla, env, nodes)
            self.store.update_project(
                project_id,
                {"services": [s.name for s in deployment.services], "service_handles": []},
            )
            self.orchestrator.deploy(deployment, self._recorder(project_id))
            self._transition(
                project_id,
                ProjectStatus.TRAINING,
                f"started the aggregator and {len(nodes)} learner(s)",
            )
        except FlopsError as exc:
            self._finish(project_id, ProjectStatus.FAILED, exc.message)
        except Exception as exc:
            logger.exception("project %s: unexpected error", project_id)
            self._finish(project_id, ProjectStatus.FAILED, f"internal error: {exc}")

    def _recorder(self, project_id: str) -> Callable[[ServiceHandle], None]:
        """Persists each started service's handle at once (a restart re-attaches with it)."""

        def record(handle: ServiceHandle) -> None:
            self.store.update_project(project_id, {}, push={"service_handles": handle})

        return record

    def _deployment(
        self, project_id: str, sla: ProjectSLA, env: BuildResult, nodes: list[dict[str, Any]]
    ) -> Deployment:
        address = f"127.0.0.1:{find_free_port()}"
        common = {
            env_vars.PROJECT_ID: project_id,
            env_vars.MQTT_URL: self.mqtt_url,
            env_vars.AGGREGATOR_ADDRESS: address,
        }
        if env.repo_dir is not None:  # an image sets its own FLOPS_ML_REPO_DIR
            common[env_vars.ML_REPO_DIR] = str(env.repo_dir)
        if env.user_python is not None:  # an image holds one environment for both
            common[env_vars.USER_PYTHON] = str(env.user_python)
        aggregator = ServiceSpec(
            name=AGGREGATOR,
            module="aggregator",
            env={
                **common,
                env_vars.MLFLOW_URL: self.mlflow_url,
                env_vars.SLA: json.dumps(sla.model_dump(mode="json")),
            },
        )
        learners = tuple(
            ServiceSpec(
                name=f"learner-{node['node_id']}",
                module="learner",
                env={
                    **common,
                    env_vars.DATA_SERVER: node["data_server"],
                    env_vars.DATA_TAGS: ",".join(sla.training_configuration.data_tags),
                    env_vars.LEARNER_NAME: str(node["node_id"]),
                },
                placement=Placement(
                    cluster=str(node.get("cluster") or "local"),
                    hostname=str(node.get("hostname") or node["node_id"]),
                    platform=str(node.get("architecture") or "linux/amd64"),
                ),
            )
            for node in nodes
        )
        self.store.update_project(project_id, {"aggregator_address": address})
        return Deployment(
            project_id=project_id,
            services=(aggregator, *learners),
            python=env.python,
            images=dict(env.images),
            resources=sla.resource_constraints.model_dump(),
        )

    # -- inputs from the running services -------------------------------------------------
    def on_status(self, topic: ParsedTopic, payload: dict[str, Any]) -> None:
        """Apply one MQTT status message (``flops/<project>/<component>/<status>``)."""
        project = self.store.get_project(topic.project_id)
        if project is None or ProjectStatus(project["status"]).is_terminal:
            return
        project_id = topic.project_id
        instance = str(payload.get("instance") or topic.component.value)
        if instance != topic.component.value:
            instance = f"{topic.component.value} {instance}"
        message = str(payload.get("message") or "")
        data = payload.get("data") or {}
        service = service_name(topic.component, str(payload.get("instance") or ""))
        if topic.status in (ComponentStatus.SUCCESS, ComponentStatus.FAILED):
            fields: dict[str, Any] = {}
            if service == AGGREGATOR and topic.status is ComponentStatus.SUCCESS:
                fields["aggregator_result"] = data
            report = {"service": service, "status": topic.status.value, "timestamp": time.time()}
            self.store.update_project(project_id, fields, push={"service_reports": report})
        if topic.status is ComponentStatus.FAILED:
            reason = f"{instance} failed: {message or 'no reason given'}"
            with self._lock:
                held = self._recovering.get(project_id)
                if held is not None:
                    held.failures.append(reason)
            if held is not None:
                self.store.update_project(
                    project_id, {}, event=_event("component", "failed", reason, component=instance)
                )
                return
            if self._learner_lost(project_id, service, reason):
                return
            # Persisted here, before the broker gets its acknowledgement; services stop later.
            self._finish(project_id, ProjectStatus.FAILED, reason, stop_in_background=True)
            return
        if topic.component is Component.AGGREGATOR and topic.status is ComponentStatus.PROGRESS:
            if data.get("stage") == TRAINING_DONE:
                self._transition(project_id, ProjectStatus.POST_TRAINING, message or TRAINING_DONE)
            else:
                self._record_round(project_id, data)
            return
        if topic.component is Component.AGGREGATOR and topic.status is ComponentStatus.SUCCESS:
            self._pool.submit(self._post_training, project_id, data)
            return
        text = message or f"{instance} {topic.status.value}"
        self.store.update_project(
            project_id, {}, event=_event("component", topic.status.value, text, component=instance)
        )

    def on_service_exit(
        self, project_id: str, service: str, returncode: int | None, last: str
    ) -> None:
        """React to a service that ended on its own (called by the orchestrator's watcher).

        ``returncode`` ``None`` means unknown (a service re-attached after a restart): if the
        service has not reported success ``exit_grace_s`` seconds later (a learner
        may also leave once training is done), the project fails with its last log line.
        """
        with self._lock:
            held = self._recovering.get(project_id)
            if held is not None:
                held.gone[service] = last
                return
        project = self.store.get_project(project_id)
        if project is None or ProjectStatus(project["status"]).is_terminal:
            return
        if returncode is None:
            _later(self.exit_grace_s, self._check_gone, project_id, service, last)
        elif returncode != 0:
            reason = f"{service} exited with code {returncode}" + (f": {last}" if last else "")
            if not self._learner_lost(project_id, service, reason):
                self._finish(project_id, ProjectStatus.FAILED, reason)
        elif service == AGGREGATOR:
            _later(self.exit_grace_s, self._check_finished, project_id)

    def _learner_lost(self, project_id: str, service: str, reason: str) -> bool:
        """Whether training goes on without the failed learner ``service``.

        It does while the project is ``training`` and the learners left number at least
        ``max(min_fit_clients, min_evaluate_clients, min_available_clients)`` (Flower waits
        for ``min_available_clients`` connected clients before each round, so fewer would
        stall it); the loss is then recorded (``lost_learners`` and an event) and ``True``
        returned. A learner already recorded as lost (its ``failed`` message and its exit both
        arrive) is ``True`` again; anything else is ``False``.
        """
        if service == AGGREGATOR:
            return False
        with self._lock:
            project = self.get(project_id)
            if ProjectStatus(project["status"]) is not ProjectStatus.TRAINING:
                return False
            lost = set(project.get("lost_learners") or [])
            if service in lost:
                return True
            learners = [s for s in project.get("services") or [] if s != AGGREGATOR]
            if service not in learners:
                return False
            training = ProjectSLA.model_validate(project["sla"]).training_configuration
            needed = max(
                training.min_fit_clients,
                training.min_evaluate_clients,
                training.min_available_clients,
            )
            remaining = len(learners) - len(lost) - 1
            if remaining < needed:
                return False
            text = (
                f"{reason}; training goes on with {remaining} learner(s) (at least {needed} needed)"
            )
            self.store.update_project(
                project_id,
                {"lost_learners": sorted(lost | {service})},
                event=_event("component", "failed", text, component=service),
            )
        logger.warning("project %s: %s", project_id, text)
        return True

    def _check_finished(self, project_id: str) -> None:
        project = self.store.get_project(project_id)
        running = (ProjectStatus.TRAINING.value, ProjectStatus.POST_TRAINING.value)
        if self._closing or project is None or project["status"] not in running:
            return
        if final_reports(project).get(AGGREGATOR) == ComponentStatus.SUCCESS.value:
            return  # completing on the worker pool
        self._finish(
            project_id,
            ProjectStatus.FAILED,
            "the aggregator exited without reporting a result; see its log",
        )

    def _check_gone(self, project_id: str, service: str, last: str) -> None:
        """A service with an unknown exit code is gone: fail unless it reported success, or
        it is a learner leaving after training."""
        project = self.store.get_project(project_id)
        if self._closing or project is None:
            return
        status = ProjectStatus(project["status"])
        report = final_reports(project).get(service)
        if status.is_terminal or report == ComponentStatus.SUCCESS.value:
            return
        if service != AGGREGATOR and status is ProjectStatus.POST_TRAINING:
            return
        self._finish(
            project_id,
            ProjectStatus.FAILED,
            f"{service} stopped without reporting a result (exit code unknown: it was "
            "re-attached after a manager restart)"
            + (f"; last log line: {_clip(last)}" if last else ""),
        )

    def _record_round(self, project_id: str, data: dict[str, Any]) -> None:
        entry = {k: data.get(k) for k in ("round", "loss", "accuracy")}
        loss, accuracy = _fmt(entry["loss"]), _fmt(entry["accuracy"])
        text = f"round {entry['round']}: loss {loss}, accuracy {accuracy}"
        with self._lock:  # QoS 1 is at-least-once: a redelivered round is recorded once
            project = self.get(project_id)
            if any(r.get("round") == entry["round"] for r in project.get("rounds", [])):
                return
            self.store.update_project(
                project_id,
                {"metrics": entry},
                event=_event("round", "progress", text, component=AGGREGATOR),
                push={"rounds": entry},
            )

    def _post_training(self, project_id: str, result: dict[str, Any]) -> None:
        with self._lock:  # the success message and a restart's recovery may both get here
            if project_id in self._completing:
                return
            self._completing.add(project_id)
        try:
            self._complete(project_id, result)
        finally:
            with self._lock:
                self._completing.discard(project_id)

    def _complete(self, project_id: str, result: dict[str, Any]) -> None:
        if ProjectStatus(self.get(project_id)["status"]).is_terminal:
            return
        mlflow = {
            k: result.get(k)
            for k in (
                "experiment_id",
                "run_id",
                "model_uri",
                "registered_model",
                "model_version",
                "registered_model_uri",
            )
        }
        self.store.update_project(
            project_id,
            {
                "mlflow": mlflow,
                "metrics": {k: result.get(k) for k in ("round", "rounds", "loss", "accuracy")},
            },
        )
        status = ProjectStatus(self.get(project_id)["status"])
        if status is ProjectStatus.TRAINING:
            self._transition(project_id, ProjectStatus.POST_TRAINING, TRAINING_DONE)
        elif status is not ProjectStatus.POST_TRAINING:
            return
        sla = ProjectSLA.model_validate(self.get(project_id)["sla"])
        model_uri = str(mlflow["registered_model_uri"] or mlflow["model_uri"])
        for step in sla.post_training_steps:
            try:
                self._post_training_step(project_id, step, model_uri)
            except FlopsError as exc:
                if step is PostTrainingStep.DEPLOY_TRAINED_MODEL_IMAGE:
                    self._stop_inference_quietly(project_id)
                self._finish(
                    project_id,
                    ProjectStatus.FAILED,
                    f"training completed and the model is in MLflow as {model_uri}, but "
                    f"{step.value} failed: {exc.message}",
                )
                return
        accuracy = _fmt(result.get("accuracy"))
        self._finish(
            project_id,
            ProjectStatus.COMPLETED,
            f"final accuracy {accuracy}; model registered as "
            f"{mlflow['registered_model_uri'] or mlflow['model_uri']}",
        )

    def _post_training_step(self, project_id: str, step: PostTrainingStep, model_uri: str) -> None:
        """Run one of the SLA's ``post_training_steps`` for the trained model ``model_uri``.

        ``build_image_for_trained_model`` builds (or reuses) the image serving the model with
        the ``oci`` builder and records it as ``model_image`` (``ref``, ``model_uri``, ``port``,
        ``reused``, ``seconds``); with the ``venv`` builder it is skipped (an event says so).
        ``deploy_trained_model_image`` builds that image if no step did, runs it through the
        orchestrator (:meth:`Orchestrator.deploy_inference`, on a free port) and records
        ``inference_url``; skipped with an event when the orchestrator runs no images.
        Raises the builder's and the orchestrator's ``FlopsError``.
        """
        if not self.builder.produces_images:
            self._post_training_event(
                project_id,
                "skipped",
                f"skipped {step.value}: the venv builder makes environments, not images; use "
                "FLOPS_BUILDER=oci (with the oakestra orchestrator) for trained-model images",
            )
            return
        image = self.get(project_id).get("model_image")
        if image is None:  # deploying needs the image: build it first if no step did
            built = self.builder.build_model_image(
                project_id, model_uri, self.mlflow_url, self.workdir / project_id / "model-build"
            )
            image = dataclasses.asdict(built)
            self.store.update_project(project_id, {"model_image": image})
            how = "reused" if built.reused else f"built in {built.seconds:.1f} s"
            self._post_training_event(
                project_id,
                "built",
                f"trained-model image {built.ref} {how}; it serves {built.model_uri} on port "
                f"{built.port} (POST /invocations)",
            )
        if step is not PostTrainingStep.DEPLOY_TRAINED_MODEL_IMAGE:
            return
        if not self.orchestrator.serves_models:
            self._post_training_event(
                project_id,
                "skipped",
                f"skipped {step.value}: the '{self.orchestrator_name}' orchestrator does not "
                "run images; run the model image (see model_image) yourself",
            )
            return
        sla = ProjectSLA.model_validate(self.get(project_id)["sla"])
        url = self.orchestrator.deploy_inference(
            project_id, image["ref"], find_free_port(), sla.resource_constraints.model_dump()
        )
        self.store.update_project(project_id, {"inference_url": url})
        self._post_training_event(
            project_id,
            "deployed",
            f"trained-model server at {url} (POST {url}/invocations); DELETE the project to "
            "stop it",
        )

    def _stop_inference_quietly(self, project_id: str) -> None:
        """Remove what a failed trained-model deployment left; failures only logged."""
        try:
            self.orchestrator.stop_inference(project_id)
        except Exception:
            logger.exception("project %s: removing the trained-model server failed", project_id)

    @property
    def orchestrator_name(self) -> str:
        """The orchestrator backend's class name, for messages."""
        return type(self.orchestrator).__name__

    def _post_training_event(self, project_id: str, status: str, text: str) -> None:
        self.store.update_project(project_id, {}, event=_event("post_training", status, text))

    # -- state machine ------------------------------------------------------------------
    def _transition(self, project_id: str, status: ProjectStatus, message: str) -> bool:
        """Move to ``status`` if that is the next step; False when the project left the path."""
        with self._lock:
            project = self.get(project_id)
            current = ProjectStatus(project["status"])
            if self._closing and status is not ProjectStatus.POST_TRAINING:
                logger.info("project %s: manager stopping, stays %s", project_id, current)
                return False
            if _NEXT.get(current) is not status:
                logger.info("project %s: %s → %s refused", project_id, current, status)
                return False
            self._write_transition(project, current, status, message)
        return True

    def _finish(
        self,
        project_id: str,
        status: ProjectStatus,
        message: str,
        stop_in_background: bool = False,
    ) -> None:
        """End the project (terminal ``status``) and stop its services; idempotent.

        The new status is persisted before this returns; with ``stop_in_background`` the
        services are stopped on the worker pool (for callers that must not block).
        """
        with self._lock:
            project = self.get(project_id)
            current = ProjectStatus(project["status"])
            if current.is_terminal:
                return
            if status is ProjectStatus.COMPLETED and current is not ProjectStatus.POST_TRAINING:
                return
            self._write_transition(project, current, status, message)
        log = logger.warning if status is ProjectStatus.FAILED else logger.info
        log("project %s %s: %s", project_id, status.value, message)
        if stop_in_background:
            try:
                self._pool.submit(self._stop_services, project_id)
                return
            except RuntimeError:  # the pool is shut down
                pass
        self._stop_services(project_id)

    def _stop_services(self, project_id: str) -> None:
        try:
            self.orchestrator.stop(project_id)
        except Exception:
            logger.exception("project %s: stopping its services failed", project_id)

    def _write_transition(
        self,
        project: dict[str, Any],
        current: ProjectStatus,
        status: ProjectStatus,
        message: str,
    ) -> None:
        now = time.time()
        fields: dict[str, Any] = {"status": status.value, "status_message": message}
        started = project.get("phases", {}).get(current.value, {}).get("started_at")
        if started is not None:
            fields[f"phases.{current.value}.ended_at"] = now
            fields[f"phases.{current.value}.seconds"] = round(now - started, 3)
        if not status.is_terminal:
            fields[f"phases.{status.value}.started_at"] = now
        self.store.update_project(
            project["_id"], fields, event=_event("status", status.value, message, now)
        )


def _event(
    kind: str, status: str, message: str, now: float | None = None, component: str | None = None
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "timestamp": now if now is not None else time.time(),
        "type": kind,
        "status": status,
        "message": message,
    }
    if component is not None:
        event["component"] = component
    return event


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _clip(text: str, limit: int = 300) -> str:
    """``text`` quoted, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _later(delay_s: float, function: Callable[..., None], *args: Any) -> None:
    """Call ``function(*args)`` after ``delay_s`` seconds in a daemon thread."""
    timer = threading.Timer(delay_s, function, args)
    timer.daemon = True
    timer.start()
