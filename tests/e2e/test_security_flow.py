"""A project on a manager with every security control on (the default), end to end.

The embedded Mosquitto runs with authentication (no ``FLOPS_MQTT_URL``), the data servers
serve TLS with tokens, the aggregator serves TLS to authenticated learners. While the project
trains, the test reads the secrets the manager handed to its services (from their
environments, which it may read as the same user) and checks that no process's command line
and no log under ``FLOPS_HOME`` holds any of them; after the project, its MQTT credentials
no longer work.
"""

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion
from waiting import wait_until

from flops_manager.auth import read_api_token
from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import example_sla, local_nodes
from flops_manager.suite import ManagerSuite
from flops_utils import env_vars

pytestmark = pytest.mark.e2e

SECRET_VARIABLES = (
    env_vars.MQTT_PASSWORD,
    env_vars.FLOWER_TOKEN,
    env_vars.TLS_KEY,
    env_vars.DATA_TOKEN,
    env_vars.MANAGER_TOKEN,
    env_vars.API_TOKEN,
)


def _environ(pid: int) -> dict[str, str]:
    """The environment of process ``pid`` (empty when it is gone or not ours)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _command_lines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return lines


def _project_secrets(project_id: str) -> dict[str, str]:
    """Every secret variable of every process of ``project_id`` (learners, aggregator)."""
    found: dict[str, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        environ = _environ(int(entry.name))
        if environ.get(env_vars.PROJECT_ID) != project_id:
            continue
        name = environ.get(env_vars.LEARNER_NAME) or environ.get(env_vars.AGGREGATOR_ROLE, "agg")
        for variable in SECRET_VARIABLES:
            if environ.get(variable):
                found[f"{name}:{variable}"] = environ[variable]
        if environ.get(env_vars.MQTT_USERNAME):
            found[f"{name}:username"] = environ[env_vars.MQTT_USERNAME]
    return found


def _all_started(project_id: str, services: int) -> dict[str, str] | None:
    """The project's secrets once ``services`` processes of it hold an MQTT password."""
    found = _project_secrets(project_id)
    started = sum(name.endswith(env_vars.MQTT_PASSWORD) for name in found)
    return found if started >= services else None


@pytest.fixture(scope="module")
def secure_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagerSuite]:
    config = ManagerConfig(home=Path(tmp_path_factory.mktemp("secure-home")), port=0)
    assert not config.insecure
    with ManagerSuite(config) as suite:
        yield suite


def _can_connect(url: str, username: str | None, password: str | None) -> bool:
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username or "probe")
    if username is not None:
        client.username_pw_set(username, password)
    outcome: list[bool] = []
    done = threading.Event()

    def on_connect(*args: Any) -> None:
        outcome.append(not args[3].is_failure)
        done.set()

    client.on_connect = on_connect
    client.connect(host, int(port))
    client.loop_start()
    done.wait(10)
    client.disconnect()
    client.loop_stop()
    return bool(outcome and outcome[0])


def test_a_secure_project_trains_and_leaks_no_secret(
    secure_suite: ManagerSuite, tmp_path: Path
) -> None:
    home = secure_suite.config.home
    token = read_api_token(home)
    assert token is not None
    api = ManagerClient(secure_suite.url, token=token)
    with local_nodes(2, tmp_path / "nodes", secure_suite.url, token):
        api.wait_for_nodes(2, timeout_s=60)
        api.provide_mocks(dataset="mnist", tag="mnist")
        sla = example_sla(2, min_available_clients=2, min_fit_clients=2, min_evaluate_clients=2)
        project_id = api.create_project(sla)
        secrets = wait_until(
            lambda: _all_started(project_id, services=3),
            240,
            "the project's three services did not start",
            interval_s=0.5,
        )
        command_lines = "\n".join(_command_lines())
        project = api.wait_for_project(project_id, 300)

    assert project["status"] == "completed", project["status_message"]
    learner_user = next(v for k, v in secrets.items() if k.startswith("node-1:username"))
    learner_password = secrets[f"node-1:{env_vars.MQTT_PASSWORD}"]
    secrets["api-token"] = token
    for name, value in secrets.items():
        if name.endswith(":username"):
            continue
        assert value not in command_lines, f"{name} is on a command line"
    for log in (p for p in home.rglob("*") if p.is_file() and p.suffix in (".log", ".txt")):
        text = log.read_text(errors="replace")
        for name, value in secrets.items():
            if not name.endswith(":username"):
                assert value not in text, f"{name} is in {log.relative_to(home)}"
    assert not _can_connect(secure_suite.mqtt_url, None, None)
    assert not _can_connect(secure_suite.mqtt_url, learner_user, learner_password)
    assert os.stat(home).st_mode & 0o077 == 0
    _check_tracking(secure_suite, token, project_id)


def _check_tracking(suite: ManagerSuite, token: str, project_id: str) -> None:
    """MLflow refuses anonymous calls; the customer's own credential (from the API) shows
    the project's experiment with its rounds."""
    search = f"{suite.mlflow_url}/api/2.0/mlflow/experiments/search"
    anonymous = requests.get(search, params={"max_results": 100}, timeout=30)
    issued = requests.post(
        f"{suite.url}/api/flops/tracking/credential",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ).json()
    login = (issued["username"], issued["password"])
    found = requests.get(search, params={"max_results": 100}, auth=login, timeout=30)

    assert anonymous.status_code == 401
    assert found.status_code == 200
    names = [e["name"] for e in found.json().get("experiments", [])]
    assert f"flops-{project_id}" in names
