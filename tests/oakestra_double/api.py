"""The system manager's REST API (port 10000 in Oakestra) over a :class:`Root`, with its quirks:

- ``POST /api/application/``, ``GET /api/applications/<userid>`` and ``GET /api/service/<id>``
  answer a JSON *string* that encodes the document (flask-smorest dumping ``json_util.dumps``).
- ``GET /api/application/<id>`` answers ``null`` for an existing application.
- ``POST /api/service/`` answers 400 "The given SLA was not formatted correctly" for every
  error (the blueprint catches its own ``abort``).
- ``POST /api/service/<id>/instance`` and ``DELETE .../instance/<n>`` always answer 200.
- ``GET /api/services/<application id>`` answers every service of the application (a JSON
  string, as ``GET /api/service/<id>``).
- ``GET /api/clusters/active`` needs no token and answers a raw JSON array (text/html), each
  cluster's ``_id`` a plain string, with ``vcpus``, ``memory`` and ``active_nodes``.
- Application routes check tokens like flask-jwt-extended (``{"msg"}``, 401 or 422: a token
  signed with the key pair of before a root restart gets 422 ``Signature verification
  failed``); service routes answer 401 ``{"message": "Missing authentication token"}`` for any
  token problem.
- Error bodies are flask-smorest's ``{"code", "status"}`` only (no message). Deleting a service
  that is gone answers 500; deleting an application that is gone 501.
- ``POST /api/auth/login`` takes ``organization_name`` (default ``root``; unknown: 404); a body
  without credentials (``{}``) gets 500.

Test hooks (not in Oakestra) live under ``/double/``: ``POST /double/faults`` ``{"count",
"status", "delay_s", "after"}`` makes the next ``count`` ``/api/`` requests wait ``delay_s`` and
answer ``status`` (0: answer normally after the delay; ``after``: handle the request first, then
wait, as a slow root that did the work); ``POST /double/rotate-keys`` makes a new key pair (a
root restart); ``POST /double/revoke`` ``{"access",
"refresh"}`` rejects the tokens issued so far; ``GET /double/stats`` counts logins, refreshes,
401s and requests (all, and per route: ``"GET /api/service/<service_id>"``); ``GET
/double/instances`` is the workers' view of each instance;
``POST /double/refuse-services`` ``{"count", "reason"}`` makes the network manager refuse the
next services (``failed_services``); ``POST /double/instances/<service_id>/<n>/kill`` kills an
instance's processes (it then reports ``DEAD``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Flask, Response, g, request

from .root import SLA_INVALID, Root, oid
from .tokens import TokenIssuer, TokenRejected

REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    422: "Unprocessable Entity",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def _json(body: Any, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(json.dumps(body), status=status, content_type=content_type)


def _abort(status: int, message: str) -> Response:
    """flask-smorest's error body, ``{"code", "status"}``; ``message`` is only logged."""
    logging.getLogger("oakestra_double").info("answering %d: %s", status, message)
    return _json({"code": status, "status": REASONS.get(status, "")}, status)


def _dumped(document: Any) -> Response:
    """A document as flask-smorest sends ``json_util.dumps(document)``: a JSON string."""
    return _json(json.dumps(document))


