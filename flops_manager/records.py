"""The typed project record: what the store keeps for one project.

:class:`ProjectRecord` is the storage schema (``extra="forbid"``: a field the code does not
know is a bug, not data). The REST API never returns it as is; ``api_models`` has the views
(:class:`flops_manager.api_models.ProjectView`), and only the admin sees internals such as
the services' handles (process ids, log paths) and local paths.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.contract.services import learner_service


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Event(_Record):
    """One entry of a project's event log.

    ``timestamp``: seconds since the epoch. ``type``: what produced it (``status`` for a
    status change, ``component`` for a service's message, ``round``, ``builder``,
    ``post_training``, ``manager``). ``status``: the new project status or the component's
    status. ``component``: the service or component it concerns, if any.
    """

    timestamp: float
    type: str
    status: str
    message: str
    component: str | None = None


class Phase(_Record):
    """Timing of one lifecycle phase, seconds since the epoch; ``seconds`` its duration."""

    started_at: float | None = None
    ended_at: float | None = None
    seconds: float | None = None


class RoundMetrics(_Record):
    """The aggregated evaluation of one round (``loss``, ``accuracy`` may be unknown)."""

    round: int | None = None
    loss: float | None = None
    accuracy: float | None = None


class Metrics(_Record):
    """The latest metrics: after a round (``round``), or the final ones (``rounds``)."""

    round: int | None = None
    rounds: int | None = None
    loss: float | None = None
    accuracy: float | None = None


class ServiceReport(_Record):
    """A final status (``success`` / ``failed``) a service reported over MQTT."""

    service: str
    status: str
    timestamp: float


class MlflowRecord(_Record):
    """Where the trained model is in MLflow."""

    experiment_id: str | None = None
    run_id: str | None = None
    model_uri: str | None = None
    registered_model: str | None = None
    model_version: str | int | None = None
    registered_model_uri: str | None = None


class ModelImageRecord(_Record):
    """The trained-model image: ``ref`` pinned by digest, the ``model_uri`` it serves, the
    ``port`` it listens on, whether it was ``reused``, build wall time in ``seconds``."""

    ref: str
    model_uri: str
    port: int
    reused: bool
    seconds: float


class ClusterRoundMetrics(_Record):
    """One round of a cluster aggregator (hierarchical FL): the root's ``cycle``, the
    ``round`` within it, the global ``step`` (``(cycle - 1) * training_rounds + round``), the
    example-weighted evaluation ``loss``/``accuracy`` of its learners, how many ``learners``
    took part and the examples aggregated (``fit_examples``) and evaluated
    (``evaluate_examples``)."""

    cycle: int | None = None
    round: int | None = None
    step: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    learners: int | None = None
    fit_examples: int | None = None
    evaluate_examples: int | None = None


class ClusterRecord(_Record):
    """One cluster of a hierarchical project: its ``name`` (the nodes' registered cluster),
    its aggregator's ``service`` name, the ``nodes`` its learners run on, the aggregator's
    ``address`` once it listens, its per-round metrics (``rounds``), its MLflow child
    ``run_id``, ``lost_learners`` training went on without, and ``lost`` (the reason) once
    the root goes on without the cluster."""

    name: str
    service: str
    nodes: list[str] = Field(default_factory=list)
    address: str | None = None
    rounds: list[ClusterRoundMetrics] = Field(default_factory=list)
    run_id: str | None = None
    lost_learners: list[str] = Field(default_factory=list)
    lost: str | None = None


class ProjectRecord(_Record):
    """One project as stored.

    ``_id`` (``id`` here) equals ``project_id``. Times are seconds since the epoch.
    ``nodes``: ids of the nodes its learners run on. ``services``: the names of the services
    it deploys (aggregator first); ``service_handles``: what the orchestrator needs to find
    each started one again after a manager restart (admin-only in the API).
    ``environment``: the build's document (commit, cache key, interpreter paths or image
    references). ``aggregator_result``: the data of the aggregator's ``success`` message,
    kept until post-training is done. ``lost_learners``: learners training went on without.
    ``clusters``: hierarchical FL only, one entry per cluster taking part (in the classic
    mode it is empty); ``rounds`` then holds the root's cycles.
    """

    id: str = Field(alias="_id")
    project_id: str
    customer_id: str
    status: ProjectStatus
    status_message: str
    created_at: float
    updated_at: float
    sla: dict[str, Any]
    nodes: list[str] = Field(default_factory=list)
    phases: dict[str, Phase] = Field(default_factory=dict)
    events: list[Event] = Field(default_factory=list)
    rounds: list[RoundMetrics] = Field(default_factory=list)
    metrics: Metrics | None = None
    services: list[str] = Field(default_factory=list)
    service_handles: list[dict[str, Any]] = Field(default_factory=list)
    service_reports: list[ServiceReport] = Field(default_factory=list)
    lost_learners: list[str] = Field(default_factory=list)
    clusters: list[ClusterRecord] = Field(default_factory=list)
    aggregator_address: str | None = None
    aggregator_result: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    mlflow: MlflowRecord | None = None
    model_image: ModelImageRecord | None = None
    inference_url: str | None = None
    repo_userinfo: str | None = None
    """The secret user-info of the SLA's ``ml_repo_url`` (``user:token``), kept apart from
    ``sla`` (whose URL has none): only the build puts it back; no view shows it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def document(self) -> dict[str, Any]:
        """The record as a store document (``_id`` set, JSON types only)."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> "ProjectRecord":
        """Validate a stored document. Top-level keys this version does not know (written by
        an older FLOps) are dropped, so an upgrade never makes a project unreadable; raises
        ``pydantic.ValidationError`` when a known field has the wrong type."""
        return cls.model_validate({k: v for k, v in doc.items() if k in PROJECT_FIELDS})

    @property
    def hierarchical(self) -> bool:
        """Whether the project runs hierarchical FL (it has clusters)."""
        return bool(self.clusters)

    def cluster_of(self, service: str) -> ClusterRecord | None:
        """The cluster whose aggregator or learner ``service`` is, else ``None``."""
        for cluster in self.clusters:
            if service == cluster.service or any(
                service == learner_service(node) for node in cluster.nodes
            ):
                return cluster
        return None

    def final_reports(self) -> dict[str, str]:
        """Service name → the last final status (``success`` / ``failed``) it reported."""
        return {r.service: r.status for r in self.service_reports}


PROJECT_FIELDS = frozenset(ProjectRecord.model_fields) | {"_id"}
"""Top-level field names of a project document; the stores refuse updates of other fields."""
