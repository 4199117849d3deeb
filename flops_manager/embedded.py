"""The embedded Mosquitto and MLflow, kept at the same addresses across manager restarts.

Learners and aggregators keep the broker's and the tracking server's URLs
(``FLOPS_MQTT_URL``, ``FLOPS_MLFLOW_URL``) for their whole life, so these addresses must
outlive one manager process. Both components run in their own session, so they survive a
manager that is killed. The manager records each one in ``$FLOPS_HOME/embedded.json``
(``{"mqtt": {"port": int, "process": ProcessIdentity | null}, "mlflow": {...}}``) and, when it
starts again:

- the recorded process still runs (same pid *and* start time) and answers on its port:
  re-use it;
- it runs but does not answer in time: stop it and start a new one on the same port;
- it is gone: start a new one on the recorded port (a free port the first time, or when
  another program took the recorded port; services of the earlier manager then lose their
  broker or tracking server, which is logged).

A running broker is re-used only when it was started in the mode asked for (authentication on,
or anonymous with ``FLOPS_INSECURE=mqtt``) and the manager's admin credential is still in
``$FLOPS_HOME/mosquitto``; otherwise it is restarted on the same port and workdir (the
credentials it issued survive in its dynamic-security state).
"""

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from flops_manager.broker import START_TIMEOUT_S as BROKER_START_TIMEOUT_S
from flops_manager.broker import MosquittoBroker, configured_anonymous
from flops_manager.mqtt_access import MqttCredential, read_credential
from flops_manager.process_identity import ProcessIdentity
from flops_utils.logging import logger
from flops_utils.net import wait_for_port

if TYPE_CHECKING:
    from observatory.mlflow_server import MlflowCredential

STATE_FILE = "embedded.json"
"""Name of the state file under ``$FLOPS_HOME``."""

BROKER_WORKDIR = "mosquitto"
"""The embedded broker's workdir under ``$FLOPS_HOME`` (config, persistence, plugin state and
the manager's admin credential)."""

STOP_TIMEOUT_S = 10.0
"""Seconds a re-used component gets to stop after SIGTERM before SIGKILL."""

MLFLOW_ADOPT_TIMEOUT_S = 60.0
"""Seconds to wait for a running, recorded MLflow server that does not answer yet (it may have
been starting when the previous manager died) before replacing it."""


class _Child(Protocol):
    def stop(self) -> None: ...
    def detach(self) -> None: ...


class EmbeddedComponent:
    """One running embedded component: a child this manager started, or a process a previous
    manager started and this one re-uses (``reused``).

    ``url`` is its address (``mqtt://HOST:PORT`` or ``http://HOST:PORT``) and ``identity`` its
    process. :meth:`stop` stops it either way; :meth:`detach` leaves it running.
    """

    def __init__(
        self, name: str, url: str, identity: ProcessIdentity | None, child: _Child | None
    ) -> None:
        self.name = name
        self.url = url
        self.identity = identity
        self.reused = child is None
        self._child = child

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

    def process(self, name: str) -> ProcessIdentity | None:
        """The recorded process of ``name``, or ``None``."""
        entry = self._data.get(name) or {}
        process = entry.get("process")
        return ProcessIdentity.from_dict(process) if isinstance(process, dict) else None

    def record(self, name: str, port: int, process: ProcessIdentity | None) -> None:
        """Remember ``name`` on ``port`` run by ``process`` (``None``: not running)."""
        with self._lock:
            self._data[name] = {
                "port": port,
                "process": process.to_dict() if process is not None else None,
            }
            tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self._data, indent=2))
            os.replace(tmp, self.path)


def start_broker(
    home: Path, state: EmbeddedState, host: str = "127.0.0.1", anonymous: bool = False
) -> EmbeddedComponent:
    """Re-use the recorded Mosquitto of ``home`` or start one (workdir ``home/mosquitto``);
    ``anonymous``: without authentication (``FLOPS_INSECURE=mqtt``). Its admin credential is
    :func:`broker_admin` afterwards.

    Raises ``BrokerUnavailable`` when mosquitto (or, unless ``anonymous``, its
    dynamic-security plugin) is missing or does not start.
    """
    port = state.port("mqtt")
    process = state.process("mqtt")
    workdir = home / BROKER_WORKDIR
    if port and process is not None and process.is_alive():
        if not _same_mode(workdir, anonymous):
            logger.warning(
                "Mosquitto (pid %d) runs %s authentication; restarting it %s",
                process.pid,
                "without" if configured_anonymous(workdir) else "with another",
                "without authentication" if anonymous else "with authentication",
            )
            process.stop_group(STOP_TIMEOUT_S)
        elif wait_for_port(host, port, BROKER_START_TIMEOUT_S):
            logger.info("re-using Mosquitto on port %d (pid %d)", port, process.pid)
            return EmbeddedComponent("mqtt", f"mqtt://{host}:{port}", process, None)
        else:
            logger.warning(
                "Mosquitto (pid %d) does not answer on %d; restarting it", process.pid, port
            )
            process.stop_group(STOP_TIMEOUT_S)
    port = _usable_port(host, port, "Mosquitto")
    broker = MosquittoBroker(workdir, host=host, port=port, anonymous=anonymous).start()
    identity = ProcessIdentity.of(broker.pid) if broker.pid is not None else None
    state.record("mqtt", broker.port, identity)
    return EmbeddedComponent("mqtt", broker.url, identity, broker)


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
    home: Path, state: EmbeddedState, host: str = "127.0.0.1", authentication: bool = False
) -> EmbeddedComponent:
    """Re-use the recorded MLflow server of ``home`` or start one (workdir ``home/mlflow``);
    ``authentication``: MLflow's basic-auth app (the admin credential is :func:`mlflow_admin`
    afterwards). A running server in the other mode (or whose admin credential is gone) is
    restarted on the same port and workdir.

    Raises ``MlflowServerError`` when it does not start.
    """
    from observatory.mlflow_server import MlflowServer

    port = state.port("mlflow")
    process = state.process("mlflow")
    if port and process is not None and process.is_alive():
        probe = MlflowServer(home / "mlflow", host=host, port=port, authentication=authentication)
        deadline = time.monotonic() + MLFLOW_ADOPT_TIMEOUT_S
        while process.is_alive() and time.monotonic() < deadline:
            if probe.healthy(timeout_s=1.0):
                if probe.serves_as_configured():
                    logger.info("re-using the MLflow server on port %d (pid %d)", port, process.pid)
                    return EmbeddedComponent("mlflow", probe.url, process, None)
                logger.warning(
                    "MLflow (pid %d) does not run %s authentication; restarting it",
                    process.pid,
                    "with" if authentication else "without",
                )
                break
            time.sleep(0.2)
        else:
            logger.warning(
                "MLflow (pid %d) does not answer on %d; restarting it", process.pid, port
            )
        process.stop_group(STOP_TIMEOUT_S)
    port = _usable_port(host, port, "MLflow")
    server = MlflowServer(home / "mlflow", host=host, port=port, authentication=authentication)
    server.start()
    identity = ProcessIdentity.of(server.pid) if server.pid is not None else None
    state.record("mlflow", server.port, identity)
    return EmbeddedComponent("mlflow", server.url, identity, server)


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
