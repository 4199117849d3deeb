"""The manager and the components it needs, wired together and started on this machine.

With the embedded default (no ``FLOPS_MQTT_URL`` / ``FLOPS_MLFLOW_URL``) the suite also starts
Mosquitto and an MLflow tracking server as child processes; the project store is MongoDB or the
embedded on-disk store (``FLOPS_DB_URL``). The REST API is served by waitress in a thread.
"""

import threading
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import waitress
from waitress.server import BaseWSGIServer, MultiSocketServer

from flops_manager.app import create_app
from flops_manager.broker import MosquittoBroker
from flops_manager.config import ManagerConfig
from flops_manager.errors import ConfigurationError
from flops_manager.mqtt_listener import StatusListener
from flops_manager.orchestrators import make_orchestrator
from flops_manager.projects import ProjectLifecycle
from flops_manager.store import ProjectStore
from flops_utils.logging import logger

BUILDERS: dict[str, str] = {"venv": "image_builder.venv_builder:VenvBuilder"}
"""Builder name → ``module:class``; the ``oci`` builder joins with the image issue."""

API_THREADS = 16
"""waitress worker threads; each event-stream follower holds one while it listens."""


class ManagerSuite:
    """Starts and stops the manager with its broker, tracking server, store and orchestrator.

    Args:
        config: see :class:`ManagerConfig`.

    ``url`` is the API's base URL (``http://HOST:PORT``) once started; ``mlflow_url`` and
    ``mqtt_url`` are the tracking server and broker in use. Raises ``FlopsError`` subclasses
    from :meth:`start` when a component cannot start (with the component's own message).
    """

    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        self.mqtt_url = config.mqtt_url
        self.mlflow_url = config.mlflow_url
        self.url = ""
        self._broker: MosquittoBroker | None = None
        self._mlflow: Any = None
        self._listener: StatusListener | None = None
        self._lifecycle: ProjectLifecycle | None = None
        self._server: BaseWSGIServer | MultiSocketServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def lifecycle(self) -> ProjectLifecycle:
        """The running project lifecycle (after :meth:`start`)."""
        assert self._lifecycle is not None, "start the suite first"
        return self._lifecycle

    def start(self) -> "ManagerSuite":
        """Start every component; the broker and MLflow start in parallel."""
        home = self.config.home.resolve()
        home.mkdir(parents=True, exist_ok=True)
        try:
            with ThreadPoolExecutor(max_workers=2) as pool:
                broker = None if self.mqtt_url else pool.submit(self._start_broker, home)
                mlflow = None if self.mlflow_url else pool.submit(self._start_mlflow, home)
                for future in (broker, mlflow):
                    if future is not None:
                        future.result()
            store = ProjectStore(self.config.store_url)
            builder = _make_builder(self.config.builder, home / "envs")
            orchestrator = make_orchestrator(
                self.config.orchestrator,
                home / "services",
                lambda *args: self.lifecycle.on_service_exit(*args),
            )
            if orchestrator.needs_images and not getattr(builder, "produces_images", False):
                raise ConfigurationError(
                    f"The {self.config.orchestrator!r} orchestrator runs OCI images, but the "
                    f"{self.config.builder!r} builder makes none; set FLOPS_BUILDER=oci."
                )
            self._lifecycle = ProjectLifecycle(
                store, builder, orchestrator, home / "projects", self.mqtt_url, self.mlflow_url
            )
            self._listener = StatusListener(self.mqtt_url, self._lifecycle.on_status)
            self._listener.start()
            public_mlflow = self.config.mlflow_public_url or self.mlflow_url
            app = create_app(self._lifecycle, store, public_mlflow, self.config.authenticator())
            self._server = waitress.create_server(
                app, host=self.config.host, port=self.config.port, threads=API_THREADS
            )
            port = self._server.socket.getsockname()[1]
            self.url = f"http://{self.config.host}:{port}"
            self._thread = threading.Thread(target=self._server.run, name="api", daemon=True)
            self._thread.start()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "FLOps manager on %s (MLflow %s, MQTT %s)", self.url, public_mlflow, self.mqtt_url
        )
        return self

    def _start_broker(self, home: Any) -> None:
        self._broker = MosquittoBroker(home / "mosquitto").start()
        self.mqtt_url = self._broker.url

    def _start_mlflow(self, home: Any) -> None:
        from observatory.mlflow_server import MlflowServer

        self._mlflow = MlflowServer(home / "mlflow").start()
        self.mlflow_url = self._mlflow.url

    def stop(self) -> None:
        """Stop the API, every project's services, the listener, MLflow and the broker."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._lifecycle is not None:
            self._lifecycle.close()
            self._lifecycle.orchestrator.close()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self._mlflow is not None:
            self._mlflow.stop()
            self._mlflow = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def __enter__(self) -> "ManagerSuite":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _make_builder(name: str, cache_dir: Any) -> Any:
    """Instantiate the builder backend ``name``; ``ConfigurationError`` lists valid names."""
    import importlib

    if name not in BUILDERS:
        raise ConfigurationError(
            f"Unknown builder {name!r}; set FLOPS_BUILDER to one of {sorted(BUILDERS)}."
        )
    module_name, class_name = BUILDERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(cache_dir)
