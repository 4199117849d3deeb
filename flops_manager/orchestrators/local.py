"""The ``local`` orchestrator: every FL service is a child process on this machine.

Each service runs ``<env python> -m <module>`` in its own process group (so stopping it
also stops anything it spawned, and it outlives a manager that is killed), logging to
``<workdir>/<project_id>/<service>.log``. A watcher thread polls the processes every
``POLL_INTERVAL_S`` and reports services that exit on their own through ``on_service_exit``.

Re-attach: a service's handle is its :class:`~flops_manager.process_identity.ProcessIdentity`
(pid, start time, boot id) and log path. A later manager process re-attaches to a service that
still runs by polling ``/proc`` for it: it is not that manager's child, so its exit code is
unknown (reported as ``None``) and its last log line is the exit reason there is.
"""

import os
import re
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flops_manager.orchestrators.base import (
    Deployment,
    Orchestrator,
    ServiceExitCallback,
    ServiceHandle,
    ServiceStartedCallback,
    ServiceState,
)
from flops_manager.process_identity import ProcessIdentity
from flops_utils import env_vars
from flops_utils.logging import logger
from flops_utils.processes import stop_process_groups

POLL_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 10.0


@dataclass
class _Service:
    """A watched service: ``process`` is set for this manager's children, ``None`` for a
    re-attached one (then only ``identity`` tells whether it still runs)."""

    name: str
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


class LocalOrchestrator(Orchestrator):
    """Runs services as child processes.

    Args:
        workdir: where service logs go.
        on_service_exit: see :class:`Orchestrator`.
    """

    def __init__(self, workdir: Path, on_service_exit: ServiceExitCallback) -> None:
        super().__init__(on_service_exit)
        self.workdir = workdir
        self._projects: dict[str, list[_Service]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="local-watch", daemon=True)
        self._watcher.start()

    def deploy(
        self, deployment: Deployment, on_started: ServiceStartedCallback | None = None
    ) -> None:
        """Start every service; the services' environment is this process's plus ``spec.env``.

        ``on_started`` gets ``{"name", "pid", "start_ticks", "boot", "log_path"}`` per service.
        """
        if deployment.python is None:
            raise ValueError("the local orchestrator runs virtualenvs: Deployment.python is unset")
        log_dir = self.workdir / deployment.project_id
        log_dir.mkdir(parents=True, exist_ok=True)
        for spec in deployment.services:
            log_path = log_dir / f"{spec.name}.log"
            log_file = log_path.open("ab")
            process = subprocess.Popen(
                [str(deployment.python), "-u", "-m", spec.module],
                env=_service_environment(spec.env),
                cwd=spec.env.get(env_vars.ML_REPO_DIR),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            logger.info(
                "project %s: started %s (pid %d)", deployment.project_id, spec.name, process.pid
            )
            identity = ProcessIdentity.of(process.pid) or ProcessIdentity(process.pid, -1, "")
            service = _Service(spec.name, identity, log_path, process, log_file)
            with self._lock:
                self._projects.setdefault(deployment.project_id, []).append(service)
            if on_started is not None:
                on_started(service.handle())

    def reattach(self, project_id: str, handles: Sequence[ServiceHandle]) -> list[ServiceState]:
        """Watch again the services of ``handles`` that still run (see the module docstring);
        a handle whose process is gone, or now belongs to another program, is reported as not
        running with its log's last line."""
        states = []
        for handle in handles:
            name = str(handle.get("name", "?"))
            log_path = Path(str(handle.get("log_path", "")))
            identity = ProcessIdentity.from_dict(handle)
            running = identity is not None and identity.is_alive()
            if identity is not None and running:
                with self._lock:
                    known = {s.name for s in self._projects.get(project_id, [])}
                    if name not in known:
                        self._projects.setdefault(project_id, []).append(
                            _Service(name, identity, log_path)
                        )
                logger.info("project %s: re-attached %s (pid %d)", project_id, name, identity.pid)
            states.append(ServiceState(name, running, last_line(log_path)))
        return states

    def stop(self, project_id: str) -> None:
        """SIGTERM each service's process group, SIGKILL after ``STOP_TIMEOUT_S``."""
        with self._lock:
            services = self._projects.pop(project_id, [])
        adopted = [s.identity for s in services if s.process is None]
        for identity in adopted:
            identity.signal_group(signal.SIGTERM)
        stop_process_groups([s.process for s in services if s.process is not None], STOP_TIMEOUT_S)
        for identity in adopted:
            identity.stop_group(STOP_TIMEOUT_S)
        for service in services:
            if service.log_file is not None:
                service.log_file.close()

    def running_services(self, project_id: str) -> list[str]:
        """Names of the project's services whose process is alive."""
        with self._lock:
            services = list(self._projects.get(project_id, []))
        return [s.name for s in services if not s.exit_status()[0]]

    def close(self, stop_services: bool = True) -> None:
        """Stop the watcher thread and, with ``stop_services``, every project's services
        (else they keep running, and their handles let the next manager re-attach)."""
        self._closed.set()
        with self._lock:
            project_ids = list(self._projects)
        if stop_services:
            for project_id in project_ids:
                self.stop(project_id)
        else:
            with self._lock:
                services = [s for ss in self._projects.values() for s in ss]
                self._projects.clear()
            for service in services:
                if service.log_file is not None:
                    service.log_file.close()
        self._watcher.join(timeout=5)

    def _watch(self) -> None:
        reported: set[int] = set()
        while not self._closed.wait(POLL_INTERVAL_S):
            with self._lock:
                items = [(pid, s) for pid, ss in self._projects.items() for s in ss]
            for project_id, service in items:
                exited, code = service.exit_status()
                if not exited or service.identity.pid in reported:
                    continue
                reported.add(service.identity.pid)
                try:
                    self.on_service_exit(
                        project_id, service.name, code, last_line(service.log_path)
                    )
                except Exception:
                    logger.exception("service exit handler failed")


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
