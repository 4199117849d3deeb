"""The programs a build runs: bounded in time, in their own process group, killable per build.

Every program a builder runs (git, uv, buildah, skopeo, the interpreter of a new environment,
the image builder service) goes through :func:`run_bounded`:

- it runs in its own session (process group), so that stopping it also stops what it spawned
  (git's ``git-remote-https``, uv's build backends);
- it is stopped after ``timeout_s`` seconds, or when an optional ``watch`` callback returns an
  error (the size cap of a fetch), and the caller's error is raised;
- it belongs to the :class:`BuildScope` of the build that runs it (a context variable that
  :meth:`BuildRegistry.scope` sets for the ``with`` block, in the thread that builds):
  :meth:`BuildRegistry.cancel` stops every running program of one build at once and makes the
  build raise :class:`~image_builder.errors.BuildCancelled`; a cancelled build starts no
  program any more.

Stopping is SIGTERM to the group, up to ``stop_grace_s`` seconds (default
:data:`STOP_GRACE_S`) of waiting, then SIGKILL to the group
(:func:`flops_utils.processes.stop_process_groups`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any

from flops_utils.processes import signal_group, stop_process_groups
from image_builder.errors import BuildCancelled

POLL_INTERVAL_S = 0.1
"""How often a running program is checked for cancellation, its deadline and ``watch``."""

STOP_GRACE_S = 5.0
"""Seconds a stopped program gets between SIGTERM and SIGKILL."""


class BuildScope:
    """The running programs of one build (``name``: its project id) and whether it was
    cancelled. Thread-safe: :meth:`cancel` is called from another thread than the build's."""

    def __init__(self, name: str) -> None:
        self.name = name
        # reentrant: cancel() may run in a signal handler of the thread that holds it
        self._lock = threading.RLock()
        self._processes: set[subprocess.Popen[Any]] = set()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def pids(self) -> list[int]:
        """Process ids (= process group ids) of the programs running now."""
        with self._lock:
            return sorted(process.pid for process in self._processes)

    def check(self) -> None:
        """Raise :class:`BuildCancelled` if the build was cancelled."""
        if self.cancelled:
            raise BuildCancelled(f"The build of {self.name} was cancelled.")

    def cancel(self) -> list[int]:
        """Mark the build cancelled and send SIGTERM to the group of each running program
        (:func:`run_bounded` escalates to SIGKILL). Returns the signalled process ids."""
        with self._lock:
            self._cancelled.set()
            running = list(self._processes)
        for process in running:
            signal_group(process.pid, signal.SIGTERM)
        return [process.pid for process in running]

    def _add(self, process: subprocess.Popen[Any]) -> None:
        with self._lock:
            self._processes.add(process)
            cancelled = self._cancelled.is_set()
        if cancelled:  # cancelled between the check and the start
            signal_group(process.pid, signal.SIGTERM)

    def _remove(self, process: subprocess.Popen[Any]) -> None:
        with self._lock:
            self._processes.discard(process)


_current: ContextVar[BuildScope | None] = ContextVar("flops_build_scope", default=None)


def current_scope() -> BuildScope | None:
    """The :class:`BuildScope` of the build running in this context, if any."""
    return _current.get()


class BuildRegistry:
    """The builds running in this process, by key (the project id)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scopes: dict[str, BuildScope] = {}

    @contextmanager
    def scope(self, key: str) -> Iterator[BuildScope]:
        """Run the ``with`` block as the build ``key``: programs it starts through
        :func:`run_bounded` (in this thread or context) belong to it."""
        scope = BuildScope(key)
        with self._lock:
            self._scopes[key] = scope
        token = _current.set(scope)
        try:
            yield scope
        finally:
            _current.reset(token)
            with self._lock:
                if self._scopes.get(key) is scope:
                    del self._scopes[key]

    def get(self, key: str) -> BuildScope | None:
        """The running build ``key``, or ``None``."""
        with self._lock:
            return self._scopes.get(key)

    def cancel(self, key: str) -> bool:
        """Cancel the running build ``key`` (see :meth:`BuildScope.cancel`); ``False`` when no
        build of ``key`` is running."""
        scope = self.get(key)
        if scope is None:
            return False
        scope.cancel()
        return True


def run_bounded(
    command: Sequence[str],
    *,
    timeout_s: float,
    timeout_error: Callable[[], Exception],
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    stdout: IO[Any] | None = None,
    watch: Callable[[], Exception | None] | None = None,
    stop_grace_s: float = STOP_GRACE_S,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in its own session and return its result (exit status not checked).

    Output: text stdout and stderr captured, or with ``stdout`` (an open file) both go there
    and the result holds ``None``. ``timeout_s``: seconds until the program is stopped and
    ``timeout_error()`` raised. ``watch()``: called every :data:`POLL_INTERVAL_S` seconds while
    the program runs; an error it returns stops the program and is raised. Raises
    :class:`BuildCancelled` when the build's scope is (or gets) cancelled. ``stdin`` is
    ``/dev/null``.
    """
    scope = current_scope()
    if scope is not None:
        scope.check()
    capture = stdout is None
    process = subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else stdout,
        stderr=subprocess.PIPE if capture else subprocess.STDOUT,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    if scope is not None:
        scope._add(process)
    try:
        out, err = _wait(process, scope, time.monotonic() + timeout_s, timeout_error, watch,
                         stop_grace_s)  # fmt: skip
    finally:
        if scope is not None:
            scope._remove(process)
        if process.poll() is None:  # an exception (KeyboardInterrupt) left it running
            _stop(process, stop_grace_s)
    if scope is not None and scope.cancelled:
        # It ended on the cancel's SIGTERM: its result means nothing, and what it spawned
        # in its group may still be stopping.
        signal_group(process.pid, signal.SIGKILL)
        scope.check()
    return subprocess.CompletedProcess(list(command), int(process.returncode), out, err)


def _wait(
    process: subprocess.Popen[str],
    scope: BuildScope | None,
    deadline: float,
    timeout_error: Callable[[], Exception],
    watch: Callable[[], Exception | None] | None,
    stop_grace_s: float,
) -> tuple[str | None, str | None]:
    """Wait for ``process`` (reading its pipes); stop it and raise on cancel, deadline or a
    ``watch`` error."""
    while True:
        remaining = deadline - time.monotonic()
        try:
            return process.communicate(timeout=max(0.0, min(POLL_INTERVAL_S, remaining)))
        except subprocess.TimeoutExpired:
            pass
        problem: Exception | None = None
        if scope is not None and scope.cancelled:
            problem = BuildCancelled(f"The build of {scope.name} was cancelled.")
        elif time.monotonic() >= deadline:
            problem = timeout_error()
        elif watch is not None:
            problem = watch()
        if problem is not None:
            _stop(process, stop_grace_s)
            raise problem


def _stop(process: subprocess.Popen[Any], grace_s: float) -> None:
    """Stop ``process``'s group and close its pipes (a straggler outside the group that holds
    them must not block the caller)."""
    stop_process_groups([process], timeout_s=grace_s)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def process_exists(pid: int) -> bool:
    """True while a process (not a zombie) with ``pid`` exists (Linux ``/proc``)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[-1].split()[0] != "Z"


def group_exists(pgid: int) -> bool:
    """True while a process group ``pgid`` has a member."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
