"""The orchestrator interface: deploy a project's FL services, watch them, stop them, and find
them again after the manager restarted.

:class:`Orchestrator` owns the bookkeeping every backend needs: the per-project table of
started services, one watcher thread that polls them, reporting each service's end exactly
once (never for a service that :meth:`~Orchestrator.stop` removed), re-attaching after a
manager restart, and putting the aggregator's address into the services' environment. A
backend implements how one service is started (:meth:`~Orchestrator._start`), polled
(:meth:`~Orchestrator._poll`), removed (:meth:`~Orchestrator._remove`) and found again
(:meth:`~Orchestrator._reattach_one`), and where the aggregator listens.
"""

import dataclasses
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flops_manager.errors import NotFound
from flops_utils import env_vars
from flops_utils.logging import logger

WATCHER_JOIN_TIMEOUT_S = 10.0
"""Seconds :meth:`Orchestrator.close` waits for the watcher to finish a poll in progress."""

ServiceExitCallback = Callable[[str, str, int | None, str], None]
"""``(project_id, service_name, returncode, last_output_line)`` for a service that exited.

``returncode`` is ``None`` when it is unknown: a service re-attached after a manager restart
is no longer the manager's child (local backend), so only its disappearance is seen."""

ServiceHandle = dict[str, Any]
"""What a backend needs to find one started service again after a manager restart: a
JSON-serialisable dict with at least ``name`` (the service's name). The lifecycle persists it
in the project document. ``local``: ``{"name", "pid", "start_ticks", "boot", "log_path"}``;
an ``oakestra`` backend would keep its service and instance ids."""

ServiceStartedCallback = Callable[[ServiceHandle], None]
"""Called by :meth:`Orchestrator.deploy` with the handle of each service right after it
started, so that a manager that dies during a deployment still knows what it started."""


@dataclass(frozen=True)
class Placement:
    """The worker node a service must run on: its ``cluster`` and ``hostname`` (an Oakestra
    ``direct`` constraint) and its ``platform`` (``linux/amd64``, ``linux/arm64``)."""

    cluster: str
    hostname: str
    platform: str


@dataclass(frozen=True)
class ServiceSpec:
    """One FL service: ``name`` unique within the project, ``module`` run with ``python -m``
    (also the role: ``aggregator``, ``learner``), ``env`` the environment variables it gets
    (see ``flops_utils.env_vars``), ``placement`` the node it must run on (learners: the node
    holding the data) or ``None`` for anywhere.

    Wiring: a service that ``listens`` gets a port the backend chooses and binds it
    (``FLOPS_AGGREGATOR_ADDRESS`` = ``<bind host>:<port>``); a service with an ``upstream``
    (the name of an earlier service that listens) gets the address that reaches it in
    ``upstream_env``. A deployment whose services set neither is wired the classic way: the
    first service listens and every other one connects to it.
    """

    name: str
    module: str
    env: dict[str, str] = field(default_factory=dict)
    placement: Placement | None = None
    listens: bool = False
    upstream: str | None = None
    upstream_env: str = env_vars.AGGREGATOR_ADDRESS


@dataclass(frozen=True)
class Deployment:
    """Everything an orchestrator needs to run a project.

    ``services``: in start order: the aggregator first; hierarchical FL: then the cluster
    aggregators; then one learner per node. ``python``:
    interpreter of the built virtualenv (``venv`` builder), else ``None``. ``images``: role
    (``learner``, ``aggregator``) → pinned image reference (``oci`` builder), else empty.
    ``resources``: the SLA's per-service ``resource_constraints`` (``memory`` and ``storage``
    in MB, ``vcpus`` a count).
    """

    project_id: str
    services: tuple[ServiceSpec, ...]
    python: Path | None = None
    images: dict[str, str] = field(default_factory=dict)
    resources: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceState:
    """A service as :meth:`Orchestrator.reattach` found it: ``running`` or gone, and
    ``last_output``, the last non-empty line of its output (empty when unknown)."""

    name: str
    running: bool
    last_output: str


@dataclass(frozen=True)
class ServiceExit:
    """How a service ended: ``returncode`` (``None`` when the backend cannot know it) and
    ``last_line``, the last line of its output or the backend's reason."""

    returncode: int | None
    last_line: str


@dataclass(frozen=True)
class LogSource:
    """A service whose output the backend can read: ``name`` (the service's), ``where`` it
    runs (``local``, ``oakestra``) and the ``handle`` that finds it (never shown to users)."""

    name: str
    where: str
    handle: ServiceHandle = field(default_factory=dict, compare=False)


