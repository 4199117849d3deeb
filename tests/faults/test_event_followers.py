"""Event-stream followers cannot starve the API (issue: survive faults, "16 clients following
the event stream make GET /projects and /healthz unanswered"): followers are bounded below the
server's thread count, the rest get 429, and every other request is still answered."""

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from mqtt_testing import manager_mqtt
from tarpit_testing import tarpit_server
from waiting import wait_until

import flops_manager.suite as suite_module
from flops_manager.auth import read_api_token
from flops_manager.broker import MosquittoBroker
from flops_manager.config import ManagerConfig
from flops_manager.suite import ManagerSuite

THREADS = 12
FREE = 4


@pytest.fixture
def tarpit() -> Iterator[str]:
    with tarpit_server() as url:
        yield f"{url}/slow.git"


@pytest.fixture
def suite(
    tmp_path: Path, mqtt_broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ManagerSuite]:
    monkeypatch.setattr(suite_module, "API_THREADS", THREADS)
    monkeypatch.setattr(suite_module, "API_FREE_THREADS", FREE)
    config = ManagerConfig(
        home=tmp_path / "home",
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url="http://127.0.0.1:9",
        insecure=frozenset({"mlflow"}),
    )
    with ManagerSuite(config) as running:
        yield running


def _follow(url: str, headers: dict[str, str], lines: list[str]) -> requests.Response:
    response = requests.get(url, headers=headers, params={"follow": 1}, stream=True, timeout=60)

    def read() -> None:
        try:
            for line in response.iter_lines(decode_unicode=True):
                lines.append(line)
        except (requests.RequestException, AttributeError, ValueError):
            return

    threading.Thread(target=read, daemon=True).start()
    return response


def test_followers_are_bounded_and_the_api_stays_answering(
    suite: ManagerSuite, tarpit: str
) -> None:
    headers = {"Authorization": f"Bearer {read_api_token(suite.config.home)}"}
    api = f"{suite.url}/api/flops"
    node = {"node_id": "edge-1", "data_server": "grpc://127.0.0.1:9999", "tags": {"mnist": 5}}
    assert requests.post(f"{api}/nodes", json=node, headers=headers, timeout=10).ok
    sla: dict[str, Any] = {
        "ml_repo_url": tarpit,
        "ml_model_flavor": "sklearn",
        "training_configuration": {"data_tags": ["mnist"]},
    }
    project_id = requests.post(f"{api}/projects", json=sla, headers=headers, timeout=10).json()[
        "project_id"
    ]
    events = f"{api}/projects/{project_id}/events"
    streams: list[requests.Response] = []
    received: list[list[str]] = []
    for _ in range(THREADS - FREE):
        received.append([])
        streams.append(_follow(events, headers, received[-1]))
    wait_until(lambda: all(r.status_code == 200 for r in streams), 10, "followers not served")

    one_more = requests.get(events, headers=headers, params={"follow": 1}, timeout=10)
    health = requests.get(f"{suite.url}/healthz", timeout=5)
    listed = requests.get(f"{api}/projects", headers=headers, timeout=5)
    one = requests.get(f"{api}/projects/{project_id}", headers=headers, timeout=5)
    requests.delete(f"{api}/projects/{project_id}", headers=headers, timeout=10)

    assert one_more.status_code == 429
    assert one_more.headers["Retry-After"]
    assert health.status_code == listed.status_code == one.status_code == 200
    # the followers woke up for the cancellation and their streams ended with it
    wait_until(
        lambda: all(any("cancelled" in line for line in lines) for lines in received),
        15,
        "a follower missed the cancellation",
    )
    for stream in streams:
        stream.close()
    again = wait_until(
        lambda: (
            r
            if (
                r := requests.get(events, headers=headers, params={"follow": 1}, timeout=10)
            ).status_code
            == 200
            else None
        ),
        10,
        "the freed follower slots were not given back",
    )
    assert "cancelled" in again.text
