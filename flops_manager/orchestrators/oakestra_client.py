"""A client of the Oakestra root orchestrator's REST API (the system manager, port 10000).

It speaks the API as the current Oakestra code serves it (routes from
``root_orchestrator/system-manager-python/blueprints`` of oakestra/oakestra):

- login ``POST /api/auth/login`` (``username``, ``password``, ``organization_name``; an
  unknown organization is a 404) → access token (RS256, 10 minutes) + refresh token (30
  days); the access token is renewed with ``POST /api/auth/refresh`` shortly before it
  expires (its ``exp`` claim is read without verifying the signature), and once more on a 401;
  when the refresh token is refused too, the client logs in again. The jwt-generator makes a
  new key pair at every root start, so after a root restart a token gets 422 ``{"msg":
  "Signature verification failed"}`` (or ``Invalid header string``): the client logs in again
  and repeats the request once.
- ``POST /api/application/`` answers a JSON *string* encoding all of the caller's applications;
  ``GET /api/application/<id>`` answers ``null`` (a bug), so applications are read from
  ``GET /api/applications/<user id>`` (the user id comes from ``GET /api/user/<username>``).
- ``POST /api/service/`` answers ``{"job_id", "deployed_services", "failed_services"}``, or
  400 for any problem; ``GET /api/service/<id>`` answers a JSON string, ``GET
  /api/services/<application id>`` all of an application's services in one.
- Error bodies are only ``{"code", "status"}``. Deleting a service that is gone answers 500
  (not retried: it is gone); deleting an application that is gone 501.
- ``GET /api/clusters/active``: each cluster's ``_id`` a plain string, with ``vcpus``,
  ``memory`` and ``active_nodes``.
- Every request has a timeout; connection errors, timeouts and 500/502/503/504 answers are
  retried with exponential backoff; other 4xx/5xx answers raise at once with Oakestra's
  status and body.

Names of applications, namespaces and services must match ``^[a-zA-Z0-9]{1,30}$``;
:func:`oakestra_name` makes such names, :func:`application` and :func:`microservice` build the
SLA parts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import requests

from flops_manager.errors import (
    OakestraAuthFailed,
    OakestraConflict,
    OakestraError,
    OakestraNotFound,
    OakestraUnavailable,
)

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9]{1,30}$")
"""Oakestra's pattern for application, namespace and microservice names (``sla/schema.py``)."""

SLA_VERSION = "v2.0"
"""The only SLA version whose schema the system manager validates as JSON."""

RETRY_STATUSES = frozenset({500, 502, 503, 504})
"""Answers retried with backoff (a 501 is Oakestra's "could not delete", not transient)."""

TOKEN_MARGIN_S = 30.0
"""Renew the access token this long before it expires (at most a fifth of its lifetime)."""

BODY_CHARS = 2000
"""How much of an error body an :class:`OakestraError` keeps."""

SCHEDULING_FAILURES = frozenset(
    {
        "TargetClusterNotFound",
        "TargetClusterNotActive",
        "TargetClusterNoCapacity",
        "NoActiveClusterWithCapacity",
        "NO_QUALIFIED_WORKER_FOUND",
        "NO_NODE_FOUND",
    }
)
"""Statuses with which Oakestra gives up placing a service or an instance
(``NegativeSchedulingStatus`` in ``oakestra_utils.types.statuses``). ``NO_WORKER_CAPACITY`` is
not one: the cluster manager tries that instance again."""

RETRIED_STATUSES = frozenset({"FAILED", "DEAD", "NO_WORKER_CAPACITY"})
"""Instance statuses the cluster manager restarts (about every 15 s) until the instance is
undeployed: a service that ended this way crash-loops unless it is deleted."""

CRASHED_STATUSES = frozenset({"DEAD"})
"""The container exited with an error (or, not one-shot, at all), as the NodeEngine marks
it; ``FAILED`` means the instance could not be started (image pull, runtime)."""

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "DEAD", "UNDEPLOYED"}) | SCHEDULING_FAILURES
"""Instance statuses after which FLOps counts the instance as ended. ``COMPLETED``: a one-shot
service exited 0; ``DEAD``: it crashed (see :data:`CRASHED_STATUSES`); ``FAILED``: it could
not start. ``FAILED`` and ``DEAD`` instances are restarted by Oakestra (see
:data:`RETRIED_STATUSES`), so an ended service must be deleted. Before: ``REQUESTED →
CLUSTER_SCHEDULED → NODE_SCHEDULED → RUNNING``."""

