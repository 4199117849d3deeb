"""Addresses the operator chooses: the embedded Mosquitto and MLflow listen on
``FLOPS_BIND_HOST`` on fixed ports (``FLOPS_MQTT_PORT``, ``FLOPS_MLFLOW_PORT``), services and
``GET /tracking`` get ``FLOPS_PUBLIC_HOST``, and a browser opening a tracking route is
redirected to the MLflow GUI.

The components are real (Mosquitto, MLflow with its basic-auth app), reached through this
machine's non-loopback address.
"""

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import requests
from mqtt_testing import manager_mqtt
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_until

from flops_manager.app import project_gui
from flops_manager.auth import read_api_token
from flops_manager.broker import MosquittoBroker
from flops_manager.config import ManagerConfig
from flops_manager.embedded import (
    STATE_FILE,
    EmbeddedState,
    broker_admin,
    mlflow_admin,
    start_broker,
)
from flops_manager.records import MlflowRecord, ProjectRecord
from flops_manager.suite import ManagerSuite
from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.errors import FlopsError
from flops_utils.net import find_free_port, port_answers

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
"""What a browser's navigation sends as ``Accept`` (Chromium's)."""

GUI = "http://gui.example:5000"
"""An MLflow GUI address no test reaches: the redirect tests only read ``Location``."""


