"""The ``local`` orchestrator: every FL service is a child process on this machine.

Each service runs ``<env python> -m <module>`` in its own process group (so stopping it
also stops anything it spawned, and it outlives a manager that is killed), logging to
``<workdir>/<project_id>/<service>.log`` (read through the API by :class:`FileLog`). The
base class's watcher polls the processes every ``POLL_INTERVAL_S`` and reports services that
exit on their own through ``on_service_exit``.

The aggregator binds ``127.0.0.1:<port>``, a free port outside the kernel's ephemeral range
(see :mod:`flops_manager.orchestrators.ports` for why), and the learners connect there.

Re-attach: a service's handle is its :class:`~flops_manager.process_identity.ProcessIdentity`
(pid, start time, boot id) and log path. A later manager process re-attaches to a service that
still runs by polling ``/proc`` for it: it is not that manager's child, so its exit code is
unknown (reported as ``None``) and its last log line is the exit reason there is.

Trained models: the backend serves a finished project's model on ``127.0.0.1``
(:meth:`LocalOrchestrator.deploy_model`, :mod:`flops_manager.orchestrators.local_models`): from
its image in the local Docker engine when there is both, else from the MLflow model in a
virtualenv made for it; :meth:`LocalOrchestrator.stop_inference` stops it.
"""

import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flops_manager.errors import NotFound
from flops_manager.model_delivery import ModelEnvironments, TrainedModel
from flops_manager.orchestrators.base import (
    Deployment,
    LogSource,
    Orchestrator,
    Service,
    ServiceExit,
    ServiceExitCallback,
    ServiceHandle,
    ServiceLog,
    ServiceSpec,
    ServiceState,
)
from flops_manager.orchestrators.local_models import LocalModelServers
from flops_manager.orchestrators.ports import local_aggregator_port
from flops_manager.process_identity import ProcessIdentity
from flops_utils import env_vars
from flops_utils.logging import logger
from flops_utils.processes import stop_process_groups

POLL_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 10.0
LOOPBACK = "127.0.0.1"


@dataclass(eq=False)
class _Process(Service):
    """A local service: ``process`` is set for this manager's children, ``None`` for a
    re-attached one (then only ``identity`` tells whether it still runs)."""

    identity: ProcessIdentity
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None

    def exit_status(self) -> tuple[bool, int | None]:
        """``(exited, returncode)``; the code is ``None`` while running or when unknown."""
        if self.process is not None:
            code = self.process.poll()
            return code is not None, code
        return not self.identity.is_alive(), None

    def handle(self) -> ServiceHandle:
        return {"name": self.name, **self.identity.to_dict(), "log_path": str(self.log_path)}

    def close_log(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
"""Terminal colour codes (Flower colours its log lines)."""


def last_line(path: Path, max_bytes: int = 4096) -> str:
    """The last non-empty line of a log file (read from its last ``max_bytes`` bytes), without
    terminal colour codes and with runs of whitespace collapsed; empty when unreadable."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            text = _ANSI_ESCAPE.sub("", f.read().decode(errors="replace"))
    except OSError:
        return ""
    lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class FileLog(ServiceLog):
    """A service's output in the file ``path`` (it may not exist yet, or be gone: then it
    reads as empty), read from a byte offset on; bytes that are not UTF-8 read as U+FFFD.

    Args:
        path: the log file.
        max_line_bytes: an incomplete line longer than this is returned as it is (a progress
            bar rewriting one line with carriage returns never ends it).
    """

    def __init__(self, path: Path, max_line_bytes: int = 64 * 1024) -> None:
        self.path = path
        self.max_line_bytes = max_line_bytes
        self._offset = 0
        self._partial = b""

    def read_tail(self, max_bytes: int) -> tuple[list[str], bool]:
        size = self._size()
        start = max(0, size - max_bytes)
        self._offset, self._partial = start, b""
        lines = self.read_new(max_bytes)
        if start > 0 and lines:
            lines = lines[1:]  # the first one began before ``start``
        return lines, start > 0

    def read_new(self, max_bytes: int) -> list[str]:
        if self._size() < self._offset:  # truncated or replaced: read it again
            self._offset, self._partial = 0, b""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read(max_bytes)
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > self.max_line_bytes:
            complete.append(self._partial)
            self._partial = b""
        return [_decoded(line) for line in complete]

    def pending(self) -> list[str]:
        partial, self._partial = self._partial, b""
        return [_decoded(partial)] if partial else []

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


def _decoded(line: bytes) -> str:
    return line.decode("utf-8", errors="replace").rstrip("\r")


_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""A service name whose log file this backend reads (``learner-<node id>`` and the like)."""

