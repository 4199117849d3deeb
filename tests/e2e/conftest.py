"""Fixtures shared by the end-to-end flows: a manager's configuration and nodes with data."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from flow_testing import MockNodes
from mqtt_testing import manager_mqtt

from flops_manager.auth import read_api_token
from flops_manager.broker import MosquittoBroker
from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import local_nodes
from flops_manager.suite import ManagerSuite
from observatory.mlflow_server import MlflowServer


@pytest.fixture(scope="module")
def manager_config(
    tmp_path_factory: pytest.TempPathFactory,
    mqtt_broker: MosquittoBroker,
    mlflow_server: MlflowServer,
) -> ManagerConfig:
    """An embedded manager on the session's broker and MLflow server, with a fresh
    ``FLOPS_HOME`` and a free port; a module changes it with
    ``flow_testing.with_settings``."""
    return ManagerConfig(
        home=Path(tmp_path_factory.mktemp("flops-home")),
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url=mlflow_server.url,
        insecure=frozenset({"mlflow"}),
    )


@pytest.fixture(scope="module")
def mnist_nodes(tmp_path_factory: pytest.TempPathFactory) -> MockNodes:
    """Start ``count`` local nodes for a manager and give them IID MNIST partitions (tag
    ``mnist``); the context yields a client of the manager and stops the nodes at its end."""

    @contextmanager
    def start(suite: ManagerSuite, count: int) -> Iterator[ManagerClient]:
        token = read_api_token(suite.config.home)
        api = ManagerClient(suite.url, token=token)
        with local_nodes(count, Path(tmp_path_factory.mktemp("nodes")), suite.url, token):
            api.wait_for_nodes(count, timeout_s=30)
            api.provide_mocks(dataset="mnist", tag="mnist")
            yield api

    return start
