"""The manager and the components it needs, wired together and started on this machine.

With the embedded default (no ``FLOPS_MQTT_URL`` / ``FLOPS_MLFLOW_URL``) the suite also starts
Mosquitto and an MLflow tracking server as child processes; the project store is MongoDB or the
embedded on-disk store (``FLOPS_DB_URL``). The REST API is served by waitress in a thread.
With the ``venv`` builder and no ``FLOPS_REGISTRY`` it also runs an OCI registry
(``docker-registry``, :mod:`flops_manager.embedded_registry`; ``FLOPS_REGISTRY_PORT``) for the
trained-model images, when buildah and docker-registry are installed.

Addresses: the embedded broker and tracking server listen on ``FLOPS_BIND_HOST`` (default:
``FLOPS_MANAGER_HOST``) on fixed (``FLOPS_MQTT_PORT``, ``FLOPS_MLFLOW_PORT``) or recorded
ports. The manager connects to them itself through loopback when they listen on every
interface; services get their addresses with ``FLOPS_PUBLIC_HOST`` when it is set
(:meth:`ManagerSuite.service_url`), and so does ``GET /tracking`` (unless
``FLOPS_MLFLOW_PUBLIC_URL`` names another GUI address).

Restarts: the embedded broker and tracking server are re-used, or restarted on the same
ports, by the next start on the same ``FLOPS_HOME`` (:mod:`flops_manager.embedded`); the
lifecycle then reconciles the unfinished projects (re-attaching running services, applying
the status messages the broker queued meanwhile). One manager at a time may use a
``FLOPS_HOME``: the suite holds ``$FLOPS_HOME/manager.lock`` while it runs.
"""

import contextlib
import fcntl
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import waitress
from waitress import wasyncore
from waitress.server import BaseWSGIServer, MultiSocketServer

from flops_manager.app import create_app
from flops_manager.auth import WithNodeCredentials
from flops_manager.broker import ALL_INTERFACES
from flops_manager.builds import ImageBuildService, builder_name, make_builder
from flops_manager.config import ManagerConfig
from flops_manager.credentials import ProjectCredentials
from flops_manager.data_access import DataAccess
from flops_manager.embedded import (
    EmbeddedComponent,
    EmbeddedState,
    broker_admin,
    mlflow_admin,
    registry_address,
    start_broker,
    start_mlflow,
    start_registry,
)
from flops_manager.embedded_registry import missing_tools
from flops_manager.errors import ConfigurationError
from flops_manager.mlflow_access import MlflowAccess, MlflowAccessControl, NoMlflowAccess
from flops_manager.mock_jobs import MockJobs
from flops_manager.mqtt_access import (
    MqttAccess,
    MqttAccessControl,
    MqttCredential,
    NoMqttAccess,
    listener_client_id,
)
from flops_manager.mqtt_listener import StatusListener
from flops_manager.orchestrators import make_orchestrator
from flops_manager.pki import ProjectCA
from flops_manager.projects import ProjectLifecycle
from flops_manager.store import ProjectStore, open_store
from flops_manager.supervision import ANSWER_TIMEOUT_S, Probe, Supervisor, http_ok
from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.net import port_answers
from flops_utils.notifications import parse_mqtt_url
from flops_utils.processes import StartStop
from observatory.mlflow_server import MlflowCredential

API_THREADS = 128
"""waitress worker threads; each event-stream follower holds one while it listens (they are
bounded to ``API_THREADS - API_FREE_THREADS``, and sleep until their project changes)."""

API_FREE_THREADS = 28
"""Worker threads event streams never take: the other requests' share."""

API_STOP_TIMEOUT_S = 5.0
"""Seconds a stop waits for the API requests being served."""

BACKLOG_TIMEOUT_S = 10.0
"""Seconds a start waits for the status messages the broker queued while the manager was
down, before judging the re-attached projects without them."""

HOME_LOCK_TIMEOUT_S = 15.0
"""Seconds a start waits for another manager on the same ``FLOPS_HOME`` to finish stopping."""