MODEL_SERVER_LOG = "model-server"
"""The logs API's name of a project's trained-model server (not an FL service name)."""


class LocalOrchestrator(Orchestrator):
    """Runs services as child processes.

    Args:
        workdir: where service logs go.
        on_service_exit: see :class:`Orchestrator`.
        poll_interval_s: seconds between two polls of the processes.
        model_envs_dir: where trained-model virtualenvs are cached (default
            ``workdir/model-envs``).
    """

    aggregator_bind_host = LOOPBACK
    serves_models = True

    def __init__(
        self,
        workdir: Path,
        on_service_exit: ServiceExitCallback,
        poll_interval_s: float = POLL_INTERVAL_S,
        model_envs_dir: Path | None = None,
    ) -> None:
        super().__init__(on_service_exit, poll_interval_s)
        self.workdir = workdir
        environments = ModelEnvironments(model_envs_dir or workdir / "model-envs")
        self.model_servers = LocalModelServers(workdir, environments)

    def deploy_model(
        self, project_id: str, model: TrainedModel, resources: Mapping[str, int] | None = None
    ) -> str:
        """Serve the project's trained ``model`` on ``127.0.0.1`` and a free port (its image
        in the local Docker engine when it has one and the engine answers, else its MLflow
        model in a virtualenv made for it) until :meth:`stop_inference`; returns
        ``http://127.0.0.1:<port>`` once ``/ping`` answers. ``resources`` (the SLA's
        ``resource_constraints``) limit the container's memory and CPUs
        (:func:`~flops_manager.orchestrators.local_models.container_limits`); a process is not
        limited. Raises ``FlopsError`` (:class:`~flops_manager.model_delivery.ModelDeliveryError`,
        the model fetch's)."""
        return self.model_servers.serve(project_id, model, resources)

    def deploy_inference(self, project_id: str, image: str, resources: dict[str, int]) -> str:
        """Run the trained-model ``image`` in the local Docker engine, limited to ``resources``'
        memory and CPUs (:func:`~flops_manager.orchestrators.local_models.container_limits`);
        returns its base URL. Raises
        :class:`~flops_manager.model_delivery.ModelDeliveryError` without an engine."""
        if self.model_servers.engine() is None:
            from flops_manager.model_delivery import ModelDeliveryError

            raise ModelDeliveryError(
                "No Docker engine answers on this machine (DOCKER_HOST or "
                "/var/run/docker.sock), so the local backend cannot run the trained-model image."
            )
        return self.model_servers.serve(project_id, TrainedModel("", "", image=image), resources)

    def stop_inference(self, project_id: str) -> bool:
        """Stop the project's trained-model server (also one a previous manager process
        started); ``False`` when none runs."""
        return self.model_servers.stop(project_id)

    def log_sources(self, project_id: str, handles: Sequence[ServiceHandle]) -> list[LogSource]:
        """The project's FL services and, once it ran, its trained-model server as a process
        (``model-server``; a container's output is Docker's)."""
        sources = super().log_sources(project_id, handles)
        if self.model_servers.log_path(project_id) is not None:
            sources.append(LogSource(MODEL_SERVER_LOG, self.log_where, {"name": MODEL_SERVER_LOG}))
        return sources

    def service_log(self, project_id: str, source: LogSource) -> ServiceLog:
        """The output file of ``source``: ``<workdir>/<project_id>/<name>.log`` for an FL
        service, ``model-server.log`` there for the trained-model server. The path is made
        here from the project id and the service's name, never taken from a request; raises
        ``NotFound`` for a name that would leave the project's directory."""
        if source.name == MODEL_SERVER_LOG:
            path = self.model_servers.log_path(project_id)
            if path is None:
                raise NotFound(f"Project {project_id} has no trained-model server output.")
            return FileLog(path)
        return FileLog(self._service_log_path(project_id, source.name))

    def log_running(self, project_id: str, source: LogSource) -> bool:
        if source.name == MODEL_SERVER_LOG:
            return self.model_servers.serving(project_id)
        return super().log_running(project_id, source)

    def _service_log_path(self, project_id: str, name: str) -> Path:
        """``<workdir>/<project_id>/<name>.log``; ``NotFound`` unless ``name`` is a plain
        service name (:data:`_SERVICE_NAME`) and the file is inside ``<workdir>/<project_id>``."""
        directory = (self.workdir / project_id).resolve()
        path = (directory / f"{name}.log").resolve()
        if (
            not _SERVICE_NAME.match(name)
            or path.parent != directory
            or directory.parent != self.workdir.resolve()
        ):
            raise NotFound(f"No service {name!r} in project {project_id!r}.")
        return path

    def _check(self, deployment: Deployment) -> None:
        if deployment.python is None:
            raise ValueError("the local orchestrator runs virtualenvs: Deployment.python is unset")

    def _aggregator_port(self, deployment: Deployment) -> int:
        return local_aggregator_port(self.ports_in_use(), LOOPBACK)

    def _aggregator_address(self, project_id: str, aggregator: Service, port: int) -> str:
        return f"{LOOPBACK}:{port}"

    def _start(
        self, project_id: str, spec: ServiceSpec, deployment: Deployment, port: int | None
    ) -> Service:
        """Start ``<python> -u -m <module>`` with this process's environment plus
        ``spec.env``; its handle is ``{"name", "pid", "start_ticks", "boot", "log_path"}``."""
        assert deployment.python is not None  # checked by _check
        log_dir = self.workdir / project_id
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{spec.name}.log"
        log_file = log_path.open("ab")
        try:
            process = subprocess.Popen(
                [str(deployment.python), "-u", "-m", spec.module],
                env=_service_environment(spec.env),
                cwd=spec.env.get(env_vars.ML_REPO_DIR),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            log_file.close()
            raise
        logger.info("project %s: started %s (pid %d)", project_id, spec.name, process.pid)
        identity = ProcessIdentity.of(process.pid) or ProcessIdentity(process.pid, -1, "")
        return _Process(spec.name, identity, log_path, process, log_file)

    def _poll(self, service: Service) -> ServiceExit | None:
        assert isinstance(service, _Process)
        exited, code = service.exit_status()
        return ServiceExit(code, last_line(service.log_path)) if exited else None

    def _remove(self, service: Service) -> None:
        self._remove_services("", [service])

    def _remove_services(self, project_id: str, services: list[Service]) -> None:
        """SIGTERM every service's process group at once, SIGKILL after ``STOP_TIMEOUT_S``."""
        local = [s for s in services if isinstance(s, _Process)]
        adopted = [s.identity for s in local if s.process is None]
        for identity in adopted:
            identity.signal_group(signal.SIGTERM)
        stop_process_groups([s.process for s in local if s.process is not None], STOP_TIMEOUT_S)
        for identity in adopted:
            identity.stop_group(STOP_TIMEOUT_S)
        for service in local:
            service.close_log()

    def _release(self, service: Service) -> None:
        if isinstance(service, _Process):
            service.close_log()

    def _reattach_one(
        self, project_id: str, handle: ServiceHandle
    ) -> tuple[Service | None, ServiceState]:
        """A handle whose process is gone, or now belongs to another program, is not
        running; either way the state carries its log's last line."""
        name = str(handle.get("name", "?"))
        log_path = Path(str(handle.get("log_path", "")))
        identity = ProcessIdentity.from_dict(handle)
        running = identity is not None and identity.is_alive()
        state = ServiceState(name, running, last_line(log_path))
        if identity is None or not running:
            return None, state
        return _Process(name, identity, log_path), state


def _service_environment(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment plus ``extra``, with bytecode caching switched back on.

    The built environments are FLOps' own, so services may write ``__pycache__`` there: a
    learner then imports flwr, datasets and scikit-learn in about 2.7 s of CPU instead of 7 s.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **extra}


def from_config(
    config: object, workdir: Path, on_service_exit: ServiceExitCallback
) -> Orchestrator:
    """The ``local`` orchestrator (it needs no settings beyond ``workdir``, where logs go)."""
    return LocalOrchestrator(workdir, on_service_exit)
