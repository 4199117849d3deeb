"""Recognising a process again after the manager restarted, and stopping it without ``Popen``.

A pid alone is not an identity: after the process ends the kernel may give its pid to another
one. :class:`ProcessIdentity` adds the process's start time (clock ticks since boot, field 22
of ``/proc/<pid>/stat``, see proc(5)) and the boot id (``/proc/sys/kernel/random/boot_id``),
so a recorded identity matches only the very process it was taken from. Linux only.

The manager records identities of what it starts (Mosquitto, MLflow, learners, aggregators)
and, after a restart, uses them to re-attach to those processes: they are no longer its
children, so their exit codes are unknown and their end is seen by polling ``/proc``.
"""

import contextlib
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROC = Path("/proc")
BOOT_ID_FILE = PROC / "sys" / "kernel" / "random" / "boot_id"
POLL_INTERVAL_S = 0.05


def boot_id() -> str:
    """This boot's id (a UUID string); empty when ``/proc`` does not have it."""
    try:
        return BOOT_ID_FILE.read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state first), or ``None`` when there is no such pid.

    The command name (field 2) is skipped by splitting after its closing parenthesis: it may
    itself contain spaces and parentheses.
    """
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    return text[text.rfind(")") + 2 :].split()


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as recorded: ``pid``, ``start_ticks`` (start time in clock ticks after boot)
    and ``boot`` (the boot id). JSON-friendly through :meth:`to_dict` / :meth:`from_dict`."""

    pid: int
    start_ticks: int
    boot: str

    @classmethod
    def of(cls, pid: int) -> "ProcessIdentity | None":
        """The identity of the running process ``pid``; ``None`` when it does not exist."""
        fields = _stat_fields(pid)
        if fields is None or len(fields) < 20:
            return None
        return cls(pid=pid, start_ticks=int(fields[19]), boot=boot_id())

    def to_dict(self) -> dict[str, Any]:
        """``{"pid": int, "start_ticks": int, "boot": str}``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProcessIdentity | None":
        """Read what :meth:`to_dict` wrote; ``None`` when a field is missing or malformed."""
        try:
            return cls(int(data["pid"]), int(data["start_ticks"]), str(data["boot"]))
        except (KeyError, TypeError, ValueError):
            return None

    def is_alive(self) -> bool:
        """Whether this very process still runs: same boot, same start time, not a zombie."""
        fields = _stat_fields(self.pid)
        if fields is None or len(fields) < 20 or fields[0] in ("Z", "X", "x"):
            return False
        return int(fields[19]) == self.start_ticks and boot_id() == self.boot

    def wait(self, timeout_s: float) -> bool:
        """Poll until the process is gone; ``True`` if it went within ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while self.is_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process group this process leads, if this process still runs."""
        if self.is_alive():
            _signal_group(self.pid, sig)

    def stop_group(self, timeout_s: float) -> None:
        """Stop the process group this process leads (it was started with
        ``start_new_session=True``): SIGTERM, then SIGKILL after ``timeout_s`` seconds.

        A no-op when the process is already gone (its pid may belong to someone else now).
        Returns when the leader is gone or SIGKILL was sent.
        """
        if not self.is_alive():
            return
        _signal_group(self.pid, signal.SIGTERM)
        if not self.wait(timeout_s):
            _signal_group(self.pid, signal.SIGKILL)
            self.wait(timeout_s)
        _signal_group(self.pid, signal.SIGKILL)  # stragglers left in the group


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
