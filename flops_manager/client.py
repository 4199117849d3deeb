"""A small HTTP client of the manager's REST API, used by the CLI, the demo and the tests."""

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests

from flops_utils.contract.lifecycle import TERMINAL
from flops_utils.errors import FlopsError

REQUEST_TIMEOUT_S = 60.0
"""Seconds one request may take to connect, and to answer: every endpoint answers at once
(long work runs as a job), so only a manager that is gone or overloaded takes this long."""

MOCK_TIMEOUT_S = 600.0
"""Seconds :meth:`ManagerClient.provide_mocks` waits for the push by default."""

FOLLOW_TIMEOUT_S = 24 * 3600.0
"""Seconds :meth:`ManagerClient.follow_events` follows a project by default."""
POLL_S = 1.0
"""Seconds between two reads of a project when the manager serves no event stream."""
SSE_READ_TIMEOUT_S = 60.0
"""Seconds of silence after which an event stream counts as dropped and is opened again: the
manager writes a heartbeat comment every 15 s (``flops_manager.app.SSE_HEARTBEAT_S``)."""
RECONNECT_BUDGET_S = 120.0
"""Seconds a follower keeps reconnecting to an unreachable manager (a restart takes less)
before it raises :class:`ManagerUnreachable`."""
RECONNECT_PAUSE_S = (0.5, 5.0)
"""First and longest pause between two reconnects, in seconds (doubling in between)."""
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


def _api_error(response: requests.Response) -> ApiError:
    """The :class:`ApiError` of a 4xx/5xx ``response`` (the API's ``ErrorBody``)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"message": response.text[:300]}
    return ApiError(
        response.status_code,
        str(body.get("error", "error")),
        str(body.get("message", response.reason)),
        list(body.get("details", [])),
    )


_DROPPED = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    ManagerUnreachable,
)
"""What a dropped, refused or silent connection raises while following."""


class _Reconnects:
    """Paces the reconnects of a follower: :meth:`failed` sleeps (doubling pauses, see
    ``RECONNECT_PAUSE_S``) and raises :class:`ManagerUnreachable` once the failures have
    lasted ``RECONNECT_BUDGET_S`` seconds; :meth:`succeeded` starts over."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._since: float | None = None
        self._pause_s = RECONNECT_PAUSE_S[0]

    def failed(self, exc: Exception) -> None:
        now = time.monotonic()
        self._since = self._since if self._since is not None else now
        if now - self._since >= RECONNECT_BUDGET_S:
            if isinstance(exc, ManagerUnreachable):
                raise exc
            assert isinstance(exc, requests.RequestException)
            raise _unreachable(self.base_url, exc) from None
        time.sleep(self._pause_s)
        self._pause_s = min(self._pause_s * 2, RECONNECT_PAUSE_S[1])

    def succeeded(self) -> None:
        self._since = None
        self._pause_s = RECONNECT_PAUSE_S[0]


def _check_deadline(deadline: float, timeout_s: float, what: str) -> None:
    """Raise ``TimeoutError`` ("``what`` after ``timeout_s`` s") once the monotonic clock
    passed ``deadline``."""
    if time.monotonic() > deadline:
        raise TimeoutError(f"{what} after {timeout_s:g} s")