STOPPED_REASON = "the manager was stopped, and with it the services of this project"
"""``status_message`` of the projects a full :meth:`ManagerSuite.stop` ends."""


def status_channel_ready(listener: StatusListener, settle_s: float) -> bool:
    """Whether status messages reach the manager now: the listener is connected, and has been
    for ``settle_s`` seconds (what services queued while the broker was down arrives in that
    time after a reconnect)."""
    connected_at = listener.last_connected_at
    return (
        listener.connected
        and connected_at is not None
        and time.monotonic() - connected_at >= settle_s
    )


class HomeInUse(FlopsError):
    """Another manager process runs on the same ``FLOPS_HOME``."""

    code = "home_in_use"


class ManagerSuite(StartStop):
    """Starts and stops the manager with its broker, tracking server, store and orchestrator.

    Args:
        config: see :class:`ManagerConfig`.

    ``url`` is the API's base URL (``http://HOST:PORT``) once started; ``mlflow_url`` and
    ``mqtt_url`` are the tracking server and broker the manager itself uses;
    ``service_mqtt_url`` and ``service_mlflow_url`` the addresses services get (the public
    ones, see the module docstring); ``tracking_url`` the MLflow GUI address of
    ``GET /tracking``. Raises ``FlopsError`` subclasses
    from :meth:`start` when a component cannot start (with the component's own message), and
    :class:`HomeInUse` when another manager holds ``FLOPS_HOME``.
    """

    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        self.mqtt_url = config.mqtt_url
        self.mlflow_url = config.mlflow_url
        self.service_mqtt_url = config.mqtt_url
        self.service_mlflow_url = config.mlflow_url
        self.tracking_url = config.mlflow_public_url or config.mlflow_url
        self.url = ""
        self._broker: EmbeddedComponent | None = None
        self._mlflow: EmbeddedComponent | None = None
        self._registry: EmbeddedComponent | None = None
        self._home_lock: int | None = None
        self._listener: StatusListener | None = None
        self._supervisor: Supervisor | None = None
        self._lifecycle: ProjectLifecycle | None = None
        self._server: BaseWSGIServer | MultiSocketServer | None = None
        self._thread: threading.Thread | None = None
        self._mock_jobs = MockJobs()

    @property
    def lifecycle(self) -> ProjectLifecycle:
        """The running project lifecycle (after :meth:`start`)."""
        assert self._lifecycle is not None, "start the suite first"
        return self._lifecycle

    def start(self) -> "ManagerSuite":
        """Start every component (the broker and MLflow in parallel, re-using those a previous
        manager left running), reconcile unfinished projects, then serve the API."""
        check_isolation(self.config)
        home = self.config.home.resolve()
        home.mkdir(parents=True, exist_ok=True)
        restrict_home(home)
        self._lock_home(home)
        self._mock_jobs = MockJobs()
        self._mock_jobs.warm_up()  # datasets' imports take seconds: not in the first request
        try:
            state = EmbeddedState(home)
            with ThreadPoolExecutor(max_workers=2) as pool:
                broker = None if self.mqtt_url else pool.submit(self._start_broker, home, state)
                mlflow = None if self.mlflow_url else pool.submit(self._start_mlflow, home, state)
                for future in (broker, mlflow):
                    if future is not None:
                        future.result()
            self._advertise()
            store = open_store(self.config.store_url)
            orchestrator = make_orchestrator(
                self.config,
                home / "services",
                lambda *args: self.lifecycle.on_service_exit(*args),
            )
            try:
                registry = self._start_registry(home, state, orchestrator.needs_images)
                builder = make_builder(
                    self.config,
                    home,
                    self.mqtt_url,
                    needs_images=orchestrator.needs_images,
                    embedded_registry=registry,
                )
            except FlopsError:
                orchestrator.close()
                raise
            if orchestrator.needs_images != builder.produces_images:
                orchestrator.close()
                raise ConfigurationError(
                    f"The {self.config.orchestrator!r} orchestrator runs OCI images, but the "
                    f"{self.config.builder!r} builder makes none; set FLOPS_BUILDER=oci."
                    if orchestrator.needs_images
                    else f"The {self.config.orchestrator!r} orchestrator runs virtualenvs on "
                    f"this machine, but the {self.config.builder!r} builder makes images; set "
                    "FLOPS_BUILDER=venv."
                )
            admin = self._broker_admin(home)
            credentials = self._credentials(home, admin)
            if isinstance(builder, ImageBuildService):  # the builder reports over MQTT too
                builder.service_credentials = partial(credentials.builder, service="builder")
            model_images = getattr(builder, "model_images", None)
            if isinstance(model_images, ImageBuildService):  # the venv builder's model images
                model_images.service_credentials = partial(credentials.builder, service="builder")
            self._lifecycle = ProjectLifecycle(
                store,
                builder,
                orchestrator,
                home / "projects",
                self.service_mqtt_url,
                self.service_mlflow_url,
                credentials=credentials,
            )
            recovering = self._lifecycle.begin_recovery()
            self._listener = StatusListener(
                self.mqtt_url,
                self._lifecycle.on_status,
                client_id=listener_client_id(home),
                username=admin.username if admin else None,
                password=admin.password if admin else None,
            )
            self._listener.start()
            self._lifecycle.status_channel_ready = partial(
                status_channel_ready, self._listener, self._lifecycle.exit_grace_s
            )
            if recovering and not self._listener.wait_for_backlog(BACKLOG_TIMEOUT_S):
                logger.warning(
                    "the MQTT broker did not deliver the queued status messages within %gs; "
                    "reconciling without them",
                    BACKLOG_TIMEOUT_S,
                )
            self._lifecycle.finish_recovery()
            if recovering:
                logger.info("reconciled %d unfinished project(s)", len(recovering))
            self._supervisor = self._supervise(state, store)
            authenticator = self.config.authenticator()
            nodes = (
                authenticator.credentials
                if isinstance(authenticator, WithNodeCredentials)
                else None
            )
            app = create_app(
                self._lifecycle,
                store,
                self.tracking_url,
                authenticator,
                nodes,
                credentials.data,
                max_followers=API_THREADS - API_FREE_THREADS,
                tracking_access=credentials.mlflow,
                health=self._supervisor.health,
                mock_jobs=self._mock_jobs,
            )
            self._server = waitress.create_server(
                app, host=self.config.host, port=self.config.port, threads=API_THREADS
            )
            port = self._server.socket.getsockname()[1]
            self.url = f"http://{self.config.host}:{port}"
            public = self.config.public_host or self.config.host
            # runs link back to their project
            self._lifecycle.pipeline.manager_url = f"http://{public}:{port}"
            self._thread = threading.Thread(target=self._server.run, name="api", daemon=True)
            self._thread.start()
            restrict_home(home)  # also what the components created meanwhile
        except BaseException:
            self.stop(keep_running=True)  # a failed start must not end running projects
            raise
        logger.info(
            "FLOps manager on %s (MLflow %s, MQTT %s)",
            self.url,
            self.tracking_url,
            self.service_mqtt_url,
        )
        return self

    def _supervise(self, state: EmbeddedState, store: ProjectStore) -> Supervisor:
        """Start supervising the embedded components and probing the external ones and the
        store (``flops_manager.supervision``)."""
        components = (self._broker, self._mlflow, self._registry)
        embedded = [c for c in components if c is not None]
        probes: dict[str, Probe] = {"store": partial(_store_answers, store)}
        if self._broker is None:
            host, port = parse_mqtt_url(self.mqtt_url)
            probes["mqtt"] = partial(port_answers, host, port, ANSWER_TIMEOUT_S)
        if self._mlflow is None:
            probes["mlflow"] = partial(http_ok, f"{self.mlflow_url.rstrip('/')}/health")
        return Supervisor(embedded, state, probes).start()

    def _start_broker(self, home: Path, state: EmbeddedState) -> None:
        self._broker = start_broker(
            home,
            state,
            host=self.config.listen_host,
            anonymous=not self.config.secure("mqtt"),
            port=self.config.mqtt_port,
            port_setting="FLOPS_MQTT_PORT",
        )
        self.mqtt_url = self._broker.url

    def _start_registry(self, home: Path, state: EmbeddedState, needs_images: bool) -> str:
        """Start (or re-use) the embedded registry for trained-model images when the ``venv``
        builder has no ``FLOPS_REGISTRY``, ``FLOPS_EMBEDDED_REGISTRY`` is not off and
        buildah and docker-registry are installed; its ``host:port``, else ``""``. Raises
        ``RegistryUnavailable`` when it does not start."""
        config = self.config
        if config.registry or not config.embedded_registry:
            return ""
        if builder_name(config, needs_images) != "venv":
            return ""
        if missing := missing_tools():
            logger.info(
                "no embedded registry, so no trained-model images: missing %s", ", ".join(missing)
            )
            return ""
        self._registry = start_registry(
            home,
            state,
            host=config.listen_host,
            port=config.registry_port,
            port_setting="FLOPS_REGISTRY_PORT",
        )
        return registry_address(self._registry)

    def service_url(self, component: EmbeddedComponent) -> str:
        """The address services and browsers get for an embedded ``component``: its URL with
        ``FLOPS_PUBLIC_HOST`` as the host when that is set, else the URL the manager uses."""
        public = self.config.public_host
        if not public:
            return component.url
        scheme = component.url.split("://", 1)[0]
        return f"{scheme}://{public}:{component.port}"

    def _advertise(self) -> None:
        """Set the addresses services and ``GET /tracking`` get for the embedded components,
        and warn about addresses other machines cannot use."""
        if self._broker is not None:
            self.service_mqtt_url = self.service_url(self._broker)
        if self._mlflow is not None:
            self.service_mlflow_url = self.service_url(self._mlflow)
            self.tracking_url = self.config.mlflow_public_url or self.service_mlflow_url
        embedded = self._broker is not None or self._mlflow is not None
        listen = self.config.listen_host
        if embedded and listen in ALL_INTERFACES and not self.config.public_host:
            logger.warning(
                "the embedded components listen on every interface (%s) but FLOPS_PUBLIC_HOST "
                "is not set: services and browsers get loopback addresses (%s, %s), which only "
                "this machine reaches",
                listen or "0.0.0.0",
                self.service_mqtt_url,
                self.tracking_url,
            )
        loopback = listen == "localhost" or listen.startswith("127.")
        if embedded and self.config.public_host and loopback:
            logger.warning(
                "FLOPS_PUBLIC_HOST=%s is given to services, but the embedded components listen "
                "on %s only (FLOPS_BIND_HOST): other machines cannot reach them",
                self.config.public_host,
                listen,
            )

    def _broker_admin(self, home: Path) -> MqttCredential | None:
        """The broker's admin credential: the embedded broker's own, or the configured one of
        an external broker (``None`` when there is none). Raises ``ConfigurationError`` for
        an external broker without one while MQTT security is on."""
        if self._broker is not None:
            return broker_admin(home)
        if self.config.mqtt_admin_username:
            return MqttCredential(self.config.mqtt_admin_username, self.config.mqtt_admin_password)
        if self.config.secure("mqtt"):
            raise ConfigurationError(
                f"The MQTT broker {self.mqtt_url} (FLOPS_MQTT_URL) needs an admin credential of "
                "its dynamic-security plugin, with which the manager issues per-project "
                "credentials: set FLOPS_MQTT_ADMIN_USERNAME and FLOPS_MQTT_ADMIN_PASSWORD (or "
                "FLOPS_INSECURE=mqtt for an anonymous broker on a test machine)."
            )
        return None

    def _credentials(self, home: Path, admin: MqttCredential | None) -> ProjectCredentials:
        """The issuers of the controls that are on (``FLOPS_INSECURE`` turns them off)."""
        mqtt: MqttAccessControl = NoMqttAccess()
        if self.config.secure("mqtt") and admin is not None:
            mqtt = MqttAccess(self.mqtt_url, admin.username, admin.password)
        data = DataAccess(home) if self.config.secure("data") else None
        flower = ProjectCA(home) if self.config.secure("flower") else None
        tracking: MlflowAccessControl = NoMlflowAccess(self.mlflow_url)
        mlflow_admin = self._mlflow_admin(home)
        if mlflow_admin is not None:
            tracking = MlflowAccess(self.mlflow_url, mlflow_admin.username, mlflow_admin.password)
        return ProjectCredentials(mqtt, flower=flower, data=data, mlflow=tracking)

    def _mlflow_admin(self, home: Path) -> MlflowCredential | None:
        """The tracking server's admin: the embedded server's own or the configured one of an
        external server; ``None`` with ``FLOPS_INSECURE=mlflow``. Raises
        ``ConfigurationError`` for an external server without one while the control is on."""
        if not self.config.secure("mlflow"):
            return None
        if self._mlflow is not None:
            return mlflow_admin(home)
        if self.config.mlflow_admin_username:
            return MlflowCredential(
                self.config.mlflow_admin_username, self.config.mlflow_admin_password
            )
        raise ConfigurationError(
            f"The MLflow server {self.mlflow_url} (FLOPS_MLFLOW_URL) needs an admin of its "
            "basic-auth app, with which the manager gives each project and customer its own "
            "user: set FLOPS_MLFLOW_ADMIN_USERNAME and FLOPS_MLFLOW_ADMIN_PASSWORD (or "
            "FLOPS_INSECURE=mlflow for a server without authentication on a test machine)."
        )

    def _start_mlflow(self, home: Path, state: EmbeddedState) -> None:
        urls = (self.config.mlflow_public_url,) if self.config.mlflow_public_url else ()
        self._mlflow = start_mlflow(
            home,
            state,
            host=self.config.listen_host,
            authentication=self.config.secure("mlflow"),
            port=self.config.mlflow_port,
            port_setting="FLOPS_MLFLOW_PORT",
            public=(self.config.public_host, *urls) if self.config.public_host or urls else (),
        )
        self.mlflow_url = self._mlflow.url

    def _lock_home(self, home: Path) -> None:
        """Hold ``home/manager.lock`` (``flock``; released when this process ends, even when
        killed). Waits up to ``HOME_LOCK_TIMEOUT_S`` for a manager that is stopping."""
        fd = os.open(home / "manager.lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + HOME_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise HomeInUse(
                        f"Another FLOps manager (pid {holder}) uses FLOPS_HOME={home}; stop it "
                        "first or set FLOPS_HOME to another directory."
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._home_lock = fd

    def stop(self, keep_running: bool = False) -> None:
        """Stop the manager.

        ``keep_running=False`` (the default; tests, ``flops demo``): every unfinished project
        fails with :data:`STOPPED_REASON`, its services are stopped, and so are MLflow and the
        broker. ``keep_running=True`` (``flops-manager`` on SIGTERM/SIGINT): only the manager
        stops; running projects' services keep running, and so do the embedded broker and
        MLflow while any project is active (those services report to them); the next start on
        the same ``FLOPS_HOME`` re-attaches them. Pending and building projects are resumed then.
        A start that fails stops like this too, leaving components it found running as they were.
        The supervisor stops first: nothing is restarted during a stop.
        """
        self._mock_jobs.close()
        if self._supervisor is not None:
            self._supervisor.stop()
            self._supervisor = None
        if self._server is not None:
            _close_server(self._server, self._thread)
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        active: list[str] | None = None  # unknown when the lifecycle never started
        if self._lifecycle is not None:
            self._lifecycle.close()
            if keep_running:
                active = self._lifecycle.active_projects()
                if active:
                    logger.info(
                        "left %d project(s) running (%s); the next start re-attaches them",
                        len(active),
                        ", ".join(active),
                    )
            else:
                self._lifecycle.fail_unfinished(STOPPED_REASON)
            self._lifecycle.orchestrator.close(stop_services=not keep_running)
            self._lifecycle.store.close()
        for component in (self._registry, self._mlflow, self._broker):
            if component is None:
                continue
            needed = bool(active) if active is not None else component.reused
            if keep_running and needed:
                component.detach()
            else:
                component.stop()
        self._mlflow = self._broker = self._registry = None
        if self._home_lock is not None:
            with contextlib.suppress(OSError):
                os.close(self._home_lock)  # releases the flock
            self._home_lock = None


def _store_answers(store: ProjectStore) -> bool:
    """Whether the project store serves a small read (``StoreUnavailable`` propagates)."""
    store.list_nodes()
    return True


def check_isolation(config: ManagerConfig) -> None:
    """Refuse a configuration that would run one customer's code where it reaches another's,
    and log a warning for each security control ``FLOPS_INSECURE`` turns off.

    The ``local`` orchestrator runs learners and aggregators, and so the customers' repository
    code, as the manager's own user on its machine, where ``FLOPS_HOME`` holds every
    credential; that is fine for one user (``auth=token``) but not for many (``auth=oakestra``).
    Raises ``ConfigurationError`` for that combination unless ``FLOPS_INSECURE`` lists ``local``.
    """
    for control in sorted(config.insecure):
        logger.warning(
            "security control %r is OFF (FLOPS_INSECURE=%s): %s",
            control,
            ",".join(sorted(config.insecure)),
            INSECURE_CONSEQUENCES[control],
        )
    if config.auth == "oakestra" and config.orchestrator == "local" and config.secure("local"):
        raise ConfigurationError(
            "FLOPS_AUTH=oakestra serves many customers, but the local orchestrator would run "
            "their repositories' code as the manager's own user, next to every credential in "
            "FLOPS_HOME. Use FLOPS_ORCHESTRATOR=oakestra, or FLOPS_AUTH=token for a single "
            "user (or FLOPS_INSECURE=local to accept the risk on a test machine)."
        )


INSECURE_CONSEQUENCES: dict[str, str] = {
    "mqtt": "the broker accepts anonymous clients; anyone on the network can read every "
    "status message and complete or fail any project",
    "flower": "aggregators serve plain gRPC to any client; anyone who learns an address "
    "receives the global model and can poison it",
    "data": "data servers serve plain Arrow Flight without tokens; anyone on the network can "
    "read, replace or drop a node's training data",
    "mlflow": "the tracking server has no authentication; anyone who reaches it reads and "
    "changes every project's runs and models",
    "local": "customers' code runs as the manager's user next to every credential",
}
"""What turning off each ``FLOPS_INSECURE`` control exposes (logged at start)."""


def restrict_home(home: Path) -> None:
    """Make ``home`` (``FLOPS_HOME``) private to the manager's user: the directory and each
    directory directly in it mode 0700, each file directly in it 0600.

    Everything the manager keeps (the store, MLflow's database and artifacts, models, logs,
    tokens, keys, the environment cache) lies under ``home``, so no other user of the machine
    can reach any of it; files created later inside are covered by the directories' modes.
    Raises ``OSError`` when ``home`` belongs to another user.
    """
    home.chmod(0o700)
    for entry in home.iterdir():
        if entry.is_symlink():
            continue
        entry.chmod(0o700 if entry.is_dir() else 0o600)


def _close_server(
    server: BaseWSGIServer | MultiSocketServer, thread: threading.Thread | None
) -> None:
    """Stop waitress: let the requests being served finish (up to ``API_STOP_TIMEOUT_S``),
    end its loop thread, then close every connection and the listening socket.

    The loop ends by itself once its socket map is empty (within one loop timeout, 1 s);
    the sockets are closed only after that, since closing them while the loop waits in
    ``select`` on them fails that call with "Bad file descriptor".
    """
    server.task_dispatcher.shutdown(timeout=API_STOP_TIMEOUT_S)
    connections = getattr(server, "_map", None)
    if connections is None:
        server.close()
        return
    sockets = dict(connections)
    connections.clear()
    if thread is not None:
        thread.join(timeout=API_STOP_TIMEOUT_S)
    wasyncore.close_all(sockets)
