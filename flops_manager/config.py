"""The manager's configuration, read once from ``FLOPS_*`` environment variables.

Every field has an embedded default, so that with no configuration at all the manager runs the
embedded suite on this machine (DESIGN.md §3 "Embedded default").
"""

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ManagerConfig(BaseModel):
    """Where the manager keeps its state and which components it uses.

    Attributes:
        home: directory for the embedded store, logs, MLflow data and the environment cache.
            ``FLOPS_HOME``; defaults to ``./.flops``.
        host: interface the REST API listens on (``FLOPS_MANAGER_HOST``, default loopback).
        port: TCP port of the REST API (``FLOPS_MANAGER_PORT``, default 8080; 0 picks a free one).
        db_url: ``mongodb://...`` for MongoDB, otherwise a directory for the embedded store
            (``FLOPS_DB_URL``; default ``<home>/db``).
        mqtt_url: ``mqtt://HOST:PORT`` of an existing broker (``FLOPS_MQTT_URL``); empty starts
            the embedded Mosquitto.
        mlflow_url: URL of an existing MLflow tracking server (``FLOPS_MLFLOW_URL``); empty starts
            the embedded one.
        mlflow_public_url: the MLflow GUI address a user's browser can reach
            (``FLOPS_MLFLOW_PUBLIC_URL``); defaults to ``mlflow_url``.
        orchestrator: orchestrator backend name (``FLOPS_ORCHESTRATOR``, default ``local``).
        builder: builder backend name (``FLOPS_BUILDER``, default ``venv``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    home: Path = Path(".flops")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    db_url: str = ""
    mqtt_url: str = ""
    mlflow_url: str = ""
    mlflow_public_url: str = ""
    orchestrator: str = "local"
    builder: str = "venv"

    @property
    def store_url(self) -> str:
        """``db_url`` or, when empty, the embedded store's directory under ``home``."""
        return self.db_url or str(self.home / "db")

    @classmethod
    def from_env(cls, **overrides: object) -> "ManagerConfig":
        """Build the configuration from ``FLOPS_*`` variables; ``overrides`` win over them."""
        names = {
            "home": "FLOPS_HOME",
            "host": "FLOPS_MANAGER_HOST",
            "port": "FLOPS_MANAGER_PORT",
            "db_url": "FLOPS_DB_URL",
            "mqtt_url": "FLOPS_MQTT_URL",
            "mlflow_url": "FLOPS_MLFLOW_URL",
            "mlflow_public_url": "FLOPS_MLFLOW_PUBLIC_URL",
            "orchestrator": "FLOPS_ORCHESTRATOR",
            "builder": "FLOPS_BUILDER",
        }
        values: dict[str, object] = {
            field: os.environ[var] for field, var in names.items() if os.environ.get(var)
        }
        values.update(overrides)
        return cls.model_validate(values)