def _sse_events(
    response: requests.Response, deadline: float, timeout_s: float, what: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(index, event)`` for each server-sent event of ``response`` (the WHATWG HTML
    "server-sent events" format: ``id:`` and ``data:`` fields, a blank line ends an event,
    lines starting with ``:`` are comments), until the stream ends. Raises
    ``TimeoutError`` ("``what`` after ``timeout_s`` s") at the monotonic time ``deadline``
    (checked at every line). Lines are split on line ends only (bytes): an event's JSON may
    hold other Unicode separators."""
    event_id: str | None = None
    data: list[str] = []
    for raw in response.iter_lines(chunk_size=None):
        _check_deadline(deadline, timeout_s, what)
        line = raw.decode("utf-8", errors="replace")
        if not line:
            if event_id is not None and data:
                yield int(event_id), json.loads("\n".join(data))
            event_id, data = None, []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event_id = value
            elif name == "data":
                data.append(value)


def _log_lines(response: requests.Response) -> Iterator[str]:
    """The ``data`` of each server-sent event of a followed log (one output line each),
    until its ``end`` event or the end of the stream. Lines are split on line ends only
    (bytes), never on other Unicode separators an output line may hold."""
    event = ""
    data: list[str] = []
    for raw in response.iter_lines(chunk_size=None):
        line = raw.decode("utf-8", errors="replace")
        if not line:
            if event == "end":
                return
            if data:
                yield "\n".join(data)
            event, data = "", []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value


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
        if response.status_code >= 400:
            raise _api_error(response)
        try:
            return response.json()
        except ValueError:
            return {"message": response.text[:300]}

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

    def service_logs(self, project_id: str) -> dict[str, Any]:
        """The project's services with output (``GET /projects/{id}/logs``):
        ``{"project_id", "status", "services": [{"name", "role", "where", "running"}]}``."""
        answer: dict[str, Any] = self.request("GET", f"/projects/{project_id}/logs")
        return answer

    def service_log(self, project_id: str, service: str, tail: int | None = None) -> str:
        """The output of the project's ``service`` so far (its last ``tail`` lines; the
        manager answers at most 10 000). Raises :class:`ApiError` (404: no such project or
        service, naming the project's services) and :class:`ManagerUnreachable`."""
        with self._log_response(project_id, service, tail, follow=False) as response:
            return response.text

    def follow_service_log(
        self, project_id: str, service: str, tail: int | None = None
    ) -> Iterator[str]:
        """Yield the lines of ``service``'s output, its last ``tail`` first (default: all
        so far), then each new one as it comes, until the service ends (the stream's
        ``end`` event). Raises as :meth:`service_log` does; a stream that drops or stays
        silent (the manager writes a heartbeat every 15 s) raises
        :class:`ManagerUnreachable`."""
        with self._log_response(project_id, service, tail, follow=True) as response:
            try:
                yield from _log_lines(response)
            except _DROPPED as exc:
                raise ManagerUnreachable(
                    f"the log stream of {service} from {self.base_url} stopped "
                    f"({type(exc).__name__}); run the command again to go on."
                ) from None

    def _log_response(
        self, project_id: str, service: str, tail: int | None, follow: bool
    ) -> requests.Response:
        """The open answer of ``GET /projects/{id}/logs?service=...``; raises
        :class:`ApiError` for an error answer, :class:`ManagerUnreachable` when the manager
        cannot be reached."""
        params: dict[str, str | int] = {"service": service}
        if tail is not None:
            params["tail"] = tail
        if follow:
            params["follow"] = 1
        try:
            response = self.session.get(
                f"{self.base_url}/api/flops/projects/{project_id}/logs",
                params=params,
                stream=follow,
                timeout=(REQUEST_TIMEOUT_S, SSE_READ_TIMEOUT_S if follow else REQUEST_TIMEOUT_S),
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _unreachable(self.base_url, exc) from None
        if response.status_code >= 400:
            response.close()
            raise _api_error(response)
        return response

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
        poll_s: float = POLL_S,
    ) -> dict[str, Any]:
        """Follow the project's events (:meth:`follow_events`) until it is completed, failed
        or cancelled, and return its final document.

        ``on_event`` gets each event once, in order, from the first. ``poll_s``: the polling
        interval when the manager serves no event stream. Raises ``TimeoutError`` after
        ``timeout_s`` seconds, :class:`ApiError` and :class:`ManagerUnreachable` as
        :meth:`follow_events` does.
        """
        for event in self.follow_events(project_id, timeout_s=timeout_s, poll_s=poll_s):
            if on_event is not None:
                on_event(event)
        return self.project(project_id)

    def follow_events(
        self,
        project_id: str,
        start: int = 0,
        timeout_s: float = FOLLOW_TIMEOUT_S,
        poll_s: float = POLL_S,
    ) -> Iterator[dict[str, Any]]:
        """Yield the project's events from index ``start`` (0: the first), in order, each
        once, until the project ends (then its last event has been yielded).

        Reads ``GET /projects/{id}/events?follow=1`` (server-sent events); a dropped or
        silent connection (no heartbeat for ``SSE_READ_TIMEOUT_S``) is opened again with
        ``Last-Event-ID``, so nothing is lost or repeated. When the manager refuses the stream
        (429: too many followers) or serves none (an older manager), it polls
        ``GET /projects/{id}`` every ``poll_s`` seconds instead.

        Raises ``TimeoutError`` after ``timeout_s`` seconds, :class:`ApiError` for an error
        answer (404: no such project), and :class:`ManagerUnreachable` once the manager
        stayed unreachable for ``RECONNECT_BUDGET_S`` seconds.
        """
        deadline = time.monotonic() + timeout_s
        retry = _Reconnects(self.base_url)
        next_index = start
        unended = f"project {project_id} has not ended"
        while True:
            _check_deadline(deadline, timeout_s, unended)
            try:
                response = self._open_event_stream(project_id, next_index, deadline)
                if response is not None:
                    retry.succeeded()
                    with response:
                        for index, event in _sse_events(response, deadline, timeout_s, unended):
                            if index >= next_index:
                                next_index = index + 1
                                yield event
            except _DROPPED as exc:
                retry.failed(exc)
                continue
            # the stream ended with the project (or was refused): the rest, polling
            yield from self._poll_events(project_id, next_index, deadline, timeout_s, poll_s)
            return

    def _open_event_stream(
        self, project_id: str, start: int, deadline: float
    ) -> requests.Response | None:
        """The open event stream from event ``start``, or ``None`` when the manager refuses
        it (429) or serves none; raises :class:`ApiError` for other error answers and the
        ``requests`` exception when the connection fails. Reading it times out after
        ``SSE_READ_TIMEOUT_S`` of silence, or at the monotonic time ``deadline``."""
        read_timeout_s = min(SSE_READ_TIMEOUT_S, max(deadline - time.monotonic(), 0.1))
        headers = {"Accept": "text/event-stream"}
        if start > 0:
            headers["Last-Event-ID"] = str(start - 1)
        response = self.session.get(
            f"{self.base_url}/api/flops/projects/{project_id}/events?follow=1",
            headers=headers,
            stream=True,
            timeout=(REQUEST_TIMEOUT_S, read_timeout_s),
        )
        kind = response.headers.get("Content-Type", "")
        if response.status_code == 429 or (
            response.status_code < 400 and not kind.startswith("text/event-stream")
        ):
            response.close()
            return None
        if response.status_code >= 400:
            error = _api_error(response)  # reads the (short) error body
            response.close()
            if response.status_code == 404:
                self.project(project_id)  # raises when the project is unknown
                return None  # it exists: an older manager without the event stream
            raise error
        return response

    def _poll_events(
        self, project_id: str, start: int, deadline: float, timeout_s: float, poll_s: float
    ) -> Iterator[dict[str, Any]]:
        """Poll the project every ``poll_s`` seconds and yield its events from ``start``
        until it ends (at once when it has ended); raises as :meth:`follow_events` does
        (``TimeoutError`` at the monotonic time ``deadline``, naming ``timeout_s``)."""
        retry = _Reconnects(self.base_url)
        seen = start
        while True:
            try:
                project = self.project(project_id)
            except ManagerUnreachable as exc:
                retry.failed(exc)
                continue
            retry.succeeded()
            events = project.get("events", [])
            yield from events[seen:]
            seen = max(seen, len(events))
            if project["status"] in TERMINAL_STATUSES:
                return
            _check_deadline(deadline, timeout_s, f"project {project_id} still {project['status']}")
            time.sleep(poll_s)
