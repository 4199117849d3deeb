"""Supervision of the manager's components, and the health report ``GET /healthz`` serves.

The embedded Mosquitto, MLflow and OCI registry (those the suite started or re-used) are
watched by one thread each: every :data:`POLL_INTERVAL_S` it checks that the process still runs
(its :class:`~flops_manager.process_identity.ProcessIdentity`) and that it serves on its port.
A crash is logged at ERROR once (component, pid, how it ended), the component is reported
``restarting`` and started again **on the same port and workdir**: Mosquitto keeps its
persistence file and its dynamic-security state (so the credentials it issued stay valid),
MLflow its backend store, artifacts and basic-auth database, the registry its image storage.
The new process is recorded in
``embedded.json`` and the recovery is logged at WARNING with the downtime. A restart that
fails (another program took the port, the executable is gone) is retried after 1, 2, 4 ... up
to :data:`MAX_BACKOFF_S` seconds while the component is reported ``down``; the port is never
changed, since the running services use it. A process that runs but does not answer for
:data:`HUNG_TIMEOUT_S` is treated as crashed.

An external broker or tracking server (``FLOPS_MQTT_URL`` / ``FLOPS_MLFLOW_URL``) and the
project store are only probed, every :data:`PROBE_INTERVAL_S`; a change of their state is
logged.

:meth:`Supervisor.health` is what ``GET /healthz`` answers: the cached states, never a probe
per request. It is public, so its ``detail`` texts hold no host path, URL or secret.
"""

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flops_manager.embedded import EmbeddedComponent, EmbeddedState
from flops_utils.logging import logger

POLL_INTERVAL_S = 1.0
"""Seconds between two checks of an embedded component."""

PROBE_INTERVAL_S = 5.0
"""Seconds between two probes of an external component or the project store."""

ANSWER_TIMEOUT_S = 2.0
"""Seconds one check waits for a component's answer."""

HUNG_TIMEOUT_S = 30.0
"""Seconds an embedded component's process may run without answering before it is restarted
(a busy MLflow on a small machine can miss a few checks)."""

SILENT_GRACE_S = 5.0
"""Seconds a running component may miss checks before it is reported ``down``."""

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
"""Delays between restart attempts: 1, 2, 4 ... up to 30 s (exponential backoff)."""

OK = "ok"
RESTARTING = "restarting"
DOWN = "down"

LABELS = {
    "mqtt": "MQTT broker (Mosquitto)",
    "mlflow": "MLflow tracking server",
    "registry": "OCI registry (docker-registry)",
    "store": "project store",
}
"""How log lines name the components."""


@dataclass(frozen=True)
class ComponentState:
    """One component's health: ``status`` (``ok``, ``restarting`` or ``down``) and a public
    ``detail`` (no path, URL or secret)."""

    status: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        """``{"status": ..., "detail": ...}`` (``detail`` only when there is one)."""
        return {"status": self.status, **({"detail": self.detail} if self.detail else {})}


Probe = Callable[[], bool]
"""Whether an external component answers now (called from the supervisor's threads)."""


