"""The embedded Mosquitto, MLflow and OCI registry, kept at the same addresses across manager
restarts.

Learners and aggregators keep the broker's and the tracking server's URLs
(``FLOPS_MQTT_URL``, ``FLOPS_MLFLOW_URL``) for their whole life, so these addresses must
outlive one manager process. Both components run in their own session, so they survive a
manager that is killed. The manager records each one in ``$FLOPS_HOME/embedded.json``
(``{"mqtt": {"port": int, "host": str, "process": ProcessIdentity | null}, "mlflow": {...},
"registry": {...}}``; image references name the registry's port, so it is kept as well)
and, when it starts again:

- the recorded process still runs (same pid *and* start time) and answers on its port:
  re-use it;
- it runs but does not answer in time: stop it and start a new one on the same port;
- it is gone: start a new one on the recorded port (a free port the first time, or when
  another program took the recorded port; services of the earlier manager then lose their
  broker or tracking server, which is logged).

The operator chooses the interface (``FLOPS_BIND_HOST``) and may fix the ports
(``FLOPS_MQTT_PORT``, ``FLOPS_MLFLOW_PORT``): a recorded process on another interface or port
is stopped and a new one started where asked; a fixed port another program holds fails the
start, naming the variable (it is never replaced by a free one).

A running broker is re-used only when it was started in the mode asked for (authentication on,
or anonymous with ``FLOPS_INSECURE=mqtt``) and the manager's admin credential is still in
``$FLOPS_HOME/mosquitto``; otherwise it is restarted on the same port and workdir (the
credentials it issued survive in its dynamic-security state).

While the manager runs, :mod:`flops_manager.supervision` restarts a component that crashed,
on the same port and workdir (:meth:`EmbeddedComponent.restart`), and records the new process.
A port given or recorded is never replaced by a retry (the error names where it came from);
only a port picked for the first start is.
"""

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from flops_manager.broker import START_TIMEOUT_S as BROKER_START_TIMEOUT_S
from flops_manager.broker import MosquittoBroker, configured_anonymous, local_address
from flops_manager.mqtt_access import MqttCredential, read_credential
from flops_manager.process_identity import ProcessIdentity
from flops_utils.logging import logger
from flops_utils.net import port_answers, wait_for_port

if TYPE_CHECKING:
    from observatory.mlflow_server import MlflowCredential, MlflowServer

STATE_FILE = "embedded.json"
"""Name of the state file under ``$FLOPS_HOME``."""

BROKER_WORKDIR = "mosquitto"
"""The embedded broker's workdir under ``$FLOPS_HOME`` (config, persistence, plugin state and
the manager's admin credential)."""

RECORDED_PORT = f"the port recorded in {STATE_FILE} (services of this manager use it)"
"""The origin a start or restart on a recorded port names when that port is taken."""

STOP_TIMEOUT_S = 10.0
"""Seconds a re-used component gets to stop after SIGTERM before SIGKILL."""

MLFLOW_ADOPT_TIMEOUT_S = 60.0
"""Seconds to wait for a running, recorded MLflow server that does not answer yet (it may have
been starting when the previous manager died) before replacing it."""


class _Child(Protocol):
    @property
    def pid(self) -> int | None: ...
    def stop(self) -> None: ...
    def detach(self) -> None: ...
    def exit_code(self) -> int | None: ...


Relaunch = Callable[[threading.Event], _Child]
"""Starts a component again on its port and workdir (the argument cancels a slow start);
raises the component's ``FlopsError`` when it cannot."""


