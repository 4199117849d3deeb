"""The project lifecycle: accept an SLA, build, deploy, train, finish (DESIGN.md §3).

``pending → building → deploying → training → post_training → completed``, or ``failed`` (with
the reason) / ``cancelled``. Every transition is persisted with a timestamp and appended to the
project's event log; the time spent in each phase is recorded under ``phases``.

Orchestration work (cloning, building, starting services) runs on a worker pool, never in the
request thread. Component status messages arrive over MQTT (:meth:`ProjectLifecycle.on_status`)
and service exits from the orchestrator (:meth:`ProjectLifecycle.on_service_exit`).
"""

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from flops_manager.errors import Conflict, NotFound
from flops_manager.orchestrators.base import Deployment, Orchestrator, ServiceSpec
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
"""Seconds to wait for the aggregator's ``success`` message after it exited with code 0."""


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


class BuiltEnvironment(Protocol):
    """What a builder hands to the orchestrator (see ``image_builder.venv_builder``)."""

    @property
    def python(self) -> Path: ...
    @property
    def repo_dir(self) -> Path: ...
    @property
    def commit(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def cache_hit(self) -> bool: ...
    @property
    def seconds(self) -> float: ...


class EnvironmentBuilder(Protocol):
    """Builds the learner/aggregator environment of an ML repository."""

    def build(self, ml_repo_url: str, ref: str | None, workdir: Path) -> BuiltEnvironment: ...


NODE_TTL_S = 120.0
"""A node whose data server has not registered for this many seconds is not used."""


def eligible_nodes(
    nodes: list[dict[str, Any]], data_tags: list[str], now: float | None = None
) -> list[dict[str, Any]]:
    """The live nodes whose data server holds rows under at least one of ``data_tags``.

    ``nodes`` are node documents (``tags``: ``{tag: rows}``, ``last_seen``: seconds since the
    epoch); a node not seen for ``NODE_TTL_S`` seconds is left out. The result keeps the order.
    """
    now = time.time() if now is None else now
    wanted = set(data_tags)
    return [
        n
        for n in nodes
        if any(n.get("tags", {}).get(t, 0) > 0 for t in wanted)
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
    """

    def __init__(
        self,
        store: ProjectStore,
        builder: EnvironmentBuilder,
        orchestrator: Orchestrator,
        workdir: Path,
        mqtt_url: str,
        mlflow_url: str,
        max_workers: int = 4,
    ) -> None:
        self.store = store
        self.builder = builder
        self.orchestrator = orchestrator
        self.workdir = workdir
        self.mqtt_url = mqtt_url
        self.mlflow_url = mlflow_url
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="project")

    # -- accepting work ------------------------------------------------------------------
    def create(self, sla: ProjectSLA) -> dict[str, Any]:
        """Accept a validated SLA, persist the project as ``pending`` and start working on it.

        Returns the project document. Raises ``Conflict`` when fewer nodes hold the SLA's data
        tags than ``min_available_clients`` (details list every node's tags).
        """
        training = sla.training_configuration
        nodes = self.store.list_nodes()
        eligible = eligible_nodes(nodes, training.data_tags)
        if len(eligible) < training.min_available_clients:
            raise Conflict(
                f"{len(eligible)} worker node(s) hold data tagged {training.data_tags}, but "
                f"min_available_clients is {training.min_available_clients}. Register more "
                "nodes with that data (e.g. POST /api/flops/mocks) or lower min_available_clients.",
                details=[{"node_id": n["node_id"], "tags": n.get("tags", {})} for n in nodes],
            )
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
            "environment": None,
            "mlflow": None,
            "inference_url": None,
        }
        self.store.insert_project(project)
        self._pool.submit(self._run, project_id, sla, eligible)
        return project

    def get(self, project_id: str) -> dict[str, Any]:
        """The project document; raises ``NotFound`` for an unknown id."""
        project = self.store.get_project(project_id)
        if project is None:
            raise NotFound(f"No project has id {project_id!r}; GET /api/flops/projects lists them.")
        return project

    def cancel(self, project_id: str) -> dict[str, Any]:
        """Stop every service of the project and mark it ``cancelled`` (no-op when finished)."""
        project = self.get(project_id)
        if not ProjectStatus(project["status"]).is_terminal:
            self._finish(project_id, ProjectStatus.CANCELLED, "cancelled by the user")
        return self.get(project_id)

    def close(self) -> None:
        """Stop accepting work; running builds finish in the background threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the pipeline --------------------------------------------------------------------
    def _run(self, project_id: str, sla: ProjectSLA, nodes: list[dict[str, Any]]) -> None:
        try:
            if not self._transition(project_id, ProjectStatus.BUILDING, "building the environment"):
                return
            env = self.builder.build(
                sla.ml_repo_url, sla.ml_repo_ref, self.workdir / project_id / "build"
            )
            env_doc = {
                "python": str(env.python),
                "repo_dir": str(env.repo_dir),
                "commit": env.commit,
                "key": env.key,
                "cache_hit": env.cache_hit,
                "seconds": round(env.seconds, 3),
            }
            self.store.update_project(project_id, {"environment": env_doc})
            cached = "reused from the cache" if env.cache_hit else f"built in {env.seconds:.1f} s"
            if not self._transition(
                project_id, ProjectStatus.DEPLOYING, f"environment {env.key[:12]} {cached}"
            ):
                return
            deployment = self._deployment(project_id, sla, env, nodes)
            self.store.update_project(
                project_id, {"services": [s.name for s in deployment.services]}
            )
            self.orchestrator.deploy(deployment)
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

    def _deployment(
        self, project_id: str, sla: ProjectSLA, env: BuiltEnvironment, nodes: list[dict[str, Any]]
    ) -> Deployment:
        address = f"127.0.0.1:{find_free_port()}"
        common = {
            env_vars.PROJECT_ID: project_id,
            env_vars.MQTT_URL: self.mqtt_url,
            env_vars.ML_REPO_DIR: str(env.repo_dir),
            env_vars.AGGREGATOR_ADDRESS: address,
        }
        aggregator = ServiceSpec(
            name="aggregator",
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
            )
            for node in nodes
        )
        self.store.update_project(project_id, {"aggregator_address": address})
        return Deployment(
            project_id=project_id, python=env.python, services=(aggregator, *learners)
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
        if topic.status is ComponentStatus.FAILED:
            reason = f"{instance} failed: {message or 'no reason given'}"
            self._pool.submit(self._finish, project_id, ProjectStatus.FAILED, reason)
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

    def on_service_exit(self, project_id: str, service: str, returncode: int, last: str) -> None:
        """React to a service that ended on its own (called by the orchestrator's watcher)."""
        project = self.store.get_project(project_id)
        if project is None or ProjectStatus(project["status"]).is_terminal:
            return
        if returncode != 0:
            reason = f"{service} exited with code {returncode}" + (f": {last}" if last else "")
            self._finish(project_id, ProjectStatus.FAILED, reason)
        elif service == "aggregator":
            threading.Timer(AGGREGATOR_EXIT_GRACE_S, self._check_finished, (project_id,)).start()

    def _check_finished(self, project_id: str) -> None:
        project = self.store.get_project(project_id)
        running = (ProjectStatus.TRAINING.value, ProjectStatus.POST_TRAINING.value)
        if project is not None and project["status"] in running:
            self._finish(
                project_id,
                ProjectStatus.FAILED,
                "the aggregator exited without reporting a result; see its log",
            )

    def _record_round(self, project_id: str, data: dict[str, Any]) -> None:
        entry = {k: data.get(k) for k in ("round", "loss", "accuracy")}
        loss, accuracy = _fmt(entry["loss"]), _fmt(entry["accuracy"])
        text = f"round {entry['round']}: loss {loss}, accuracy {accuracy}"
        self.store.update_project(
            project_id,
            {"metrics": entry},
            event=_event("round", "progress", text, component="aggregator"),
            push={"rounds": entry},
        )

    def _post_training(self, project_id: str, result: dict[str, Any]) -> None:
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
        for step in sla.post_training_steps:
            self._skip_step(project_id, step)
        accuracy = _fmt(result.get("accuracy"))
        self._finish(
            project_id,
            ProjectStatus.COMPLETED,
            f"final accuracy {accuracy}; model registered as "
            f"{mlflow['registered_model_uri'] or mlflow['model_uri']}",
        )

    def _skip_step(self, project_id: str, step: PostTrainingStep) -> None:
        text = (
            f"skipped {step.value}: the '{type(self.orchestrator).__name__}' backend runs "
            "environments, not images; use the oci builder for trained-model images"
        )
        self.store.update_project(project_id, {}, event=_event("post_training", "skipped", text))

    # -- state machine ------------------------------------------------------------------
    def _transition(self, project_id: str, status: ProjectStatus, message: str) -> bool:
        """Move to ``status`` if that is the next step; False when the project left the path."""
        with self._lock:
            project = self.get(project_id)
            current = ProjectStatus(project["status"])
            if _NEXT.get(current) is not status:
                logger.info("project %s: %s → %s refused", project_id, current, status)
                return False
            self._write_transition(project, current, status, message)
        return True

    def _finish(self, project_id: str, status: ProjectStatus, message: str) -> None:
        """End the project (terminal ``status``) and stop its services; idempotent."""
        with self._lock:
            project = self.get(project_id)
            current = ProjectStatus(project["status"])
            if current.is_terminal:
                return
            if status is ProjectStatus.COMPLETED and current is not ProjectStatus.POST_TRAINING:
                return
            self._write_transition(project, current, status, message)
        try:
            self.orchestrator.stop(project_id)
        except Exception:
            logger.exception("project %s: stopping its services failed", project_id)
        log = logger.warning if status is ProjectStatus.FAILED else logger.info
        log("project %s %s: %s", project_id, status.value, message)

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
