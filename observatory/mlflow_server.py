"""The embedded MLflow tracking server: ``mlflow server`` as a child process.

The server keeps runs and the model registry in SQLite (``<workdir>/mlflow.db``) and serves
artifacts itself (``--serve-artifacts``, stored under ``<workdir>/artifacts``), so clients
only ever talk HTTP to it and need no storage credentials. It runs in its own process group
so that stopping it also stops its uvicorn worker.

With ``authentication=True`` it runs MLflow's basic-auth app (``mlflow server --app-name
basic-auth``): every request but ``/health`` and ``/static`` needs an MLflow user's password,
and a user sees only the experiments and registered models they were granted
(``default_permission = NO_PERMISSIONS``). Its files in the workdir (0700):

- ``basic_auth.ini`` (0600): the auth app's config (``MLFLOW_AUTH_CONFIG_PATH``), which also
  holds the admin credential (user :data:`ADMIN_USERNAME`, a random password generated at the
  first start and reused afterwards; the app creates the admin user from it when its user
  database is empty). :func:`read_admin_credential` reads it.
- ``basic_auth.db``: the auth app's users, password hashes and permissions (SQLite).

Browsers reach the GUI at the server's own address when it listens on loopback or a private
address (MLflow's default host and origin checks, ``mlflow.server.security``). With
``public_host`` (``FLOPS_PUBLIC_HOST``) or ``public_urls`` (``FLOPS_MLFLOW_PUBLIC_URL``) the
server also accepts that host name in the ``Host`` header and requests from that origin (the
GUI's own POST calls carry it), and nothing else: MLflow's defaults plus these
(:data:`DEFAULT_ALLOWED_HOSTS`).

The admin password is never on a command line or in the server's environment; the Flask secret
key the app needs for CSRF protection is generated per start and passed in the environment.
"""

import base64
import configparser
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.net import PORT_PICK_ATTEMPTS, address_in_use, find_free_port
from flops_utils.processes import StartStop, stop_process_groups

START_TIMEOUT_S = 90.0
"""Seconds to wait for ``GET /health`` to answer after starting the server."""

STOP_TIMEOUT_S = 10.0
"""Seconds to wait after SIGTERM before the process group gets SIGKILL."""

LOG_TAIL_CHARS = 1500
"""How much of the server's log a start failure quotes."""

OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}
"""Environment of the server: no usage telemetry (it would try the internet), and no job
runner (MLflow's GenAI jobs, unused by FLOps; it starts seven more processes, which slow the
server's start and stop on a small machine)."""


ADMIN_USERNAME = "flops-admin"
"""The MLflow user name of the manager's admin credential (an MLflow admin: every permission)."""

AUTH_CONFIG_FILE = "basic_auth.ini"
"""The basic-auth app's config file in the workdir (0600; holds the admin credential)."""

AUTH_DB_FILE = "basic_auth.db"
"""The basic-auth app's user and permission database (SQLite) in the workdir."""

PASSWORD_BYTES = 32
"""Random bytes of every generated password (``secrets.token_urlsafe``); MLflow requires at
least 12 characters (``mlflow.utils.validation._validate_password``)."""

AUTH_ENV_DROPPED = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")
"""Variables of the caller's environment the server must not see: they would override the admin
credential of :data:`AUTH_CONFIG_FILE` (``mlflow.server.auth.config.read_auth_config``)."""

AUTH_CACHE_TTL_S = 600
"""Seconds the server keeps a verified password in memory (``auth_cache_ttl_seconds``):
checking one costs about 0.3 s of CPU (scrypt), on every request otherwise. Password changes and
user deletions drop the entry at once in the worker that handles them, which is the only one
(``--workers 1``), so a revoked credential stops working immediately."""

DEFAULT_ALLOWED_HOSTS = (
    "localhost",
    "127.0.0.1",
    "[::1]",
    "0.0.0.0",
    "localhost:*",
    "127.0.0.1:*",
    "[[]::1]:*",
    "0.0.0.0:*",
    "192.168.*",
    "10.*",
    *(f"172.{second}.*" for second in range(16, 32)),
    "fc00:*",
    "fd00:*",
)
"""``Host`` header patterns (``fnmatch``) MLflow accepts by default: loopback and the private
address ranges (RFC 1918, RFC 4193), as ``mlflow.server.security_utils.get_default_allowed_hosts``
returns them; setting ``MLFLOW_SERVER_ALLOWED_HOSTS`` replaces them, so they are repeated."""

PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"
"""A read-only REST call that needs a user on a basic-auth server (``/health`` needs none)."""


@dataclass(frozen=True)
class MlflowCredential:
    """An MLflow user name and password (the password stays out of ``repr``)."""

    username: str
    password: str = field(repr=False)

    def env(self) -> dict[str, str]:
        """``{MLFLOW_TRACKING_USERNAME: ..., MLFLOW_TRACKING_PASSWORD: ...}``: how MLflow clients
        (the ``mlflow`` Python API, so the aggregator) authenticate."""
        return {
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }


def new_password() -> str:
    """A random password of :data:`PASSWORD_BYTES` bytes (URL-safe base64, 43 characters)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def read_admin_credential(workdir: Path) -> MlflowCredential | None:
    """The admin credential in ``workdir``'s :data:`AUTH_CONFIG_FILE`; ``None`` when there is
    none (a server never started with authentication) or the file is unreadable."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        if not parser.read(workdir / AUTH_CONFIG_FILE):
            return None
        section = parser["mlflow"]
        return MlflowCredential(section["admin_username"], section["admin_password"])
    except (OSError, KeyError, configparser.Error):
        return None


def write_auth_config(workdir: Path) -> MlflowCredential:
    """Write ``workdir``'s :data:`AUTH_CONFIG_FILE` (0600; ``workdir`` made 0700), keeping the
    admin credential of an existing one and generating it the first time. Returns it."""
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(workdir, 0o700)
    admin = read_admin_credential(workdir) or MlflowCredential(ADMIN_USERNAME, new_password())
    parser = configparser.ConfigParser(interpolation=None)
    parser["mlflow"] = {
        "default_permission": "NO_PERMISSIONS",
        "database_uri": f"sqlite:///{(workdir / AUTH_DB_FILE).resolve()}",
        "admin_username": admin.username,
        "admin_password": admin.password,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access": "false",
        "auth_cache_ttl_seconds": str(AUTH_CACHE_TTL_S),
    }
    tmp = workdir / f".{AUTH_CONFIG_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        parser.write(out)
    os.replace(tmp, workdir / AUTH_CONFIG_FILE)
    return admin


class MlflowServerError(FlopsError):
    """The MLflow tracking server did not start (the message quotes its log)."""

    code = "mlflow_unavailable"


class _PortTaken(Exception):
    """The server could not bind its port: another program holds it."""


