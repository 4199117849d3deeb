"""Request and response bodies of the manager's REST API (besides the SLA in ``sla.py``)."""

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flops_manager.projects import ProjectStatus
from flops_manager.sla import TAG_PATTERN, DataTag, Platform

NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
RowCount = Annotated[int, Field(ge=0, le=2**62)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class ProjectSummary(BaseModel):
    """One project in ``GET /projects`` (without its event log)."""

    project_id: str
    customer_id: str
    status: ProjectStatus
    status_message: str
    created_at: float
    updated_at: float


class ProjectList(BaseModel):
    """``GET /projects``: a page of summaries, oldest first, and how many match in all."""

    projects: list[ProjectSummary]
    total: int
    limit: int
    offset: int


class Event(BaseModel):
    """One entry of a project's event log; ``timestamp`` in seconds since the epoch."""

    timestamp: float
    type: str
    status: str
    message: str
    component: str | None = None


class EventList(BaseModel):
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
    defaults to ``node_id``.
    """

    node_id: str = Field(pattern=NODE_ID_PATTERN)
    data_server: str = Field(
        pattern=r"^grpc(\+tcp)?://[A-Za-z0-9.\-\[\]:]+:\d{1,5}$", max_length=256
    )
    architecture: Platform = Platform.LINUX_AMD64
    cluster: str = Field(default="local", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    hostname: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,253}$")
    tags: dict[DataTag, RowCount] = Field(
        default_factory=dict, max_length=1000, json_schema_extra={"additionalProperties": False}
    )


class Node(BaseModel):
    """A registered worker node; ``last_seen`` in seconds since the epoch."""

    node_id: str
    data_server: str
    architecture: Platform
    cluster: str
    hostname: str
    tags: dict[str, int]
    last_seen: float


class NodeList(BaseModel):
    """``GET /nodes``."""

    nodes: list[Node]


class NodeDeleted(BaseModel):
    """``DELETE /nodes/{id}``."""

    node_id: str
    deleted: bool


class DatabaseDeleted(BaseModel):
    """``DELETE /database``."""

    deleted: bool


class Project(BaseModel):
    """A project as stored: the fields below plus ``sla``, ``phases`` (per phase ``started_at``,
    ``ended_at``, ``seconds``), ``events``, ``rounds``, ``metrics``, ``environment``,
    ``mlflow`` (experiment and run ids, model URIs) and ``inference_url``."""

    model_config = ConfigDict(extra="allow")

    project_id: str
    customer_id: str
    status: ProjectStatus
    status_message: str
    created_at: float
    updated_at: float


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
    nodes: list[str] | None = Field(default=None, min_length=1)


class MockResult(BaseModel):
    """Rows pushed to each node."""

    tag: str
    rows: dict[str, int]


class TrackingInfo(BaseModel):
    """``GET /tracking``: the MLflow GUI a browser can open."""

    url: str
