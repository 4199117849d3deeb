"""Request and response bodies of the manager's REST API (besides the SLA in ``sla.py``)."""

import copy
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flops_manager.records import (
    ClusterRoundMetrics,
    Event,
    Metrics,
    MlflowRecord,
    ModelImageRecord,
    Phase,
    ProjectRecord,
    RoundMetrics,
    ServiceReport,
)
from flops_manager.sla import TAG_PATTERN, DataTag, Platform, ProjectSLA
from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.contract.services import AGGREGATOR_SERVICE, learner_service

NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
RowCount = Annotated[int, Field(ge=0, le=2**62)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every error response: a stable ``error`` code, a public ``message``, and ``details``."""

    error: str
    message: str
    details: list[Any] = Field(default_factory=list)


class ProjectCreated(BaseModel):
    """Answer to ``POST /projects``."""

    project_id: str
    status: str
    message: str


class ProjectPath(BaseModel):
    """Path parameter of the per-project endpoints."""

    project_id: str = Field(max_length=64)


class _CachedSchema(BaseModel):
    """A model whose default JSON schema is generated once: Flask-OpenAPI3 asks for a query
    model's schema on every request (to find its array parameters), which otherwise costs
    about a third of a ``GET /projects``."""

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if args or kwargs:
            return super().model_json_schema(*args, **kwargs)
        cached: dict[str, Any] | None = cls.__dict__.get("_flops_schema")
        if cached is None:
            cached = super().model_json_schema()
            setattr(cls, "_flops_schema", cached)  # noqa: B010
        return copy.deepcopy(cached)


class ProjectQuery(_CachedSchema):
    """Filters and page of ``GET /projects``: ``customer`` (admin only; others always see their
    own), ``status``, ``limit`` (1-500, default 50) and ``offset``."""

    model_config = ConfigDict(extra="forbid")

    customer: str | None = Field(default=None, max_length=64)
    status: ProjectStatus | None = None
    limit: int = Field(default=50, ge=1, le=500)
    offset: int = Field(default=0, ge=0, le=10_000_000)


class ProjectSummary(_View):
    """One project in ``GET /projects`` (without its event log); times in seconds since the
    epoch."""

    project_id: str
    customer_id: str
    status: ProjectStatus
    status_message: str
    created_at: float
    updated_at: float


class ProjectList(_View):
    """``GET /projects``: a page of summaries, oldest first, and how many match in all."""

    projects: list[ProjectSummary]
    total: int
    limit: int
    offset: int


class EventList(_View):
    """``GET /projects/{id}/events``: the whole event log, oldest first."""

    project_id: str
    events: list[Event]


class EventQuery(_CachedSchema):
    """``follow=1`` streams the log as server-sent events until the project ends."""

    model_config = ConfigDict(extra="forbid")

    follow: bool = False


class NodePath(BaseModel):
    """Path parameter of the per-node endpoints."""

    node_id: str = Field(pattern=NODE_ID_PATTERN)


class NodeRegistration(_Body):
    """A worker node and its data server, as a data server registers it.

    ``tags`` maps each data tag the node holds to its row count. ``cluster`` and ``hostname``
    are the Oakestra cluster name and worker hostname the node runs under (the ``oakestra``
    orchestrator places the node's learner there with a ``direct`` constraint); ``hostname``
    defaults to ``node_id``. ``data_server_cert``: the PEM certificate of a TLS data server
    (``grpc+tls://``), given to the node's learners to trust; absent for a plain one.
    """

    node_id: str = Field(pattern=NODE_ID_PATTERN)
    data_server: str = Field(
        pattern=r"^grpc(\+tcp|\+tls)?://[A-Za-z0-9.\-\[\]:]+:\d{1,5}$", max_length=256
    )
    data_server_cert: str | None = Field(
        default=None,
        max_length=16_384,
        pattern=(
            r"^-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+"
            r"-----END CERTIFICATE-----\r?\n?$"
        ),
    )
    architecture: Platform = Platform.LINUX_AMD64
    cluster: str = Field(default="local", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    hostname: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,253}$")
    tags: dict[DataTag, RowCount] = Field(
        default_factory=dict, max_length=1000, json_schema_extra={"additionalProperties": False}
    )


class Node(_View):
    """A registered worker node; ``last_seen`` in seconds since the epoch. Where it can be
    reached (``data_server``, ``hostname``) is the admin's to know: ``null`` for customers."""

    node_id: str
    data_server: str | None
    architecture: Platform
    cluster: str
    hostname: str | None
    tags: dict[str, int]
    last_seen: float


class NodeRegistered(Node):
    """``POST /nodes``: the registered node and ``data_token_public_key``, the PEM of the
    manager's Ed25519 key that signs data tokens (left out with ``FLOPS_INSECURE=data``)."""

    data_token_public_key: str | None = None


class NodeList(_View):
    """``GET /nodes``."""

    nodes: list[Node]


def node_view(node: dict[str, Any], admin: bool = True) -> Node:
    """The API view of a stored node document (its store keys such as ``_id`` left out;
    ``hostname`` defaults to the node id); without ``admin``, its address fields are ``None``.
    Raises ``pydantic.ValidationError`` for a document missing a field of :class:`Node`."""
    fields = {k: v for k, v in node.items() if k in Node.model_fields}
    fields["hostname"] = fields.get("hostname") or node.get("node_id")
    if not admin:
        fields.update(data_server=None, hostname=None)
    return Node.model_validate(fields)


class NodeDeleted(BaseModel):
    """``DELETE /nodes/{id}``."""

    node_id: str
    deleted: bool


class DatabaseDeleted(BaseModel):
    """``DELETE /database``."""

    deleted: bool


class MockRequest(_Body):
    """``POST /mocks``: split a bundled dataset across registered nodes and push the parts.

    ``nodes`` defaults to every registered node; ``alpha`` is the Dirichlet concentration
    (smaller is more skewed), used only with ``partitioning="dirichlet"``.
    """

    dataset: Literal["mnist"] = "mnist"
    tag: str = Field(default="mnist", pattern=TAG_PATTERN)
    partitioning: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(default=0.5, gt=0, le=1000)
    seed: int = Field(default=42, ge=0)
    nodes: list[str] | None = Field(default=None, min_length=1, max_length=10_000)


class MockJobView(BaseModel):
    """A ``POST /mocks`` job: ``running``, ``done`` with the ``rows`` pushed to each node, or
    ``failed`` with the ``message`` saying why."""

    job_id: str
    tag: str
    status: Literal["running", "done", "failed"]
    rows: dict[str, int]
    message: str


class MockJobPath(BaseModel):
    """Path parameter of ``GET /mocks/{job_id}``."""

    job_id: str = Field(pattern=r"^[0-9a-f]{12}$")


class TrackingInfo(BaseModel):
    """``GET /tracking``: the MLflow GUI a browser can open."""

    url: str


class ProjectTracking(_View):
    """``GET /tracking/projects/{id}``: the project's page in the MLflow GUI: its run
    (``#/experiments/<experiment_id>/runs/<run_id>?workflowType=machine_learning``, the
    model-training view) once the aggregator logged one, else the GUI's home
    (``experiment_id`` and ``run_id`` null)."""

    url: str
    experiment_id: str | None = None
    run_id: str | None = None


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def mask_credentials(url: str) -> str:
    """``url`` with the password of its user-info masked: ``https://user:token@host/x`` →
    ``https://user:***@host/x``; a bare token of an http(s) URL (``https://token@host``)
    becomes ``***@``. Other URLs (``ssh://git@host``, ``git@host:path``, paths) are kept."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return url
    authority, slash, rest = url[scheme.end() :].partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    if colon:
        masked = f"{user}:***"
    elif scheme[0].lower() in ("http://", "https://") and userinfo:
        masked = "***"
    else:
        return url
    return f"{scheme[0]}{masked}@{host}{slash}{rest}"


ENVIRONMENT_PATH_KEYS = ("python", "user_python", "repo_dir")
"""Keys of a stored build environment that are local paths (admin only)."""


class EnvironmentView(_View):
    """The build behind a project: ``commit`` (git SHA or content hash), ``key`` (environment
    or image key), ``cache_hit`` (nothing was built), ``seconds`` (build wall time),
    ``versions`` (key distributions of the repository's environment → version), ``notes``
    (sentences about the build) and ``images`` (role → pinned image reference; OCI builds)."""

    commit: str
    key: str
    cache_hit: bool
    seconds: float
    versions: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    images: dict[str, str] = Field(default_factory=dict)


class EnvironmentPaths(_View):
    """Where the build is on the manager's host (virtualenv builds): the interpreter of the
    learner and aggregator (``python``), of the repository's own environment
    (``user_python``), and the repository copy (``repo_dir``)."""

    python: str | None = None
    user_python: str | None = None
    repo_dir: str | None = None


class ProjectInternals(_View):
    """What only the admin sees: each started service's ``service_handles`` (backend
    specific, e.g. ``{"name", "pid", "start_ticks", "boot", "log_path"}`` for ``local``), the
    final ``service_reports``, the ``aggregator_address`` learners connect to
    (``HOST:PORT``), the aggregator's ``aggregator_result`` (kept until post-training is done)
    and the build's ``environment_paths``."""

    service_handles: list[dict[str, Any]] = Field(default_factory=list)
    service_reports: list[ServiceReport] = Field(default_factory=list)
    aggregator_address: str | None = None
    aggregator_result: dict[str, Any] | None = None
    environment_paths: EnvironmentPaths | None = None
    cluster_aggregator_addresses: dict[str, str] = Field(default_factory=dict)
    """Hierarchical FL: cluster name → ``HOST:PORT`` its learners connect to."""


class ClusterView(_View):
    """One cluster of a hierarchical project: its ``name``, its aggregator's ``service``,
    the ``learners`` (node ids) and their services' names (``learner_services``), the
    learners training went on without (``lost_learners``), ``lost`` (why the root went on
    without the cluster, else ``None``), its per-round metrics (``rounds``: ``cycle``,
    ``round``, global ``step``, example-weighted ``loss``/``accuracy``, ``learners``,
    ``fit_examples``, ``evaluate_examples``) and its MLflow child ``run_id``."""

    name: str
    service: str
    learners: list[str]
    learner_services: list[str]
    lost_learners: list[str]
    lost: str | None = None
    rounds: list[ClusterRoundMetrics]
    run_id: str | None = None


class RootView(_View):
    """The root aggregator of a hierarchical project: its ``service``, the cycles planned
    (``training_cycles``) and rounds per cycle (``training_rounds``), and its per-cycle
    metrics (``cycles``: ``round`` is the cycle)."""

    service: str
    training_cycles: int
    training_rounds: int
    cycles: list[RoundMetrics]


class HierarchyView(_View):
    """The tree of a hierarchical project: the ``root`` and its ``clusters``."""

    root: RootView
    clusters: list[ClusterView]


class ProjectView(_View):
    """One project as ``GET`` and ``DELETE /projects/{id}`` answer it.

    Times are seconds since the epoch. ``sla``: the SLA as accepted (a password in
    ``ml_repo_url`` masked as ``user:***@``). ``nodes``: the nodes its learners run on;
    ``services``: the services it deploys (aggregator first); ``lost_learners``: learners
    training went on without. ``phases``: per phase ``started_at``, ``ended_at``,
    ``seconds``. ``rounds``: the aggregated evaluation of each round; ``metrics``: the latest
    or final ones. ``mlflow``: experiment and run ids, model URIs. ``model_image`` and
    ``inference_url``: the trained model's image and its inference server, when the SLA asks
    for them. ``hierarchy``: hierarchical FL only, the tree of root, clusters and learners
    with per-cycle and per-cluster per-round metrics (``None`` in classic FL). ``admin``:
    internals, present for the admin only.
    """

    project_id: str
    customer_id: str
    status: ProjectStatus
    status_message: str
    created_at: float
    updated_at: float
    sla: ProjectSLA
    nodes: list[str]
    services: list[str]
    lost_learners: list[str]
    phases: dict[str, Phase]
    events: list[Event]
    rounds: list[RoundMetrics]
    metrics: Metrics | None = None
    environment: EnvironmentView | None = None
    mlflow: MlflowRecord | None = None
    model_image: ModelImageRecord | None = None
    inference_url: str | None = None
    hierarchy: HierarchyView | None = None
    admin: ProjectInternals | None = None


def project_view(record: ProjectRecord, admin: bool) -> ProjectView:
    """The API view of ``record``: everything a customer needs; with ``admin`` also the
    internals (:class:`ProjectInternals`: process ids, log paths, local paths, addresses).
    Raises ``pydantic.ValidationError`` when the stored SLA or environment is malformed."""
    sla = {**record.sla, "ml_repo_url": mask_credentials(str(record.sla.get("ml_repo_url", "")))}
    environment = record.environment or {}
    view = ProjectView(
        project_id=record.project_id,
        customer_id=record.customer_id,
        status=record.status,
        status_message=record.status_message,
        created_at=record.created_at,
        updated_at=record.updated_at,
        sla=ProjectSLA.model_validate(sla),
        nodes=record.nodes,
        services=record.services,
        lost_learners=record.lost_learners,
        phases=record.phases,
        events=record.events,
        rounds=record.rounds,
        metrics=record.metrics,
        environment=_environment_view(environment) if record.environment else None,
        mlflow=record.mlflow,
        model_image=record.model_image,
        inference_url=record.inference_url,
        hierarchy=_hierarchy(record, sla) if record.hierarchical else None,
    )
    if admin:
        view.admin = _internals(record, environment)
    return view


def _hierarchy(record: ProjectRecord, sla: dict[str, Any]) -> HierarchyView:
    training = ProjectSLA.model_validate(sla).training_configuration
    return HierarchyView(
        root=RootView(
            service=AGGREGATOR_SERVICE,
            training_cycles=training.training_cycles,
            training_rounds=training.training_rounds,
            cycles=record.rounds,
        ),
        clusters=[
            ClusterView(
                name=c.name,
                service=c.service,
                learners=c.nodes,
                learner_services=[learner_service(n) for n in c.nodes],
                lost_learners=c.lost_learners,
                lost=c.lost,
                rounds=c.rounds,
                run_id=c.run_id,
            )
            for c in record.clusters
        ],
    )


def _environment_view(environment: dict[str, Any]) -> EnvironmentView:
    fields = {k: v for k, v in environment.items() if k in EnvironmentView.model_fields}
    return EnvironmentView.model_validate(fields)


def _internals(record: ProjectRecord, environment: dict[str, Any]) -> ProjectInternals:
    paths = {k: str(environment[k]) for k in ENVIRONMENT_PATH_KEYS if environment.get(k)}
    return ProjectInternals(
        service_handles=record.service_handles,
        service_reports=record.service_reports,
        aggregator_address=record.aggregator_address,
        aggregator_result=record.aggregator_result,
        environment_paths=EnvironmentPaths(**paths) if paths else None,
        cluster_aggregator_addresses={c.name: c.address for c in record.clusters if c.address},
    )


def project_json(record: ProjectRecord, admin: bool) -> dict[str, Any]:
    """:func:`project_view` as a JSON-ready dict; ``admin`` is left out for a customer."""
    view = project_view(record, admin)
    return view.model_dump(mode="json", exclude=None if admin else {"admin"})


class NodeCredentialView(_View):
    """``POST /nodes/{node_id}/credential``: a node credential for the node's data server
    (``FLOPS_API_TOKEN``); it registers and refreshes that node only. ``expires_at`` in
    seconds since the epoch."""

    node_id: str
    token: str
    expires_at: float


class TrackingCredential(_View):
    """``POST /tracking/credential``: the caller's own MLflow user and a new password (the
    previous one stops working); with it the MLflow GUI at ``url`` shows the caller's own
    experiments and registered models only."""

    url: str
    username: str
    password: str
