"""The services' own output through the API: ``GET /api/flops/projects/{id}/logs``.

A project's services (aggregator, cluster aggregators, learners, and the local backend's
trained-model server) write their own output where the orchestrator runs them: the local
backend into ``<workdir>/<project_id>/<service>.log``, Oakestra into each instance's ``logs``
on its root. :class:`ServiceLogs` lists them and reads one through the orchestrator
(:meth:`~flops_manager.orchestrators.base.Orchestrator.service_log`), so that remote users
never need the manager's disk:

- without ``service``: the project's services with output (:class:`ServiceLogList`);
- with ``service``: its output as ``text/plain``, the last ``tail`` lines (default: all),
  at most :data:`MAX_LOG_LINES` lines and :data:`MAX_LOG_BYTES` bytes of it;
- with ``follow=1`` too: server-sent events, one ``data:`` line per output line, until the
  service ends (an ``end`` event names why), the client goes away or
  :data:`FOLLOW_MAX_S` passed.

A service is looked up by name among the project's own services (its orchestrator handles);
a name is never a path. What the services write is the customer's own output: the manager
adds none of its internals (paths, addresses, credentials).
"""

import time
from collections.abc import Callable, Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field

from flops_manager.api_models import _CachedSchema
from flops_manager.errors import NotFound, Unprocessable
from flops_manager.orchestrators.base import LogSource, Orchestrator, ServiceLog
from flops_manager.records import ProjectRecord
from flops_manager.store import ProjectStore
from flops_utils.contract.services import role_of
from flops_utils.errors import FlopsError
from flops_utils.logging import logger

MAX_LOG_LINES = 10_000
"""The most lines one answer (or the start of a followed stream) carries."""

MAX_LOG_BYTES = 4 * 1024 * 1024
"""The most bytes of a service's output read for one answer, so that a huge log cannot
exhaust the manager's memory; a followed stream reads at most this much per poll."""

FOLLOW_MAX_S = 24 * 3600.0
"""Seconds a followed stream lasts at most."""

HEARTBEAT_S = 15.0
"""Seconds of silence after which a followed stream writes a comment, so that a client that
went away is noticed (the write fails) and its follower slot freed."""

DRAIN_READS = 64
"""Reads at most of what a service wrote before its end, once it ended (each up to
:data:`MAX_LOG_BYTES`)."""

TRUNCATED_HEADER = "X-FLOps-Log-Truncated"
"""Set to ``1`` on a ``text/plain`` answer that left out earlier output to stay within
:data:`MAX_LOG_LINES` / :data:`MAX_LOG_BYTES`."""


class LogQuery(_CachedSchema):
    """``service``: the service whose output to answer (none: list the services);
    ``tail``: only its last lines; ``follow=1``: stream it (server-sent events)."""

    model_config = ConfigDict(extra="forbid")

    service: str | None = Field(default=None, min_length=1, max_length=128)
    follow: bool = False
    tail: int | None = Field(default=None, ge=1, le=MAX_LOG_LINES)


