"""``ProjectLifecycle``: the lifecycle's public face for the API, the MQTT listener and the
orchestrator's watcher.

It turns every input into an event for the project's queue
(:class:`~flops_manager.lifecycle.runner.LifecycleRunner`), and executes the reducer's actions:
quick ones at once, long ones (build, deploy, post-training) on a worker pool.
"""

import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flops_manager.builds import ProjectBuilder, builds_model_images
from flops_manager.credentials import ProjectCredentials
from flops_manager.errors import NotFound
from flops_manager.lifecycle import actions as act
from flops_manager.lifecycle import events as ev
from flops_manager.lifecycle.admission import admit, check_supported
from flops_manager.lifecycle.pipeline import Pipeline
from flops_manager.lifecycle.post_training import PostTraining
from flops_manager.lifecycle.recovery import RestartRecovery
from flops_manager.lifecycle.runner import Ack, LifecycleRunner
from flops_manager.lifecycle.scheduling import FairQueue
from flops_manager.model_delivery import ServesMlflowModels
from flops_manager.orchestrators.base import Orchestrator
from flops_manager.records import ProjectRecord
from flops_manager.sla import ProjectSLA
from flops_manager.store import ProjectStore
from flops_utils.contract.lifecycle import ACTIVE, ProjectStatus
from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.mqtt_topics import ParsedTopic

RUN_END_STATUS = {ProjectStatus.FAILED: "FAILED", ProjectStatus.CANCELLED: "KILLED"}
"""The MLflow status the project's runs still ``RUNNING`` get when it ends so."""

BUILDS_PER_CUSTOMER = 2
"""Default for the most builds of one customer running at the same time."""

AGGREGATOR_EXIT_GRACE_S = 5.0
"""Seconds to wait for a service's final status message after it exited with code 0 or with
an unknown code (a re-attached service): the message may still be on its way."""


STATUS_OUTAGE_WAIT_S = 120.0
"""Seconds a grace period is extended at most while the status messages cannot arrive (the
MQTT broker is down or was just reconnected): a service's final message, queued by the
service while the broker was down, then still reaches the manager and the project is not
failed for the broker's crash."""

CLEANUP_WAIT_S = 30.0
"""How long :meth:`ProjectLifecycle.close` waits for finished projects' MLflow runs and
credentials to be ended before the suite stops MLflow and the broker (seconds)."""