class ServiceLog(ABC):
    """Reads one service's output, line by line, for the API (``GET /projects/{id}/logs``).

    :meth:`read_tail` once, then :meth:`read_new` as often as wanted: each returns the
    complete lines (without their line ends) not returned yet; an incomplete last line is
    held back until it ends, or until :meth:`pending` takes it. Never raises for output that
    is gone (it reads as empty); ``FlopsError``/``OSError`` when it cannot be read now.
    """

    @abstractmethod
    def read_tail(self, max_bytes: int) -> tuple[list[str], bool]:
        """The complete lines of the last ``max_bytes`` bytes of the output so far, and
        whether earlier output was left out."""

    @abstractmethod
    def read_new(self, max_bytes: int) -> list[str]:
        """The complete lines written since the last read (at most about ``max_bytes``
        bytes of them; the rest comes with the next call)."""

    def pending(self) -> list[str]:
        """The incomplete last line held back, if any (``[]`` or one line), taken out."""
        return []


@dataclass(eq=False)
class Service:
    """A started service as a backend tracks it; backends subclass it with what finds the
    service (a process, an Oakestra service id). ``port``: a port the service holds on its
    host (the aggregator's), else ``None``. ``ended`` is the base class's: set once the end
    was reported or the service was stopped."""

    name: str
    port: int | None = field(default=None, kw_only=True)
    ended: bool = field(default=False, kw_only=True)

    def handle(self) -> ServiceHandle:
        """The JSON-serialisable :data:`ServiceHandle` that finds this service again."""
        return {"name": self.name}


def wired(services: Sequence[ServiceSpec]) -> list[ServiceSpec]:
    """``services`` with the classic wiring applied when none listens or has an upstream:
    the first listens, the others connect to it (``FLOPS_AGGREGATOR_ADDRESS``)."""
    if not services or any(s.listens or s.upstream for s in services):
        return list(services)
    first, *others = services
    return [
        dataclasses.replace(first, listens=True),
        *(dataclasses.replace(s, upstream=first.name) for s in others),
    ]


def with_env(spec: ServiceSpec, overrides: dict[str, str]) -> ServiceSpec:
    """``spec`` with ``overrides`` added to its environment."""
    return dataclasses.replace(spec, env={**spec.env, **overrides})


