"""The embedded MQTT broker: Mosquitto started as a child process on loopback.

Production runs Mosquitto from docker-compose; the embedded default and the tests start
``mosquitto`` (Debian package, installed by ``scripts/bootstrap``) with a generated config.

Persistence is on: Mosquitto keeps retained messages, persistent sessions and the QoS 1
messages queued for disconnected persistent clients (the manager's listener while the manager
restarts) in ``<workdir>/mosquitto.db``, saved every ``AUTOSAVE_INTERVAL_S`` seconds and on a
clean shutdown, so a broker restarted on the same port and workdir still delivers them.

Authentication is on by default: ``allow_anonymous false`` and Mosquitto's dynamic-security
plugin with its state in ``<workdir>/dynamic-security.json``. The manager's admin credential
(``flops_manager.mqtt_access``) is generated at the first start into
``<workdir>/manager-credential.json`` (0600, workdir 0700) and (re)written into that state
before every start; the per-project credentials the manager issues at run time are kept there
too, so they survive a broker restart. ``anonymous=True`` (``FLOPS_INSECURE=mqtt``) lets
anonymous clients do anything, as before; the plugin and the admin credential stay (when the
plugin is installed), so that the manager can still issue credentials.
"""

import glob
import json
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from flops_manager.mqtt_access import (
    MqttCredential,
    load_or_create_credential,
    password_hash,
)
from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.net import PORT_PICK_ATTEMPTS, address_in_use, find_free_port, port_answers
from flops_utils.processes import StartStop, stop_process_groups

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.05
"""Seconds between two looks at a starting broker (its process, its log, its port)."""

LISTENING_MARKER = "Opening ipv4 listen socket on port"
"""What Mosquitto logs once its listener is bound (``src/net.c``); a port that answers before
this line appears in the log of this start may belong to another program."""
AUTOSAVE_INTERVAL_S = 5
"""Seconds between saves of the persistence file (Mosquitto's ``autosave_interval``)."""

DYNSEC_FILE = "dynamic-security.json"
"""The dynamic-security plugin's state (clients, roles, groups) in the workdir."""

