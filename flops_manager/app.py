"""The manager's REST API: Flask-OpenAPI3 routes under ``/api/flops``.

The app only validates, persists and answers; orchestration runs in :class:`ProjectLifecycle`'s
worker threads. Projects are answered as views (:mod:`flops_manager.api_models`), never as
stored; internals are the admin's. Errors are JSON ``{"error", "message", "details"}`` with the
status from :data:`flops_manager.errors.HTTP_STATUS`; any other exception (and a
``FlopsError`` the table does not map) is a 500 carrying a correlation id, which the log line
with the traceback repeats, never the traceback itself.
"""

import difflib
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

from flask import Response, g, jsonify, redirect, request, stream_with_context
from flask_openapi3.blueprint import APIBlueprint
from flask_openapi3.models.info import Info
from flask_openapi3.models.tag import Tag
from flask_openapi3.openapi import OpenAPI
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException

from flops_manager.api_models import (
    DatabaseDeleted,
    ErrorBody,
    EventList,
    EventQuery,
    MockJobPath,
    MockJobView,
    MockRequest,
    NodeCredentialView,
    NodeDeleted,
    NodeList,
    NodePath,
    NodeRegistered,
    NodeRegistration,
    ProjectCreated,
    ProjectList,
    ProjectPath,
    ProjectQuery,
    ProjectSummary,
    ProjectTracking,
    ProjectView,
    TrackingCredential,
    TrackingInfo,
    node_view,
    project_json,
)
from flops_manager.auth import (
    Authenticator,
    Forbidden,
    NodeCredentials,
    Principal,
    bearer_token,
)
from flops_manager.data_access import DataAccess
from flops_manager.errors import (
    INTERNAL_ERROR_STATUS,
    NotFound,
    TooManyRequests,
    Unprocessable,
    http_status,
)
from flops_manager.lifecycle.changes import ProjectChanges
from flops_manager.mlflow_access import MlflowAccessControl
from flops_manager.mock_jobs import MockJobs
from flops_manager.projects import ProjectLifecycle
from flops_manager.records import ProjectRecord
from flops_manager.service_logs import (
    TRUNCATED_HEADER,
    FollowNeedsService,
    LogQuery,
    ServiceLogList,
    ServiceLogs,
)
from flops_manager.sla import ProjectSLA, check_repo_url
from flops_manager.store import ProjectStore
from flops_utils.errors import FlopsError
from flops_utils.logging import logger

API_PREFIX = "/api/flops"
PUBLIC_PATHS = ("/healthz", "/openapi")
"""Paths (prefixes) served without a bearer token: the health check and the API docs."""

GUI_PATH = re.compile(rf"^{API_PREFIX}/tracking(/projects/[^/]+)?/?$")
"""The tracking routes a browser opens: ``GET /tracking`` and ``GET /tracking/projects/{id}``
without a token and preferring HTML are redirected to the MLflow GUI (:func:`wants_gui`)."""

PATTERN_HINTS = {
    "ml_repo_url": "must be an https, http, ssh, git or file URL, user@host:path, or a local "
    "path, without whitespace",
    "data_tags": "data tags are 1-63 lower-case letters, digits, '_', '.' or '-'",
    "tags": "data tags are 1-63 lower-case letters, digits, '_', '.' or '-'",
    "tag": "data tags are 1-63 lower-case letters, digits, '_', '.' or '-'",
    "customerID": "customer ids are 1-64 letters, digits, '_', '.', '@' or '-'",
    "node_id": "node ids are 1-63 letters, digits, '_', '.' or '-', starting with a letter "
    "or digit",
    "data_server": "must be grpc://HOST:PORT (the node's Arrow Flight data server)",
}
"""Readable messages for fields whose rule is a regular expression (by field name)."""

MAX_BODY_BYTES = 1024 * 1024
"""Largest request body the API reads (an SLA is a few hundred bytes); larger ones get 413."""

MAX_JSON_DEPTH = 32
"""Deepest nesting of objects/arrays a JSON body may have (an SLA has 3 levels); deeper ones
get 422 before they are parsed, since Python's JSON parser recurses once per level."""