class ServiceLogView(BaseModel):
    """One service with output: ``name`` (``GET .../logs?service=<name>``), ``role``
    (``aggregator``, ``cluster-aggregator``, ``learner``, ``model-server``), ``where`` it
    runs (``local``, ``oakestra``) and whether it is ``running``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    role: str
    where: str
    running: bool


class ServiceLogList(BaseModel):
    """``GET /projects/{id}/logs`` without ``service``: the project's ``status`` and its
    ``services`` with output, in start order (none before it deploys)."""

    model_config = ConfigDict(extra="forbid")

    project_id: str
    status: str
    services: list[ServiceLogView]


class UnknownService(NotFound):
    """A ``service`` the project has no output of; ``details`` name the ones it has."""

    code = "unknown_service"


class FollowNeedsService(Unprocessable):
    """``follow=1`` without ``service``."""

    code = "follow_needs_service"

    def __init__(self) -> None:
        super().__init__(
            "follow=1 streams one service's output: add service=<name> (GET "
            "/api/flops/projects/{id}/logs lists them); the project's events stream at "
            "GET /api/flops/projects/{id}/events?follow=1.",
            details=[{"field": "service", "message": "required with follow=1"}],
        )


def role_name(service: str) -> str:
    """The role of a service with output: its FL role, else its name (``model-server``)."""
    try:
        return role_of(service).value
    except ValueError:
        return service


class ServiceLogs:
    """Lists and reads a project's services' output through its orchestrator.

    Args:
        orchestrator: the backend that runs the services (it knows where their output is).
        store: the projects, read again while a followed service has not started yet.
    """

    def __init__(self, orchestrator: Orchestrator, store: ProjectStore) -> None:
        self.orchestrator = orchestrator
        self.store = store

    def listing(self, project: ProjectRecord) -> ServiceLogList:
        """The project's services with output, with their role, place and state."""
        views = [
            ServiceLogView(
                name=source.name,
                role=role_name(source.name),
                where=source.where,
                running=self._running(project.project_id, source),
            )
            for source in self._sources(project)
        ]
        return ServiceLogList(
            project_id=project.project_id, status=project.status.value, services=views
        )

    def find(self, project: ProjectRecord, service: str) -> LogSource | None:
        """The source of ``service``: ``None`` for a service of the project that has not
        started yet (it is in ``project.services``). Raises :class:`UnknownService` for any
        other name, with the names the project has."""
        sources = {s.name: s for s in self._sources(project)}
        if service in sources:
            return sources[service]
        if service in project.services:
            return None
        known = list(dict.fromkeys([*project.services, *sources]))  # in start order
        where = f"GET /api/flops/projects/{project.project_id}/logs"
        if not known:
            message = (
                f"Project {project.project_id} has started no services yet (it is "
                f"{project.status.value}); {where} lists them once it deploys."
            )
        else:
            message = (
                f"Project {project.project_id} has no service {service!r}; its services: "
                f"{', '.join(known)} ({where} lists them)."
            )
        raise UnknownService(message, details=[{"service": name} for name in known])

    def text(self, project: ProjectRecord, service: str, tail: int | None) -> tuple[str, bool]:
        """The output of ``service`` so far (its last ``tail`` lines, default all, within
        :data:`MAX_LOG_LINES`/:data:`MAX_LOG_BYTES`) and whether those limits left out
        earlier output. Raises :class:`UnknownService`, and ``FlopsError``/``OSError`` when
        it cannot be read now."""
        source = self.find(project, service)
        if source is None:
            return "", False
        reader = self.orchestrator.service_log(project.project_id, source)
        lines, truncated = reader.read_tail(MAX_LOG_BYTES)
        lines += reader.pending()
        kept, capped = last_lines(lines, tail)
        cut = truncated and (tail is None or len(lines) < tail)  # else the tail was there
        return "".join(f"{line}\n" for line in kept), cut or capped

    def follow(
        self,
        project: ProjectRecord,
        source: LogSource | None,
        service: str,
        tail: int | None,
        slot: Callable[[], None],
    ) -> Iterator[str]:
        """Server-sent events of ``service``'s output (``source``, from :meth:`find`; ``None``
        while it has not started: the stream waits for it): its last ``tail`` lines (default
        all, within :data:`MAX_LOG_LINES`), then each new line, until it ends. The last
        event is ``event: end`` with the reason as its data. ``slot`` is called once the
        stream ends (it frees the caller's follower slot)."""
        try:
            began = time.monotonic()
            if source is None:
                started: list[LogSource] = []
                yield from self._wait_started(project.project_id, service, began, started)
                if not started:
                    yield _end(f"{service} did not start (the project ended)")
                    return
                source = started[0]
            reader = self.orchestrator.service_log(project.project_id, source)
            lines, _ = reader.read_tail(MAX_LOG_BYTES)
            yield from _events(last_lines(lines, tail)[0])
            yield from self._stream(project.project_id, source, reader, began)
        finally:
            slot()

    def _stream(
        self, project_id: str, source: LogSource, reader: ServiceLog, began: float
    ) -> Iterator[str]:
        """New lines of ``reader`` until ``source`` ends (then what it wrote before)."""
        last_write = time.monotonic()
        while time.monotonic() - began < FOLLOW_MAX_S:
            running = self._running(project_id, source)
            fresh = _read_quietly(reader, source.name)
            if fresh:
                yield from _events(fresh)
                last_write = time.monotonic()
            if not running:
                for _ in range(DRAIN_READS):
                    rest = _read_quietly(reader, source.name)
                    if not rest:
                        break
                    yield from _events(rest)
                yield from _events(reader.pending())
                yield _end(f"{source.name} ended")
                return
            if time.monotonic() - last_write > HEARTBEAT_S:
                yield ": keep-alive\n\n"
                last_write = time.monotonic()
            time.sleep(self.orchestrator.log_poll_interval_s)
        yield _end(f"followed for {FOLLOW_MAX_S:.0f} s, the most a stream lasts")

    def _wait_started(
        self, project_id: str, service: str, began: float, started: list[LogSource]
    ) -> Iterator[str]:
        """Wait until the project started ``service``, then put its source into ``started``
        (left empty when the project ended or is gone first); yields a heartbeat comment
        every :data:`HEARTBEAT_S` seconds meanwhile."""
        last_write = time.monotonic()
        while time.monotonic() - began < FOLLOW_MAX_S:
            project = self.store.get_project(project_id)
            if project is None:
                return
            sources = {s.name: s for s in self._sources(project)}
            if service in sources:
                started.append(sources[service])
                return
            if project.status.is_terminal:
                return
            if time.monotonic() - last_write > HEARTBEAT_S:
                yield ": keep-alive\n\n"
                last_write = time.monotonic()
            time.sleep(self.orchestrator.log_poll_interval_s)

    def _sources(self, project: ProjectRecord) -> list[LogSource]:
        return self.orchestrator.log_sources(project.project_id, project.service_handles)

    def _running(self, project_id: str, source: LogSource) -> bool:
        try:
            return self.orchestrator.log_running(project_id, source)
        except Exception as exc:  # the state is unknown now: ask again at the next poll
            logger.warning("project %s: is %s running? %s", project_id, source.name, exc)
            return True


def last_lines(lines: Sequence[str], tail: int | None) -> tuple[list[str], bool]:
    """The last ``tail`` of ``lines`` (all when ``None``), at most :data:`MAX_LOG_LINES`,
    and whether that limit (not ``tail``) left lines out."""
    wanted = min(tail or MAX_LOG_LINES, MAX_LOG_LINES)
    capped = len(lines) > MAX_LOG_LINES and (tail is None or tail > MAX_LOG_LINES)
    return list(lines[-wanted:]), capped


def _read_quietly(reader: ServiceLog, name: str) -> list[str]:
    """:meth:`ServiceLog.read_new`, with an output that cannot be read now read as nothing
    (the next poll tries again)."""
    try:
        return reader.read_new(MAX_LOG_BYTES)
    except (FlopsError, OSError) as exc:
        logger.warning("reading the output of %s: %s", name, exc)
        return []


def _events(lines: Sequence[str]) -> Iterator[str]:
    """One server-sent event per line; a carriage return inside a line (a progress bar)
    ends a line too, as SSE would read it so."""
    for line in lines:
        for part in line.split("\r"):
            yield f"data: {part}\n\n"


def _end(reason: str) -> str:
    return f"event: end\ndata: {reason}\n\n"
