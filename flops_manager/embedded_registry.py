"""The embedded OCI registry: Debian's ``docker-registry`` (the CNCF Distribution registry v2).

With no ``FLOPS_REGISTRY`` the embedded suite runs one next to Mosquitto and MLflow, so that
``build_image_for_trained_model`` has somewhere to push the trained-model image (and its base
image, :mod:`flops_manager.base_image`) and the local Docker engine somewhere to pull it from.

:class:`RegistryServer` runs ``docker-registry serve CONFIG`` in its own session with plain
HTTP on ``HOST:PORT`` and filesystem storage in ``<workdir>/storage`` (under
``$FLOPS_HOME/registry``, so pushed images survive a manager restart); its configuration
(``config.yml``), HTTP secret (``http-secret``, kept so uploads in progress stay valid across a
restart) and log (``registry.log``) lie next to it. Docker and buildah treat a registry on
``127.0.0.0/8`` as insecure by default, so images on the loopback registry are pulled over
plain HTTP without configuring the engine.

:func:`missing_tools` says which executables the embedded registry and the image builds need
(buildah builds, docker-registry serves).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from flops_manager.broker import local_address
from flops_utils.errors import FlopsError
from flops_utils.net import address_in_use, find_free_port
from flops_utils.processes import StartStop, stop_process_groups

WORKDIR = "registry"
"""The embedded registry's workdir under ``$FLOPS_HOME``."""

TOOLS = {"buildah": "buildah", "docker-registry": "docker-registry"}
"""Executable → Debian package: what the embedded registry and image builds need."""

START_TIMEOUT_S = 15.0
"""Seconds a start waits for ``GET /v2/`` to answer 200."""

STOP_TIMEOUT_S = 10.0
"""Seconds the registry gets to stop after SIGTERM before SIGKILL."""

PORT_PICK_ATTEMPTS = 3
"""How many picked ports a start tries when another program takes one first."""

POLL_INTERVAL_S = 0.1


class RegistryUnavailable(FlopsError):
    """The embedded registry cannot start (missing, its port taken, or it exited)."""

    code = "registry_unavailable"


class _PortTaken(Exception):
    """The registry exited because its port is taken."""


def find_tool(name: str) -> str | None:
    """The path of the executable ``name`` (also looked for in the ``sbin`` directories,
    where Debian puts ``debootstrap``), or ``None``."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def missing_tools(tools: dict[str, str] = TOOLS) -> list[str]:
    """``["<executable> (apt-get install <package>)", ...]`` for each of ``tools``
    (executable → Debian package) not installed; ``[]`` when all are."""
    return [f"{tool} (apt-get install {pkg})" for tool, pkg in tools.items() if not find_tool(tool)]


def registry_answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``GET <url>/v2/`` (the registry v2 API's version check) answers 200."""
    try:
        with urllib.request.urlopen(f"{url}/v2/", timeout=timeout_s) as response:
            return int(response.status) == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


class RegistryServer(StartStop):
    """``docker-registry serve`` on ``host:port``, plain HTTP, storage in ``workdir/storage``.

    Args:
        workdir: holds ``config.yml``, ``http-secret``, ``registry.log`` and ``storage/``.
        host: interface to listen on (``0.0.0.0``: every IPv4 interface).
        port: TCP port; 0 picks a free one (and another when a program takes it first, up
            to :data:`PORT_PICK_ATTEMPTS` picks). A port given here is never replaced.
        port_origin: where a given ``port`` comes from, named by the error when it is taken.

    ``address`` is ``HOST:PORT`` as this machine reaches it (what image references start
    with; loopback when it listens on every interface), ``url`` the HTTP base URL, ``pid`` the
    process (its own process group) once started. :meth:`detach` leaves it running.
    """

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        port_origin: str = "the port argument",
    ) -> None:
        self.workdir = workdir
        self.host = host
        self.port = port or find_free_port(host)
        self.port_fixed = bool(port)
        self.port_origin = port_origin
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the registry as this machine reaches it."""
        return f"{local_address(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        """``http://HOST:PORT``."""
        return f"http://{self.address}"

    @property
    def pid(self) -> int | None:
        """The registry's process id (also its process group id) while started."""
        return self._process.pid if self._process is not None else None

    def exit_code(self) -> int | None:
        """Its exit code once it ended (negative: killed by that signal); ``None`` while it
        runs or when it was not started (or was detached) here."""
        return self._process.poll() if self._process is not None else None

    def answers(self, timeout_s: float = 2.0) -> bool:
        """Whether it serves the v2 API now (:func:`registry_answers`)."""
        return registry_answers(self.url, timeout_s)

    def start(self) -> RegistryServer:
        """Write the configuration, start the registry and wait until ``GET /v2/`` answers.

        Raises :class:`RegistryUnavailable` when docker-registry is not installed, when a
        given port is taken (naming ``port_origin``), or when it does not answer within
        :data:`START_TIMEOUT_S` seconds (quoting its log).
        """
        for _ in range(PORT_PICK_ATTEMPTS):
            try:
                return self._start_once()
            except _PortTaken:
                if self.port_fixed:
                    raise RegistryUnavailable(
                        f"Cannot start the registry on {self.host}:{self.port}: another "
                        f"program uses that port. The port is fixed by {self.port_origin}; "
                        "stop the program using it or choose another port."
                    ) from None
                self.port = find_free_port(self.host)
        raise RegistryUnavailable(
            f"Cannot start the registry on {self.host}: each of {PORT_PICK_ATTEMPTS} free ports "
            "picked was taken by another program first."
        )

    def _start_once(self) -> RegistryServer:
        executable = find_tool("docker-registry")
        if executable is None:
            raise RegistryUnavailable(
                "docker-registry is not installed (apt-get install docker-registry)."
            )
        config = self._write_config()
        log = self.workdir / "registry.log"
        offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as output:
            self._process = subprocess.Popen(
                [executable, "serve", str(config)],
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                self._process = None
                text = _read_from(log, offset)
                if address_in_use(text):
                    raise _PortTaken()
                raise RegistryUnavailable(
                    f"docker-registry exited with code {code} while starting on "
                    f"{self.address}: {text[-500:].strip()}"
                )
            if self.answers(timeout_s=0.5):
                return self
            time.sleep(POLL_INTERVAL_S)
        self.stop()
        tail = _read_from(log, offset)[-500:].strip()
        raise RegistryUnavailable(f"docker-registry did not answer on {self.address}: {tail}")

    def _write_config(self) -> Path:
        """``workdir/config.yml`` for this host and port (storage, a kept HTTP secret)."""
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        secret_file = self.workdir / "http-secret"
        if not secret_file.is_file():
            secret_file.write_text(secrets.token_hex(32), encoding="utf-8")
            os.chmod(secret_file, 0o600)
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str((self.workdir / "storage").resolve())},
                "delete": {"enabled": True},
            },
            "http": {
                "addr": f"{self.host}:{self.port}",
                "secret": secret_file.read_text(encoding="utf-8").strip(),
            },
        }
        path = self.workdir / "config.yml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        os.chmod(path, 0o600)
        return path

    def stop(self) -> None:
        """Stop the registry (SIGTERM to its process group, SIGKILL after a timeout)."""
        if self._process is not None:
            stop_process_groups([self._process], STOP_TIMEOUT_S)
            self._process = None

    def detach(self) -> None:
        """Forget the registry without stopping it (a later manager re-uses it)."""
        self._process = None


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""
