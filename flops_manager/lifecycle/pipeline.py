"""The build/deploy pipeline: the long work behind ``StartBuild`` and ``Deploy`` actions.

Both run on the lifecycle's worker pool and report back as events: ``BuildFinished`` or
``PipelineFailed`` after building, ``ServiceStarted`` per started service (persisted before
the next one starts, so that a restart finds it), then ``DeploymentFinished`` or
``PipelineFailed``.
"""

import importlib.metadata
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flops_manager.builds import BuildResult, ProjectBuilder
from flops_manager.credentials import ProjectCredentials
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
from flops_manager.sla import ProjectSLA, with_userinfo
from flops_utils import env_vars
from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.contract.services import AGGREGATOR_SERVICE, learner_service
from flops_utils.contract.tracking import Provenance, without_credentials
from flops_utils.contract.training import AggregatorRole
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
        credentials: issues each service's per-project credentials (default: none).

    :attr:`manager_url` (the manager's API address as users reach it; empty: unknown) is set
    by whoever starts the API after it listens; the aggregators' MLflow runs then link back
    to the project (``<manager_url>/api/flops/projects/<project_id>``).
    """

    def __init__(
        self,
        runner: LifecycleRunner,
        builder: ProjectBuilder,
        orchestrator: Orchestrator,
        workdir: Path,
        mqtt_url: str,
        mlflow_url: str,
        credentials: ProjectCredentials | None = None,
    ) -> None:
        self.credentials = credentials or ProjectCredentials.none()
        self.runner = runner
        self.builder = builder
        self.orchestrator = orchestrator
        self.workdir = workdir
        self.mqtt_url = mqtt_url
        self.mlflow_url = mlflow_url
        self._lock = threading.Lock()
        self._built: dict[str, BuildResult] = {}
        self.manager_url = ""

    def build(self, project_id: str) -> None:
        """Build (or reuse) the project's environment; posts ``BuildFinished`` or
        ``PipelineFailed``. Never raises."""
        outcome: ev.LifecycleEvent
        try:
            record, sla = self._load(project_id)
            if record.status is not ProjectStatus.BUILDING:
                return  # cancelled while it waited for a build worker
            url = with_userinfo(sla.ml_repo_url, record.repo_userinfo)  # stored apart
            clone = sla.model_copy(update={"ml_repo_url": url})
            env = self.builder.build(project_id, clone, self.workdir / project_id / "build")
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
            deployment = self.deployment(record, sla, env, self.runner.store.list_nodes())
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
        self,
        record: ProjectRecord,
        sla: ProjectSLA,
        env: BuildResult,
        registered: list[dict[str, Any]],
    ) -> Deployment:
        """The project's services, in start order: the aggregator (classic, or the root in
        hierarchical FL); hierarchical FL: one cluster aggregator per cluster of the record,
        connecting to the root; then a learner per node of the record, connecting to the
        aggregator of its cluster (classic: the aggregator). ``registered``: every
        registered node document (the learners' nodes, and where a cluster aggregator may
        run). The orchestrator adds the addresses."""
        common = {env_vars.PROJECT_ID: record.project_id, env_vars.MQTT_URL: self.mqtt_url}
        if env.repo_dir is not None:  # an image sets its own FLOPS_ML_REPO_DIR
            common[env_vars.ML_REPO_DIR] = str(env.repo_dir)
        if env.user_python is not None:  # an image holds one environment for both
            common[env_vars.USER_PYTHON] = str(env.user_python)
        if sla.verbose:  # the SLA's "verbose": every service logs at DEBUG
            common[env_vars.LOG_LEVEL] = "DEBUG"
        by_id = {str(n["node_id"]): n for n in registered}
        aggregating = {
            **common,
            env_vars.MLFLOW_URL: self.mlflow_url,
            env_vars.SLA: json.dumps(sla.model_dump(mode="json")),
            env_vars.PROVENANCE: self.provenance(record, sla, env, by_id).model_dump_json(
                exclude_none=True
            ),
        }
        issued = self.credentials
        project_id = record.project_id
        aggregator_env = {
            **aggregating,
            **issued.aggregator(
                project_id, AGGREGATOR_SERVICE, cluster=False, customer_id=record.customer_id
            ),
        }
        aggregator_env[env_vars.REGISTERED_MODEL] = issued.mlflow.registered_model(
            project_id, record.customer_id, sla.ml_repo_url
        )
        if record.hierarchical:
            aggregator_env[env_vars.AGGREGATOR_ROLE] = AggregatorRole.ROOT.value
            aggregator_env[env_vars.CLUSTERS] = ",".join(c.name for c in record.clusters)
        services = [
            ServiceSpec(
                name=AGGREGATOR_SERVICE, module="aggregator", env=aggregator_env, listens=True
            )
        ]
        platforms = [p.value for p in sla.supported_platforms]
        for cluster in record.clusters:
            host = cluster_aggregator_node(cluster.name, cluster.nodes, registered, platforms)
            services.append(
                ServiceSpec(
                    name=cluster.service,
                    module="aggregator",
                    env={
                        **aggregating,
                        **issued.aggregator(
                            project_id,
                            cluster.service,
                            cluster=True,
                            customer_id=record.customer_id,
                        ),
                        env_vars.AGGREGATOR_ROLE: AggregatorRole.CLUSTER.value,
                        env_vars.CLUSTER: cluster.name,
                        env_vars.LEARNERS: ",".join(cluster.nodes),
                    },
                    placement=_placement(host) if host is not None else None,
                    listens=True,
                    upstream=AGGREGATOR_SERVICE,
                    upstream_env=env_vars.ROOT_AGGREGATOR_ADDRESS,
                )
            )
        for node_id in record.nodes:
            node = by_id.get(node_id)
            if node is None:
                raise NodeGone(node_id)
            cluster_record = record.cluster_of(learner_service(node_id))
            tags = list(sla.training_configuration.data_tags)
            services.append(
                ServiceSpec(
                    name=learner_service(node_id),
                    module="learner",
                    env={
                        **common,
                        **issued.learner(project_id, learner_service(node_id), node, tags),
                        env_vars.DATA_SERVER: node["data_server"],
                        env_vars.DATA_TAGS: ",".join(sla.training_configuration.data_tags),
                        env_vars.LEARNER_NAME: node_id,
                    },
                    placement=_placement(node),
                    upstream=cluster_record.service if cluster_record else AGGREGATOR_SERVICE,
                )
            )
        return Deployment(
            project_id=record.project_id,
            services=tuple(services),
            python=env.python,
            images=dict(env.images),
            resources=sla.resource_constraints.model_dump(),
        )

    def provenance(
        self,
        record: ProjectRecord,
        sla: ProjectSLA,
        env: BuildResult,
        nodes: dict[str, dict[str, Any]],
    ) -> Provenance:
        """What the aggregators record about the project's origin
        (:class:`~flops_utils.contract.tracking.Provenance`): the repository URL (without
        credentials) and ref, the commit and environment (key, images, versions) built, the
        rows of the SLA's data tags on each learner's node (``nodes``: node id to its
        registered document), the learners, the project's URL in the manager's API (when
        :attr:`manager_url` is known) and this manager's FLOps version."""
        tags = list(sla.training_configuration.data_tags)
        data = {}
        for node_id in record.nodes:
            held = (nodes.get(node_id) or {}).get("tags") or {}
            data[node_id] = {t: int(held[t]) for t in tags if t in held}
        base = self.manager_url.rstrip("/")
        return Provenance(
            repo_url=without_credentials(sla.ml_repo_url),
            repo_ref=sla.ml_repo_ref,
            commit=env.commit or None,
            environment_key=env.key or None,
            images=dict(env.images),
            versions=dict(env.versions),
            data=data,
            learners=list(record.nodes),
            project_url=f"{base}{PROJECTS_PATH}/{record.project_id}" if base else None,
            manager_version=_flops_version(),
        )