class Faults:
    """Injected failures for the next ``count`` API requests (a test hook)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[tuple[int, float, bool]] = []

    def add(self, count: int, status: int, delay_s: float, after: bool = False) -> None:
        with self._lock:
            self._queue.extend([(status, delay_s, after)] * count)

    def take(self) -> tuple[int, float, bool] | None:
        with self._lock:
            return self._queue.pop(0) if self._queue else None


def create_app(root: Root, tokens: TokenIssuer) -> Flask:
    """The Flask app serving the system manager's API over ``root``."""
    app = Flask("oakestra_double")
    faults = Faults()
    stats: Counter[str] = Counter()
    stats_lock = threading.Lock()

    def count(key: str) -> None:
        with stats_lock:
            stats[key] += 1

    @app.before_request
    def inject_fault() -> Response | None:
        if not request.path.startswith("/api/"):
            return None
        count("requests")
        if request.url_rule is not None:
            count(f"{request.method} {request.url_rule.rule}")
        fault = faults.take()
        if fault is None:
            return None
        status, delay_s, after = fault
        if after:
            g.delay_after_s = delay_s
            return None
        time.sleep(delay_s)
        return _abort(status, "injected fault") if status else None

    @app.after_request
    def delay_answer(response: Response) -> Response:
        time.sleep(float(g.pop("delay_after_s", 0.0)))
        return response

    Handler = Callable[..., Response]

    def jwt_required(refresh: bool = False) -> Callable[[Handler], Handler]:
        """flask-jwt-extended's ``@jwt_required()``: its own error bodies and statuses."""

        def decorate(handler: Handler) -> Handler:
            @wraps(handler)
            def wrapper(*args: Any, **kwargs: Any) -> Response:
                try:
                    claims = tokens.verify(
                        request.headers.get("Authorization"), "refresh" if refresh else "access"
                    )
                except TokenRejected as exc:
                    if exc.status == 401:
                        count("unauthorized")
                    return _json(exc.body, exc.status)
                g.claims = claims
                return handler(claims["sub"], *args, **kwargs)

            return wrapper

        return decorate

    def jwt_auth_required(handler: Handler) -> Handler:
        """Oakestra's ``@jwt_auth_required()``: any token problem is a 401."""

        @wraps(handler)
        def wrapper(*args: Any, **kwargs: Any) -> Response:
            try:
                claims = tokens.verify(request.headers.get("Authorization"), "access")
            except TokenRejected:
                count("unauthorized")
                return _json({"message": "Missing authentication token"}, 401)
            return handler(claims["sub"], *args, **kwargs)

        return wrapper

    def claims_for(username: str, organization: str) -> dict[str, Any]:
        return {"user": username, "roles": ["Admin"], "organization": organization}

    # ---- authentication ----------------------------------------------------------------

    @app.post("/api/auth/login")
    def login() -> Response:
        content = request.get_json(silent=True)
        if content is None:
            return _abort(403, "No credentials provided")
        if "username" not in content or "password" not in content:
            return _abort(500, "KeyError")  # the real handler indexes the body
        username = str(content["username"])
        password = str(content["password"])
        organization = root.organizations.get(str(content.get("organization_name") or "root"))
        if organization is None:
            return _abort(404, "Organization not found")
        if not username or root.passwords.get(username) != password:
            return _abort(401, "invalid username or password")
        count("logins")
        claims = claims_for(username, organization)
        return _json(
            {
                "token": tokens.issue(username, "access", claims),
                "refresh_token": tokens.issue(username, "refresh", claims),
            }
        )

    @app.post("/api/auth/refresh")
    @jwt_required(refresh=True)
    def refresh(username: str) -> Response:
        if username not in root.passwords:
            return _abort(404, "User does not exists")
        count("refreshes")
        claims = claims_for(username, str(g.claims.get("organization", "")))
        return _json({"token": tokens.issue(username, "access", claims)})

    @app.get("/api/user/<username>")
    @jwt_auth_required
    def get_user(identity: str, username: str) -> Response:
        if identity != username:
            return _json({"message": "You have not enough permissions!"}, 403)
        return _json(oid(root.user(username)))

    # ---- applications ------------------------------------------------------------------

    @app.post("/api/application/")
    @jwt_required()
    def create_application(username: str) -> Response:
        data = request.get_json(silent=True) or {}
        result, status = root.register_app(data, username)
        if status != 200:
            return _abort(status, result["message"])
        return _dumped(result)

    @app.get("/api/application/<app_id>")
    @jwt_required()
    def get_application(username: str, app_id: str) -> Response:
        if root.get_app(app_id, username) is None:
            return _abort(404, "Application not found")
        return _json(None)  # the real handler never returns the application it found

    @app.delete("/api/application/<app_id>")
    @jwt_required()
    def delete_application(username: str, app_id: str) -> Response:
        if root.delete_app(app_id, username):
            return _json({"message": "Application Deleted"})
        return _abort(501, "User could not be deleted")

    @app.get("/api/applications/<user_id>")
    @jwt_required()
    def user_applications(username: str, user_id: str) -> Response:
        if root.user_ids.get(username) != user_id:
            return _abort(401, "Unauthorized")
        return _dumped(root.user_apps(username))

    @app.get("/api/applications/")
    @jwt_required()
    def all_applications(username: str) -> Response:
        return _dumped(_all_apps(root))  # every user of the double is an Admin

    # ---- services ----------------------------------------------------------------------

    @app.post("/api/service/")
    @jwt_auth_required
    def create_service(username: str) -> Response:
        data = request.get_json(silent=True)
        if not data:
            return _abort(404, "/api/deploy request without a yaml file")
        result, status = root.create_services(data, username)
        if status != 200:
            app.logger.warning("service refused (%s): %s", status, result)
            return _abort(400, SLA_INVALID)
        return _json(result)

    @app.get("/api/service/<service_id>")
    @jwt_auth_required
    def get_service(username: str, service_id: str) -> Response:
        job = root.get_service(service_id, username)
        if job is None:
            return _abort(404, "not found")
        return _dumped(job)

    @app.get("/api/services/<app_id>")
    @jwt_auth_required
    def app_services(username: str, app_id: str) -> Response:
        jobs = root.app_services(app_id, username)
        if jobs is None:
            return _abort(404, "application not found")
        return _dumped(jobs)

    @app.delete("/api/service/<service_id>")
    @jwt_auth_required
    def delete_service(username: str, service_id: str) -> Response:
        if root.delete_service(service_id, username):
            return _json({"message": "Job deleted"})
        return _abort(500, "Job not deleted")

    @app.post("/api/service/<service_id>/instance")
    @jwt_auth_required
    def deploy_instance(username: str, service_id: str) -> Response:
        root.deploy(service_id, username)
        return _json({"message": "ok"})

    @app.delete("/api/service/<service_id>/instance/<int(signed=True):number>")
    @jwt_auth_required
    def undeploy_instance(username: str, service_id: str, number: int) -> Response:
        root.undeploy(service_id, username, number)
        return _json({"message": "ok"})

    # ---- clusters ----------------------------------------------------------------------

    @app.get("/api/clusters/active")
    def active_clusters() -> Response:
        now = time.time()
        clusters = [
            {
                "_id": cluster.id,
                "candidate_name": cluster.name,
                "cluster_name": cluster.name,
                "cluster_location": "Unknown Location",
                "active": True,
                "last_modified_timestamp": now,
                "active_nodes": len(cluster.workers),
                "vcpus": len(cluster.workers) * root.worker_vcpus,
                "memory": len(cluster.workers) * root.worker_memory_mb,
            }
            for cluster in root.clusters.values()
        ]
        return _json(clusters, content_type="text/html; charset=utf-8")

    # ---- test hooks ----------------------------------------------------------------------

    @app.post("/double/faults")
    def add_faults() -> Response:
        body = request.get_json(silent=True) or {}
        faults.add(int(body.get("count", 1)), int(body.get("status", 500)),
                   float(body.get("delay_s", 0.0)), bool(body.get("after", False)))  # fmt: skip
        return _json({"message": "ok"})

    @app.post("/double/rotate-keys")
    def rotate_keys() -> Response:
        tokens.rotate()
        return _json({"message": "ok"})

    @app.post("/double/refuse-services")
    def refuse_services() -> Response:
        body = request.get_json(silent=True) or {}
        root.refuse_services(int(body.get("count", 1)), str(body.get("reason", "refused")))
        return _json({"message": "ok"})

    @app.post("/double/revoke")
    def revoke() -> Response:
        body = request.get_json(silent=True) or {}
        for kind in ("access", "refresh"):
            if body.get(kind):
                tokens.revoke(kind)
        return _json({"message": "ok"})

    @app.get("/double/stats")
    def get_stats() -> Response:
        with stats_lock:
            return _json(dict(stats))

    @app.get("/double/instances")
    def instances() -> Response:
        with root.lock:
            return _json(
                [
                    {"service_id": service_id, "instance_number": number, **runner.describe()}
                    for (service_id, number), runner in root.runners.items()
                ]
            )

    @app.post("/double/instances/<service_id>/<int:number>/kill")
    def kill_instance(service_id: str, number: int) -> Response:
        with root.lock:
            runner = root.runners.get((service_id, number))
        if runner is None:
            return _abort(404, "no such instance")
        runner.kill()
        return _json({"message": "ok"})

    return app


def _all_apps(root: Root) -> list[dict[str, Any]]:
    with root.lock:
        return [oid(app) for app in root.apps.values()]
