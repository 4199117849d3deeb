"""Session-wide fixtures: real components on loopback (DESIGN.md §4)."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from flops_manager.broker import MosquittoBroker
from observatory.mlflow_server import MlflowServer


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A real Mosquitto broker for the whole test session; ``.url`` is ``mqtt://HOST:PORT``."""
    with MosquittoBroker(Path(tmp_path_factory.mktemp("mosquitto"))) as broker:
        yield broker


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server (SQLite + served artifacts) for the whole session;
    ``.url`` is ``http://HOST:PORT``."""
    with MlflowServer(Path(tmp_path_factory.mktemp("mlflow"))) as server:
        yield server