class ProjectLifecycle:
    """Runs projects from SLA to trained model and keeps their persisted state current.

    Args:
        store: where projects and nodes live.
        builder: makes the learner/aggregator environment from the ML repo.
        orchestrator: starts and stops the project's services.
        workdir: per-project scratch space (clones, logs) goes under ``workdir/<project_id>``.
        mqtt_url: broker the services publish their status to.
        mlflow_url: tracking server the aggregator logs to.
        max_workers: projects that can build/deploy/post-train at the same time.
        exit_grace_s: seconds to wait for a service's final status message after it exited
            with code 0 or an unknown code. Defaults to :data:`AGGREGATOR_EXIT_GRACE_S`.
        credentials: issues each service's per-project credentials and revokes them when the
            project ends; default: none (every control off, for component tests).
        builds_per_customer: the most builds of one customer running at the same time; the
            ``max_workers`` build workers serve customers in turn (:class:`FairQueue`).
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
        credentials: ProjectCredentials | None = None,
        builds_per_customer: int = BUILDS_PER_CUSTOMER,
    ) -> None:
        self.store = store
        self.builder = builder
        self.orchestrator = orchestrator
        self.exit_grace_s = exit_grace_s
        self.runner = LifecycleRunner(store, self._execute)
        self.credentials = credentials or ProjectCredentials.none()
        self.pipeline = Pipeline(
            self.runner, builder, orchestrator, workdir, mqtt_url, mlflow_url, self.credentials
        )
        self.post_training = PostTraining(
            self.runner, builder, orchestrator, workdir, mlflow_url, self.credentials
        )
        self.recovery = RestartRecovery(self.runner, orchestrator)
        self.status_channel_ready: Callable[[], bool] = lambda: True
        """Whether the status messages reach the manager now (the suite sets it from its MQTT
        listener); grace periods wait while it is false, for at most
        :data:`STATUS_OUTAGE_WAIT_S` seconds."""
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="project")
        self._cleanups: set[futures.Future[None]] = set()
        self._cleanups_lock = threading.Lock()
        self.builds = FairQueue(max_workers, min(builds_per_customer, max_workers))
        self._closing = threading.Event()

    # -- the API's requests ----------------------------------------------------------------
    def create(self, sla: ProjectSLA) -> ProjectRecord:
        """Accept a validated SLA, persist the project as ``pending`` and start building.

        Returns the new record. Raises ``UnsupportedSla`` for an SLA field this manager
        would not honour (see :func:`admission.check_supported`) and ``Conflict`` when fewer
        nodes hold the SLA's data tags than ``min_available_clients`` (details list every
        node's tags; hierarchical FL: when no cluster has that many, details per cluster).
        """
        check_supported(
            sla,
            self.orchestrator.enforces_resources,
            self.builder.produces_images,
            self.orchestrator.serves_models,
            builds_model_images=builds_model_images(self.builder),
            serves_without_image=isinstance(self.orchestrator, ServesMlflowModels),
        )
        now_s = time.time()
        record = admit(sla, self.store.list_nodes(), now_s)
        self.store.insert_project(record)
        self.runner.post(record.project_id, ev.BuildRequested())
        return record

    def get(self, project_id: str) -> ProjectRecord:
        """The project's record; raises ``NotFound`` for an unknown id."""
        record = self.store.get_project(project_id)
        if record is None:
            raise NotFound(f"No project has id {project_id!r}; GET /api/flops/projects lists them.")
        return record

    def cancel(self, project_id: str) -> ProjectRecord:
        """Stop every service of the project and mark it ``cancelled``; a finished project
        keeps its status, but its trained-model server (``inference_url``) is stopped.
        Returns the record afterwards; raises ``NotFound`` for an unknown id."""
        self.get(project_id)
        self.runner.apply(project_id, ev.CancelRequested())
        self.builder.cancel(project_id)  # a clone or install under way stops now
        return self.get(project_id)

    def active_projects(self) -> list[str]:
        """Ids of the projects that have services running or starting (``deploying``,
        ``training``, ``post_training``), oldest first."""
        return [p.project_id for p in self.store.list_projects() if p.status in ACTIVE]

    # -- inputs from the services ------------------------------------------------------------
    def on_status(
        self, topic: ParsedTopic, payload: dict[str, Any], ack: Ack | None = None
    ) -> None:
        """Queue one MQTT status message (``flops/<project>/<component>/<status>``, the
        decoded JSON ``payload`` with ``instance``, ``message``, ``data``); ``ack`` is called
        once it is applied and persisted."""
        data = payload.get("data")
        event = ev.StatusReceived(
            component=topic.component,
            status=topic.status,
            instance=str(payload.get("instance") or ""),
            message=str(payload.get("message") or ""),
            data=dict(data) if isinstance(data, dict) else {},
        )
        self.runner.post(topic.project_id, event, ack)

    def on_service_exit(
        self, project_id: str, service: str, returncode: int | None, last: str
    ) -> None:
        """Queue the end of a service that ended on its own (the orchestrator's watcher).

        ``returncode`` ``None`` means unknown (a service re-attached after a restart): if the
        service has not reported success ``exit_grace_s`` seconds later (a learner may also
        leave once training is done), the project fails with its last log line.
        """
        self.runner.post(project_id, ev.ServiceExited(service, returncode, last))

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued event is applied; ``False`` after ``timeout_s`` seconds."""
        return self.runner.drain(timeout_s)

    # -- restart and stop -------------------------------------------------------------------
    def begin_recovery(self) -> list[str]:
        """First half of reconciling after a restart, before the MQTT backlog is applied
        (see :mod:`flops_manager.lifecycle.recovery`). Returns the ids it reconciles."""
        return self.recovery.begin()

    def finish_recovery(self) -> None:
        """Second half, once the MQTT backlog has been received: applies it, then judges the
        re-attached projects and resumes ``pending`` / ``building`` ones."""
        self.recovery.finish()

    def close(self, cleanup_wait_s: float = CLEANUP_WAIT_S) -> None:
        """Stop accepting work. Queued projects stay ``pending`` and a build that is under way
        finishes in its thread without moving on: the next manager process resumes both.
        Ending finished projects' MLflow runs and credentials, which needs MLflow and the
        broker the suite stops next, gets up to ``cleanup_wait_s`` seconds to finish."""
        self._closing.set()
        self.runner.close()
        self.builds.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._cleanups_lock:
            cleanups = set(self._cleanups)
        if cleanups:
            futures.wait(cleanups, timeout=cleanup_wait_s)

    def fail_unfinished(self, reason: str) -> list[str]:
        """Fail every unfinished project with ``reason`` and stop its services (a manager
        stopping for good). Returns their ids."""
        ended = []
        for record in self.store.list_projects():
            if not record.status.is_terminal:
                self.runner.apply(record.project_id, ev.ManagerStopping(reason))
                ended.append(record.project_id)
        return ended

    # -- executing the reducer's actions ----------------------------------------------------
    def _execute(self, record: ProjectRecord, actions: list[act.Action]) -> None:
        for action in actions:
            try:
                self._execute_one(record.project_id, action)
            except Exception:
                logger.exception("project %s: %s failed", record.project_id, action.kind.value)

    def _execute_one(self, project_id: str, action: act.Action) -> None:
        if isinstance(action, act.StartBuild):
            record = self.store.get_project(project_id)
            customer = record.customer_id if record is not None else ""
            self.builds.submit(customer, lambda: self.pipeline.build(project_id))
        elif isinstance(action, act.Deploy):
            self._submit(self.pipeline.deploy, project_id)
        elif isinstance(action, act.RunPostTraining):
            self._submit(self.post_training.run, project_id)
        elif isinstance(action, act.StopServices):
            if not action.background or not self._submit(self._stop_services, project_id):
                self._stop_services(project_id)
        elif isinstance(action, act.AwaitGrace):
            self._await_grace(project_id, action.event)
        elif isinstance(action, act.StopInference):
            self.orchestrator.stop_inference(project_id)
        elif isinstance(action, act.Log):
            (logger.warning if action.level == "warning" else logger.info)(action.message)

    def _await_grace(self, project_id: str, event: ev.LifecycleEvent) -> None:
        """Post ``event`` after the grace period, extended while the status messages cannot
        arrive (see :attr:`status_channel_ready`)."""
        deadline = time.monotonic() + STATUS_OUTAGE_WAIT_S
        warned = threading.Event()

        def outage() -> bool:
            if self.status_channel_ready() or time.monotonic() >= deadline:
                return False
            if not warned.is_set():
                warned.set()
                logger.warning(
                    "project %s: %s ended while status messages cannot arrive (MQTT broker "
                    "down or reconnecting); waiting up to %gs for its final message",
                    project_id,
                    getattr(event, "service", "a service"),
                    STATUS_OUTAGE_WAIT_S,
                )
            return True

        self.runner.schedule(self.exit_grace_s, project_id, event, hold=outage)

    def _submit(self, work: Any, project_id: str, cleanup: bool = False) -> bool:
        """Run ``work(project_id)`` on the pool; ``False`` when the pool is shut down.
        ``cleanup`` work is waited for (boundedly) by :meth:`close`."""
        if self._closing.is_set():
            return False
        try:
            future = self._pool.submit(work, project_id)
        except RuntimeError:
            return False
        if cleanup:
            with self._cleanups_lock:
                self._cleanups.add(future)
            future.add_done_callback(self._forget_cleanup)
        return True

    def _forget_cleanup(self, future: futures.Future[None]) -> None:
        with self._cleanups_lock:
            self._cleanups.discard(future)

    def _stop_services(self, project_id: str) -> None:
        """Stop the project's services, then end its MLflow runs and revoke its credentials
        in the background (both wait for a broker or tracking server that is restarting, which
        must not hold up a cancel request)."""
        try:
            self.orchestrator.stop(project_id)
        except Exception:
            logger.exception("project %s: stopping its services failed", project_id)
        if not self._submit(self._end_credentials, project_id, cleanup=True):
            self._end_credentials(project_id)

    def _end_credentials(self, project_id: str) -> None:
        """End the MLflow runs a killed aggregator left open, and revoke the credentials of a
        project that ended."""
        record = self.store.get_project(project_id)
        if record is not None and record.status in RUN_END_STATUS:
            try:  # a killed aggregator never ends its MLflow run itself
                self.credentials.end_runs(project_id, RUN_END_STATUS[record.status])
            except FlopsError as exc:
                logger.warning("project %s: its MLflow runs stay open: %s", project_id, exc)
            except Exception:
                logger.exception("project %s: ending its MLflow runs failed", project_id)
        if record is None or record.status.is_terminal:
            try:
                self.credentials.revoke(project_id)
            except Exception:
                logger.exception("project %s: revoking its credentials failed", project_id)
