"""The embedded broker and MLflow are supervised (issue: survive faults, "SIGKILL Mosquitto:
... /healthz says ok; no warning logged"): a crash is logged naming the component, ``/healthz``
reports it (degraded), the component comes back on its port, and what was issued before the
crash (MQTT credentials, MLflow experiments, the admin credentials) still works.

A real manager suite on the embedded default (authentication on) in a temporary FLOPS_HOME; the
crashes are real SIGKILLs of the Mosquitto and MLflow processes.
"""

import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import requests
from flow_testing import processes_mentioning
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_until

from flops_manager.config import ManagerConfig
from flops_manager.embedded import EmbeddedState, broker_admin, mlflow_admin
from flops_manager.mlflow_access import MlflowAccess
from flops_manager.mqtt_access import MqttAccess, MqttCredential
from flops_manager.mqtt_listener import StatusListener
from flops_manager.suite import ManagerSuite
from flops_utils.contract.topics import ParsedTopic
from flops_utils.logging import logger
from flops_utils.notifications import parse_mqtt_url
from flops_utils.types import Component

pytestmark = pytest.mark.e2e

RECOVERY_TIMEOUT_S = 30.0
MLFLOW_RECOVERY_TIMEOUT_S = 150.0


class Records(logging.Handler):
    """Keeps the FLOps logger's records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


class Running:
    """The module's suite, what its listener received, and the log."""

    def __init__(self, suite: ManagerSuite, log: Records) -> None:
        self.suite = suite
        self.log = log
        self.received: list[str] = []
        self.stopped = False
        listener = self.listener
        handler = listener.handler

        def recording(topic: ParsedTopic, payload: dict[str, Any], ack: Any) -> None:
            self.received.append(str(payload.get("message")))
            handler(topic, payload, ack)

        listener.handler = recording

    @property
    def listener(self) -> StatusListener:
        listener = self.suite._listener
        assert listener is not None
        return listener

    def health(self) -> dict[str, Any]:
        response = requests.get(f"{self.suite.url}/healthz", timeout=5)
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    log = Records()
    logger.addHandler(log)
    home = Path(tmp_path_factory.mktemp("supervision")) / "home"
    suite = ManagerSuite(ManagerConfig(home=home, port=0)).start()
    try:
        yield Running(suite, log)
    finally:
        suite.stop()
        logger.removeHandler(log)