class EmbeddedComponent:
    """One running embedded component: a child this manager started, or a process a previous
    manager started and this one re-uses (``reused``).

    Args:
        name: ``mqtt`` or ``mlflow`` (the key in ``embedded.json``).
        url: its address (``mqtt://HOST:PORT`` or ``http://HOST:PORT``).
        identity: its process (``None`` when unknown).
        child: the child object when this manager started it, else ``None``.
        port: its port; a restart keeps it (services use it).
        relaunch: starts it again on ``port`` (see :meth:`restart`).
        answers: ``answers(timeout_s)``, whether it serves on ``port`` now.
        host: the interface it listens on (recorded with its port).
        public: the public addresses it accepts (recorded; MLflow's host and origin checks).

    :meth:`stop` stops it either way; :meth:`detach` leaves it running. Not thread-safe: the
    supervisor (``flops_manager.supervision``) is the only one to restart it, and is stopped
    before the suite stops or detaches it.
    """

    def __init__(
        self,
        name: str,
        url: str,
        identity: ProcessIdentity | None,
        child: _Child | None,
        port: int = 0,
        relaunch: Relaunch | None = None,
        answers: Callable[[float], bool] | None = None,
        host: str = "127.0.0.1",
        public: str = "",
    ) -> None:
        self.name = name
        self.host = host
        self.public = public
        self.url = url
        self.identity = identity
        self.reused = child is None
        self.port = port
        self._child = child
        self._relaunch = relaunch
        self._answers = answers

    @property
    def pid(self) -> int | None:
        """The component's process id, when known."""
        return self.identity.pid if self.identity is not None else None

    def alive(self) -> bool:
        """Whether its process still runs (a child that ended is reaped here)."""
        if self._child is not None and self._child.exit_code() is not None:
            return False
        return self.identity is not None and self.identity.is_alive()

    def answers(self, timeout_s: float) -> bool:
        """Whether it serves on its port within ``timeout_s`` seconds (``True`` when this
        component cannot be probed)."""
        return self._answers(timeout_s) if self._answers is not None else True

    def how_it_ended(self) -> str:
        """How its process ended, for a log line: ``exited with code N``, ``killed by
        SIGKILL``, or that it is unknown (a process this manager did not start)."""
        code = self._child.exit_code() if self._child is not None else None
        if code is None:
            return "how it ended is unknown (a process started by an earlier manager)"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
            return f"killed by signal {-code}"
        return f"exited with code {code}"

    def restart(self, state: "EmbeddedState", cancel: threading.Event) -> None:
        """Stop what is left of its process group, start it again on the same port and
        workdir, and record the new process in ``state``.

        Raises the component's ``FlopsError`` (``BrokerUnavailable``, ``MlflowServerError``)
        when it cannot start, e.g. when another program took the port meanwhile (the port is
        never changed: services use it), and ``RuntimeError`` for a component without
        ``relaunch``.
        """
        if self._relaunch is None:
            raise RuntimeError(f"the embedded {self.name} cannot be restarted")
        self._stop_remnants()
        child = self._relaunch(cancel)
        self._child = child
        self.reused = False
        self.identity = ProcessIdentity.of(child.pid) if child.pid is not None else None
        state.record(self.name, self.port, self.identity, self.host, self.public)

    def _stop_remnants(self) -> None:
        """SIGKILL the rest of its process group (MLflow's uvicorn worker outlives a killed
        parent and would keep the port)."""
        if self._child is not None:
            self._child.stop()  # reaps it and kills its group
        elif self.identity is not None:
            self.identity.stop_group(STOP_TIMEOUT_S)
            kill_group_remnants(self.identity.pid)

    def stop(self) -> None:
        """Stop the component (SIGTERM to its process group, SIGKILL after a timeout)."""
        if self._child is not None:
            self._child.stop()
        elif self.identity is not None:
            self.identity.stop_group(STOP_TIMEOUT_S)

    def detach(self) -> None:
        """Leave the component running after this process exits."""
        if self._child is not None:
            self._child.detach()