def outside_address() -> str:
    """This machine's address on its default route (what another machine reaches it on);
    skips the test when there is none, or only loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only the route is looked up
            address = str(probe.getsockname()[0])
        except OSError:
            address = ""
    if not address or address.startswith("127."):
        listed = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
        address = next((a for a in listed if "." in a and not a.startswith("127.")), "")
    if not address:
        pytest.skip("this machine has no non-loopback IPv4 address")
    return address


@pytest.fixture(scope="module")
def public_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerSuite]:
    """An embedded manager (its own Mosquitto and MLflow, every security control on) whose
    components listen on every interface on fixed ports, advertising the outside address."""
    config = ManagerConfig(
        home=Path(tmp_path_factory.mktemp("public-home")),
        port=0,
        bind_host="0.0.0.0",
        mqtt_port=find_free_port("0.0.0.0"),
        mlflow_port=find_free_port("0.0.0.0"),
        public_host=outside_address(),
    )
    with ManagerSuite(config) as suite:
        yield suite


def test_components_listen_where_asked_and_services_get_the_public_address(
    public_suite: ManagerSuite,
) -> None:
    config = public_suite.config
    public = config.public_host

    recorded = json.loads((config.home / STATE_FILE).read_text())
    assert (recorded["mqtt"]["port"], recorded["mqtt"]["host"]) == (config.mqtt_port, "0.0.0.0")
    assert (recorded["mlflow"]["port"], recorded["mlflow"]["host"]) == (
        config.mlflow_port,
        "0.0.0.0",
    )
    assert public_suite.service_mqtt_url == f"mqtt://{public}:{config.mqtt_port}"
    assert public_suite.service_mlflow_url == f"http://{public}:{config.mlflow_port}"
    assert public_suite.mqtt_url == f"mqtt://127.0.0.1:{config.mqtt_port}"  # the manager's own
    token = read_api_token(config.home)
    tracking = requests.get(
        f"{public_suite.url}/api/flops/tracking",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert tracking.json() == {"url": f"http://{public}:{config.mlflow_port}"}


def test_the_broker_answers_on_the_outside_address(public_suite: ManagerSuite) -> None:
    admin = broker_admin(public_suite.config.home.resolve())
    assert admin is not None
    answered: list[Any] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="outside-probe")
    client.username_pw_set(admin.username, admin.password)
    client.on_connect = lambda _c, _u, _f, code, _p: answered.append(code)
    client.connect(public_suite.config.public_host, public_suite.config.mqtt_port)
    client.loop_start()
    try:
        wait_until(lambda: answered, 10, "no CONNACK on the outside address")
    finally:
        client.disconnect()
        client.loop_stop()
    assert not answered[0].is_failure


def test_the_mlflow_gui_serves_its_public_address(public_suite: ManagerSuite) -> None:
    """MLflow refuses a ``Host`` outside loopback and the private ranges and a POST from
    another origin unless it was started for that public address; the GUI's own search call
    (a POST from the GUI's origin) must pass."""
    gui = public_suite.tracking_url
    admin = mlflow_admin(public_suite.config.home.resolve())
    assert admin is not None

    page = requests.get(f"{gui}/", timeout=10)
    search = requests.post(
        f"{gui}/ajax-api/2.0/mlflow/experiments/search",
        json={"max_results": 1},
        headers={"Origin": gui},
        auth=(admin.username, admin.password),
        timeout=10,
    )
    elsewhere = requests.post(
        f"{gui}/ajax-api/2.0/mlflow/experiments/search",
        json={"max_results": 1},
        headers={"Origin": "http://elsewhere.example"},
        auth=(admin.username, admin.password),
        timeout=10,
    )

    assert page.status_code in (200, 401), page.text[:200]  # the GUI, or MLflow's login
    assert "Invalid Host header" not in page.text
    assert search.status_code == 200, search.text[:200]
    assert elsewhere.status_code == 403


def test_a_browser_is_redirected_to_the_public_gui(public_suite: ManagerSuite) -> None:
    response = requests.get(
        f"{public_suite.url}/api/flops/tracking",
        headers={"Accept": BROWSER_ACCEPT},
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 302
    assert response.headers["Location"] == public_suite.tracking_url


@pytest.mark.parametrize("setting", ["FLOPS_MLFLOW_PORT", "FLOPS_MQTT_PORT"])
def test_a_fixed_port_that_is_taken_fails_naming_the_variable(
    setting: str, tmp_path: Path, mqtt_broker: MosquittoBroker
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        if setting == "FLOPS_MLFLOW_PORT":  # the session's broker: only MLflow starts
            fields: dict[str, Any] = {"mlflow_port": taken, **manager_mqtt(mqtt_broker)}
        else:  # no MLflow to start: only Mosquitto does
            fields = {"mqtt_port": taken, "mlflow_url": GUI, "insecure": frozenset({"mlflow"})}
        config = ManagerConfig(home=tmp_path / "home", port=0, bind_host="0.0.0.0", **fields)

        with pytest.raises(FlopsError, match=f"{setting}={taken}") as raised:
            ManagerSuite(config).start()

    assert "another" in str(raised.value).lower() or "in use" in str(raised.value).lower()


@pytest.fixture(scope="module")
def gui_suite(
    tmp_path_factory: pytest.TempPathFactory, mqtt_broker: MosquittoBroker
) -> Iterator[ManagerSuite]:
    """A manager on the session's broker whose GUI address is :data:`GUI` (nothing trains)."""
    config = ManagerConfig(
        home=Path(tmp_path_factory.mktemp("gui-home")),
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url="http://127.0.0.1:9",
        mlflow_public_url=GUI,
        insecure=frozenset({"mlflow"}),
    )
    with ManagerSuite(config) as suite:
        yield suite


def _get(suite: ManagerSuite, path: str, **headers: str) -> requests.Response:
    return requests.get(
        f"{suite.url}/api/flops{path}", headers=headers, allow_redirects=False, timeout=10
    )


def test_only_a_browser_without_a_token_is_redirected(gui_suite: ManagerSuite) -> None:
    token = read_api_token(gui_suite.config.home)

    browser = _get(gui_suite, "/tracking", Accept=BROWSER_ACCEPT)
    curl = _get(gui_suite, "/tracking", Accept="*/*")
    json_client = _get(gui_suite, "/tracking", Accept="application/json")
    with_token = _get(
        gui_suite, "/tracking", Accept=BROWSER_ACCEPT, Authorization=f"Bearer {token}"
    )
    wrong_token = _get(gui_suite, "/tracking", Accept=BROWSER_ACCEPT, Authorization="Bearer x")
    other_route = _get(gui_suite, "/projects", Accept=BROWSER_ACCEPT)

    assert (browser.status_code, browser.headers["Location"]) == (302, GUI)
    assert curl.status_code == json_client.status_code == 401
    assert with_token.status_code == 200 and with_token.json() == {"url": GUI}
    assert wrong_token.status_code == 401
    assert other_route.status_code == 401


def test_a_project_route_redirects_without_telling_whether_it_exists(
    gui_suite: ManagerSuite,
) -> None:
    token = read_api_token(gui_suite.config.home)

    unknown = _get(gui_suite, "/tracking/projects/0123456789ab", Accept=BROWSER_ACCEPT)
    as_json = _get(gui_suite, "/tracking/projects/0123456789ab", Authorization=f"Bearer {token}")

    assert (unknown.status_code, unknown.headers["Location"]) == (302, GUI)
    assert as_json.status_code == 404


def test_the_project_gui_is_its_run_page() -> None:
    ran = ProjectRecord(
        _id="p1",
        project_id="p1",
        customer_id="c1",
        status=ProjectStatus.COMPLETED,
        status_message="done",
        created_at=0.0,
        updated_at=0.0,
        sla={},
        mlflow=MlflowRecord(experiment_id="7", run_id="abc"),
    )
    fresh = ran.model_copy(update={"mlflow": None})

    assert project_gui(f"{GUI}/", ran).url == (
        f"{GUI}/#/experiments/7/runs/abc?workflowType=machine_learning"
    )
    assert project_gui(GUI, fresh).model_dump() == {
        "url": f"{GUI}/",
        "experiment_id": None,
        "run_id": None,
    }


def test_a_broker_recorded_elsewhere_is_moved_where_asked(tmp_path: Path) -> None:
    """A manager started again with another interface and a fixed port stops the recorded
    Mosquitto and starts it where asked (services would not find it on the old address)."""
    first = start_broker(tmp_path, EmbeddedState(tmp_path), host="127.0.0.1")
    moved_port = find_free_port("0.0.0.0")
    try:
        moved = start_broker(
            tmp_path,
            EmbeddedState(tmp_path),
            host="0.0.0.0",
            port=moved_port,
            port_setting="FLOPS_MQTT_PORT",
        )
        try:
            old = first.identity
            assert old is not None
            wait_until(lambda: not old.is_alive(), 10, "the old broker still runs")
            assert (moved.port, moved.reused) == (moved_port, False)
            state = EmbeddedState(tmp_path)
            assert (state.host("mqtt"), state.port("mqtt")) == ("0.0.0.0", moved_port)
            assert port_answers(outside_address(), moved_port, 5.0)
        finally:
            moved.stop()
    finally:
        first.stop()