SSE_POLL_MAX_S = 2.0
"""Seconds an event stream sleeps at most between two reads of its project."""
SSE_HEARTBEAT_S = 15.0
MAX_FOLLOWERS = 100
"""Default for the most event streams followed at once (see :class:`Followers`)."""
FOLLOWERS_PER_CUSTOMER = 16
"""The most event streams one customer follows at once."""
SSE_MAX_S = 24 * 3600.0

_ERRORS: dict[str | int | HTTPStatus, type[BaseModel] | dict[Any, Any] | None] = {
    401: ErrorBody,
    403: ErrorBody,
    404: ErrorBody,
    409: ErrorBody,
    422: ErrorBody,
    429: ErrorBody,
    500: ErrorBody,
    502: ErrorBody,
    503: ErrorBody,
}
CORRELATION_HEADER = "X-Correlation-ID"


def error_response(
    status: int, code: str, message: str, details: list[Any] | None = None
) -> Response:
    """A JSON error response ``{"error": code, "message": message, "details": [...]}``."""
    response = jsonify({"error": code, "message": message, "details": details or []})
    response.status_code = status
    return response


def internal_error_response(error: BaseException) -> Response:
    """500 for an error the API has no answer for: a fresh correlation id in the body's
    message and the ``X-Correlation-ID`` header, logged with ``error``'s traceback."""
    correlation_id = uuid.uuid4().hex
    logger.error(
        "internal error (correlation id %s) in %s %s: %r",
        correlation_id,
        request.method,
        request.path,
        error,
        exc_info=error,
    )
    message = (
        f"Internal server error (correlation id {correlation_id}); the manager's log has the "
        "details."
    )
    response = error_response(INTERNAL_ERROR_STATUS, "internal_error", message)
    response.headers[CORRELATION_HEADER] = correlation_id
    return response


def wants_gui() -> bool:
    """Whether the request is a browser opening a tracking route (:data:`GUI_PATH`): a GET
    without ``Authorization`` whose ``Accept`` prefers HTML to JSON (a browser's navigation
    does; ``*/*``, as curl sends, does not). Such a request needs no token: its answer, a
    redirect, names only the GUI's address and the project's MLflow ids, and MLflow's own
    login decides what the browser sees."""
    return (
        request.method == "GET"
        and "Authorization" not in request.headers
        and GUI_PATH.match(request.path) is not None
        and request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"
    )


MODEL_TRAINING_VIEW = "workflowType=machine_learning"
"""The query that opens MLflow's GUI on its model-training view (runs, model metrics) instead
of its default GenAI view (traces, evaluations); the GUI (MLflow 3) takes the view from this
parameter or the browser's last choice, not from the experiment's ``mlflow.experimentKind``."""


def project_gui(tracking_url: str, record: ProjectRecord) -> ProjectTracking:
    """Where the MLflow GUI at ``tracking_url`` shows the project of ``record``: its run page
    (``#/experiments/<id>/runs/<run id>``, MLflow's GUI routes, in the model-training view)
    once the aggregator reported its run, else the GUI's home."""
    mlflow = record.mlflow
    base = tracking_url.rstrip("/")
    if mlflow is None or not mlflow.experiment_id or not mlflow.run_id:
        return ProjectTracking(url=f"{base}/")
    run_page = f"#/experiments/{mlflow.experiment_id}/runs/{mlflow.run_id}"
    return ProjectTracking(
        url=f"{base}/{run_page}?{MODEL_TRAINING_VIEW}",
        experiment_id=mlflow.experiment_id,
        run_id=mlflow.run_id,
    )


def validation_error_response(error: ValidationError) -> Response:
    """422 naming every bad field by its dotted path; unknown keys get the closest valid name."""
    details = []
    for item in error.errors(include_url=False, include_input=False):
        path = ".".join(str(part) for part in item["loc"]) or "(body)"
        message = item["msg"]
        field = next((p for p in reversed(item["loc"]) if isinstance(p, str)), "")
        if item["type"] == "string_pattern_mismatch" and field in PATTERN_HINTS:
            message = PATTERN_HINTS[field]
        elif item["type"] == "extra_forbidden":
            message = f"unknown field{_suggestion(error.title, item['loc'])}"
        elif item["type"] == "model_type" and not item["loc"]:
            message = "the body must be a JSON object (Content-Type: application/json)"
        details.append({"field": path, "message": message})
    fields = ", ".join(d["field"] for d in details)
    return error_response(
        422, "validation_error", f"The request is invalid: check {fields}.", details
    )