class MlflowServer(StartStop):
    """An MLflow tracking server on ``host:port`` (port 0 picks a free one).

    Args:
        workdir: directory for ``mlflow.db``, ``artifacts/`` and ``mlflow.log``; created if
            missing. Reusing a workdir keeps earlier experiments and models.
        host: interface to bind. Defaults to loopback.
        port: TCP port; 0 picks a free one (``flops_utils.net.find_free_port``), and a new one
            when another program takes it before the server binds it (up to
            ``PORT_PICK_ATTEMPTS`` picks). A port given here is never replaced.
        start_timeout_s: seconds :meth:`start` waits for ``/health``. Defaults to
            :data:`START_TIMEOUT_S`.
        authentication: run MLflow's basic-auth app (see the module docstring); ``False``
            serves everyone without a password, as before.
        port_origin: where a given ``port`` comes from (a setting, a recorded port), named by
            the error when that port is taken.
        public_host: the host name or address browsers and remote services use for this
            server (its port is the server's); accepted besides MLflow's defaults.
        public_urls: further addresses of the GUI (``http(s)://HOST[:PORT][/...]``, e.g. a
            reverse proxy), accepted the same way.

    Use as a context manager or call :meth:`start` / :meth:`stop` (or :meth:`detach`). ``url`` is
    ``http://HOST:PORT`` (loopback when it listens on every interface); ``start_seconds`` is
    how long the last successful :meth:`start` took; ``pid`` is the last started server
    process (also its process group id); ``admin`` is
    the admin :class:`MlflowCredential` once an authenticating server started (else ``None``).
    """

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout_s: float = START_TIMEOUT_S,
        authentication: bool = False,
        port_origin: str = "the port argument",
        public_host: str = "",
        public_urls: tuple[str, ...] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.public_host = public_host
        self.public_urls = public_urls
        self.authentication = authentication
        self.admin: MlflowCredential | None = None
        self.host = host
        self.port = port or find_free_port(host)
        self.port_fixed = bool(port)
        self.port_origin = port_origin
        self.start_timeout_s = start_timeout_s
        self.start_seconds: float | None = None
        self.pid: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the tracking server (the value of ``FLOPS_MLFLOW_URL``)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The file the server's stdout and stderr go to."""
        return self.workdir / "mlflow.log"

    def command(self) -> list[str]:
        """The argument list that starts the server with this interpreter's MLflow."""
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}",
            "--artifacts-destination",
            str((self.workdir / "artifacts").resolve()),
            "--serve-artifacts",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
            *(["--app-name", "basic-auth"] if self.authentication else []),
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment: the caller's, :data:`OFFLINE_ENV` and, with
        authentication, the auth config's path and a fresh Flask secret key (CSRF protection of
        the sign-up form), without :data:`AUTH_ENV_DROPPED`."""
        env = {**os.environ, **OFFLINE_ENV, **self.public_access_env()}
        if self.authentication:
            for name in AUTH_ENV_DROPPED:
                env.pop(name, None)
            env["MLFLOW_AUTH_CONFIG_PATH"] = str((self.workdir / AUTH_CONFIG_FILE).resolve())
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_urlsafe(PASSWORD_BYTES)
        return env

    def public_access_env(self) -> dict[str, str]:
        """``MLFLOW_SERVER_ALLOWED_HOSTS`` and ``MLFLOW_SERVER_CORS_ALLOWED_ORIGINS`` for
        ``public_host`` and ``public_urls`` (empty without them: MLflow's defaults)."""
        origins = [f"http://{self.public_host}:{self.port}"] if self.public_host else []
        for url in self.public_urls:
            parts = urlsplit(url)
            if parts.scheme and parts.netloc:
                origins.append(f"{parts.scheme}://{parts.netloc}")
        if not origins:
            return {}
        hosts = list(DEFAULT_ALLOWED_HOSTS)
        hosts += [urlsplit(origin).netloc for origin in origins]  # compared as is (no '*')
        return {
            "MLFLOW_SERVER_ALLOWED_HOSTS": ",".join(hosts),
            "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": ",".join(origins),
        }

    def start(self, cancel: threading.Event | None = None) -> "MlflowServer":
        """Start the server and wait until ``GET /health`` answers 200.

        A picked port (``port=0``) that another program took before the server bound it is
        replaced by a new pick, up to ``PORT_PICK_ATTEMPTS`` times (each logged). ``cancel``:
        when it is set during the start, the server is stopped and the start fails (a
        supervisor that is stopping).

        Returns ``self``. Raises :class:`MlflowServerError` when a given port is taken (naming
        ``port_origin``), when ``cancel`` was set, and quoting the log's tail when the process
        exits early or ``/health`` does not answer within ``start_timeout_s`` seconds (the
        process group is stopped then).
        """
        if self._process is not None:
            return self
        for attempt in range(1, PORT_PICK_ATTEMPTS + 1):
            try:
                return self._start_once(cancel)
            except _PortTaken as taken_error:
                if self.port_fixed:
                    raise MlflowServerError(
                        f"Cannot start the MLflow server on {self.host}:{self.port} "
                        f"({taken_error}); the port is fixed by {self.port_origin}: stop the "
                        "process using that port or choose another port."
                    ) from None
                taken, self.port = self.port, find_free_port(self.host)
                logger.warning(
                    "the MLflow server's port %d was taken before it could bind it "
                    "(attempt %d of %d); trying port %d",
                    taken,
                    attempt,
                    PORT_PICK_ATTEMPTS,
                    self.port,
                )
        raise MlflowServerError(
            f"Cannot start the MLflow server on {self.host}: each of {PORT_PICK_ATTEMPTS} free "
            "ports picked was taken by another program before the server could bind it."
        )

    def _start_once(self, cancel: threading.Event | None) -> "MlflowServer":
        """One start on ``self.port``; raises ``_PortTaken`` when its bind fails."""
        self._check_port_free()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "artifacts").mkdir(exist_ok=True)
        if self.authentication:
            self.admin = write_auth_config(self.workdir)
        began = time.monotonic()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=self.environment(),
                start_new_session=True,
            )
        self.pid = self._process.pid
        deadline = began + self.start_timeout_s
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                self.stop()
                raise MlflowServerError(
                    f"The start of the MLflow server on {self.url} was cancelled."
                )
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                if address_in_use(self._log_since(log_offset)):
                    raise _PortTaken("Address already in use")
                raise MlflowServerError(
                    f"The MLflow server exited with code {code} while starting on {self.url}; "
                    f"fix the cause in its log ({self.log_path}): {self._log_tail()}"
                )
            if self.healthy(timeout_s=1.0) and self._process.poll() is None:
                self.start_seconds = time.monotonic() - began
                logger.info("MLflow server up at %s in %.1fs", self.url, self.start_seconds)
                return self
            time.sleep(0.2)
        self.stop()
        raise MlflowServerError(
            f"The MLflow server did not answer on {self.url}/health within "
            f"{self.start_timeout_s:g}s; see {self.log_path}: {self._log_tail()}"
        )

    def _check_port_free(self) -> None:
        """Fail fast (instead of after MLflow's slow start) when the port is taken: raises
        ``_PortTaken``."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As uvicorn does; a listening socket still makes the bind fail.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
            except OSError as exc:
                raise _PortTaken(exc.strerror or "Address already in use") from exc

    def exit_code(self) -> int | None:
        """The server's exit code once it ended (negative: killed by that signal); ``None``
        while it runs or when it was not started (or detached) here."""
        return self._process.poll() if self._process is not None else None

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """Whether ``GET /health`` answers 200 within ``timeout_s`` seconds."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout_s) as response:
                return int(response.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def serves_as_configured(self, timeout_s: float = 5.0) -> bool:
        """Whether the server on ``url`` runs in this object's mode: with ``authentication``, it
        refuses an anonymous REST call (401) and accepts the admin credential of the workdir;
        without, it answers the anonymous call. ``False`` when it does not answer."""
        if not self.authentication:
            return self._probe_status(None, timeout_s) == 200
        admin = read_admin_credential(self.workdir)
        return (
            admin is not None
            and self._probe_status(None, timeout_s) == 401
            and self._probe_status(admin, timeout_s) == 200
        )

    def _probe_status(self, credential: MlflowCredential | None, timeout_s: float) -> int | None:
        """The HTTP status of :data:`PROBE_PATH` as ``credential`` (anonymous: ``None``)."""
        request = urllib.request.Request(f"{self.url}{PROBE_PATH}")
        if credential is not None:
            token = base64.b64encode(f"{credential.username}:{credential.password}".encode())
            request.add_header("Authorization", f"Basic {token.decode()}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (OSError, urllib.error.URLError):
            return None

    def running(self) -> bool:
        """Whether the server process started by :meth:`start` is still alive."""
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Stop the server's process group: SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``.

        A no-op when the server is not running.
        """
        process, self._process = self._process, None
        if process is None:
            return
        # The group: the uvicorn worker may outlive its parent for a moment.
        stop_process_groups([process], STOP_TIMEOUT_S)

    def detach(self) -> None:
        """Forget the server without stopping it: it keeps serving after this process exits
        (the FLOps manager leaves it to the projects still running and re-uses it when it
        starts again). :meth:`stop` is a no-op afterwards."""
        self._process = None

    def _log_since(self, offset: int) -> str:
        """The log written after byte ``offset`` (empty when unreadable)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-LOG_TAIL_CHARS:].strip() or "(empty log)"
