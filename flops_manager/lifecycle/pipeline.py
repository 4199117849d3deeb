"""The build/deploy pipeline: the long work behind ``StartBuild`` and ``Deploy`` actions.

Both run on the lifecycle's worker pool and report back as events: ``BuildFinished`` or
``PipelineFailed`` after building, ``ServiceStarted`` per started service (persisted before
the next one starts, so that a restart finds it), then ``DeploymentFinished`` or
``PipelineFailed``.
"""

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flops_manager.builds import BuildResult, ProjectBuilder
from flops_manager.lifecycle import events as ev
from flops_manager.lifecycle.runner import LifecycleRunner
from flops_manager.orchestrators.base import (
    Deployment,
    Orchestrator,
    Placement,
    ServiceHandle,
    ServiceSpec,
)
from flops_manager.records import ProjectRecord
from flops_manager.sla import ProjectSLA
from flops_utils import env_vars
from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.contract.services import AGGREGATOR_SERVICE, learner_service
from flops_utils.errors import FlopsError
from flops_utils.logging import logger


class Pipeline:
    """Builds a project's environment and deploys its services.

    Args:
        runner: where the results are posted.
        builder: makes the learner/aggregator environment from the ML repo.
        orchestrator: starts the services.
        workdir: per-project scratch space goes under ``workdir/<project_id>``.
        mqtt_url: broker the services publish their status to.
        mlflow_url: tracking server the aggregator logs to.
    """

    def __init__(
        self,
        runner: LifecycleRunner,
        builder: ProjectBuilder,
        orchestrator: Orchestrator,
        workdir: Path,
        mqtt_url: str,
        mlflow_url: str,
    ) -> None:
        self.runner = runner
        self.builder = builder
        self.orchestrator = orchestrator
        self.workdir = workdir
        self.mqtt_url = mqtt_url
        self.mlflow_url = mlflow_url
        self._lock = threading.Lock()
        self._built: dict[str, BuildResult] = {}

    def build(self, project_id: str) -> None:
        """Build (or reuse) the project's environment; posts ``BuildFinished`` or
        ``PipelineFailed``. Never raises."""
        outcome: ev.LifecycleEvent
        try:
            _, sla = self._load(project_id)
            env = self.builder.build(project_id, sla, self.workdir / project_id / "build")
            with self._lock:
                self._built[project_id] = env
            cached = "reused from the cache" if env.cache_hit else f"built in {env.seconds:.1f} s"
            outcome = ev.BuildFinished(
                env.document(), tuple(env.notes), f"environment {env.key[:12]} {cached}"
            )
        except Exception as exc:
            outcome = ev.PipelineFailed(_reason(project_id, exc))
        after = self.runner.apply(project_id, outcome)
        if after is None or after.status is not ProjectStatus.DEPLOYING:
            with self._lock:
                self._built.pop(project_id, None)

    def deploy(self, project_id: str) -> None:
        """Start the project's services with the environment :meth:`build` made; posts
        ``ServiceStarted`` per service and ``DeploymentFinished`` or ``PipelineFailed``.
        Never raises."""
        outcome: ev.LifecycleEvent
        try:
            with self._lock:
                env = self._built.pop(project_id, None)
            if env is None:
                raise RuntimeError("no environment was built for the deployment")
            record, sla = self._load(project_id)
            if record.status is not ProjectStatus.DEPLOYING:
                return  # ended meanwhile (cancelled)
            nodes = [n for n in self.runner.store.list_nodes() if n["node_id"] in record.nodes]
            deployment = self.deployment(record, sla, env, nodes)
            address = self.orchestrator.deploy(deployment, self._recorder(project_id))
            outcome = ev.DeploymentFinished(address)
        except Exception as exc:
            outcome = ev.PipelineFailed(_reason(project_id, exc))
        self.runner.post(project_id, outcome)

    def _recorder(self, project_id: str) -> Callable[[ServiceHandle], None]:
        """Persists each started service's handle before the next one starts."""

        def record(handle: ServiceHandle) -> None:
            self.runner.apply(project_id, ev.ServiceStarted(handle))

        return record

    def _load(self, project_id: str) -> tuple[ProjectRecord, ProjectSLA]:
        record = self.runner.store.get_project(project_id)
        if record is None:
            raise RuntimeError("the project is not in the store")
        try:
            return record, ProjectSLA.model_validate(record.sla)
        except ValueError:
            raise _StoredSlaInvalid() from None

    def deployment(
        self, record: ProjectRecord, sla: ProjectSLA, env: BuildResult, nodes: list[dict[str, Any]]
    ) -> Deployment:
        """The project's services: the aggregator first, then a learner per node of
        ``nodes`` (node documents). The orchestrator adds ``FLOPS_AGGREGATOR_ADDRESS``."""
        common = {env_vars.PROJECT_ID: record.project_id, env_vars.MQTT_URL: self.mqtt_url}
        if env.repo_dir is not None:  # an image sets its own FLOPS_ML_REPO_DIR
            common[env_vars.ML_REPO_DIR] = str(env.repo_dir)
        if env.user_python is not None:  # an image holds one environment for both
            common[env_vars.USER_PYTHON] = str(env.user_python)
        if sla.verbose:  # the SLA's "verbose": every service logs at DEBUG
            common[env_vars.LOG_LEVEL] = "DEBUG"
        aggregator = ServiceSpec(
            name=AGGREGATOR_SERVICE,
            module="aggregator",
            env={
                **common,
                env_vars.MLFLOW_URL: self.mlflow_url,
                env_vars.SLA: json.dumps(sla.model_dump(mode="json")),
            },
        )
        learners = tuple(
            ServiceSpec(
                name=learner_service(str(node["node_id"])),
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
        return Deployment(
            project_id=record.project_id,
            services=(aggregator, *learners),
            python=env.python,
            images=dict(env.images),
            resources=sla.resource_constraints.model_dump(),
        )


class _StoredSlaInvalid(FlopsError):
    """The stored SLA does not validate (written by another FLOps version)."""

    code = "stored_sla_invalid"

    def __init__(self) -> None:
        super().__init__(
            "internal error: the stored SLA does not validate with this FLOps version; "
            "POST the SLA again."
        )


def _reason(project_id: str, exc: Exception) -> str:
    """The failure reason for ``exc``: a ``FlopsError``'s message; for anything else a
    generic text (the details go to the manager's log, not to users)."""
    if isinstance(exc, FlopsError):
        return exc.message
    logger.error("project %s: unexpected error", project_id, exc_info=exc)
    return f"internal error ({type(exc).__name__}); the manager's log has the details"
