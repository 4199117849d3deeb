"""Node credentials (issue: secure by default, attack 5): a data server registers its node with
a credential that can do only that, not with the admin token; expired, forged and other nodes'
credentials are refused."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from mqtt_testing import manager_mqtt

from flops_manager.auth import NodeCredentials, read_api_token
from flops_manager.broker import MosquittoBroker
from flops_manager.config import ManagerConfig
from flops_manager.suite import ManagerSuite

UNUSED_MLFLOW = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def suite(
    tmp_path_factory: pytest.TempPathFactory, mqtt_broker: MosquittoBroker
) -> Iterator[ManagerSuite]:
    home = Path(tmp_path_factory.mktemp("manager-nodes"))
    config = ManagerConfig(
        home=home,
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url=UNUSED_MLFLOW,
        insecure=frozenset({"mlflow"}),
    )
    with ManagerSuite(config) as running:
        yield running


def call(suite: ManagerSuite, token: str, method: str, path: str, **kwargs: Any) -> Any:
    return requests.request(
        method,
        f"{suite.url}/api/flops{path}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
        **kwargs,
    )


def registration(node_id: str) -> dict[str, Any]:
    return {"node_id": node_id, "data_server": "grpc://127.0.0.1:9999", "tags": {"mnist": 5}}


def admin_token(suite: ManagerSuite) -> str:
    token = read_api_token(suite.config.home)
    assert token is not None
    return token


def issued(suite: ManagerSuite, node_id: str) -> str:
    response = call(suite, admin_token(suite), "POST", f"/nodes/{node_id}/credential")
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


def test_a_node_credential_registers_its_own_node_only(suite: ManagerSuite) -> None:
    credential = issued(suite, "edge-1")

    own = call(suite, credential, "POST", "/nodes", json=registration("edge-1"))
    other = call(suite, credential, "POST", "/nodes", json=registration("edge-2"))

    assert own.status_code == 200
    assert other.status_code == 403
    assert "edge-2" in other.json()["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/projects"),
        ("POST", "/projects"),
        ("GET", "/nodes"),
        ("DELETE", "/nodes/edge-1"),
        ("POST", "/mocks"),
        ("DELETE", "/database"),
        ("GET", "/tracking"),
        ("POST", "/nodes/edge-2/credential"),
    ],
)
def test_a_node_credential_can_do_nothing_else(suite: ManagerSuite, method: str, path: str) -> None:
    credential = issued(suite, "edge-1")

    response = call(suite, credential, method, path, json={})

    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"


def test_a_node_refreshes_its_own_credential(suite: ManagerSuite) -> None:
    credential = issued(suite, "edge-1")

    refreshed = call(suite, credential, "POST", "/nodes/edge-1/credential")
    fresh = refreshed.json()["token"]

    assert refreshed.status_code == 200
    assert jwt.decode(fresh, options={"verify_signature": False})["sub"] == "edge-1"
    assert call(suite, fresh, "POST", "/nodes", json=registration("edge-1")).status_code == 200


def test_an_expired_node_credential_is_refused(suite: ManagerSuite) -> None:
    expired = NodeCredentials(suite.config.home.resolve()).issue("edge-1", ttl_s=-5).token

    response = call(suite, expired, "POST", "/nodes", json=registration("edge-1"))

    assert response.status_code == 401
    assert "expired" in response.json()["message"]


def test_a_node_credential_of_another_manager_is_refused(
    suite: ManagerSuite, tmp_path: Path
) -> None:
    forged = NodeCredentials(tmp_path).issue("edge-1").token

    response = call(suite, forged, "POST", "/nodes", json=registration("edge-1"))

    assert response.status_code == 401


def test_the_node_key_is_private(suite: ManagerSuite) -> None:
    mode = (suite.config.home / "node-credential.key").stat().st_mode & 0o777

    assert mode == 0o600