PROJECTS_PATH = "/api/flops/projects"
"""Where the manager's API serves a project (``GET <manager_url>/api/flops/projects/<id>``)."""


def _flops_version() -> str | None:
    """The installed FLOps version (``None`` when FLOps runs from an uninstalled tree)."""
    try:
        return importlib.metadata.version("flops")
    except importlib.metadata.PackageNotFoundError:
        return None


def _placement(node: dict[str, Any]) -> Placement:
    """Where a service pinned to ``node`` (a node document) runs."""
    return Placement(
        cluster=str(node.get("cluster") or "local"),
        hostname=str(node.get("hostname") or node["node_id"]),
        platform=str(node.get("architecture") or "linux/amd64"),
    )


def cluster_aggregator_node(
    cluster: str, learners: list[str], registered: list[dict[str, Any]], platforms: list[str]
) -> dict[str, Any] | None:
    """The node a cluster aggregator of ``cluster`` runs on: a registered node of that
    cluster on one of ``platforms`` (the images are built for those), preferring one that
    runs none of the ``learners`` (node ids), then the first learner's node; ``None`` when
    the cluster has no such node (then the orchestrator places it)."""
    members = [
        n
        for n in registered
        if str(n.get("cluster") or "local") == cluster
        and str(n.get("architecture") or "linux/amd64") in platforms
    ]
    spare = [n for n in members if str(n["node_id"]) not in learners]
    chosen = spare or [n for n in members if str(n["node_id"]) in learners]
    return chosen[0] if chosen else None


class NodeGone(FlopsError):
    """A node chosen at admission is no longer registered."""

    code = "node_gone"

    def __init__(self, node_id: str) -> None:
        super().__init__(
            f"Node {node_id!r}, chosen for a learner when the project was accepted, is no "
            "longer registered; register its data server again and POST the SLA again."
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