class Supervisor:
    """Watches the embedded components (restarting them) and probes the others.

    Args:
        embedded: the embedded components to supervise (``ManagerSuite._broker/_mlflow``).
        state: ``embedded.json``, where a restarted process is recorded.
        probes: name → :data:`Probe` of each component that is only probed (an external
            broker or tracking server, ``store``).
        poll_interval_s / probe_interval_s: see :data:`POLL_INTERVAL_S`,
            :data:`PROBE_INTERVAL_S`.

    :meth:`start` starts one daemon thread per component; :meth:`stop` ends them (a restart
    in progress is cancelled; none begins afterwards). :meth:`health` is thread-safe.
    """

    def __init__(
        self,
        embedded: list[EmbeddedComponent],
        state: EmbeddedState,
        probes: dict[str, Probe],
        poll_interval_s: float = POLL_INTERVAL_S,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.embedded = embedded
        self.state = state
        self.probes = probes
        self.poll_interval_s = poll_interval_s
        self.probe_interval_s = probe_interval_s
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._states: dict[str, ComponentState] = {c.name: ComponentState(OK) for c in embedded}
        self._threads: list[threading.Thread] = []

    def start(self) -> "Supervisor":
        """Probe the probed components once (so that the first health report is true) and
        start the watching threads. Returns ``self``."""
        for name, probe in self.probes.items():
            self._probe(name, probe, first=True)
        for component in self.embedded:
            self._spawn(f"supervise-{component.name}", self._watch, component)
        for name, probe in self.probes.items():
            self._spawn(f"probe-{name}", self._probe_loop, name, probe)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop supervising: no restart begins after this call, one in progress is cancelled;
        waits up to ``timeout_s`` seconds for the threads."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []

    def health(self) -> dict[str, Any]:
        """``{"status": "ok" | "degraded", "components": {"api": {"status": "ok"}, NAME:
        {"status": "ok" | "restarting" | "down", "detail": str}}}``: ``degraded`` when any
        component is not ``ok``. The API answers, so ``api`` is ``ok``."""
        with self._lock:
            states = dict(self._states)
        components = {"api": {"status": OK}, **{n: s.to_dict() for n, s in states.items()}}
        degraded = any(s.status != OK for s in states.values())
        return {"status": "degraded" if degraded else OK, "components": components}

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _set(self, name: str, state: ComponentState) -> None:
        with self._lock:
            self._states[name] = state

    # embedded components ------------------------------------------------------------------
    def _watch(self, component: EmbeddedComponent) -> None:
        """Check ``component`` every poll interval; restart it when it crashed or hangs."""
        silent_since: float | None = None
        while not self._stopping.wait(self.poll_interval_s):
            if not component.alive():
                self._recover(component, component.how_it_ended())
                silent_since = None
            elif component.answers(ANSWER_TIMEOUT_S):
                silent_since = None
                self._set(component.name, ComponentState(OK))
            else:
                silent_since = silent_since or time.monotonic()
                silent_s = time.monotonic() - silent_since
                if silent_s >= HUNG_TIMEOUT_S:
                    self._recover(component, f"it did not answer for {silent_s:.0f} s")
                    silent_since = None
                elif silent_s >= SILENT_GRACE_S:
                    detail = f"the process runs but does not answer (for {silent_s:.0f} s)"
                    self._set(component.name, ComponentState(DOWN, detail))

    def _recover(self, component: EmbeddedComponent, how: str) -> None:
        """Log the crash, restart ``component`` on its port (retrying with backoff) and log
        the recovery; returns early when the supervisor stops."""
        if self._stopping.is_set():
            return
        label = LABELS.get(component.name, component.name)
        down_since = time.monotonic()
        logger.error(
            "the embedded %s (pid %s) ended: %s; restarting it on port %d",
            label,
            component.pid if component.pid is not None else "?",
            how,
            component.port,
        )
        self._set(component.name, ComponentState(RESTARTING, f"crashed ({how}); restarting"))
        attempt = 0
        while not self._stopping.is_set():
            attempt += 1
            try:
                component.restart(self.state, self._stopping)
            except Exception as exc:
                if self._stopping.is_set():
                    return
                self._restart_failed(component, label, attempt, exc)
                if self._stopping.wait(backoff_s(attempt)):
                    return
                self._set(component.name, ComponentState(RESTARTING, f"attempt {attempt + 1}"))
                continue
            downtime_s = time.monotonic() - down_since
            logger.warning(
                "the embedded %s is back on port %d (pid %s) after %.1f s down",
                label,
                component.port,
                component.pid if component.pid is not None else "?",
                downtime_s,
            )
            self._set(component.name, ComponentState(OK))
            return

    def _restart_failed(
        self, component: EmbeddedComponent, label: str, attempt: int, exc: Exception
    ) -> None:
        delay_s = backoff_s(attempt)
        logger.error(
            "restarting the embedded %s on port %d failed (attempt %d): %s; next attempt in "
            "%g s. The port stays %d: the running services use it; if another program took "
            "it, stop that program.",
            label,
            component.port,
            attempt,
            exc,
            delay_s,
            component.port,
        )
        detail = (
            f"restart attempt {attempt} failed ({type(exc).__name__}); "
            f"next attempt in {delay_s:g} s"
        )
        self._set(component.name, ComponentState(DOWN, detail))

    # probed components ---------------------------------------------------------------------
    def _probe_loop(self, name: str, probe: Probe) -> None:
        while not self._stopping.wait(self.probe_interval_s):
            self._probe(name, probe)

    def _probe(self, name: str, probe: Probe, first: bool = False) -> None:
        """Probe ``name`` and record its state, logging a change."""
        try:
            answers = probe()
        except Exception:
            answers = False
        with self._lock:
            before = self._states.get(name)
            self._states[name] = (
                ComponentState(OK) if answers else ComponentState(DOWN, "does not answer")
            )
        label = LABELS.get(name, name)
        if not answers and (first or (before is not None and before.status == OK)):
            logger.warning("the %s does not answer (external: not restarted by FLOps)", label)
        elif answers and before is not None and before.status != OK:
            logger.info("the %s answers again", label)


def backoff_s(attempt: int) -> float:
    """The delay after failed restart ``attempt`` (1-based): 1, 2, 4 ... :data:`MAX_BACKOFF_S`."""
    return float(min(FIRST_BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S))


def http_ok(url: str, timeout_s: float = ANSWER_TIMEOUT_S) -> bool:
    """Whether ``GET url`` answers 200 within ``timeout_s`` seconds (the probe of an external
    tracking server's ``/health``)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status) == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False
