"""Stopping child processes that run in their own process group (``start_new_session=True``).

Every long-running child FLOps starts (Mosquitto, MLflow, data servers, learners, aggregators)
gets its own session, so that stopping it also stops whatever it spawned (MLflow's uvicorn
workers, for instance).
"""

import contextlib
import os
import signal
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

STOP_TIMEOUT_S = 10.0


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``pid``; a group that is gone is ignored."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_process_groups(
    processes: Sequence["subprocess.Popen[Any]"], timeout_s: float = STOP_TIMEOUT_S
) -> None:
    """Stop each process's group: SIGTERM to all at once, then per process a wait of up to
    ``timeout_s`` seconds, SIGKILL to the group if it is still there, and a last SIGKILL for
    stragglers left in the group. Returns when every process has been reaped."""
    for process in processes:
        signal_group(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)
        signal_group(process.pid, signal.SIGKILL)


def run_to_log(
    command: Sequence[str],
    log_path: "os.PathLike[str] | str",
    timeout_s: float,
    *,
    env: dict[str, str] | None = None,
    header: str = "",
) -> int | None:
    """Run ``command`` in its own session with stdout and stderr appended to ``log_path``
    (after ``header``, if given) and return its exit status; ``None`` when it did not end
    within ``timeout_s`` seconds (its process group is then stopped). A file, not a pipe, so
    that a long build cannot block on a full pipe."""
    with open(log_path, "ab") as log:
        if header:
            log.write(header.encode())
            log.flush()
        process = subprocess.Popen(
            list(command), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process_groups([process])
            return None


class StartStop(ABC):
    """A component with ``start()`` and ``stop()`` that is also a context manager:
    ``with Component(...) as running:`` starts it and stops it on exit."""

    @abstractmethod
    def start(self) -> object:
        """Start the component (and wait until it is ready)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the component; a no-op when it is not running."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
