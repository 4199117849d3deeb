"""A real MongoDB wire-protocol server for tests: ``secantusd-py`` (PyPI ``secantusdb``, a dev
dependency) on loopback, so that the pymongo store is exercised over the wire."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import pymongo
import pymongo.errors

from flops_utils.net import find_free_port
from flops_utils.processes import stop_process_groups

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
EXECUTABLE = "secantusd-py"


class MongoServerUnavailable(Exception):
    """``secantusd-py`` is not installed or did not answer a ping in time."""


def find_secantusd() -> str:
    """The path of ``secantusd-py`` (beside the interpreter, else on ``PATH``).

    Raises ``MongoServerUnavailable`` naming the install command when it is missing.
    """
    beside = Path(sys.executable).parent / EXECUTABLE
    found = str(beside) if beside.exists() else shutil.which(EXECUTABLE)
    if found is None:
        raise MongoServerUnavailable(
            f"{EXECUTABLE} is not installed; run 'uv sync' (the dev group has secantusdb)"
        )
    return found


class SecantusServer:
    """``secantusd-py --standalone`` on ``127.0.0.1:<free port>`` storing in ``workdir``.

    Use as a context manager: entering returns once pymongo can ping it
    (``MongoServerUnavailable`` after ``START_TIMEOUT_S``, quoting the log), leaving stops it
    (SIGTERM, SIGKILL after ``STOP_TIMEOUT_S``). ``url`` is ``mongodb://127.0.0.1:PORT``;
    append ``/DATABASE`` for a database of one's own.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = find_free_port(self.host)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mongodb://HOST:PORT`` of the server."""
        return f"mongodb://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The server's stdout and stderr."""
        return self.workdir / "secantusd.log"

    def start(self) -> SecantusServer:
        """Start the server and wait until it answers a ping."""
        command = [find_secantusd(), "--host", self.host, "--port", str(self.port)]
        command += ["--storage-path", str(self.workdir / "data"), "--standalone"]
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        if not self._wait_for_ping(START_TIMEOUT_S):
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-1500:].strip()
            raise MongoServerUnavailable(f"{EXECUTABLE} did not answer on {self.url}: {tail}")
        return self

    def _wait_for_ping(self, timeout_s: float) -> bool:
        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
            self.url, serverSelectionTimeoutMS=500
        )
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self._process is not None and self._process.poll() is not None:
                    return False
                try:
                    client.admin.command("ping")
                    return True
                except pymongo.errors.ConnectionFailure:
                    time.sleep(0.1)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server; a no-op when it is not running."""
        if self._process is None:
            return
        stop_process_groups([self._process], STOP_TIMEOUT_S)
        self._process = None

    def __enter__(self) -> SecantusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