JWT_REJECTIONS = ("Signature verification failed", "Invalid header string")
"""flask-jwt-extended's 422 ``msg`` for a token of another key pair (a restarted root)."""


def oakestra_name(*parts: str) -> str:
    """A name Oakestra accepts (``^[a-zA-Z0-9]{1,30}$``) that stands for ``parts``.

    The letters and digits of ``parts[0]`` (up to 18, e.g. a role: ``learner``) are kept for
    readability; 12 hex digits of the SHA-256 of all parts follow, so distinct parts give
    distinct names (48 bits: a collision among 10⁴ names has probability ~2·10⁻⁷).
    Example: ``oakestra_name("learner", project_id, "node-1")`` → ``learner3f9c0a1b2d4e``.
    Raises ``ValueError`` without parts.
    """
    if not parts:
        raise ValueError("oakestra_name needs at least one part")
    prefix = re.sub(r"[^a-zA-Z0-9]", "", parts[0])[:18]
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:12]
    return f"{prefix}{digest}"


def check_name(value: str, what: str = "name") -> str:
    """``value`` if it matches :data:`NAME_PATTERN`, else ``ValueError`` naming ``what``."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ValueError(
            f"Oakestra {what} {value!r} must be 1-30 letters or digits; use oakestra_name()."
        )
    return value


def application(name: str, namespace: str, *, description: str = "") -> dict[str, Any]:
    """One entry of an SLA's ``applications`` for :meth:`OakestraClient.create_application`:
    ``{"applicationID": "", "application_name", "application_namespace",
    "application_desc", "microservices": []}``. Raises ``ValueError`` for a bad name."""
    return {
        "applicationID": "",
        "application_name": check_name(name, "application name"),
        "application_namespace": check_name(namespace, "application namespace"),
        "application_desc": description,
        "microservices": [],
    }


def microservice(
    name: str,
    namespace: str,
    image: str,
    *,
    cmd: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    memory_mb: int = 100,
    vcpus: int = 1,
    storage_mb: int = 0,
    port: int | str | None = None,
    cluster: str | None = None,
    node: str | None = None,
    platform: str | None = None,
    one_shot: bool = True,
    privileged: bool = False,
    rr_ip: str | None = None,
) -> dict[str, Any]:
    """A microservice of an Oakestra SLA (v2.0) for :meth:`OakestraClient.create_service`.

    Args:
        name, namespace: ``microservice_name`` / ``microservice_namespace`` (see
            :func:`oakestra_name`).
        image: the image reference (``code``), e.g. ``registry:5000/flops/learner@sha256:...``.
        cmd: the command; it replaces the image's entrypoint. ``None``: the image's own.
        env: environment variables, sent as ``environment: ["K=V", ...]``.
        memory_mb, vcpus, storage_mb: resource requests (ints; the FLOps SLA's
            ``resource_constraints``); ``memory`` and ``storage`` in MB.
        port: Oakestra's port string (``"8080"`` or ``"HOST:CONTAINER"``).
        cluster, node: place the instance on this worker (a ``direct`` constraint, the only
            placement Oakestra honours); both or neither.
        platform: ``linux/amd64`` or ``linux/arm64``; passed through to the worker.
        one_shot: the service ends by itself (exit 0 → ``COMPLETED``; any other end is
            ``DEAD``); FL services do, so True by default (Oakestra's default is False).
        privileged: run privileged.
        rr_ip: the service's round-robin IP (``addresses.rr_ip``, in 10.30.0.0/16).

    Returns the dict. Raises ``ValueError`` for a bad name, a negative or non-int resource,
    or only one of ``cluster``/``node``.
    """
    for value, what in ((memory_mb, "memory_mb"), (vcpus, "vcpus"), (storage_mb, "storage_mb")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{what} must be a non-negative int, not {value!r}")
    if (cluster is None) != (node is None):
        raise ValueError("a direct placement needs both cluster and node")
    service: dict[str, Any] = {
        "microserviceID": "",
        "microservice_name": check_name(name, "microservice name"),
        "microservice_namespace": check_name(namespace, "microservice namespace"),
        "virtualization": "container",
        "code": image,
        "cmd": list(cmd or []),
        "environment": [f"{key}={value}" for key, value in (env or {}).items()],
        "memory": memory_mb,
        "vcpus": vcpus,
        "vgpus": 0,
        "vtpus": 0,
        "bandwidth_in": 0,
        "bandwidth_out": 0,
        "storage": storage_mb,
        "one_shot": one_shot,
        "privileged": privileged,
        "constraints": [],
    }
    if port is not None:
        service["port"] = str(port)
    if cluster is not None:
        service["constraints"].append({"type": "direct", "cluster": cluster, "node": node})
    if platform is not None:
        service["platform"] = platform
    if rr_ip is not None:
        service["addresses"] = {"rr_ip": rr_ip}
    return service


class OakestraClient:
    """The system manager's API for one user; safe to share between threads.

    Args:
        base_url: e.g. ``http://oakestra-root:10000`` (no trailing ``/api``).
        username, password: an Oakestra user (Oakestra's default is ``Admin``/``Admin``).
        organization: the organization to log in to (``organization_name``; Oakestra's
            default organization is ``root``).
        timeout_s: seconds each HTTP request may take (connect and read). Defaults to 10.
        retries: how many times a connection error, timeout or 500/502/503/504 is retried.
            Defaults to 3.
        backoff_s: the first retry waits this long; each further one twice as long.
            Defaults to 0.5 (so 0.5 + 1 + 2 s for 3 retries).
        session: the HTTP session to use (default: a new ``requests.Session``).
        clock: seconds since the epoch, compared with the access token's ``exp`` to renew it
            in time (default ``time.time``; tests pass a clock that runs ahead).

    Every method raises :class:`OakestraUnavailable` when Oakestra does not answer (or keeps
    answering 5xx) after the retries, :class:`OakestraAuthFailed` when the credentials are
    refused, and :class:`OakestraError` (with ``status`` and ``body``) for other error answers.
    """

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        organization: str = "root",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.organization = organization
        self.clock = clock
        self.username = username
        self._password = password
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._session = session or requests.Session()
        self._token_lock = threading.Lock()
        self._token = ""
        self._refresh_token = ""
        self._renew_at = 0.0  # clock() after which the access token is renewed first
        self._user_id = ""
        self._app_names: dict[str, tuple[str, str]] = {}

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()

    # ---- authentication ----------------------------------------------------------------

    def login(self) -> None:
        """Log in with the username and password; raises :class:`OakestraAuthFailed`."""
        response = self._send(
            "POST",
            "/api/auth/login",
            json={
                "username": self.username,
                "password": self._password,
                "organization_name": self.organization,
            },
            auth=False,
        )
        if response.status_code == 404:
            raise OakestraAuthFailed(
                f"Oakestra has no organization {self.organization!r} to log user "
                f"{self.username!r} in to (404); check FLOPS_OAKESTRA_ORGANIZATION.",
                status=404,
                body=response.text[:BODY_CHARS],
            )
        if response.status_code in (401, 403):
            raise OakestraAuthFailed(
                f"Oakestra refused the login of user {self.username!r} "
                f"({response.status_code}); check the Oakestra username and password.",
                status=response.status_code,
                body=response.text[:BODY_CHARS],
            )
        tokens = self._decode(self._checked(response, "log in"), "log in")
        with self._token_lock:
            self._refresh_token = str(tokens["refresh_token"])
            self._set_token(str(tokens["token"]))

    def _renew(self) -> None:
        """A new access token from the refresh token, or a new login if that is refused."""
        with self._token_lock:
            refresh_token = self._refresh_token
        if refresh_token:
            response = self._send(
                "POST",
                "/api/auth/refresh",
                headers={"Authorization": f"Bearer {refresh_token}"},
                auth=False,
            )
            if response.ok:
                token = self._decode(response, "refresh the token").get("token")
                if token:
                    with self._token_lock:
                        self._set_token(str(token))
                    return
        self.login()

    def _set_token(self, token: str) -> None:
        """Keep ``token`` and when to renew it (caller holds the token lock)."""
        self._token = token
        claims = _jwt_claims(token)
        now = self.clock()
        expires = float(claims.get("exp", now + 600))
        lifetime = max(expires - float(claims.get("iat", now)), 0.0)
        self._renew_at = expires - min(TOKEN_MARGIN_S, lifetime / 5)

    def _access_header(self) -> dict[str, str]:
        with self._token_lock:
            token, fresh = self._token, self.clock() < self._renew_at
        if not token:
            self.login()
        elif not fresh:
            self._renew()
        with self._token_lock:
            return {"Authorization": f"Bearer {self._token}"}

    # ---- applications ------------------------------------------------------------------

    def create_application(self, app: Mapping[str, Any]) -> str:
        """Create the application ``app`` (see :func:`application`); return its
        ``applicationID``.

        Raises :class:`OakestraConflict` if the user already has an application with that
        name and namespace, :class:`OakestraError` if Oakestra refuses it.
        """
        name = str(app["application_name"])
        namespace = str(app["application_namespace"])
        entry = {"applicationID": "", "application_desc": "", "microservices": [], **app}
        sla = {"sla_version": SLA_VERSION, "customerID": self.username, "applications": [entry]}
        response = self._request("POST", "/api/application/", json=sla)
        if response.status_code == 409:
            raise OakestraConflict(
                f"Oakestra already has an application {name!r} in namespace {namespace!r}; "
                "delete it or choose another name.",
                status=409,
                body=response.text[:BODY_CHARS],
            )
        apps = self._decode(self._checked(response, f"create application {name!r}"), name)
        for found in apps if isinstance(apps, list) else []:
            if (
                found.get("application_name") == name
                and found.get("application_namespace") == namespace
            ):
                app_id = str(found["applicationID"])
                self._app_names[app_id] = (name, namespace)
                return app_id
        raise OakestraError(
            f"Oakestra accepted application {name!r} but did not list it among the user's "
            "applications.",
            status=response.status_code,
            body=response.text[:BODY_CHARS],
        )

    def list_applications(self) -> list[dict[str, Any]]:
        """The user's applications: dicts with ``applicationID``, ``application_name``,
        ``application_namespace``, ``application_desc``, ``microservices`` (service ids)."""
        if not self._user_id:
            response = self._request("GET", f"/api/user/{self.username}")
            user = self._decode(self._checked(response, "read the user"), "the user")
            self._user_id = _object_id(user.get("_id"))
        response = self._request("GET", f"/api/applications/{self._user_id}")
        apps = self._decode(self._checked(response, "list applications"), "applications")
        result = [dict(app, _id=_object_id(app.get("_id"))) for app in apps or []]
        for app in result:
            self._app_names[str(app["applicationID"])] = (
                str(app["application_name"]),
                str(app["application_namespace"]),
            )
        return result

    def find_application(self, name: str, namespace: str) -> dict[str, Any] | None:
        """The user's application called ``name`` in ``namespace``, or ``None``."""
        for app in self.list_applications():
            if app["application_name"] == name and app["application_namespace"] == namespace:
                return app
        return None

    def delete_application(self, application_id: str) -> bool:
        """Delete the application and every service of it (their instances are undeployed).

        Returns False if Oakestra does not know it (it answers 501 then, or 404). A slow root
        may delete it and still answer too late for every attempt: the client then checks
        whether the application is gone (True) before it raises
        :class:`OakestraUnavailable`.
        """
        try:
            response = self._request("DELETE", f"/api/application/{application_id}")
        except OakestraUnavailable:
            if any(a["applicationID"] == application_id for a in self.list_applications()):
                raise
            self._app_names.pop(application_id, None)
            return True
        if response.status_code in (404, 501):
            return False
        self._checked(response, f"delete application {application_id}")
        self._app_names.pop(application_id, None)
        return True

    # ---- services ----------------------------------------------------------------------

    def create_service(self, application_id: str, service: Mapping[str, Any]) -> str:
        """Add the microservice ``service`` (see :func:`microservice`) to the application;
        return the new service's id. No instance runs until :meth:`deploy_instance`.

        Raises :class:`OakestraNotFound` if the application does not exist, and
        :class:`OakestraError` if Oakestra refuses the service (400, its body attached) or
        lists it in ``failed_services`` (with Oakestra's reason).
        """
        name, namespace = self._app_name(application_id)
        service_name = str(service.get("microservice_name"))
        sla = {
            "sla_version": SLA_VERSION,
            "customerID": self.username,
            "applications": [
                {
                    "applicationID": application_id,
                    "application_name": name,
                    "application_namespace": namespace,
                    "application_desc": "",
                    "microservices": [dict(service)],
                }
            ],
        }
        response = self._request("POST", "/api/service/", json=sla)
        if response.status_code == 400:
            raise OakestraError(
                f"Oakestra refused service {service_name!r} (400: "
                f"{_message(response)}); Oakestra answers 400 for any problem: check that the "
                f"names match {NAME_PATTERN.pattern}, memory/vcpus/storage are ints and the "
                "application exists.",
                status=400,
                body=response.text[:BODY_CHARS],
            )
        result = self._decode(self._checked(response, f"create service {service_name!r}"), "")
        failed = result.get("failed_services") or []
        if failed:
            reasons = "; ".join(
                str(item.get("message") or f"status {item.get('status')}") for item in failed
            )
            raise OakestraError(
                f"Oakestra could not create service {service_name!r}: {reasons}.",
                details=failed,
                status=response.status_code,
                body=response.text[:BODY_CHARS],
            )
        service_id = str(result.get("job_id") or "")
        if not service_id:
            raise OakestraError(
                f"Oakestra created no service for {service_name!r} and gave no reason.",
                status=response.status_code,
                body=response.text[:BODY_CHARS],
            )
        return service_id

    def get_service(self, service_id: str) -> dict[str, Any]:
        """The service as the root knows it: ``status``, ``status_detail``,
        ``microservice_name``, ``image``, ... and ``instance_list``, each instance with
        ``instance_number``, ``status``, ``cluster_id``, ``worker_id``, ``publicip``,
        ``host_ip``, ``host_port`` (some only once the worker reported them, which reaches the
        root up to 15 s late). See :data:`TERMINAL_STATUSES`.

        Raises :class:`OakestraNotFound` if the service does not exist.
        """
        response = self._request("GET", f"/api/service/{service_id}")
        if response.status_code == 404:
            raise OakestraNotFound(
                f"Oakestra has no service {service_id}.",
                status=404,
                body=response.text[:BODY_CHARS],
            )
        job = self._decode(self._checked(response, f"read service {service_id}"), service_id)
        if not isinstance(job, dict):
            raise OakestraNotFound(
                f"Oakestra has no service {service_id}.", status=response.status_code
            )
        job["_id"] = _object_id(job.get("_id"))
        return job

    def list_services(self, application_id: str) -> list[dict[str, Any]]:
        """Every service of the application in one request (``GET /api/services/<id>``),
        each as :meth:`get_service` answers it. Raises :class:`OakestraNotFound` if the
        application does not exist."""
        response = self._request("GET", f"/api/services/{application_id}")
        if response.status_code == 404:
            raise OakestraNotFound(
                f"Oakestra has no application {application_id}.",
                status=404,
                body=response.text[:BODY_CHARS],
            )
        jobs = self._decode(
            self._checked(response, f"list the services of {application_id}"), application_id
        )
        return [dict(job, _id=_object_id(job.get("_id"))) for job in jobs or []]

    def delete_service(self, service_id: str) -> bool:
        """Undeploy every instance of the service and delete it; False if it did not exist
        (Oakestra answers 500 ``{"code": 500, "status": "Internal Server Error"}`` then,
        which is not retried)."""
        response = self._request(
            "DELETE", f"/api/service/{service_id}", final=lambda r: r.status_code == 500
        )
        if response.status_code in (404, 500):
            return False
        self._checked(response, f"delete service {service_id}")
        return True

    def deploy_instance(self, service_id: str) -> None:
        """Ask for one more instance of the service. Asynchronous: Oakestra answers 200
        whatever happens; follow the instance with :meth:`get_service`."""
        response = self._request("POST", f"/api/service/{service_id}/instance")
        self._checked(response, f"deploy an instance of service {service_id}")

    def undeploy_instance(self, service_id: str, instance_number: int) -> None:
        """Stop instance ``instance_number`` of the service (-1: all); it disappears from
        ``instance_list`` at once."""
        response = self._request("DELETE", f"/api/service/{service_id}/instance/{instance_number}")
        self._checked(response, f"undeploy instance {instance_number} of {service_id}")

    # ---- clusters ----------------------------------------------------------------------

    def active_clusters(self) -> list[dict[str, Any]]:
        """The active clusters (no token needed): dicts with ``_id`` (a string),
        ``cluster_name``, ``cluster_location``, ``active``, ``active_nodes``, ``vcpus``,
        ``memory`` (MB), ... (no worker architectures)."""
        response = self._request("GET", "/api/clusters/active", auth=False)
        clusters = self._decode(self._checked(response, "list active clusters"), "clusters")
        return [dict(c, _id=_object_id(c.get("_id"))) for c in clusters or []]

    # ---- transport ---------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        auth: bool = True,
        final: Callable[[requests.Response], bool] | None = None,
    ) -> requests.Response:
        """Send with the access token; on a 401, renew the token, on a 422 that rejects the
        token (:data:`JWT_REJECTIONS`, a restarted root), log in again; then send once more."""
        headers = self._access_header() if auth else {}
        response = self._send(method, path, json=json, headers=headers, auth=auth, final=final)
        if auth and (response.status_code == 401 or _token_rejected(response)):
            if response.status_code == 401:
                self._renew()
            else:
                self.login()  # the refresh token is signed with the old key too
            response = self._send(
                method, path, json=json, headers=self._access_header(), auth=auth, final=final
            )
            if response.status_code == 401 or _token_rejected(response):
                raise OakestraAuthFailed(
                    f"Oakestra refused a fresh token for {method} {path} "
                    f"({response.status_code}: {_message(response)}); check that user "
                    f"{self.username!r} may do this.",
                    status=response.status_code,
                    body=response.text[:BODY_CHARS],
                )
        return response

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        final: Callable[[requests.Response], bool] | None = None,
    ) -> requests.Response:
        """One request with retries: connection errors, timeouts and
        :data:`RETRY_STATUSES` are retried ``retries`` times (unless ``final`` accepts the
        answer); raises :class:`OakestraUnavailable` when they run out."""
        url = f"{self.base_url}{path}"
        problem = ""
        last: requests.Response | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._session.request(
                    method, url, json=json, headers=headers, timeout=self.timeout_s
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in RETRY_STATUSES and not (final and final(response)):
                last = response
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            return response
        raise OakestraUnavailable(
            f"Oakestra at {self.base_url} did not answer {method} {path} after "
            f"{self.retries + 1} attempts ({problem}); check that the Oakestra root "
            "orchestrator runs there and is reachable from the manager.",
            status=last.status_code if last is not None else None,
            body=last.text[:BODY_CHARS] if last is not None else "",
        )

    def _checked(self, response: requests.Response, what: str) -> requests.Response:
        """``response`` if it is a 2xx; else :class:`OakestraNotFound` (404) or
        :class:`OakestraError` naming ``what``, with Oakestra's status and body."""
        if response.ok:
            return response
        cls = OakestraNotFound if response.status_code == 404 else OakestraError
        raise cls(
            f"Oakestra refused to {what} ({response.status_code}: {_message(response)}).",
            status=response.status_code,
            body=response.text[:BODY_CHARS],
        )

    def _decode(self, response: requests.Response, what: str) -> Any:
        """The JSON body, decoded once more when it is a JSON string (Oakestra sends
        ``json_util.dumps(...)`` through a JSON response for several routes)."""
        try:
            value = response.json()
            if isinstance(value, str):
                value = json.loads(value)
        except ValueError:
            raise OakestraError(
                f"Oakestra answered {response.request.method} {response.request.path_url} "
                f"({what}) with a body that is not JSON.",
                status=response.status_code,
                body=response.text[:BODY_CHARS],
            ) from None
        return value

    def _app_name(self, application_id: str) -> tuple[str, str]:
        """Name and namespace of the application (the service SLA needs them)."""
        if application_id not in self._app_names:
            self.list_applications()
        if application_id not in self._app_names:
            raise OakestraNotFound(
                f"Oakestra has no application {application_id} for user {self.username!r}."
            )
        return self._app_names[application_id]


def _jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, not verified (only to read ``exp``); ``{}`` if unreadable."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _object_id(value: Any) -> str:
    """``{"$oid": "..."}`` (bson's JSON) or a plain id → the id string."""
    if isinstance(value, dict):
        return str(value.get("$oid", ""))
    return "" if value is None else str(value)


def _message(response: requests.Response) -> str:
    """Oakestra's ``message`` or ``msg`` (a token problem) from an error body, else its
    ``status`` (flask-smorest's ``{"code", "status"}``), else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or "no body"
    if isinstance(body, dict):
        return str(body.get("message") or body.get("msg") or body.get("status") or body)[:300]
    return str(body)[:300]


def _token_rejected(response: requests.Response) -> bool:
    """A 422 of flask-jwt-extended for a token of another key pair (:data:`JWT_REJECTIONS`)."""
    if response.status_code != 422:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    message = str(body.get("msg", "")) if isinstance(body, dict) else ""
    return message.startswith(JWT_REJECTIONS)