class Orchestrator(ABC):
    """Runs FL services somewhere. Backends: ``local`` (child processes), ``oakestra``.

    ``on_service_exit`` is called from the watcher thread when a service ends on its own,
    once per service; ``poll_interval_s`` is the watcher's interval.
    """

    needs_images: bool = False
    """True when the backend pulls OCI images (then the ``oci`` builder is required)."""

    serves_models: bool = False

    enforces_resources: bool = False
    """True when the backend limits each service to the SLA's ``resource_constraints``
    (``oakestra`` passes them to the scheduler); ``local`` runs plain processes and cannot."""
    """True when the backend can run a trained-model image (:meth:`deploy_inference`)."""

    aggregator_bind_host: str = "0.0.0.0"
    """The host part of the address the aggregator binds (``FLOPS_AGGREGATOR_ADDRESS``)."""

    log_where: str = "local"
    """Where this backend's services run, as the logs API names it (``local``, ``oakestra``)."""

    log_poll_interval_s: float = 0.5
    """Seconds between two reads of a followed service's output."""

    def __init__(self, on_service_exit: ServiceExitCallback, poll_interval_s: float) -> None:
        self.on_service_exit = on_service_exit
        self.poll_interval_s = poll_interval_s
        self._services: dict[str, list[Service]] = {}
        self._lock = threading.Lock()
        self._port_lock = threading.Lock()
        self._reserved_ports: set[int] = set()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- the public API --------------------------------------------------------------------
    def deploy(
        self, deployment: Deployment, on_started: ServiceStartedCallback | None = None
    ) -> str:
        """Start every service of ``deployment`` in order, calling ``on_started`` with each
        one's :data:`ServiceHandle` as soon as it runs.

        The backend chooses the port of each service that listens (:attr:`ServiceSpec.
        listens`): it gets ``FLOPS_AGGREGATOR_ADDRESS`` = ``<aggregator_bind_host>:<port>``,
        and every service naming it as ``upstream`` the address that reaches it (a listening
        service is waited for until that address is known). Returns the address of the first
        listening service (the classic or root aggregator, ``HOST:PORT``). Raises
        ``FlopsError`` when a service can't start (the ones started keep running until
        :meth:`stop`), ``ValueError`` for a deployment the backend cannot run.
        """
        self._check(deployment)
        addresses: dict[str, str] = {}
        for spec in wired(deployment.services):
            connect: dict[str, str] = {}
            if spec.upstream is not None:
                if spec.upstream not in addresses:
                    raise ValueError(f"{spec.name}: upstream {spec.upstream!r} does not listen")
                connect[spec.upstream_env] = addresses[spec.upstream]
            if not spec.listens:
                self._launch(deployment, with_env(spec, connect), None, on_started)
                continue
            port = self._reserve_port(deployment)
            bind = {env_vars.AGGREGATOR_ADDRESS: f"{self.aggregator_bind_host}:{port}"}
            try:
                started = self._launch(
                    deployment, with_env(spec, {**connect, **bind}), port, on_started
                )
            finally:
                with self._lock:
                    self._reserved_ports.discard(port)
            addresses[spec.name] = self._aggregator_address(deployment.project_id, started, port)
        if not addresses:
            raise ValueError("the deployment has no service that listens")
        return next(iter(addresses.values()))

    def reattach(self, project_id: str, handles: Sequence[ServiceHandle]) -> list[ServiceState]:
        """Take over the services a previous manager process started for the project.

        ``handles`` are what :meth:`deploy` passed to ``on_started``. Services still running
        are watched again (their end reaches ``on_service_exit``, with ``returncode`` ``None``
        when the backend cannot know it) and :meth:`stop` stops them. Returns one
        :class:`ServiceState` per handle, in order; never raises for a service that is gone.
        """
        states = []
        for handle in handles:
            service, state = self._reattach_one(project_id, handle)
            if service is not None:
                with self._lock:
                    known = {s.name for s in self._services.get(project_id, [])}
                if service.name not in known:
                    self._track(project_id, service)
                    logger.info("project %s: re-attached %s", project_id, service.name)
            states.append(state)
        return states

    def stop(self, project_id: str) -> None:
        """Stop and remove every service of the project (re-attached ones too); a no-op when
        none runs. A service stopped here is not reported to ``on_service_exit``."""
        with self._lock:
            services = self._services.pop(project_id, [])
            for service in services:
                service.ended = True
        self._remove_services(project_id, services)

    def running_services(self, project_id: str) -> list[str]:
        """Names of the project's services that are still running."""
        with self._lock:
            services = [s for s in self._services.get(project_id, []) if not s.ended]
        return [s.name for s in services if self._poll_quietly(s) is None]

    def deploy_inference(self, project_id: str, image: str, resources: dict[str, int]) -> str:
        """Run the trained-model image ``image`` (serving MLflow's scoring protocol on its
        ``PORT``, which the backend chooses) for the project, apart from its FL services: it
        outlives the project's end and runs until :meth:`stop_inference`. ``resources``:
        ``memory``/``storage`` in MB, ``vcpus`` a count. Returns its base URL
        (``http://HOST:PORT``). Only backends with :attr:`serves_models` implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not run trained-model images")

    def stop_inference(self, project_id: str) -> bool:
        """Stop the project's trained-model server; ``False`` when none runs."""
        return False

    # -- the services' output -------------------------------------------------------------
    def log_sources(self, project_id: str, handles: Sequence[ServiceHandle]) -> list[LogSource]:
        """The project's services whose output :meth:`service_log` reads: by default one per
        handle (``handles``: the project's, as :meth:`deploy` passed them to ``on_started``);
        a backend adds others (the local trained-model server)."""
        latest = {str(h["name"]): dict(h) for h in handles if h.get("name")}
        return [LogSource(name, self.log_where, handle) for name, handle in latest.items()]

    def service_log(self, project_id: str, source: LogSource) -> ServiceLog:
        """A reader of the output of ``source`` (one of :meth:`log_sources`). Raises
        ``NotFound`` when this backend keeps no output of it."""
        raise NotFound(f"The {type(self).__name__} keeps no output of {source.name}.")

    def log_running(self, project_id: str, source: LogSource) -> bool:
        """Whether ``source`` may still write output (following it goes on while it does)."""
        return source.name in self.running_services(project_id)

    def close(self, stop_services: bool = True) -> None:
        """Stop the watcher thread and, with ``stop_services`` (the default), every
        project's services; without it the services keep running for a later
        :meth:`reattach` by the next manager process."""
        self._closed.set()
        with self._lock:
            project_ids = list(self._services)
        for project_id in project_ids:
            if stop_services:
                self.stop(project_id)
            else:
                with self._lock:
                    services = self._services.pop(project_id, [])
                for service in services:
                    service.ended = True
                    self._release(service)
        if self._watcher is not None:
            self._watcher.join(timeout=WATCHER_JOIN_TIMEOUT_S)

    # -- what a backend implements ---------------------------------------------------------
    def _check(self, deployment: Deployment) -> None:
        """Raise ``ValueError`` for a deployment the backend cannot run (default: none)."""
        return None

    @abstractmethod
    def _aggregator_port(self, deployment: Deployment) -> int:
        """The port the aggregator of ``deployment`` will listen on; not one that another
        tracked service holds (:meth:`ports_in_use`). Raises ``FlopsError`` when none is
        free."""

    @abstractmethod
    def _aggregator_address(self, project_id: str, aggregator: Service, port: int) -> str:
        """``HOST:PORT`` through which the learners reach the started ``aggregator``
        listening on ``port`` (may wait until it runs). Raises ``FlopsError`` when it ended
        or cannot be placed; then call :meth:`_mark_ended` so that the end is not reported
        twice."""

    @abstractmethod
    def _start(
        self, project_id: str, spec: ServiceSpec, deployment: Deployment, port: int | None
    ) -> Service:
        """Start the service ``spec`` (its env holds the aggregator's address already);
        ``port``: the port it listens on (the aggregator's), to publish on its host, else
        ``None``. Raises ``FlopsError`` when it can't start."""

    @abstractmethod
    def _poll(self, service: Service) -> ServiceExit | None:
        """How ``service`` ended, or ``None`` while it runs. May raise ``FlopsError`` or
        ``OSError`` when the state cannot be known right now (the watcher retries)."""

    @abstractmethod
    def _remove(self, service: Service) -> None:
        """Stop ``service`` and free what it holds; it must not raise for a service that
        is gone."""

    @abstractmethod
    def _reattach_one(
        self, project_id: str, handle: ServiceHandle
    ) -> tuple[Service | None, ServiceState]:
        """Find the service of ``handle`` again: the :class:`Service` to watch (``None``
        when it no longer runs) and its :class:`ServiceState`. Never raises for a service
        that is gone."""

    def _remove_services(self, project_id: str, services: list[Service]) -> None:
        """Remove the project's ``services`` (already out of the table); default: one by
        one with :meth:`_remove`. Backends override it to remove them all at once."""
        for service in services:
            try:
                self._remove(service)
            except Exception:
                logger.exception("project %s: removing %s failed", project_id, service.name)

    def _release(self, service: Service) -> None:
        """Free what this process holds for ``service`` without stopping it (:meth:`close`
        with ``stop_services=False``); default: nothing."""
        return None

    # -- helpers for backends --------------------------------------------------------------
    def ports_in_use(self) -> set[int]:
        """The ports the tracked services that have not ended hold, and the ones reserved
        for aggregators being started."""
        with self._lock:
            held = {
                s.port
                for ss in self._services.values()
                for s in ss
                if s.port is not None and not s.ended
            }
            return held | self._reserved_ports

    def _reserve_port(self, deployment: Deployment) -> int:
        """:meth:`_aggregator_port`, reserved until the aggregator is tracked, so that
        concurrent deployments get different ports."""
        with self._port_lock:
            port = self._aggregator_port(deployment)
            with self._lock:
                self._reserved_ports.add(port)
        return port

    def _mark_ended(self, service: Service) -> bool:
        """Mark ``service`` as ended without reporting it; ``False`` when it was already."""
        with self._lock:
            already = service.ended
            service.ended = True
        return not already

    def _launch(
        self,
        deployment: Deployment,
        spec: ServiceSpec,
        port: int | None,
        on_started: ServiceStartedCallback | None,
    ) -> Service:
        service = self._start(deployment.project_id, spec, deployment, port)
        service.port = port
        self._track(deployment.project_id, service)
        if on_started is not None:
            on_started(service.handle())
        return service

    def _track(self, project_id: str, service: Service) -> None:
        with self._lock:
            self._services.setdefault(project_id, []).append(service)
            if self._watcher is None and not self._closed.is_set():
                self._watcher = threading.Thread(
                    target=self._watch, name=f"{type(self).__name__}-watch", daemon=True
                )
                self._watcher.start()

    def _poll_quietly(self, service: Service) -> ServiceExit | None:
        """:meth:`_poll`, with a state that cannot be known counted as ended."""
        try:
            return self._poll(service)
        except Exception as exc:
            logger.warning("polling %s: %s", service.name, exc)
            return ServiceExit(None, f"its state is unknown: {exc}")

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_interval_s):
            with self._lock:
                items = [(p, s) for p, ss in self._services.items() for s in ss if not s.ended]
            for project_id, service in items:
                try:
                    ended = self._poll(service)
                except Exception as exc:
                    logger.warning("polling %s of project %s: %s", service.name, project_id, exc)
                    continue
                if ended is not None:
                    self._report(project_id, service, ended)

    def _report(self, project_id: str, service: Service, ended: ServiceExit) -> None:
        """Report ``service``'s end once, unless :meth:`stop` took it out of the table."""
        with self._lock:
            tracked = any(s is service for s in self._services.get(project_id, []))
            if not tracked or service.ended:
                return
            service.ended = True
        try:
            self.on_service_exit(project_id, service.name, ended.returncode, ended.last_line)
        except Exception:
            logger.exception("service exit handler failed")