def _publish(mqtt_url: str, credential: MqttCredential, topic: str, message: str) -> None:
    """Connect with ``credential`` (client id = user name), publish QoS 1, wait for PUBACK."""
    host, port = parse_mqtt_url(mqtt_url)
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=credential.username)
    client.username_pw_set(credential.username, credential.password)
    client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    client.connect(host, port)
    client.loop_start()
    try:
        assert connected.wait(10), "the broker refused the project credential"
        info = client.publish(topic, f'{{"instance": "learner-1", "message": "{message}"}}', qos=1)
        info.wait_for_publish(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def _take_port(port: int, timeout_s: float = 5.0) -> socket.socket:
    """Listen on ``port`` as soon as the dead broker released it (before its restart)."""

    def bound() -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # The broker's side of its closed connections lingers in TIME_WAIT on the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            return None
        sock.listen()
        return sock

    return wait_until(bound, timeout_s, f"port {port} was not released", interval_s=0.001)


def _component(health: dict[str, Any], name: str) -> str:
    return str(health["components"][name]["status"])


def test_a_killed_broker_comes_back_on_its_port_and_the_issued_credentials_work(
    running: Running,
) -> None:
    # Prepare: a project credential, and a message that reaches the manager's listener.
    suite = running.suite
    home = suite.config.home
    admin = broker_admin(home)
    assert admin is not None
    access = MqttAccess(suite.mqtt_url, admin.username, admin.password)
    project = uuid.uuid4().hex[:12]
    env = access.grant(project, "learner-1", Component.LEARNER)
    credential = MqttCredential(env["FLOPS_MQTT_USERNAME"], env["FLOPS_MQTT_PASSWORD"])
    topic = f"flops/{project}/learner/progress"
    _publish(suite.mqtt_url, credential, topic, "before the crash")
    wait_until(lambda: "before the crash" in running.received, 10, "the listener got nothing")
    assert running.health()["status"] == "ok"
    port = parse_mqtt_url(suite.mqtt_url)[1]
    old = EmbeddedState(home).process("mqtt")
    assert old is not None

    # Execute: kill Mosquitto; another program holds its port for a while.
    os.kill(old.pid, signal.SIGKILL)
    holder = _take_port(port)
    try:
        degraded = wait_until(
            lambda: (h := running.health())["status"] == "degraded" and h,
            10,
            "healthz did not report the crash",
        )
        wait_until(
            lambda: any("restarting the embedded MQTT" in m for m in running.log.at(logging.ERROR)),
            10,
            "no failed restart logged",
        )
    finally:
        holder.close()
    wait_until(lambda: running.health()["status"] == "ok", RECOVERY_TIMEOUT_S, "no recovery")
    wait_until(lambda: running.listener.connected, RECOVERY_TIMEOUT_S, "listener not back")
    _publish(suite.mqtt_url, credential, topic, "after the restart")
    access.revoke(project)  # administration works on the restarted broker too

    # Assert
    assert _component(degraded, "mqtt") in ("restarting", "down")
    assert degraded["components"]["api"] == {"status": "ok"}
    assert str(home) not in str(degraded)
    errors = running.log.at(logging.ERROR)
    assert any("MQTT broker" in m and f"pid {old.pid}" in m and "SIGKILL" in m for m in errors)
    assert any(f"port stays {port}" in m for m in errors)
    new = EmbeddedState(home).process("mqtt")
    assert new is not None and new != old and new.is_alive()
    assert EmbeddedState(home).port("mqtt") == port
    assert parse_mqtt_url(suite.mqtt_url)[1] == port
    wait_until(lambda: "after the restart" in running.received, 10, "message after restart lost")
    assert running.listener.last_connected_at is not None
    assert running.listener.connects >= 2
    with pytest.raises(AssertionError, match="refused"):
        _publish(suite.mqtt_url, credential, topic, "revoked")


def test_a_killed_mlflow_server_comes_back_on_its_port_with_its_experiments(
    running: Running,
) -> None:
    # Prepare: an experiment made with the admin credential.
    suite = running.suite
    home = suite.config.home
    admin = mlflow_admin(home)
    assert admin is not None
    access = MlflowAccess(suite.mlflow_url, admin.username, admin.password)
    experiment_id = access.ensure_experiment("supervision-test", "p-supervision")
    port = EmbeddedState(home).port("mlflow")
    old = EmbeddedState(home).process("mlflow")
    assert old is not None and running.health()["status"] == "ok"

    # Execute: kill the server's main process (its uvicorn worker stays behind, on the port).
    os.kill(old.pid, signal.SIGKILL)
    degraded = wait_until(
        lambda: (h := running.health())["status"] == "degraded" and h,
        10,
        "healthz did not report the crash",
    )
    wait_until(
        lambda: running.health()["status"] == "ok",
        MLFLOW_RECOVERY_TIMEOUT_S,
        lambda: f"MLflow did not come back: {running.health()}",
    )

    # Assert
    assert _component(degraded, "mlflow") in ("restarting", "down")
    errors = running.log.at(logging.ERROR)
    assert any("MLflow tracking server" in m and f"pid {old.pid}" in m for m in errors)
    assert any("MLflow tracking server is back" in m for m in running.log.at(logging.WARNING))
    new = EmbeddedState(home).process("mlflow")
    assert new is not None and new != old and new.is_alive()
    assert EmbeddedState(home).port("mlflow") == port
    assert suite.mlflow_url.endswith(f":{port}")
    assert access.ensure_experiment("supervision-test", "p-supervision") == experiment_id


def test_stop_leaves_no_process(running: Running) -> None:
    home = running.suite.config.home
    processes = [EmbeddedState(home).process(name) for name in ("mqtt", "mlflow")]

    running.suite.stop()

    assert all(p is not None and p.wait(10) for p in processes)
    assert processes_mentioning(str(home.resolve())) == []
