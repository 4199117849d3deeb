"""The manager's configuration, read once from ``FLOPS_*`` environment variables.

Every field has an embedded default, so that with no configuration at all the manager runs the
embedded suite on this machine (the README's "Embedded default").
"""

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from flops_manager.auth import Authenticator


SecurityControl = Literal["mqtt", "flower", "data", "mlflow", "local"]
"""A security control ``FLOPS_INSECURE`` can turn off (see :class:`ManagerConfig`)."""


class ManagerConfig(BaseModel):
    """Where the manager keeps its state and which components it uses.

    Attributes:
        home: directory for the embedded store, logs, MLflow data and the environment cache.
            ``FLOPS_HOME``; defaults to ``./.flops``.
        host: interface the REST API listens on (``FLOPS_MANAGER_HOST``, default loopback).
        port: TCP port of the REST API (``FLOPS_MANAGER_PORT``, default 8080; 0 picks a free one).
        bind_host: interface the embedded Mosquitto and MLflow listen on (``FLOPS_BIND_HOST``);
            empty: ``host``, so ``FLOPS_MANAGER_HOST=0.0.0.0`` opens them to the network too.
            IPv4 addresses and host names; ``0.0.0.0`` is every interface.
        mqtt_port / mlflow_port: fixed ports of the embedded Mosquitto and MLflow
            (``FLOPS_MQTT_PORT`` / ``FLOPS_MLFLOW_PORT``); 0 (the default) re-uses the port
            recorded in ``$FLOPS_HOME/embedded.json`` or picks a free one the first time. A
            fixed port another program holds fails the start, naming the variable.
        public_host: the host name or address of this machine that services on other machines
            and users' browsers reach (``FLOPS_PUBLIC_HOST``). When set, the embedded broker's
            and MLflow's URLs handed to services (``FLOPS_MQTT_URL`` / ``FLOPS_MLFLOW_URL`` in
            their environment) and the GUI address of ``GET /tracking`` use it instead of the
            address the manager itself connects to. External components
            (``mqtt_url``, ``mlflow_url``) keep their own URLs.
        db_url: ``mongodb://...`` for MongoDB, otherwise a directory for the embedded store
            (``FLOPS_DB_URL``; default ``<home>/db``).
        mqtt_url: ``mqtt://HOST:PORT`` of an existing broker (``FLOPS_MQTT_URL``); empty starts
            the embedded Mosquitto.
        mqtt_admin_username / mqtt_admin_password: with ``mqtt_url``, a client of that
            broker's dynamic-security plugin allowed to administer it (the manager issues and
            revokes per-project credentials with it and reads every status message)
            (``FLOPS_MQTT_ADMIN_USERNAME`` / ``FLOPS_MQTT_ADMIN_PASSWORD``); the embedded broker
            makes its own.
        mlflow_url: URL of an existing MLflow tracking server (``FLOPS_MLFLOW_URL``); empty starts
            the embedded one.
        mlflow_admin_username / mlflow_admin_password: with ``mlflow_url``, an admin of
            that server's basic-auth app (the manager creates per-project and per-customer
            users with it) (``FLOPS_MLFLOW_ADMIN_USERNAME`` / ``FLOPS_MLFLOW_ADMIN_PASSWORD``);
            the embedded server makes its own.
        mlflow_public_url: the MLflow GUI address a user's browser can reach
            (``FLOPS_MLFLOW_PUBLIC_URL``); defaults to ``mlflow_url`` or, for the embedded
            server, ``http://<public_host>:<its port>`` (loopback without ``public_host``).
        orchestrator: orchestrator backend name (``FLOPS_ORCHESTRATOR``, default ``local``).
        builder: builder backend name (``FLOPS_BUILDER``): ``venv`` or ``oci``; empty (the
            default) picks what the orchestrator runs: ``oci`` for orchestrators that pull
            images (``oakestra``), else ``venv``.
        registry: ``host[:port]`` of the OCI registry the ``oci`` builder pushes to
            (``FLOPS_REGISTRY``). Empty with the ``venv`` builder (the embedded default): the
            suite runs its own registry (``docker-registry``, :mod:`flops_manager.
            embedded_registry`) for the trained-model images when buildah and
            docker-registry are installed and ``embedded_registry`` is on.
        embedded_registry: whether the suite runs that registry (``FLOPS_EMBEDDED_REGISTRY``,
            default true; ``false``: no trained-model images without ``FLOPS_REGISTRY``, the
            local backend serves trained models from virtualenvs).
        registry_port: fixed port of the embedded registry (``FLOPS_REGISTRY_PORT``); 0 (the
            default) re-uses the recorded port or picks a free one, as ``mqtt_port``. It
            listens on ``bind_host``.
        registry_public: ``host[:port]`` of that registry as the workers' container runtimes
            and users pull from it, when it differs from ``registry``
            (``FLOPS_REGISTRY_PUBLIC``; default: ``registry``). E.g. the docker-compose suite's
            registry: the manager pushes to ``registry:5000`` inside the suite, workers pull
            from ``FLOPS_PUBLIC_HOST:FLOPS_REGISTRY_PORT``. The image references the manager
            hands out (to Oakestra, in project documents) name this one.
        registry_namespace: path under the registry (``FLOPS_REGISTRY_NAMESPACE``, default
            ``flops``).
        registry_tls_verify: ``false`` for a plain-HTTP registry (``FLOPS_REGISTRY_TLS_VERIFY``,
            default true).
        base_image: the Python 3.11 base image the ``oci`` builder builds from
            (``FLOPS_BASE_IMAGE``). Empty with the embedded registry: the manager makes one
            with debootstrap on the first trained-model build (:mod:`flops_manager.base_image`).
        oakestra_url: the Oakestra root orchestrator's system manager, e.g.
            ``http://oakestra-root:10000`` (``FLOPS_OAKESTRA_URL``; ``oakestra`` orchestrator).
        oakestra_user / oakestra_password: the Oakestra account projects are deployed with
            (``FLOPS_OAKESTRA_USER`` / ``FLOPS_OAKESTRA_PASSWORD``, default ``Admin``/``Admin``,
            Oakestra's default account).
        oakestra_namespace: namespace of the applications and services
            (``FLOPS_OAKESTRA_NAMESPACE``, default ``flops``).
        oakestra_organization: the Oakestra organization to log in to
            (``FLOPS_OAKESTRA_ORGANIZATION``, default ``root``, Oakestra's default one).
        oakestra_mqtt_url / oakestra_mlflow_url: the broker and MLflow addresses the services
            on the workers reach (``FLOPS_OAKESTRA_MQTT_URL`` / ``FLOPS_OAKESTRA_MLFLOW_URL``;
            default: ``mqtt_url`` / ``mlflow_url``).
        oakestra_port_range: ``FIRST-LAST`` (inclusive) ports the ``oakestra`` orchestrator
            publishes aggregators and trained-model servers on, on the workers
            (``FLOPS_OAKESTRA_PORT_RANGE``, default ``30000-30999``).
        auth: ``token`` (one API token in ``<home>/api-token``, created at first start) or
            ``oakestra`` (Oakestra RS256 access tokens) (``FLOPS_AUTH``, default ``token``).
        jwt_public_key_file: PEM file of the Oakestra root orchestrator's public key, needed
            with ``auth=oakestra`` (``FLOPS_JWT_PUBLIC_KEY_FILE``).
        insecure: security controls turned off, comma-separated (``FLOPS_INSECURE``; default
            none, every control on): ``mqtt`` (anonymous broker, no per-project MQTT
            credentials), ``flower`` (plain gRPC, no Flower client authentication), ``data``
            (plain Arrow Flight, no data tokens), ``mlflow`` (an MLflow server without
            authentication: anyone who reaches it reads and writes every run), ``local``
            (allow ``auth=oakestra``, that is many customers, with the ``local`` orchestrator,
            which runs every customer's code as the manager's own user on the manager's
            machine). The manager logs a warning at
            start for each.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    home: Path = Path(".flops")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    bind_host: str = ""
    mqtt_port: int = Field(default=0, ge=0, le=65535)
    mlflow_port: int = Field(default=0, ge=0, le=65535)
    public_host: str = Field(
        default="", pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]*)$"
    )  # a host name, an IPv4 address or a bracketed IPv6 one; no scheme, no port
    db_url: str = ""
    mqtt_url: str = ""
    mqtt_admin_username: str = ""
    mqtt_admin_password: str = Field(default="", repr=False)
    mlflow_url: str = ""
    mlflow_admin_username: str = ""
    mlflow_admin_password: str = Field(default="", repr=False)
    mlflow_public_url: str = ""
    orchestrator: str = "local"
    builder: str = ""
    registry: str = ""
    embedded_registry: bool = True
    registry_port: int = Field(default=0, ge=0, le=65535)
    registry_public: str = ""
    registry_namespace: str = "flops"
    registry_tls_verify: bool = True
    base_image: str = ""
    oakestra_url: str = ""
    oakestra_user: str = "Admin"
    oakestra_password: str = Field(default="Admin", repr=False)
    oakestra_namespace: str = Field(default="flops", pattern=r"^[a-zA-Z0-9]{1,30}$")
    oakestra_organization: str = "root"
    oakestra_mqtt_url: str = ""
    oakestra_mlflow_url: str = ""
    oakestra_port_range: str = Field(default="30000-30999", pattern=r"^\d{1,5}-\d{1,5}$")
    auth: Literal["token", "oakestra"] = "token"
    jwt_public_key_file: str = ""
    insecure: frozenset[SecurityControl] = frozenset()

    @property
    def store_url(self) -> str:
        """``db_url`` or, when empty, the embedded store's directory under ``home``."""
        return self.db_url or str(self.home / "db")

    def authenticator(self) -> "Authenticator":
        """The :class:`Authenticator` this configuration selects.

        Node credentials (:class:`~flops_manager.auth.NodeCredentials`) are accepted with
        either. ``token`` creates ``<home>/api-token`` when missing. Raises ``ConfigurationError``
        when ``auth=oakestra`` has no readable public key file.
        """
        from flops_manager.auth import (
            ApiTokenAuth,
            NodeCredentials,
            OakestraJwtAuth,
            WithNodeCredentials,
            load_or_create_api_token,
        )
        from flops_manager.errors import ConfigurationError

        nodes = NodeCredentials(self.home.resolve())
        if self.auth == "token":
            return WithNodeCredentials(
                ApiTokenAuth(load_or_create_api_token(self.home.resolve())), nodes
            )
        try:
            return WithNodeCredentials(
                OakestraJwtAuth(Path(self.jwt_public_key_file).read_text()), nodes
            )
        except OSError as exc:
            raise ConfigurationError(
                f"FLOPS_AUTH=oakestra needs the Oakestra public key: cannot read "
                f"FLOPS_JWT_PUBLIC_KEY_FILE={self.jwt_public_key_file!r} ({exc.strerror})."
            ) from exc

    @classmethod
    def from_env(cls, **overrides: object) -> "ManagerConfig":
        """Build the configuration from ``FLOPS_*`` variables; ``overrides`` win over them."""
        names = {
            "home": "FLOPS_HOME",
            "host": "FLOPS_MANAGER_HOST",
            "port": "FLOPS_MANAGER_PORT",
            "bind_host": "FLOPS_BIND_HOST",
            "mqtt_port": "FLOPS_MQTT_PORT",
            "mlflow_port": "FLOPS_MLFLOW_PORT",
            "public_host": "FLOPS_PUBLIC_HOST",
            "db_url": "FLOPS_DB_URL",
            "mqtt_url": "FLOPS_MQTT_URL",
            "mqtt_admin_username": "FLOPS_MQTT_ADMIN_USERNAME",
            "mqtt_admin_password": "FLOPS_MQTT_ADMIN_PASSWORD",
            "mlflow_url": "FLOPS_MLFLOW_URL",
            "mlflow_admin_username": "FLOPS_MLFLOW_ADMIN_USERNAME",
            "mlflow_admin_password": "FLOPS_MLFLOW_ADMIN_PASSWORD",
            "mlflow_public_url": "FLOPS_MLFLOW_PUBLIC_URL",
            "orchestrator": "FLOPS_ORCHESTRATOR",
            "builder": "FLOPS_BUILDER",
            "registry": "FLOPS_REGISTRY",
            "embedded_registry": "FLOPS_EMBEDDED_REGISTRY",
            "registry_port": "FLOPS_REGISTRY_PORT",
            "registry_public": "FLOPS_REGISTRY_PUBLIC",
            "registry_namespace": "FLOPS_REGISTRY_NAMESPACE",
            "registry_tls_verify": "FLOPS_REGISTRY_TLS_VERIFY",
            "base_image": "FLOPS_BASE_IMAGE",
            "oakestra_url": "FLOPS_OAKESTRA_URL",
            "oakestra_user": "FLOPS_OAKESTRA_USER",
            "oakestra_password": "FLOPS_OAKESTRA_PASSWORD",
            "oakestra_namespace": "FLOPS_OAKESTRA_NAMESPACE",
            "oakestra_organization": "FLOPS_OAKESTRA_ORGANIZATION",
            "oakestra_mqtt_url": "FLOPS_OAKESTRA_MQTT_URL",
            "oakestra_mlflow_url": "FLOPS_OAKESTRA_MLFLOW_URL",
            "oakestra_port_range": "FLOPS_OAKESTRA_PORT_RANGE",
            "auth": "FLOPS_AUTH",
            "jwt_public_key_file": "FLOPS_JWT_PUBLIC_KEY_FILE",
            "insecure": "FLOPS_INSECURE",
        }
        values: dict[str, object] = {
            field: os.environ[var] for field, var in names.items() if os.environ.get(var)
        }
        if isinstance(values.get("insecure"), str):
            listed = str(values["insecure"]).split(",")
            values["insecure"] = frozenset(c.strip() for c in listed if c.strip())
        values.update(overrides)
        return cls.model_validate(values)

    @property
    def listen_host(self) -> str:
        """The interface the embedded components listen on: ``bind_host`` or else ``host``."""
        return self.bind_host or self.host

    def secure(self, control: SecurityControl) -> bool:
        """Whether the security ``control`` is on (not listed in ``insecure``)."""
        return control not in self.insecure
