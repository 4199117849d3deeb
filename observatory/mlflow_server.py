"""The embedded MLflow tracking server: ``mlflow server`` as a child process.

The server keeps runs and the model registry in SQLite (``<workdir>/mlflow.db``) and serves
artifacts itself (``--serve-artifacts``, stored under ``<workdir>/artifacts``), so clients
only ever talk HTTP to it and need no storage credentials. It runs in its own process group
so that stopping it also stops its uvicorn worker.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.net import find_free_port
from flops_utils.processes import StartStop, stop_process_groups

START_TIMEOUT_S = 90.0
"""Seconds to wait for ``GET /health`` to answer after starting the server."""

STOP_TIMEOUT_S = 10.0
"""Seconds to wait after SIGTERM before the process group gets SIGKILL."""

LOG_TAIL_CHARS = 1500
"""How much of the server's log a start failure quotes."""

OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}
"""Environment of the server: no usage telemetry (it would try the internet), and no job
runner (MLflow's GenAI jobs, unused by FLOps; it starts seven more processes, which slow the
server's start and stop on a small machine)."""


class MlflowServerError(FlopsError):
    """The MLflow tracking server did not start (the message quotes its log)."""

    code = "mlflow_unavailable"


class MlflowServer(StartStop):
    """An MLflow tracking server on ``host:port`` (port 0 picks a free one).

    Args:
        workdir: directory for ``mlflow.db``, ``artifacts/`` and ``mlflow.log``; created if
            missing. Reusing a workdir keeps earlier experiments and models.
        host: interface to bind. Defaults to loopback.
        port: TCP port; 0 picks a free one.
        start_timeout_s: seconds :meth:`start` waits for ``/health``. Defaults to
            :data:`START_TIMEOUT_S`.

    Use as a context manager or call :meth:`start` / :meth:`stop` (or :meth:`detach`). ``url`` is
    ``http://HOST:PORT``; ``start_seconds`` is how long the last successful :meth:`start`
    took; ``pid`` is the last started server process (also its process group id).
    """

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port or find_free_port(host)
        self.start_timeout_s = start_timeout_s
        self.start_seconds: float | None = None
        self.pid: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the tracking server (the value of ``FLOPS_MLFLOW_URL``)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The file the server's stdout and stderr go to."""
        return self.workdir / "mlflow.log"

    def command(self) -> list[str]:
        """The argument list that starts the server with this interpreter's MLflow."""
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}",
            "--artifacts-destination",
            str((self.workdir / "artifacts").resolve()),
            "--serve-artifacts",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def start(self) -> "MlflowServer":
        """Start the server and wait until ``GET /health`` answers 200.

        Returns ``self``. Raises :class:`MlflowServerError` when the port is taken, and quoting
        the log's tail when the process exits early or ``/health`` does not answer within
        ``start_timeout_s`` seconds (the process group is stopped then).
        """
        if self._process is not None:
            return self
        self._check_port_free()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "artifacts").mkdir(exist_ok=True)
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env={**os.environ, **OFFLINE_ENV},
                start_new_session=True,
            )
        self.pid = self._process.pid
        deadline = began + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise MlflowServerError(
                    f"The MLflow server exited with code {code} while starting on {self.url}; "
                    f"fix the cause in its log ({self.log_path}): {self._log_tail()}"
                )
            if self.healthy(timeout_s=1.0):
                self.start_seconds = time.monotonic() - began
                logger.info("MLflow server up at %s in %.1fs", self.url, self.start_seconds)
                return self
            time.sleep(0.2)
        self.stop()
        raise MlflowServerError(
            f"The MLflow server did not answer on {self.url}/health within "
            f"{self.start_timeout_s:g}s; see {self.log_path}: {self._log_tail()}"
        )

    def _check_port_free(self) -> None:
        """Fail fast (instead of after MLflow's slow start) when the port is taken."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As uvicorn does; a listening socket still makes the bind fail.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
            except OSError as exc:
                raise MlflowServerError(
                    f"Cannot start the MLflow server on {self.host}:{self.port} ({exc.strerror}); "
                    "stop the process using that port or choose another port."
                ) from exc

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """Whether ``GET /health`` answers 200 within ``timeout_s`` seconds."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout_s) as response:
                return int(response.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def running(self) -> bool:
        """Whether the server process started by :meth:`start` is still alive."""
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Stop the server's process group: SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``.

        A no-op when the server is not running.
        """
        process, self._process = self._process, None
        if process is None:
            return
        # The group: the uvicorn worker may outlive its parent for a moment.
        stop_process_groups([process], STOP_TIMEOUT_S)

    def detach(self) -> None:
        """Forget the server without stopping it: it keeps serving after this process exits
        (the FLOps manager leaves it to the projects still running and re-uses it when it
        starts again). :meth:`stop` is a no-op afterwards."""
        self._process = None

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-LOG_TAIL_CHARS:].strip() or "(empty log)"
