"""Stopping child processes that run in their own process group (``start_new_session=True``).

Every long-running child FLOps starts (Mosquitto, MLflow, data servers, learners, aggregators)
gets its own session, so that stopping it also stops whatever it spawned (MLflow's uvicorn
workers, for instance).
"""

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

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
