"""The manager's REST API on a real waitress server: success and error answers."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from flops_manager.auth import read_api_token
from flops_manager.broker import MosquittoBroker
from flops_manager.config import ManagerConfig
from flops_manager.suite import ManagerSuite

UNUSED_MLFLOW = "http://127.0.0.1:9"  # these tests never train; the suite needs a URL only
UNCLONABLE = "file:///nonexistent/repo.git"  # projects with it fail fast, in the building phase


class Api:
    """A requests session bound to ``{base}/api/flops`` with a bearer token."""

    def __init__(self, base: str, token: str | None) -> None:
        self.base = base
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def __call__(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        return self.session.request(method, f"{self.base}/api/flops{path}", **kwargs)


@pytest.fixture(scope="module")
def suite(
    tmp_path_factory: pytest.TempPathFactory, mqtt_broker: MosquittoBroker
) -> Iterator[ManagerSuite]:
    home = Path(tmp_path_factory.mktemp("manager"))
    config = ManagerConfig(home=home, port=0, mqtt_url=mqtt_broker.url, mlflow_url=UNUSED_MLFLOW)
    with ManagerSuite(config) as running:
        yield running


@pytest.fixture(scope="module")
def api(suite: ManagerSuite) -> Api:
    """The admin's API (the embedded manager's API token)."""
    return Api(suite.url, read_api_token(suite.config.home))


def sla(**training: object) -> dict[str, Any]:
    return {
        "ml_repo_url": UNCLONABLE,
        "ml_model_flavor": "sklearn",
        "training_configuration": {"data_tags": ["mnist"], **training},
    }


def register(api: Api, node_id: str, tags: dict[str, int]) -> None:
    node = {"node_id": node_id, "data_server": "grpc://127.0.0.1:9999", "tags": tags}
    assert api("POST", "/nodes", json=node).status_code == 200


def wait_until_ended(api: Api, project_id: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        project: dict[str, Any] = api("GET", f"/projects/{project_id}").json()
        if project["status"] in ("completed", "failed", "cancelled"):
            return project
        time.sleep(0.1)
    raise AssertionError(f"project {project_id} did not end")


def test_health_and_api_docs_need_no_token(suite: ManagerSuite) -> None:
    health = requests.get(f"{suite.url}/healthz", timeout=5)
    spec = requests.get(f"{suite.url}/openapi/openapi.json", timeout=5)
    swagger = requests.get(f"{suite.url}/openapi/swagger", timeout=5)

    assert health.json() == {"status": "ok"}
    assert "/api/flops/projects" in spec.json()["paths"]
    assert spec.json()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert swagger.status_code == 200
    assert "swagger" in swagger.text.lower()


def test_api_token_file_is_private(suite: ManagerSuite) -> None:
    mode = (suite.config.home / "api-token").stat().st_mode & 0o777

    assert mode == 0o600


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_requests_without_a_valid_token_get_401(suite: ManagerSuite, token: str | None) -> None:
    response = Api(suite.url, token)("GET", "/projects")

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"] == "unauthorized"
    assert "api-token" in response.json()["message"]


def test_created_project_gets_201_with_its_location(api: Api) -> None:
    register(api, "edge-0", {"mnist": 10})

    response = api("POST", "/projects", json=sla())

    assert response.status_code == 201
    project_id = response.json()["project_id"]
    assert response.headers["Location"] == f"/api/flops/projects/{project_id}"
    assert api("GET", response.headers["Location"].removeprefix("/api/flops")).status_code == 200


def test_invalid_sla_gets_422_naming_each_bad_field(api: Api) -> None:
    body = sla(training_rounds=0, trainig_cycles=2)
    body["ml_model_flavor"] = "caffe"

    response = api("POST", "/projects", json=body)

    assert response.status_code == 422
    payload = response.json()
    assert payload["error"] == "validation_error"
    fields = {d["field"]: d["message"] for d in payload["details"]}
    assert "training_configuration.training_rounds" in fields
    assert "ml_model_flavor" in fields
    assert fields["training_configuration.trainig_cycles"] == (
        "unknown field (did you mean 'training_cycles'?)"
    )
    assert "Traceback" not in response.text


def test_body_that_is_not_json_gets_422_saying_so(api: Api) -> None:
    response = api(
        "POST", "/projects", data="{not json", headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert "JSON object" in response.json()["details"][0]["message"]


def test_unknown_project_gets_404_json(api: Api) -> None:
    response = api("GET", "/projects/doesnotexist")

    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert "doesnotexist" in response.json()["message"]


def test_unknown_route_and_method_get_json_errors(api: Api) -> None:
    missing = api("GET", "/nothing-here")
    wrong_method = api("PUT", "/projects", json={})

    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["message"]


def test_nodes_register_list_delete_and_reject_a_bad_address(api: Api) -> None:
    node = {
        "node_id": "edge-a",
        "data_server": "grpc://127.0.0.1:9999",
        "architecture": "linux/arm64",
        "cluster": "c1",
        "tags": {"cifar10": 50},
    }

    registered = api("POST", "/nodes", json=node)
    on_worker = api("POST", "/nodes", json={**node, "node_id": "edge-b", "hostname": "rpi-7"})
    listed = api("GET", "/nodes/").json()["nodes"]
    bad = api("POST", "/nodes", json={**node, "data_server": "http://x"})
    deleted = api("DELETE", "/nodes/edge-a")
    deleted_again = api("DELETE", "/nodes/edge-a")
    api("DELETE", "/nodes/edge-b")

    assert registered.status_code == 200
    assert {"node_id": "edge-a", "tags": {"cifar10": 50}}.items() <= {
        k: v for n in listed if n["node_id"] == "edge-a" for k, v in n.items()
    }.items()
    # the Oakestra worker hostname defaults to the node id
    assert registered.json()["hostname"] == "edge-a"
    assert on_worker.json()["hostname"] == "rpi-7"
    hostnames = {n["node_id"]: n["hostname"] for n in listed}
    assert {"edge-a": "edge-a", "edge-b": "rpi-7"}.items() <= hostnames.items()
    assert bad.status_code == 422
    assert bad.json()["details"][0]["field"] == "data_server"
    assert deleted.json() == {"node_id": "edge-a", "deleted": True}
    assert deleted_again.status_code == 404


def test_too_few_eligible_nodes_gets_409_listing_each_nodes_tags(api: Api) -> None:
    register(api, "edge-b", {"cifar100": 10})

    response = api("POST", "/projects", json=sla(data_tags=["cifar100"], min_available_clients=2))

    assert response.status_code == 409
    body = response.json()
    assert "1 worker node(s) of linux/amd64 hold data tagged ['cifar100']" in body["message"]
    edge_b = {"node_id": "edge-b", "architecture": "linux/amd64", "tags": {"cifar100": 10}}
    assert edge_b in body["details"]


def test_paths_work_with_and_without_trailing_slash_without_redirects(api: Api) -> None:
    plain = api("GET", "/projects", allow_redirects=False)
    slashed = api("GET", "/projects/", allow_redirects=False)

    assert plain.status_code == slashed.status_code == 200
    assert plain.json() == slashed.json()


def test_project_list_filters_by_status_and_pages(api: Api) -> None:
    register(api, "edge-c", {"mnist": 10})
    ids = [api("POST", "/projects", json=sla()).json()["project_id"] for _ in range(3)]
    for project_id in ids:
        wait_until_ended(api, project_id)

    failed = api("GET", "/projects", params={"status": "failed", "limit": 500}).json()
    page = api("GET", "/projects", params={"status": "failed", "limit": 2, "offset": 1}).json()
    bad = api("GET", "/projects", params={"status": "sleeping"})

    failed_ids = [p["project_id"] for p in failed["projects"]]
    assert set(ids) <= set(failed_ids)
    assert page["total"] == failed["total"] == len(failed_ids)
    assert [p["project_id"] for p in page["projects"]] == failed_ids[1:3]
    assert bad.status_code == 422


def test_events_are_listed_and_streamed_as_server_sent_events(api: Api) -> None:
    register(api, "edge-d", {"mnist": 10})
    project_id = api("POST", "/projects", json=sla()).json()["project_id"]

    with api("GET", f"/projects/{project_id}/events", params={"follow": 1}, stream=True) as stream:
        content_type = stream.headers["Content-Type"]
        lines = [line for line in stream.iter_lines(decode_unicode=True) if line]
    listed = api("GET", f"/projects/{project_id}/events").json()

    assert content_type.startswith("text/event-stream")
    streamed = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert [e["status"] for e in streamed] == ["pending", "building", "failed"]
    assert streamed == listed["events"]
    assert "nonexistent/repo.git" in streamed[-1]["message"]


def test_cancelling_a_finished_project_changes_nothing(api: Api) -> None:
    register(api, "edge-e", {"mnist": 10})
    project_id = api("POST", "/projects", json=sla()).json()["project_id"]
    wait_until_ended(api, project_id)

    response = api("DELETE", f"/projects/{project_id}")

    assert response.status_code == 200
    assert response.json()["status"] == "failed"


def test_mocks_for_unknown_nodes_get_404(api: Api) -> None:
    response = api("POST", "/mocks", json={"nodes": ["ghost"]})

    assert response.status_code == 404
    assert "ghost" in response.json()["message"]


def test_tracking_returns_the_mlflow_url(api: Api) -> None:
    assert api("GET", "/tracking").json() == {"url": UNUSED_MLFLOW}


def test_max_clients_picks_the_nodes_with_the_most_data(api: Api) -> None:
    for node_id, rows in (("few-a", 10), ("many-b", 30), ("mid-c", 20)):
        register(api, node_id, {"fewmax": rows})

    created = api("POST", "/projects", json=sla(data_tags=["fewmax"], max_clients=2))
    too_low = api(
        "POST", "/projects", json=sla(data_tags=["fewmax"], max_clients=1, min_available_clients=2)
    )

    project = api("GET", f"/projects/{created.json()['project_id']}").json()
    assert project["nodes"] == ["many-b", "mid-c"]
    assert too_low.status_code == 422
    assert "max_clients (1) is below min_available_clients (2)" in too_low.text
