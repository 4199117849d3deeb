"""The manager's REST API on a real waitress server: success and error answers."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from flops_manager.broker import MosquittoBroker
from flops_manager.config import ManagerConfig
from flops_manager.suite import ManagerSuite

UNUSED_MLFLOW = "http://127.0.0.1:9"  # these tests never train; the suite needs a URL only


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, mqtt_broker: MosquittoBroker) -> Iterator[str]:
    """Base URL ``http://HOST:PORT/api/flops`` of a manager with an empty store."""
    home = Path(tmp_path_factory.mktemp("manager"))
    config = ManagerConfig(home=home, port=0, mqtt_url=mqtt_broker.url, mlflow_url=UNUSED_MLFLOW)
    with ManagerSuite(config) as suite:
        yield f"{suite.url}/api/flops"


def valid_sla(**training: object) -> dict[str, object]:
    return {
        "ml_repo_url": "https://example.invalid/repo.git",
        "ml_model_flavor": "sklearn",
        "training_configuration": {"data_tags": ["mnist"], **training},
    }


def test_health_and_openapi_document_are_served(api: str) -> None:
    base = api.removesuffix("/api/flops")

    health = requests.get(f"{base}/healthz", timeout=5)
    spec = requests.get(f"{base}/openapi/openapi.json", timeout=5)

    assert health.json() == {"status": "ok"}
    assert "/api/flops/projects" in spec.json()["paths"]


def test_invalid_sla_gets_422_naming_each_bad_field(api: str) -> None:
    sla = valid_sla(training_rounds=0, trainig_cycles=2)
    sla["ml_model_flavor"] = "caffe"

    response = requests.post(f"{api}/projects", json=sla, timeout=5)

    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "validation_error"
    fields = {d["field"]: d["message"] for d in body["details"]}
    assert "training_configuration.training_rounds" in fields
    assert "ml_model_flavor" in fields
    assert fields["training_configuration.trainig_cycles"] == (
        "unknown field (did you mean 'training_cycles'?)"
    )
    assert "Traceback" not in response.text


def test_body_that_is_not_json_gets_422_saying_so(api: str) -> None:
    response = requests.post(
        f"{api}/projects", data="{not json", headers={"Content-Type": "application/json"}, timeout=5
    )

    assert response.status_code == 422
    assert "JSON object" in response.json()["details"][0]["message"]


def test_unknown_project_gets_404_json(api: str) -> None:
    response = requests.get(f"{api}/projects/doesnotexist", timeout=5)

    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert "doesnotexist" in response.json()["message"]


def test_unknown_route_and_method_get_json_errors(api: str) -> None:
    missing = requests.get(f"{api}/nothing-here", timeout=5)
    wrong_method = requests.put(f"{api}/projects", json={}, timeout=5)

    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["message"]


def test_nodes_register_list_and_reject_a_bad_address(api: str) -> None:
    node = {
        "node_id": "edge-a",
        "data_server": "grpc://127.0.0.1:9999",
        "architecture": "linux/arm64",
        "cluster": "c1",
        "tags": {"cifar10": 50},
    }

    registered = requests.post(f"{api}/nodes", json=node, timeout=5)
    listed = requests.get(f"{api}/nodes/", timeout=5)
    bad = requests.post(f"{api}/nodes", json={**node, "data_server": "http://x"}, timeout=5)

    assert registered.status_code == 200
    assert [n["node_id"] for n in listed.json()["nodes"]] == ["edge-a"]
    assert listed.json()["nodes"][0]["tags"] == {"cifar10": 50}
    assert bad.status_code == 422
    assert bad.json()["details"][0]["field"] == "data_server"


def test_too_few_eligible_nodes_gets_409_listing_each_nodes_tags(api: str) -> None:
    requests.post(
        f"{api}/nodes",
        json={"node_id": "edge-b", "data_server": "grpc://127.0.0.1:9998", "tags": {"mnist": 10}},
        timeout=5,
    )

    response = requests.post(f"{api}/projects", json=valid_sla(min_available_clients=2), timeout=5)

    assert response.status_code == 409
    body = response.json()
    assert "1 worker node(s) hold data tagged ['mnist']" in body["message"]
    assert {"node_id": "edge-a", "tags": {"cifar10": 50}} in body["details"]
    assert {"node_id": "edge-b", "tags": {"mnist": 10}} in body["details"]


def test_paths_work_with_and_without_trailing_slash_without_redirects(api: str) -> None:
    plain = requests.get(f"{api}/projects", timeout=5, allow_redirects=False)
    slashed = requests.get(f"{api}/projects/", timeout=5, allow_redirects=False)

    assert plain.status_code == slashed.status_code == 200
    assert plain.json() == slashed.json()


def test_mocks_for_unknown_nodes_get_404(api: str) -> None:
    response = requests.post(f"{api}/mocks", json={"nodes": ["ghost"]}, timeout=5)

    assert response.status_code == 404
    assert "ghost" in response.json()["message"]


def test_tracking_returns_the_mlflow_url(api: str) -> None:
    assert requests.get(f"{api}/tracking", timeout=5).json() == {"url": UNUSED_MLFLOW}
