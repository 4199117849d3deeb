"""Ports the suite picks never collide (issue: survive faults, "Cannot start the MLflow server
on 127.0.0.1:P (Address already in use)"): a picked port that another program takes before the
server binds it is replaced by a new pick; a given port is never replaced, and its error names
where it came from. Real Mosquitto and MLflow servers; the "other program" is a listening
socket of the test."""

import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import flops_manager.broker as broker_module
import observatory.mlflow_server as mlflow_module
from flops_manager.broker import BrokerUnavailable, MosquittoBroker
from flops_utils.logging import logger
from flops_utils.net import find_free_port, port_answers
from observatory.mlflow_server import MlflowServer, MlflowServerError


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another program (this socket) listens on for the whole test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", find_free_port()))
        busy.listen()
        yield busy.getsockname()[1]


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The FLOps logger's records (it does not propagate to the root logger)."""
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="flops")
    yield caplog
    logger.removeHandler(caplog.handler)


def _first_pick(port: int) -> Callable[[str], int]:
    """A ``find_free_port`` whose first pick is ``port`` (taken meanwhile), then the real one."""
    picks = iter([port])

    def pick(host: str = "127.0.0.1") -> int:
        return next(picks, None) or find_free_port(host)

    return pick


def test_mosquitto_replaces_a_picked_port_taken_before_its_bind(
    tmp_path: Path, taken: int, warnings: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_module, "find_free_port", _first_pick(taken))

    with MosquittoBroker(tmp_path, anonymous=True) as broker:
        assert broker.port != taken
        assert broker.pid is not None and broker.exit_code() is None
        assert port_answers(broker.host, broker.port)
    assert f"port {taken} was taken" in warnings.text


def test_mlflow_replaces_a_picked_port_taken_before_uvicorn_binds_it(
    tmp_path: Path, taken: int, warnings: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The early check is skipped, so that the port is lost where it hurt: at uvicorn's bind,
    # seconds after the pick.
    monkeypatch.setattr(mlflow_module, "find_free_port", _first_pick(taken))
    monkeypatch.setattr(MlflowServer, "_check_port_free", lambda self: None)

    with MlflowServer(tmp_path) as server:
        assert server.port != taken
        assert server.healthy()
    assert f"port {taken} was taken" in warnings.text


def test_a_given_port_that_is_taken_fails_naming_its_origin(tmp_path: Path, taken: int) -> None:
    broker = MosquittoBroker(tmp_path / "mqtt", port=taken, port_origin="FLOPS_TEST_MQTT_PORT")
    server = MlflowServer(tmp_path / "mlflow", port=taken, port_origin="FLOPS_TEST_MLFLOW_PORT")

    with pytest.raises(BrokerUnavailable, match=f"{taken}.*FLOPS_TEST_MQTT_PORT"):
        broker.start()
    with pytest.raises(MlflowServerError, match=f"{taken}.*FLOPS_TEST_MLFLOW_PORT"):
        server.start()
    assert broker.port == server.port == taken
    assert broker.pid is None and server.pid is None