def kill_group_remnants(pgid: int) -> None:
    """SIGKILL the process group ``pgid`` when processes of it still run (its leader may be
    gone). The group id cannot be reused by the kernel while any member runs, so this cannot
    hit another program's group."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            return


class EmbeddedState:
    """``$FLOPS_HOME/embedded.json``: the port and process of each embedded component.

    Thread-safe; every :meth:`record` rewrites the file atomically (temp file + rename).
    """

    def __init__(self, home: Path) -> None:
        self.path = home / STATE_FILE
        self._lock = threading.Lock()
        try:
            data = json.loads(self.path.read_text())
            self._data: dict[str, Any] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self._data = {}

    def port(self, name: str) -> int:
        """The recorded port of ``name`` (``mqtt`` or ``mlflow``); 0 when none is recorded."""
        entry = self._data.get(name) or {}
        port = entry.get("port", 0)
        return port if isinstance(port, int) and 0 < port < 65536 else 0

    def host(self, name: str) -> str:
        """The recorded interface of ``name``; loopback when none is recorded (the only one
        before the interface could be chosen)."""
        entry = self._data.get(name) or {}
        host = entry.get("host")
        return host if isinstance(host, str) and host else "127.0.0.1"

    def process(self, name: str) -> ProcessIdentity | None:
        """The recorded process of ``name``, or ``None``."""
        entry = self._data.get(name) or {}
        process = entry.get("process")
        return ProcessIdentity.from_dict(process) if isinstance(process, dict) else None

    def public(self, name: str) -> str:
        """The recorded public addresses ``name`` was started to accept (``""``: none)."""
        entry = self._data.get(name) or {}
        public = entry.get("public")
        return public if isinstance(public, str) else ""

    def record(
        self,
        name: str,
        port: int,
        process: ProcessIdentity | None,
        host: str = "127.0.0.1",
        public: str = "",
    ) -> None:
        """Remember ``name`` on ``host:port`` run by ``process`` (``None``: not running),
        started to accept the public addresses ``public`` (comma-separated)."""
        with self._lock:
            self._data[name] = {
                "port": port,
                "host": host,
                "public": public,
                "process": process.to_dict() if process is not None else None,
            }
            tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self._data, indent=2))
            os.replace(tmp, self.path)


def start_broker(
    home: Path,
    state: EmbeddedState,
    host: str = "127.0.0.1",
    anonymous: bool = False,
    port: int = 0,
    port_setting: str = "",
) -> EmbeddedComponent:
    """Re-use the recorded Mosquitto of ``home`` or start one (workdir ``home/mosquitto``) on
    ``host``; ``anonymous``: without authentication (``FLOPS_INSECURE=mqtt``); ``port``: a
    fixed port (0: the recorded one, else a free one), named ``port_setting`` (the variable
    that fixes it) in errors. Its admin credential is :func:`broker_admin` afterwards.

    Raises ``BrokerUnavailable`` when mosquitto (or, unless ``anonymous``, its
    dynamic-security plugin) is missing or does not start, or when the fixed port is taken.
    """
    workdir = home / BROKER_WORKDIR
    process = _running_where_asked(state, "mqtt", "Mosquitto", host, port)
    recorded = state.port("mqtt")
    if process is not None:
        if not _same_mode(workdir, anonymous):
            logger.warning(
                "Mosquitto (pid %d) runs %s authentication; restarting it %s",
                process.pid,
                "without" if configured_anonymous(workdir) else "with another",
                "without authentication" if anonymous else "with authentication",
            )
            process.stop_group(STOP_TIMEOUT_S)
        elif wait_for_port(local_address(host), recorded, BROKER_START_TIMEOUT_S):
            logger.info("re-using Mosquitto on port %d (pid %d)", recorded, process.pid)
            origin = _origin(port, port_setting)
            return _broker_component(workdir, host, recorded, anonymous, process, None, origin)
        else:
            logger.warning(
                "Mosquitto (pid %d) does not answer on %d; restarting it", process.pid, recorded
            )
            process.stop_group(STOP_TIMEOUT_S)
    start_port = port or _usable_port(host, recorded, "Mosquitto")
    origin = _origin(port, port_setting)
    broker = MosquittoBroker(
        workdir, host=host, port=start_port, anonymous=anonymous, port_origin=origin
    ).start()
    identity = ProcessIdentity.of(broker.pid) if broker.pid is not None else None
    state.record("mqtt", broker.port, identity, host)
    return _broker_component(workdir, host, broker.port, anonymous, identity, broker, origin)


def _origin(port: int, port_setting: str) -> str:
    """What fixes a component's port, for the error when it is taken: the setting (a fixed
    ``port``) or the record in ``embedded.json``."""
    if port and port_setting:
        return f"{port_setting}={port}"
    return RECORDED_PORT


def _running_where_asked(
    state: EmbeddedState, name: str, what: str, host: str, port: int, public: str = ""
) -> ProcessIdentity | None:
    """The recorded process of ``name`` when it runs on ``host`` and on ``port`` (0: any
    recorded port), accepting the public addresses ``public``; a process that runs otherwise
    is stopped (logged) and ``None`` returned, as when none runs."""
    process = state.process(name)
    recorded = state.port(name)
    if not recorded or process is None or not process.is_alive():
        return None
    same_public = state.public(name) == public
    if state.host(name) == host and port in (0, recorded) and same_public:
        return process
    logger.warning(
        "%s (pid %d) listens on %s:%d (public %r); restarting it on %s:%s (public %r) as "
        "configured (services started on the old address lose it)",
        what,
        process.pid,
        state.host(name),
        recorded,
        state.public(name),
        host,
        port or recorded,
        public,
    )
    process.stop_group(STOP_TIMEOUT_S)
    kill_group_remnants(process.pid)
    return None


def _broker_component(
    workdir: Path,
    host: str,
    port: int,
    anonymous: bool,
    identity: ProcessIdentity | None,
    broker: MosquittoBroker | None,
    origin: str = RECORDED_PORT,
) -> EmbeddedComponent:
    """The :class:`EmbeddedComponent` of a Mosquitto on ``host:port``, restarted in the same
    mode, workdir and port (``origin``: what fixes the port, for the error when it is taken)."""

    def relaunch(cancel: threading.Event) -> MosquittoBroker:
        again = MosquittoBroker(workdir, host, port, anonymous, port_origin=origin)
        return again.start()

    answers = partial(port_answers, local_address(host), port)
    url = f"mqtt://{local_address(host)}:{port}"
    return EmbeddedComponent("mqtt", url, identity, broker, port, relaunch, answers, host)


def broker_admin(home: Path) -> MqttCredential | None:
    """The manager's admin credential of the embedded broker of ``home`` (``None`` for an
    anonymous broker without the dynamic-security plugin, or before the first start)."""
    return read_credential(home / BROKER_WORKDIR)


def _same_mode(workdir: Path, anonymous: bool) -> bool:
    """Whether the broker configured in ``workdir`` runs in the mode asked for, with the
    admin credential still there when authentication is on."""
    if configured_anonymous(workdir) is not anonymous:
        return False
    return anonymous or read_credential(workdir) is not None


def start_mlflow(
    home: Path,
    state: EmbeddedState,
    host: str = "127.0.0.1",
    authentication: bool = False,
    port: int = 0,
    port_setting: str = "",
    public: tuple[str, ...] = (),
) -> EmbeddedComponent:
    """Re-use the recorded MLflow server of ``home`` or start one (workdir ``home/mlflow``) on
    ``host``; ``authentication``: MLflow's basic-auth app (the admin credential is
    :func:`mlflow_admin` afterwards); ``port``: a fixed port (0: the recorded one, else a free
    one), named ``port_setting`` in errors; ``public``: ``(public host, *public URLs)``, the
    addresses browsers use besides loopback and private ones (``MlflowServer``'s
    ``public_host`` and ``public_urls``; ``""`` as the host: none). A running server in the
    other mode (or whose admin credential is gone) is restarted on the same port and workdir.

    Raises ``MlflowServerError`` when it does not start, or when the fixed port is taken.
    """
    public_text = ",".join(public)
    process = _running_where_asked(state, "mlflow", "MLflow", host, port, public_text)
    recorded = state.port("mlflow")
    origin = _origin(port, port_setting)
    settings = _MlflowSettings(home, host, authentication, origin, public)
    if process is not None:
        if _adopt_mlflow(home, host, recorded, authentication, process):
            logger.info("re-using the MLflow server on port %d (pid %d)", recorded, process.pid)
            return _mlflow_component(settings, recorded, process, None)
        process.stop_group(STOP_TIMEOUT_S)
    server = settings.server(port or _usable_port(host, recorded, "MLflow"))
    server.start()
    identity = ProcessIdentity.of(server.pid) if server.pid is not None else None
    state.record("mlflow", server.port, identity, host, public_text)
    return _mlflow_component(settings, server.port, identity, server)


@dataclass(frozen=True)
class _MlflowSettings:
    """How the embedded MLflow server of ``home`` runs, whatever its port."""

    home: Path
    host: str
    authentication: bool
    origin: str
    public: tuple[str, ...]

    def server(self, port: int) -> "MlflowServer":
        """An (unstarted) server on ``port`` with these settings."""
        from observatory.mlflow_server import MlflowServer

        return MlflowServer(
            self.home / "mlflow",
            host=self.host,
            port=port,
            authentication=self.authentication,
            port_origin=self.origin,
            public_host=self.public[0] if self.public else "",
            public_urls=self.public[1:],
        )


def _adopt_mlflow(
    home: Path, host: str, port: int, authentication: bool, process: ProcessIdentity
) -> bool:
    """Whether the running, recorded MLflow ``process`` on ``port`` answers within
    :data:`MLFLOW_ADOPT_TIMEOUT_S` in the mode asked for (else it is to be restarted; logged)."""
    from observatory.mlflow_server import MlflowServer

    probe = MlflowServer(home / "mlflow", host=host, port=port, authentication=authentication)
    deadline = time.monotonic() + MLFLOW_ADOPT_TIMEOUT_S
    while process.is_alive() and time.monotonic() < deadline:
        if probe.healthy(timeout_s=1.0):
            if probe.serves_as_configured():
                return True
            logger.warning(
                "MLflow (pid %d) does not run %s authentication; restarting it",
                process.pid,
                "with" if authentication else "without",
            )
            return False
        time.sleep(0.2)
    logger.warning("MLflow (pid %d) does not answer on %d; restarting it", process.pid, port)
    return False


def _mlflow_component(
    settings: _MlflowSettings,
    port: int,
    identity: ProcessIdentity | None,
    server: "MlflowServer | None",
) -> EmbeddedComponent:
    """The :class:`EmbeddedComponent` of an MLflow server on ``port``, restarted with the same
    ``settings`` (workdir: backend store, artifacts, basic-auth database) and port."""
    from observatory.mlflow_server import MlflowServer

    def relaunch(cancel: threading.Event) -> MlflowServer:
        return settings.server(port).start(cancel)

    probe = settings.server(port)
    return EmbeddedComponent(
        "mlflow",
        probe.url,
        identity,
        server,
        port,
        relaunch,
        probe.healthy,
        settings.host,
        ",".join(settings.public),
    )


def mlflow_admin(home: Path) -> "MlflowCredential | None":
    """The admin credential of the embedded MLflow server of ``home`` (``None`` before its
    first start with authentication)."""
    from observatory.mlflow_server import read_admin_credential

    return read_admin_credential(home / "mlflow")


def _usable_port(host: str, port: int, what: str) -> int:
    """``port`` when it can be bound on ``host`` (0 stays 0: pick a free one), else 0."""
    if not port:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            logger.warning(
                "%s's recorded port %d is taken by another program; using a new port (services "
                "started by an earlier manager cannot reach the new one)",
                what,
                port,
            )
            return 0
    return port


def start_registry(
    home: Path,
    state: EmbeddedState,
    host: str = "127.0.0.1",
    port: int = 0,
    port_setting: str = "",
) -> EmbeddedComponent:
    """Re-use the recorded registry of ``home`` or start one (``docker-registry``, workdir
    ``home/registry``, see :mod:`flops_manager.embedded_registry`) on ``host``; ``port``: a
    fixed port (0: the recorded one, else a free one), named ``port_setting`` in errors.

    Image references name the registry's address, so its port is kept across restarts as the
    broker's is. Raises ``RegistryUnavailable`` when it does not start, or when the fixed
    port is taken.
    """
    from flops_manager.embedded_registry import WORKDIR, RegistryServer, registry_answers

    workdir = home / WORKDIR
    process = _running_where_asked(state, "registry", "The registry", host, port)
    recorded = state.port("registry")
    origin = _origin(port, port_setting)
    url = f"http://{local_address(host)}:{recorded}"
    if process is not None:
        if _wait_answering(partial(registry_answers, url), process, BROKER_START_TIMEOUT_S):
            logger.info("re-using the registry on port %d (pid %d)", recorded, process.pid)
            return _registry_component(workdir, host, recorded, process, None, origin)
        logger.warning(
            "the registry (pid %d) does not answer on %d; restarting it", process.pid, recorded
        )
        process.stop_group(STOP_TIMEOUT_S)
    start_port = port or _usable_port(host, recorded, "The registry")
    server = RegistryServer(workdir, host, start_port, port_origin=origin).start()
    identity = ProcessIdentity.of(server.pid) if server.pid is not None else None
    state.record("registry", server.port, identity, host)
    return _registry_component(workdir, host, server.port, identity, server, origin)


def _wait_answering(
    answers: Callable[[float], bool], process: ProcessIdentity, timeout_s: float
) -> bool:
    """Whether ``answers(timeout)`` becomes true within ``timeout_s`` while ``process`` runs."""
    deadline = time.monotonic() + timeout_s
    while process.is_alive() and time.monotonic() < deadline:
        if answers(1.0):
            return True
        time.sleep(0.1)
    return False


def _registry_component(
    workdir: Path,
    host: str,
    port: int,
    identity: ProcessIdentity | None,
    server: _Child | None,
    origin: str,
) -> EmbeddedComponent:
    """The :class:`EmbeddedComponent` of a registry on ``host:port``, restarted on the same
    workdir (its storage) and port."""
    from flops_manager.embedded_registry import RegistryServer, registry_answers

    def relaunch(cancel: threading.Event) -> RegistryServer:
        return RegistryServer(workdir, host, port, port_origin=origin).start()

    url = f"http://{local_address(host)}:{port}"
    answers = partial(registry_answers, url)
    return EmbeddedComponent("registry", url, identity, server, port, relaunch, answers, host)


def registry_address(component: EmbeddedComponent) -> str:
    """``HOST:PORT`` of the embedded registry (what image references start with)."""
    return component.url.split("://", 1)[1]
