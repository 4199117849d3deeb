"""The ``flops`` CLI's errors are one or two lines naming the cause and the fix: never a
traceback, never the token (a Rich traceback with local variables used to print the admin
token five times). Runs the installed ``flops`` entry point as a user would, against a real
manager where one is needed."""

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from mqtt_testing import manager_mqtt
from tarpit_testing import tarpit_server
from waiting import wait_until

from flops_manager.auth import read_api_token
from flops_manager.broker import MosquittoBroker
from flops_manager.config import ManagerConfig
from flops_manager.suite import ManagerSuite
from flops_utils.net import find_free_port

FLOPS = str(Path(sys.executable).with_name("flops"))
SECRET = "tok-" + "s3cr3t" * 6


def flops(*args: str, token: str = SECRET, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "FLOPS_API_TOKEN": token, "COLUMNS": "200"}
    return subprocess.run(
        [FLOPS, *args], capture_output=True, text=True, env=env, timeout=60, **kwargs
    )


def assert_clean(result: subprocess.CompletedProcess[str], token: str = SECRET) -> str:
    """The combined output, checked: no traceback, no token, exit code 1."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output and 'File "' not in output, output
    assert token not in output
    assert result.returncode == 1, output
    assert len(output.strip().splitlines()) <= 3, output
    return output


@pytest.fixture(scope="module")
def suite(
    tmp_path_factory: pytest.TempPathFactory, mqtt_broker: MosquittoBroker
) -> Iterator[ManagerSuite]:
    config = ManagerConfig(
        home=tmp_path_factory.mktemp("cli-home"),
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url="http://127.0.0.1:9",
        insecure=frozenset({"mlflow"}),
    )
    with ManagerSuite(config) as running:
        yield running


def test_an_unreachable_manager_is_named_with_the_fix() -> None:
    closed = f"http://127.0.0.1:{find_free_port()}"

    output = assert_clean(flops("status", "abc", "--manager-url", closed))

    assert f"cannot reach the FLOps manager at {closed} (connection refused)" in output
    assert "FLOPS_MANAGER_URL" in output


def test_debug_adds_no_secret() -> None:
    closed = f"http://127.0.0.1:{find_free_port()}"

    output = assert_clean(flops("--debug", "mock", "--manager-url", closed))

    assert "cannot reach the FLOps manager" in output


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"ml_repo_url": ', "sla.json is not valid JSON: Expecting value at line 1 column 17"),
        ("[1, 2]", "sla.json must hold a JSON object (the SLA), not a list"),
        (b"\xff\xfe{}", "cannot read sla.json: not UTF-8 text"),
    ],
)
def test_a_bad_sla_file_names_the_file_and_the_place(
    tmp_path: Path, content: str | bytes, expected: str
) -> None:
    sla = tmp_path / "sla.json"
    if isinstance(content, bytes):
        sla.write_bytes(content)
    else:
        sla.write_text(content)

    output = assert_clean(flops("submit", str(sla), "--manager-url", "http://127.0.0.1:9"))

    assert expected in " ".join(output.split())
    assert str(tmp_path) not in output


def test_a_wrong_token_is_an_api_error_without_the_token(suite: ManagerSuite) -> None:
    wrong = "wrong-" + "x" * 30

    output = assert_clean(flops("status", "abc", "--manager-url", suite.url, token=wrong), wrong)

    assert "error:" in output


def test_ctrl_c_while_following_says_the_project_keeps_running(
    suite: ManagerSuite, tmp_path: Path
) -> None:
    token = read_api_token(suite.config.home)
    assert token is not None
    headers = {"Authorization": f"Bearer {token}"}
    node = {"node_id": "edge-1", "data_server": "grpc://127.0.0.1:9999", "tags": {"mnist": 5}}
    api = f"{suite.url}/api/flops"
    assert requests.post(f"{api}/nodes", json=node, headers=headers, timeout=10).ok
    with tarpit_server() as url:  # the build hangs on the clone: the project stays building
        sla = {
            "ml_repo_url": f"{url}/slow.git",
            "ml_model_flavor": "sklearn",
            "training_configuration": {"data_tags": ["mnist"]},
        }
        (tmp_path / "sla.json").write_text(json.dumps(sla))
        env = {"PATH": "/usr/bin:/bin", "FLOPS_API_TOKEN": token, "COLUMNS": "200"}
        out = (tmp_path / "out.txt").open("w")
        follower = subprocess.Popen(
            [FLOPS, "submit", str(tmp_path / "sla.json"), "--manager-url", suite.url],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        listed = wait_until(
            lambda: requests.get(f"{api}/projects", headers=headers, timeout=5).json()["projects"],
            30,
            "the project was not created",
        )
        wait_until(  # the CLI follows the project once it printed that
            lambda: "accepted" in (tmp_path / "out.txt").read_text(), 30, "not accepted"
        )
        time.sleep(1.0)
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=30)
        out.close()
        output = (tmp_path / "out.txt").read_text()
        project_id = listed[0]["project_id"]
        status = requests.get(f"{api}/projects/{project_id}", headers=headers, timeout=5).json()
        cancelled = flops("cancel", project_id, "--manager-url", suite.url, token=token)

    assert follower.returncode == 130, output
    assert "Traceback" not in output and token not in output
    assert f"project {project_id} keeps running" in output
    assert f"flops status {project_id}" in output
    assert status["status"] not in ("failed", "cancelled")
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert cancelled.stdout.strip() == f"project {project_id} cancelled"
    assert token not in cancelled.stdout + cancelled.stderr
