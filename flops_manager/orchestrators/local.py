"""The ``local`` orchestrator: every FL service is a child process on this machine.

Each service runs ``<env python> -m <module>`` in its own process group (so stopping it
also stops anything it spawned), logging to ``<workdir>/<project_id>/<service>.log``.
A watcher thread polls the processes every ``POLL_INTERVAL_S`` and reports services that
exit on their own through ``on_service_exit``.
"""

import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flops_manager.orchestrators.base import (
    Deployment,
    Orchestrator,
    ServiceExitCallback,
)
from flops_utils import env_vars
from flops_utils.logging import logger
from flops_utils.processes import stop_process_groups

POLL_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 10.0


@dataclass
class _Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


def last_line(path: Path, max_bytes: int = 4096) -> str:
    """The last non-empty line of a log file (read from its last ``max_bytes`` bytes)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


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

    def deploy(self, deployment: Deployment) -> None:
        """Start every service; the services' environment is this process's plus ``spec.env``."""
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
            with self._lock:
                self._projects.setdefault(deployment.project_id, []).append(
                    _Service(spec.name, process, log_path, log_file)
                )

    def stop(self, project_id: str) -> None:
        """SIGTERM each service's process group, SIGKILL after ``STOP_TIMEOUT_S``."""
        with self._lock:
            services = self._projects.pop(project_id, [])
        stop_process_groups([s.process for s in services], STOP_TIMEOUT_S)
        for service in services:
            service.log_file.close()

    def running_services(self, project_id: str) -> list[str]:
        """Names of the project's services whose process is alive."""
        with self._lock:
            services = list(self._projects.get(project_id, []))
        return [s.name for s in services if s.process.poll() is None]

    def close(self) -> None:
        """Stop all projects and the watcher thread."""
        self._closed.set()
        with self._lock:
            project_ids = list(self._projects)
        for project_id in project_ids:
            self.stop(project_id)
        self._watcher.join(timeout=5)

    def _watch(self) -> None:
        reported: set[int] = set()
        while not self._closed.wait(POLL_INTERVAL_S):
            with self._lock:
                items = [(pid, s) for pid, ss in self._projects.items() for s in ss]
            for project_id, service in items:
                code = service.process.poll()
                if code is None or service.process.pid in reported:
                    continue
                reported.add(service.process.pid)
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