def _suggestion(model_name: str, loc: tuple[int | str, ...]) -> str:
    """`` (did you mean 'x'?)`` for an unknown key of a known model, else ``""``."""
    model: type[BaseModel] | None = _MODELS.get(model_name)
    for part in loc[:-1]:
        if model is None or not isinstance(part, str):
            return ""
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


_EVENTS: dict[str, Any] = {
    "description": "The event log as JSON, or with ``follow=1`` as a server-sent event stream.",
    "content": {
        "application/json": {"schema": EventList.model_json_schema()},
        "text/event-stream": {"schema": {"type": "string"}},
    },
}

_LOGS: dict[str, Any] = {
    "description": "The services with output as JSON; with ``service`` that service's "
    "output as text, or with ``follow=1`` as a server-sent event stream.",
    "content": {
        "application/json": {"schema": ServiceLogList.model_json_schema()},
        "text/plain": {"schema": {"type": "string"}},
        "text/event-stream": {"schema": {"type": "string"}},
    },
}

_MODELS: dict[str, type[BaseModel]] = {
    m.__name__: m for m in (ProjectSLA, NodeRegistration, MockRequest)
}


def create_app(
    lifecycle: ProjectLifecycle,
    store: ProjectStore,
    tracking_url: str,
    authenticator: Authenticator,
    node_credentials: NodeCredentials | None = None,
    data_access: DataAccess | None = None,
    max_followers: int = MAX_FOLLOWERS,
    tracking_access: MlflowAccessControl | None = None,
    health: Callable[[], dict[str, Any]] | None = None,
    mock_jobs: MockJobs | None = None,
) -> OpenAPI:
    """Build the WSGI app.

    Args:
        lifecycle: runs the projects the API accepts.
        store: projects and nodes.
        tracking_url: MLflow GUI URL returned by ``GET /tracking``.
        authenticator: checks the bearer token of every request but ``PUBLIC_PATHS``.
        node_credentials: issues node credentials (``POST /nodes/{id}/credential``); without
            it that route answers 404.
        data_access: the data-token issuer: node registrations get its public key and
            ``POST /mocks`` pushes with its write tokens; ``None`` with ``FLOPS_INSECURE=data``.
        max_followers: the most event streams followed at once (each holds a worker thread
            of the server); more get 429.
        tracking_access: gives customers their MLflow user (``POST /tracking/credential``);
            ``None`` with ``FLOPS_INSECURE=mlflow``.
        health: the cached health report ``GET /healthz`` answers
            (``flops_manager.supervision.Supervisor.health``); ``None``: only the API's own.
        mock_jobs: runs ``POST /mocks`` in the background; default: a new one.
    """
    mock_jobs = mock_jobs or MockJobs()
    app = OpenAPI(
        __name__,
        info=Info(title="FLOps manager", version="0.1.0"),
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
        validation_error_status=422,
        validation_error_model=ErrorBody,
        validation_error_callback=validation_error_response,
    )
    app.url_map.strict_slashes = False
    api = APIBlueprint(
        "flops",
        __name__,
        url_prefix=API_PREFIX,
        abp_responses=_ERRORS,
        abp_security=[{"bearer": []}],
    )
    projects_tag = Tag(name="projects", description="FL projects from SLA to trained model")
    nodes_tag = Tag(name="nodes", description="worker nodes and their data servers")
    admin_tag = Tag(name="admin", description="administration")

    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    followers = Followers(max_followers, FOLLOWERS_PER_CUSTOMER)

    @app.before_request
    def _authenticate() -> Response | None:
        if request.path.startswith(PUBLIC_PATHS) or request.method == "OPTIONS":
            return None
        if wants_gui():
            g.principal = None  # the route redirects; MLflow asks for the login
            return None
        principal = authenticator.authenticate(bearer_token(request.headers.get("Authorization")))
        g.principal = principal
        if principal.node is not None and not _node_may_call(principal.node):
            raise Forbidden(
                "A node credential may only register its node (POST /api/flops/nodes) and "
                f"refresh itself (POST /api/flops/nodes/{principal.node}/credential); use an "
                "admin or customer token for anything else."
            )
        return _refuse_deep_json()

    @app.errorhandler(FlopsError)
    def _flops_error(error: FlopsError) -> Response:
        status = http_status(error)
        if status == INTERNAL_ERROR_STATUS:
            return internal_error_response(error)
        response = error_response(status, error.code, error.message, error.details)
        if response.status_code == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        if response.status_code == 429:
            response.headers["Retry-After"] = "5"
        return response

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        code = (error.name or "error").lower().replace(" ", "_")
        description = error.description or error.name
        if error.code == 413:
            description = (
                f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB, the most this "
                "API reads; an SLA is a few hundred bytes."
            )
        return error_response(error.code or 500, code, description)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        return internal_error_response(error)

    def caller() -> Principal:
        principal: Principal = g.principal
        return principal

    def visible_project(project_id: str) -> ProjectRecord:
        """The project if the caller may see it; another customer's project is a 404."""
        project = lifecycle.get(project_id)
        if not caller().may_see(project.customer_id):
            raise NotFound(f"No project has id {project_id!r}; GET /api/flops/projects lists them.")
        return project

    @app.get("/healthz", doc_ui=False)
    def healthz() -> dict[str, Any]:
        """``{"status": "ok" | "degraded", "components": {NAME: {"status", "detail"}}}``,
        200 either way (the API serves); cached, public (no paths, URLs or secrets)."""
        if health is None:
            return {"status": "ok", "components": {"api": {"status": "ok"}}}
        return health()

    @api.post("/projects", tags=[projects_tag], responses={201: ProjectCreated})
    def create_project(body: ProjectSLA) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Accept an SLA; the project is built, deployed and trained in the background."""
        principal = caller()
        if not principal.admin and body.customerID != principal.customer:
            raise Forbidden(
                f"The SLA's customerID {body.customerID!r} is not you ({principal.customer!r}); "
                "set customerID to your own id."
            )
        check_repo_url(body.ml_repo_url, allow_local=principal.admin)
        project = lifecycle.create(body)
        location = f"{API_PREFIX}/projects/{project.project_id}"
        created = ProjectCreated(
            project_id=project.project_id, status=project.status, message="project accepted"
        )
        return created.model_dump(mode="json"), 201, {"Location": location}

    @api.get("/projects", tags=[projects_tag], responses={200: ProjectList})
    def list_projects(query: ProjectQuery) -> dict[str, Any]:
        """Projects, oldest first, filtered by customer and status, one page at a time."""
        principal = caller()
        filters: dict[str, Any] = {}
        if not principal.admin:
            filters["customer_id"] = principal.customer
        elif query.customer is not None:
            filters["customer_id"] = query.customer
        if query.status is not None:
            filters["status"] = query.status.value
        page, total = store.find_projects(filters, query.offset, query.limit)
        return {
            "projects": [ProjectSummary.model_validate(p).model_dump(mode="json") for p in page],
            "total": total,
            "limit": query.limit,
            "offset": query.offset,
        }

    @api.get("/projects/<project_id>", tags=[projects_tag], responses={200: ProjectView})
    def get_project(path: ProjectPath) -> dict[str, Any]:
        """One project: status, phase timings, events, environment, MLflow ids, metrics; the
        admin also gets its internals (``admin``: service handles, local paths, addresses)."""
        return project_json(visible_project(path.project_id), caller().admin)

    @api.get("/projects/<project_id>/events", tags=[projects_tag], responses={200: _EVENTS})
    def project_events(path: ProjectPath, query: EventQuery) -> Any:
        """The project's event log; ``?follow=1`` streams it as server-sent events (each event
        a ``data:`` line of JSON with its index as ``id``) until the project ends."""
        project = visible_project(path.project_id)
        if not query.follow:
            events = [e.model_dump(mode="json") for e in project.events]
            return {"project_id": path.project_id, "events": events}
        start = _last_event_id(request.headers.get("Last-Event-ID")) + 1
        slot = followers.take(caller())
        stream = _event_stream(
            store, path.project_id, max(start, 0), lifecycle.runner.changes, slot
        )
        return Response(
            stream_with_context(stream),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @api.get("/projects/<project_id>/logs", tags=[projects_tag], responses={200: _LOGS})
    def project_logs(path: ProjectPath, query: LogQuery) -> Any:
        """The services with output (name, role, where, running); ``?service=NAME``: that
        service's own output as text (``tail=N``: its last N lines), ``&follow=1``: as
        server-sent events (one ``data:`` line per output line) until it ends."""
        project = visible_project(path.project_id)
        service_logs = ServiceLogs(lifecycle.orchestrator, store)
        if query.service is None:
            if query.follow:
                raise FollowNeedsService()
            return service_logs.listing(project).model_dump(mode="json")
        if not query.follow:
            text, truncated = service_logs.text(project, query.service, query.tail)
            headers = {TRUNCATED_HEADER: "1"} if truncated else {}
            return Response(text, mimetype="text/plain", headers=headers)
        source = service_logs.find(project, query.service)
        slot = followers.take(caller())
        stream = service_logs.follow(project, source, query.service, query.tail, slot)
        return Response(
            stream_with_context(stream),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @api.delete("/projects/<project_id>", tags=[projects_tag], responses={200: ProjectView})
    def cancel_project(path: ProjectPath) -> dict[str, Any]:
        """Cancel a project: stop every service it started; status becomes ``cancelled``."""
        visible_project(path.project_id)
        return project_json(lifecycle.cancel(path.project_id), caller().admin)

    @api.get("/tracking", responses={200: TrackingInfo, 302: None})
    def tracking() -> Any:
        """The MLflow tracking GUI's URL; a browser (no token, HTML preferred) is redirected
        there (302), where MLflow asks for the user of ``POST /tracking/credential``."""
        if g.principal is None:
            return redirect(tracking_url, 302)
        return {"url": tracking_url}

    @api.get(
        "/tracking/projects/<project_id>",
        tags=[projects_tag],
        responses={200: ProjectTracking, 302: None},
    )
    def project_tracking(path: ProjectPath) -> Any:
        """The project's run in the MLflow GUI (its home before the aggregator logged a run);
        a browser (no token, HTML preferred) is redirected there (302), also for an unknown
        project (to the GUI's home, so that the answer tells nothing about it)."""
        if g.principal is None:
            try:
                record = lifecycle.get(path.project_id)
            except NotFound:
                return redirect(tracking_url, 302)
            return redirect(project_gui(tracking_url, record).url, 302)
        return project_gui(tracking_url, visible_project(path.project_id)).model_dump(mode="json")

    @api.post("/tracking/credential", responses={200: TrackingCredential})
    def tracking_credential() -> dict[str, str]:
        """A new password for the caller's own MLflow user, to log in to the MLflow GUI
        (``GET /tracking``), which then shows the caller's own experiments and models only."""
        principal = caller()
        issued = (
            tracking_access.customer_credential(principal.customer) if tracking_access else None
        )
        if issued is None:
            raise NotFound(
                "This manager's MLflow server has no authentication (FLOPS_INSECURE=mlflow); "
                "open GET /api/flops/tracking's URL without logging in."
            )
        answer = TrackingCredential(
            url=tracking_url, username=issued.username, password=issued.password
        )
        return answer.model_dump(mode="json")

    @api.post("/nodes", tags=[nodes_tag], responses={200: NodeRegistered})
    def register_node(body: NodeRegistration) -> dict[str, Any]:
        """Register a worker node (or refresh its tags); data servers call this periodically
        with their node credential (or an admin token)."""
        caller().require_node(body.node_id, "register this node")
        node = {**body.model_dump(mode="json"), "last_seen": time.time()}
        node["hostname"] = body.hostname or body.node_id
        store.upsert_node(node)
        view = node_view(node).model_dump(mode="json")
        if data_access is None:  # FLOPS_INSECURE=data: data servers check no tokens
            return view
        answer = NodeRegistered(**view, data_token_public_key=data_access.public_key_pem())
        return answer.model_dump(mode="json")

    @api.post("/nodes/<node_id>/credential", tags=[nodes_tag], responses={200: NodeCredentialView})
    def node_credential(path: NodePath) -> dict[str, Any]:
        """Issue a node credential: the admin for any node id (to start its data server
        with), a data server for its own node (to refresh its credential before it expires).
        The credential registers and refreshes that node only."""
        caller().require_node(path.node_id, "issue this node's credential")
        if node_credentials is None:
            raise NotFound("This manager issues no node credentials; use the admin token.")
        issued = node_credentials.issue(path.node_id)
        view = NodeCredentialView(
            node_id=issued.node_id, token=issued.token, expires_at=issued.expires_at
        )
        return view.model_dump(mode="json")

    @api.get("/nodes", tags=[nodes_tag], responses={200: NodeList})
    def list_nodes() -> dict[str, Any]:
        """Every registered node with its architecture, cluster and tags; the admin also
        gets where each is reached (data server, hostname)."""
        admin = caller().admin
        nodes = store.list_nodes()
        return {"nodes": [node_view(n, admin).model_dump(mode="json") for n in nodes]}

    @api.delete("/nodes/<node_id>", tags=[nodes_tag], responses={200: NodeDeleted})
    def delete_node(path: NodePath) -> dict[str, Any]:
        """Forget a worker node (a running data server registers it again)."""
        caller().require_admin("remove worker nodes")
        if not store.delete_node(path.node_id):
            raise NotFound(f"No node has id {path.node_id!r}; GET /api/flops/nodes lists them.")
        return {"node_id": path.node_id, "deleted": True}

    @api.post("/mocks", tags=[nodes_tag], responses={202: MockJobView})
    def provide_mocks(body: MockRequest) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Split a bundled dataset across nodes and push each part to the node's data server,
        in the background: 202 with the job; ``GET /mocks/{job_id}`` tells its outcome."""
        caller().require_admin("push mock data")
        access = data_access
        nodes = {n["node_id"]: n for n in store.list_nodes()}
        wanted = body.nodes or list(nodes)
        unknown = [n for n in wanted if n not in nodes]
        if unknown or not wanted:
            raise NotFound(
                f"Unknown node(s) {unknown}; register nodes first (their data servers do "
                "this at start, or POST /api/flops/nodes).",
                details=[{"node_id": n} for n in nodes],
            )
        credentials = {
            n: access.write_credentials(nodes[n]) if access else ("", "") for n in wanted
        }  # issued now: a write token lives 5 minutes

        def push() -> dict[str, int]:
            from data_server.mock_provider import provide_mock_data

            rows = provide_mock_data(
                body.dataset,
                {n: nodes[n]["data_server"] for n in wanted},
                body.tag,
                body.partitioning,
                body.alpha,
                body.seed,
                credentials=credentials,
            )
            current = {n["node_id"]: n for n in store.list_nodes()}
            for node_id, count in rows.items():
                node = current.get(node_id) or nodes[node_id]
                store.upsert_node({**node, "tags": {**node.get("tags", {}), body.tag: count}})
            return rows

        job = mock_jobs.submit(body.tag, push)
        return job.view(), 202, {"Location": f"{API_PREFIX}/mocks/{job.job_id}"}

    @api.get("/mocks/<job_id>", tags=[nodes_tag], responses={200: MockJobView})
    def mock_job(path: MockJobPath) -> dict[str, Any]:
        """How a ``POST /mocks`` job went: ``running``, ``done`` (rows per node) or
        ``failed`` (``message``)."""
        caller().require_admin("push mock data")
        job = mock_jobs.get(path.job_id)
        if job is None:
            raise NotFound(f"No mock data job {path.job_id!r} (the manager keeps the last 100).")
        return job.view()

    @api.delete("/database", tags=[admin_tag], responses={200: DatabaseDeleted})
    def delete_database() -> dict[str, Any]:
        """Cancel every running project and delete all projects and nodes (admin only)."""
        caller().require_admin("delete the database")
        for project in store.list_projects():
            lifecycle.cancel(project.project_id)
        store.delete_all()
        return {"deleted": True}

    app.register_api(api)
    return app


def _node_may_call(node_id: str) -> bool:
    """Whether a node credential of ``node_id`` may make this request: register (``POST
    /nodes``) or refresh its own credential."""
    own = f"{API_PREFIX}/nodes/{node_id}/credential"
    return request.method == "POST" and request.path.rstrip("/") in (f"{API_PREFIX}/nodes", own)


def _refuse_deep_json() -> Response | None:
    """422 for a request body nested deeper than ``MAX_JSON_DEPTH`` (checked on the raw bytes,
    before any parser recurses into it); ``None`` to go on."""
    if request.method not in ("POST", "PUT", "PATCH") or not request.is_json:
        return None
    if json_depth(request.get_data(cache=True)) <= MAX_JSON_DEPTH:
        return None
    return error_response(
        422,
        "validation_error",
        f"The request body nests objects or arrays more than {MAX_JSON_DEPTH} levels deep; "
        "send the SLA as documented (GET /openapi/openapi.json).",
        [{"field": "(body)", "message": "nested too deeply"}],
    )


def json_depth(body: bytes) -> int:
    """The deepest nesting of ``{``/``[`` in the JSON text ``body``, brackets inside strings
    not counted (the text need not be valid JSON). Linear in ``len(body)``."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x7B, 0x5B):  # { [
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x7D, 0x5D):  # } ]
            depth -= 1
    return deepest


def _last_event_id(header: str | None) -> int:
    """The ``Last-Event-ID`` header as an event index (-1 when absent or empty). Raises
    ``InvalidLastEventId`` (422) for anything but a non-negative integer."""
    if header is None or not header.strip():
        return -1
    value = header.strip()
    if not value.isdigit() or len(value) > 12:
        raise InvalidLastEventId()
    return int(value)


class InvalidLastEventId(Unprocessable):
    """A ``Last-Event-ID`` header that is not an event index this API sent."""

    code = "validation_error"

    def __init__(self) -> None:
        super().__init__(
            "The Last-Event-ID header must be the id of an event this stream sent (a "
            "non-negative integer); omit it to stream from the first event.",
            details=[{"field": "Last-Event-ID", "message": "not a non-negative integer"}],
        )


def _event_stream(
    store: ProjectStore,
    project_id: str,
    start: int,
    changes: ProjectChanges,
    slot: Callable[[], None],
) -> Iterator[str]:
    """Server-sent events of the project's log from index ``start``, until it ends.

    Between changes it sleeps on ``changes`` (no store reads while nothing happens), waking
    at least every ``SSE_POLL_MAX_S`` seconds (a change persisted by another manager process
    on a shared store) and writing a comment every ``SSE_HEARTBEAT_S`` seconds. ``slot`` is
    called once the stream ends (it frees the caller's follower slot)."""
    try:
        sent = start
        began = last_write = time.monotonic()
        version = changes.version(project_id)
        while time.monotonic() - began < SSE_MAX_S:
            project = store.get_project(project_id)
            if project is None:
                return
            events = project.events
            for index in range(sent, len(events)):
                yield f"id: {index}\ndata: {events[index].model_dump_json()}\n\n"
                last_write = time.monotonic()
            sent = max(sent, len(events))
            if project.status.is_terminal:
                return
            if time.monotonic() - last_write > SSE_HEARTBEAT_S:
                yield ": keep-alive\n\n"
                last_write = time.monotonic()
            version = changes.wait(project_id, version, SSE_POLL_MAX_S)
    finally:
        slot()


class Followers:
    """Bounds how many event streams are followed at once: each holds one of the API's
    worker threads while it lasts, so the others must stay free for every other request.

    Args:
        total: the most streams at once (the API's threads minus those kept for requests).
        per_customer: the most streams of one customer at once (the admin: ``total``).

    :meth:`take` raises :class:`TooManyFollowers` (429) past either bound. Thread-safe.
    """

    def __init__(self, total: int, per_customer: int) -> None:
        self.total = total
        self.per_customer = per_customer
        self._lock = threading.Lock()
        self._count: dict[str, int] = {}

    def take(self, principal: Principal) -> Callable[[], None]:
        """Take a slot for ``principal``; returns the function that gives it back (idempotent)."""
        key = "" if principal.admin else principal.customer
        limit = self.total if principal.admin else self.per_customer
        with self._lock:
            if sum(self._count.values()) >= self.total or self._count.get(key, 0) >= limit:
                raise TooManyFollowers(limit if self._count.get(key, 0) >= limit else self.total)
            self._count[key] = self._count.get(key, 0) + 1
        given_back = threading.Event()

        def give_back() -> None:
            with self._lock:
                if given_back.is_set():
                    return
                given_back.set()
                self._count[key] -= 1

        return give_back


class TooManyFollowers(TooManyRequests):
    """More event streams followed at once than the API allows."""

    code = "too_many_followers"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"{limit} event streams are followed at once already, the most this manager "
            "serves; close one, or poll GET /api/flops/projects/{id}/events without follow=1."
        )
