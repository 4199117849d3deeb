"""Restart recovery: reconcile the projects a previous manager process left unfinished.

:meth:`RestartRecovery.begin` (before the MQTT backlog is applied) re-attaches the running
services of ``deploying`` / ``training`` / ``post_training`` projects and posts what it found
(``ServicesFound``: a ``deploying`` project becomes ``training`` when all its services run,
else fails), notes ``pending`` / ``building`` projects to resume and stops services of
finished projects that still run. Until :meth:`RestartRecovery.finish`, failure reports and
service exits of the re-attached projects are held back, so that a service that died
silently is named as the cause rather than the reactions of the others. ``finish`` waits
until the queued events are applied and posts ``RecoveryFinished`` per re-attached project
(the reducer completes, fails or keeps watching it), then resumes the builds.
"""

from flops_manager.lifecycle import events as ev
from flops_manager.lifecycle.runner import LifecycleRunner
from flops_manager.orchestrators.base import Orchestrator, ServiceHandle
from flops_manager.records import ProjectRecord
from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.logging import logger

DRAIN_TIMEOUT_S = 60.0
"""How long :meth:`RestartRecovery.finish` waits for the queued events to be applied."""

_RESUMED = frozenset({ProjectStatus.PENDING, ProjectStatus.BUILDING})


class RestartRecovery:
    """The two halves of reconciling after a restart (see the module's docstring)."""

    def __init__(self, runner: LifecycleRunner, orchestrator: Orchestrator) -> None:
        self.runner = runner
        self.orchestrator = orchestrator
        self._to_resume: list[str] = []

    def begin(self) -> list[str]:
        """Re-attach, fail or note every unfinished project; returns their ids, oldest first."""
        seen = []
        for record in self.runner.store.list_projects():
            if record.status.is_terminal:
                self._stop_leftovers(record.project_id, record.service_handles)
                continue
            seen.append(record.project_id)
            if record.status in _RESUMED:
                self._to_resume.append(record.project_id)
            else:
                self._reattach(record)
        return seen

    def finish(self, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Judge the re-attached projects once the events queued so far are applied, then
        resume the ``pending`` / ``building`` ones (building is idempotent: the environment
        cache is content-addressed and crash-safe)."""
        if not self.runner.drain(drain_timeout_s):
            logger.warning("events still queued after %gs; judging without them", drain_timeout_s)
        for project_id, found in self.runner.end_recovery().items():
            self.runner.apply(
                project_id,
                ev.RecoveryFinished(tuple(found.running), dict(found.gone), tuple(found.failures)),
            )
        to_resume, self._to_resume = self._to_resume, []
        for project_id in to_resume:
            self.runner.post(project_id, ev.BuildRequested(resumed=True))

    def _reattach(self, record: ProjectRecord) -> None:
        project_id = record.project_id
        handles: list[ServiceHandle] = list(record.service_handles)
        known = bool(handles)
        if not known and record.status is not ProjectStatus.DEPLOYING:
            self.runner.apply(project_id, ev.ServicesFound(known=False))
            return
        self.runner.begin_recovery(project_id, [], {})  # exits from now on are held back
        states = self.orchestrator.reattach(project_id, handles)
        running = [s.name for s in states if s.running]
        gone = {s.name: s.last_output for s in states if not s.running}
        after = self.runner.apply(project_id, ev.ServicesFound(known, tuple(running), gone))
        if after is None or after.status.is_terminal:
            self.runner.end_recovery_of(project_id)
        else:
            self.runner.begin_recovery(project_id, running, gone)

    def _stop_leftovers(self, project_id: str, handles: list[ServiceHandle]) -> None:
        """Stop services of a finished project that still run (the previous manager ended
        between persisting the end of the project and stopping its services)."""
        if not handles:
            return
        running = [s.name for s in self.orchestrator.reattach(project_id, handles) if s.running]
        if not running:
            return
        logger.info("project %s is finished; stopping %s", project_id, ", ".join(running))
        try:
            self.orchestrator.stop(project_id)
        except Exception:
            logger.exception("project %s: stopping its services failed", project_id)