DYNSEC_PLUGIN_PATTERNS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/*/mosquitto_dynamic_security.so",
)
"""Where Debian, Alpine and source installs put the plugin."""

ADMIN_ROLE = "flops-manager-admin"
ANONYMOUS_ROLE = "flops-anonymous"
ANONYMOUS_GROUP = "flops-anonymous"

SYNC_TOPIC_FILTER = "flops-manager/sync/#"
"""The manager listener's own marker topics (``flops_manager.mqtt_listener``)."""


def _acl(acltype: str, topic: str, allow: bool = True) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow}


ADMIN_ACLS = [
    _acl("publishClientSend", "$CONTROL/dynamic-security/#"),
    _acl("publishClientReceive", "$CONTROL/dynamic-security/#"),
    _acl("subscribePattern", "$CONTROL/dynamic-security/#"),
    _acl("publishClientReceive", "$SYS/#"),
    _acl("subscribePattern", "$SYS/#"),
    _acl("publishClientReceive", "#"),
    _acl("subscribePattern", "#"),
    _acl("unsubscribePattern", "#"),
    _acl("publishClientSend", SYNC_TOPIC_FILTER),
]
"""The manager's admin credential: administer dynamic security, read every status message,
publish its listener's sync marker (not status messages: those come from services)."""

ANONYMOUS_ACLS = [
    _acl("publishClientSend", "#"),
    _acl("publishClientReceive", "#"),
    _acl("subscribePattern", "#"),
    _acl("unsubscribePattern", "#"),
    _acl("publishClientReceive", "$SYS/#"),
    _acl("subscribePattern", "$SYS/#"),
]
"""Anonymous clients of an ``anonymous=True`` broker: everything but ``$CONTROL``."""

DEFAULT_ACL_ACCESS = {
    "publishClientSend": False,
    "publishClientReceive": True,
    "subscribe": False,
    "unsubscribe": True,
}
"""The plugin's defaults for a client whose roles say nothing about a topic (its own)."""


ALL_INTERFACES = ("0.0.0.0", "")
"""Bind addresses that listen on every IPv4 interface."""


def local_address(host: str) -> str:
    """The address this machine connects to a server bound on ``host`` with: loopback for
    every interface (:data:`ALL_INTERFACES`), else ``host`` itself."""
    return "127.0.0.1" if host in ALL_INTERFACES else host


class BrokerUnavailable(FlopsError):
    """Mosquitto is not installed or did not start."""

    code = "broker_unavailable"


class _PortTaken(Exception):
    """Mosquitto could not bind its port: another program holds it."""


def find_mosquitto() -> str:
    """Return the path of the ``mosquitto`` executable.

    Raises ``BrokerUnavailable`` naming the install command when it is missing.
    """
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BrokerUnavailable(
            "The MQTT broker mosquitto is not installed. Install it with "
            "'apt-get install mosquitto' (scripts/bootstrap does this)."
        )
    return found


def find_dynsec_plugin() -> str | None:
    """The path of Mosquitto's dynamic-security plugin, or ``None`` when it is not installed."""
    for pattern in DYNSEC_PLUGIN_PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def write_dynsec_state(path: Path, admin: MqttCredential, anonymous: bool) -> None:
    """Create or update the dynamic-security state at ``path`` (0600): the admin client and
    role (new password hash), the anonymous group (``anonymous=True``) or none; every other
    client and role (the credentials issued to projects) stays."""
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {}
    if not isinstance(state, dict):
        state = {}
    clients = [c for c in _entries(state, "clients") if c.get("username") != admin.username]
    clients.append(
        {
            "username": admin.username,
            "textname": "FLOps manager",
            "roles": [{"rolename": ADMIN_ROLE}],
            **password_hash(admin.password),
        }
    )
    ours = {ADMIN_ROLE, ANONYMOUS_ROLE}
    roles = [r for r in _entries(state, "roles") if r.get("rolename") not in ours]
    roles.append({"rolename": ADMIN_ROLE, "acls": ADMIN_ACLS})
    groups = [g for g in _entries(state, "groups") if g.get("groupname") != ANONYMOUS_GROUP]
    state.pop("anonymousGroup", None)
    if anonymous:
        roles.append({"rolename": ANONYMOUS_ROLE, "acls": ANONYMOUS_ACLS})
        groups.append(
            {"groupname": ANONYMOUS_GROUP, "roles": [{"rolename": ANONYMOUS_ROLE}], "clients": []}
        )
        state["anonymousGroup"] = ANONYMOUS_GROUP
    state.update(clients=clients, roles=roles, groups=groups, defaultACLAccess=DEFAULT_ACL_ACCESS)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(state, out, indent=1)
    os.replace(tmp, path)


def _read_from(path: Path, offset: int) -> str:
    """The text of ``path`` after byte ``offset`` (empty when it cannot be read)."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def _entries(state: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = state.get(key)
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def configured_anonymous(workdir: Path) -> bool | None:
    """Whether the broker config in ``workdir`` allows anonymous clients; ``None`` when there
    is no config (or it lacks the dynamic-security plugin while refusing anonymous ones)."""
    try:
        text = (workdir / "mosquitto.conf").read_text()
    except OSError:
        return None
    if "allow_anonymous true" in text.splitlines():
        return True
    return False if "plugin_opt_config_file" in text else None


class MosquittoBroker(StartStop):
    """A Mosquitto broker on ``host:port`` (port 0 picks a free one), stopped on exit.

    Args:
        workdir: directory for the generated config, the broker's log and its persistence
            file ``mosquitto.db`` (reusing a workdir keeps queued messages and sessions).
        host: interface to listen on (``0.0.0.0``: every IPv4 interface). Defaults to loopback.
        port: TCP port; 0 picks a free one (``flops_utils.net.find_free_port``), and a new one
            when another program takes it before the broker binds it (up to
            ``PORT_PICK_ATTEMPTS`` picks). A port given here is never replaced.
        anonymous: let anonymous clients publish and subscribe anything (the insecure mode);
            default: only clients with a credential, see the module's docstring.
        port_origin: where a given ``port`` comes from (a setting, a recorded port), named by
            the error when that port is taken.

    Use as a context manager or call :meth:`start` / :meth:`stop` (or :meth:`detach` to leave
    it running). ``url`` is ``mqtt://HOST:PORT`` (loopback when it listens on every
    interface); ``pid`` the broker process once started;
    ``admin`` the manager's admin credential once started (``None`` for an anonymous broker
    without the dynamic-security plugin).
    """

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        anonymous: bool = False,
        port_origin: str = "the port argument",
    ) -> None:
        self.workdir = workdir
        self.host = host
        self.port = port or find_free_port(host)
        self.port_fixed = bool(port)
        self.port_origin = port_origin
        self.anonymous = anonymous
        self.admin: MqttCredential | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The broker's process id (also its process group id) while started, else ``None``."""
        return self._process.pid if self._process is not None else None

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT`` of the broker, as this machine reaches it."""
        return f"mqtt://{local_address(self.host)}:{self.port}"

    def exit_code(self) -> int | None:
        """The broker's exit code once it ended (negative: killed by that signal); ``None``
        while it runs or when it was not started (or detached) here."""
        return self._process.poll() if self._process is not None else None

    def start(self) -> "MosquittoBroker":
        """Start the broker and wait until it accepts connections.

        A picked port (``port=0``) that another program took before the broker bound it is
        replaced by a new pick, up to ``PORT_PICK_ATTEMPTS`` times (each logged).

        Raises ``BrokerUnavailable`` when mosquitto is missing (or, unless ``anonymous``, its
        dynamic-security plugin), when a given port is taken (naming ``port_origin``), or when
        it is not listening after ``START_TIMEOUT_S`` seconds (the message quotes its log).
        """
        for attempt in range(1, PORT_PICK_ATTEMPTS + 1):
            try:
                return self._start_once()
            except _PortTaken:
                if self.port_fixed:
                    raise BrokerUnavailable(
                        f"Cannot start Mosquitto on {self.host}:{self.port}: another program "
                        f"uses that port (Address already in use). The port is fixed by "
                        f"{self.port_origin}; stop the program using it or choose another port."
                    ) from None
                taken, self.port = self.port, find_free_port(self.host)
                logger.warning(
                    "Mosquitto's port %d was taken before it could bind it (attempt %d of %d); "
                    "trying port %d",
                    taken,
                    attempt,
                    PORT_PICK_ATTEMPTS,
                    self.port,
                )
        raise BrokerUnavailable(
            f"Cannot start Mosquitto on {self.host}: each of {PORT_PICK_ATTEMPTS} free ports "
            "picked was taken by another program before the broker could bind it."
        )

    def _start_once(self) -> "MosquittoBroker":
        """One start on ``self.port``; raises ``_PortTaken`` when its bind fails."""
        executable = find_mosquitto()
        plugin = find_dynsec_plugin()
        if plugin is None and not self.anonymous:
            raise BrokerUnavailable(
                "Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) is not "
                "installed; install Mosquitto 2.0 or later, or run the broker without "
                "authentication with FLOPS_INSECURE=mqtt."
            )
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.workdir, 0o700)
        config = self.workdir / "mosquitto.conf"
        log = self.workdir / "mosquitto.log"
        lines = [
            f"listener {self.port} {self.host}",
            # As root, Mosquitto would switch to the user 'mosquitto', who cannot write the
            # persistence file and log in the workdir; stay the user who owns them.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            "persistence true",
            f"persistence_location {self.workdir.resolve()}/",
            f"autosave_interval {AUTOSAVE_INTERVAL_S}",
            f"log_dest file {log}",
        ]
        if plugin is not None:
            self.admin = load_or_create_credential(self.workdir)
            state = self.workdir / DYNSEC_FILE
            write_dynsec_state(state, self.admin, self.anonymous)
            lines += [f"plugin {plugin}", f"plugin_opt_config_file {state.resolve()}"]
        config.write_text("\n".join(lines) + "\n")
        os.chmod(config, 0o600)
        log_offset = log.stat().st_size if log.exists() else 0
        self._process = subprocess.Popen(
            [executable, "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            umask=0o077,  # its persistence file, log and plugin state: owner only
        )
        self._wait_listening(log, log_offset)
        return self

    def _wait_listening(self, log: Path, log_offset: int) -> None:
        """Wait until this start's log says the listener is bound and the port answers.

        Raises ``_PortTaken`` when the broker exited because its port is taken, and
        ``BrokerUnavailable`` (quoting the log) when it exited otherwise or did not listen
        within ``START_TIMEOUT_S``.
        """
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            output = _read_from(log, log_offset)
            code = self._process.poll()
            if code is not None:
                self._process = None
                if address_in_use(output):
                    raise _PortTaken()
                raise BrokerUnavailable(
                    f"mosquitto exited with code {code} while starting on {self.url}: "
                    f"{output[-500:].strip()}"
                )
            local = local_address(self.host)
            if LISTENING_MARKER in output and port_answers(local, self.port, 0.5):
                return
            time.sleep(POLL_INTERVAL_S)
        self.stop()
        tail = _read_from(log, log_offset)[-500:]
        raise BrokerUnavailable(f"mosquitto did not start on {self.url}: {tail.strip()}")

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``)."""
        if self._process is None:
            return
        stop_process_groups([self._process], STOP_TIMEOUT_S)
        self._process = None

    def detach(self) -> None:
        """Forget the broker without stopping it: it keeps running after this process exits
        (a later manager re-uses it, see ``flops_manager.embedded``)."""
        self._process = None
