"""A small HTTP client of the manager's REST API, used by the CLI, the demo and the tests."""

import time
from collections.abc import Callable
from typing import Any

import requests

from flops_utils.contract.lifecycle import TERMINAL
from flops_utils.errors import FlopsError

REQUEST_TIMEOUT_S = 30.0

MOCK_TIMEOUT_S = 600.0
"""Seconds :meth:`ManagerClient.provide_mocks` waits for the push by default."""
TERMINAL_STATUSES = frozenset(status.value for status in TERMINAL)


class ApiError(FlopsError):
    """The manager answered with an error; ``status`` is the HTTP status, ``code`` its code."""

    code = "api_error"

    def __init__(self, status: int, code: str, message: str, details: list[Any]) -> None:
        super().__init__(message, details)
        self.status = status
        self.code = code


class ManagerUnreachable(FlopsError):
    """The manager could not be reached, or did not answer in time."""

    code = "manager_unreachable"


def _unreachable(base_url: str, exc: requests.RequestException) -> ManagerUnreachable:
    """The :class:`ManagerUnreachable` for ``exc``: the manager's base URL and the cause in a
    few words (never the request's headers, so never the token), with the fix."""
    if isinstance(exc, requests.Timeout):
        cause = f"no answer within {REQUEST_TIMEOUT_S:g} s"
    elif isinstance(exc, requests.ConnectionError):
        text = str(exc)
        cause = next(
            (
                words
                for needle, words in (
                    ("Connection refused", "connection refused"),
                    ("Name or service not known", "unknown host name"),
                    ("No route to host", "no route to host"),
                    ("Network is unreachable", "network unreachable"),
                    ("timed out", "connection timed out"),
                )
                if needle in text
            ),
            "the connection failed",
        )
    else:
        cause = type(exc).__name__
    return ManagerUnreachable(
        f"cannot reach the FLOps manager at {base_url} ({cause}). Fix: start it "
        "(flops-manager), or pass --manager-url / set FLOPS_MANAGER_URL to its address."
    )


class ManagerClient:
    """Calls ``{base_url}/api/flops/...``; every call raises :class:`ApiError` on a 4xx/5xx.

    Args:
        base_url: ``http://HOST:PORT`` of the manager.
        token: the bearer token sent with every request (the embedded manager's is in
            ``$FLOPS_HOME/api-token``).
        session: an optional ``requests.Session`` to send requests with.
    """

    def __init__(
        self, base_url: str, token: str | None = None, session: requests.Session | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, json: Any = None) -> Any:
        """Send one request to ``/api/flops{path}`` and return the decoded JSON body.

        Raises :class:`ApiError` for a 4xx/5xx answer and :class:`ManagerUnreachable` when
        the manager cannot be reached or does not answer in time."""
        try:
            response = self.session.request(
                method, f"{self.base_url}/api/flops{path}", json=json, timeout=REQUEST_TIMEOUT_S
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _unreachable(self.base_url, exc) from None
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text[:300]}
        if response.status_code >= 400:
            raise ApiError(
                response.status_code,
                str(body.get("error", "error")),
                str(body.get("message", response.reason)),
                list(body.get("details", [])),
            )
        return body

    def create_project(self, sla: dict[str, Any]) -> str:
        """POST an SLA; returns the new project's id."""
        return str(self.request("POST", "/projects", sla)["project_id"])

    def project(self, project_id: str) -> dict[str, Any]:
        """The project's document (status, phases, events, metrics, MLflow ids)."""
        result: dict[str, Any] = self.request("GET", f"/projects/{project_id}")
        return result

    def nodes(self) -> list[dict[str, Any]]:
        """Registered worker nodes."""
        result: list[dict[str, Any]] = self.request("GET", "/nodes")["nodes"]
        return result

    def provide_mocks(self, timeout_s: float = MOCK_TIMEOUT_S, **request: Any) -> dict[str, int]:
        """POST /mocks (see ``MockRequest``) and wait for the job; returns rows pushed per node.

        Raises :class:`ApiError` when the manager refuses the request, ``FlopsError`` with the
        job's message when the push failed, and ``TimeoutError`` after ``timeout_s`` seconds.
        """
        job = self.request("POST", "/mocks", request)
        deadline = time.monotonic() + timeout_s
        while job["status"] == "running":
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"pushing mock data (job {job['job_id']}) still runs after {timeout_s:g} s; "
                    f"GET /api/flops/mocks/{job['job_id']} tells when it ends"
                )
            time.sleep(0.2)
            job = self.request("GET", f"/mocks/{job['job_id']}")
        if job["status"] == "failed":
            raise FlopsError(f"pushing mock data failed: {job['message']}")
        rows: dict[str, int] = job["rows"]
        return rows

    def tracking_url(self) -> str:
        """The MLflow GUI's URL."""
        return str(self.request("GET", "/tracking")["url"])

    def tracking_credential(self) -> dict[str, str]:
        """``{"url", "username", "password"}``: the caller's MLflow user with a new password
        (the previous one stops working). Raises ``ApiError`` (404) when MLflow runs without
        authentication."""
        answer: dict[str, str] = self.request("POST", "/tracking/credential")
        return answer

    def trained_model(self, project_id: str) -> dict[str, Any]:
        """Where the project's trained model is: ``{"model_uri": str | None,
        "model_image": str | None, "inference_url": str | None}`` (``model_uri`` the
        registered model's version, else the run's model; ``model_image`` the pinned image
        reference when one was built)."""
        project = self.project(project_id)
        mlflow = project.get("mlflow") or {}
        image = project.get("model_image") or {}
        return {
            "model_uri": mlflow.get("registered_model_uri") or mlflow.get("model_uri"),
            "model_image": image.get("ref"),
            "inference_url": project.get("inference_url"),
        }

    def wait_for_nodes(
        self, count: int, timeout_s: float, tag: str | None = None
    ) -> list[dict[str, Any]]:
        """Poll until at least ``count`` nodes are registered (holding data tagged ``tag``, if
        given: a node reports a new tag at its next registration); ``TimeoutError`` otherwise.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = self.nodes()
            if tag is not None:
                nodes = [node for node in nodes if tag in (node.get("tags") or {})]
            if len(nodes) >= count:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(nodes)} of {count} nodes registered"
                    + (f" with tag {tag!r}" if tag else "")
                    + f" after {timeout_s} s"
                )
            time.sleep(0.2)

    def wait_for_project(
        self,
        project_id: str,
        timeout_s: float,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 0.25,
    ) -> dict[str, Any]:
        """Poll the project until it is completed, failed or cancelled and return it.

        ``on_event`` gets each new event once, in order. Raises ``TimeoutError`` after
        ``timeout_s`` seconds.
        """
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            project = self.project(project_id)
            events = project.get("events", [])
            if on_event is not None:
                for event in events[seen:]:
                    on_event(event)
            seen = len(events)
            if project["status"] in TERMINAL_STATUSES:
                return project
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"project {project_id} still {project['status']} after {timeout_s} s"
                )
            time.sleep(poll_s)
