"""The embedded MQTT broker: Mosquitto started as a child process on loopback.

Production runs Mosquitto from docker-compose; the embedded default and the tests start
``mosquitto`` (Debian package, installed by ``scripts/bootstrap``) with a generated config.

Persistence is on: Mosquitto keeps retained messages, persistent sessions and the QoS 1
messages queued for disconnected persistent clients (the manager's listener while the manager
restarts) in ``<workdir>/mosquitto.db``, saved every ``AUTOSAVE_INTERVAL_S`` seconds and on a
clean shutdown, so a broker restarted on the same port and workdir still delivers them.
"""

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from flops_utils.errors import FlopsError
from flops_utils.net import find_free_port, wait_for_port
from flops_utils.processes import StartStop, stop_process_groups

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
AUTOSAVE_INTERVAL_S = 5
"""Seconds between saves of the persistence file (Mosquitto's ``autosave_interval``)."""


class BrokerUnavailable(FlopsError):
    """Mosquitto is not installed or did not start."""

    code = "broker_unavailable"


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


class MosquittoBroker(StartStop):
    """A Mosquitto broker on ``host:port`` (port 0 picks a free one), stopped on exit.

    Args:
        workdir: directory for the generated config, the broker's log and its persistence
            file ``mosquitto.db`` (reusing a workdir keeps queued messages and sessions).
        host: interface to listen on. Defaults to loopback.
        port: TCP port; 0 picks a free one.

    Use as a context manager or call :meth:`start` / :meth:`stop` (or :meth:`detach` to leave
    it running). ``url`` is ``mqtt://HOST:PORT``; ``pid`` the broker process once started.
    """

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.workdir = workdir
        self.host = host
        self.port = port or find_free_port(host)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The broker's process id (also its process group id) while started, else ``None``."""
        return self._process.pid if self._process is not None else None

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT`` of the broker."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> "MosquittoBroker":
        """Start the broker and wait until it accepts connections.

        Raises ``BrokerUnavailable`` when mosquitto is missing or not listening after
        ``START_TIMEOUT_S`` seconds (the message quotes its log).
        """
        executable = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "mosquitto.conf"
        log = self.workdir / "mosquitto.log"
        config.write_text(
            f"listener {self.port} {self.host}\n"
            # As root, Mosquitto would switch to the user 'mosquitto', who cannot write the
            # persistence file and log in the workdir; stay the user who owns them.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir.resolve()}/\n"
            f"autosave_interval {AUTOSAVE_INTERVAL_S}\n"
            f"log_dest file {log}\n"
        )
        self._process = subprocess.Popen(
            [executable, "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not wait_for_port(self.host, self.port, START_TIMEOUT_S):
            self.stop()
            tail = log.read_text()[-500:] if log.exists() else ""
            raise BrokerUnavailable(f"mosquitto did not start on {self.url}: {tail.strip()}")
        return self

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
