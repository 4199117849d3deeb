"""Authorization with Oakestra access tokens (RS256 JWTs): customers, admin rights, expiry."""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mqtt_testing import manager_mqtt

from flops_manager.auth import (
    ApiTokenAuth,
    OakestraJwtAuth,
    Unauthorized,
    load_or_create_api_token,
)
from flops_manager.broker import MosquittoBroker
from flops_manager.config import ManagerConfig
from flops_manager.errors import ConfigurationError
from flops_manager.suite import ManagerSuite

UNCLONABLE = "https://127.0.0.1:9/none.git"  # a customer may not name a local path


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def base_url(
    tmp_path_factory: pytest.TempPathFactory,
    mqtt_broker: MosquittoBroker,
    signing_key: rsa.RSAPrivateKey,
) -> Iterator[str]:
    home = Path(tmp_path_factory.mktemp("manager-jwt"))
    public_key = home / "oakestra.pem"
    public_key.write_bytes(public_pem(signing_key))
    config = ManagerConfig(
        home=home,
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url="http://127.0.0.1:9",
        auth="oakestra",
        insecure=frozenset({"local", "mlflow"}),  # many customers, local; MLflow without auth
        jwt_public_key_file=str(public_key),
    )
    with ManagerSuite(config) as suite:
        yield f"{suite.url}/api/flops"


def oakestra_token(
    key: rsa.RSAPrivateKey,
    sub: str,
    roles: list[str],
    ttl_s: float = 600,
    issued_at_s: float | None = None,
) -> str:
    """An access token as Oakestra's system manager issues it (RS256, 10 minutes), issued
    now or at ``issued_at_s`` (seconds since the epoch)."""
    now = int(time.time() if issued_at_s is None else issued_at_s)
    claims = {"sub": sub, "roles": roles, "type": "access", "iat": now, "exp": now + int(ttl_s)}
    return jwt.encode(claims, key, algorithm="RS256")


class FakeClock:
    """A clock for :class:`OakestraJwtAuth` that moves only when a test moves it."""

    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def call(base_url: str, token: str, method: str, path: str, **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return requests.request(method, f"{base_url}{path}", headers=headers, timeout=10, **kwargs)


def sla(customer: str) -> dict[str, Any]:
    return {
        "customerID": customer,
        "ml_repo_url": UNCLONABLE,
        "training_configuration": {"data_tags": ["mnist"]},
    }


@pytest.fixture(scope="module")
def tokens(base_url: str, signing_key: rsa.RSAPrivateKey) -> dict[str, str]:
    admin = oakestra_token(signing_key, "Admin", ["ADMIN"])
    node = {"node_id": "edge-1", "data_server": "grpc://127.0.0.1:9999", "tags": {"mnist": 5}}
    assert call(base_url, admin, "POST", "/nodes", json=node).status_code == 200
    return {
        "admin": admin,
        "alice": oakestra_token(signing_key, "alice", ["USER"]),
        "bob": oakestra_token(signing_key, "bob", ["USER"]),
    }


def test_customers_see_only_their_own_projects(base_url: str, tokens: dict[str, str]) -> None:
    alices = call(base_url, tokens["alice"], "POST", "/projects", json=sla("alice"))
    bobs = call(base_url, tokens["bob"], "POST", "/projects", json=sla("bob"))
    alice_id, bob_id = alices.json()["project_id"], bobs.json()["project_id"]

    alice_list = call(base_url, tokens["alice"], "GET", "/projects").json()["projects"]
    admin_list = call(base_url, tokens["admin"], "GET", "/projects").json()["projects"]
    admin_bobs = call(base_url, tokens["admin"], "GET", "/projects", params={"customer": "bob"})

    assert alices.status_code == bobs.status_code == 201
    assert {p["customer_id"] for p in alice_list} == {"alice"}
    assert {alice_id, bob_id} <= {p["project_id"] for p in admin_list}
    assert {p["project_id"] for p in admin_bobs.json()["projects"]} == {bob_id}
    for method in ("GET", "DELETE"):
        response = call(base_url, tokens["alice"], method, f"/projects/{bob_id}")
        assert response.status_code == 404
    assert call(base_url, tokens["alice"], "GET", f"/projects/{bob_id}/events").status_code == 404


def test_a_customer_cannot_post_for_another(base_url: str, tokens: dict[str, str]) -> None:
    response = call(base_url, tokens["alice"], "POST", "/projects", json=sla("bob"))

    assert response.status_code == 403
    assert "customerID 'bob' is not you ('alice')" in response.json()["message"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("DELETE", "/database", None),
        ("POST", "/nodes", {"node_id": "x", "data_server": "grpc://127.0.0.1:1"}),
        ("DELETE", "/nodes/edge-1", None),
        ("POST", "/mocks", {}),
    ],
)
def test_admin_work_is_403_for_customers(
    base_url: str, tokens: dict[str, str], method: str, path: str, body: Any
) -> None:
    response = call(base_url, tokens["alice"], method, path, json=body)

    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"


def test_expired_and_foreign_tokens_get_401(base_url: str, signing_key: rsa.RSAPrivateKey) -> None:
    expired = oakestra_token(signing_key, "alice", ["USER"], ttl_s=-60)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    foreign = oakestra_token(other_key, "alice", ["ADMIN"])

    expired_response = call(base_url, expired, "GET", "/projects")
    foreign_response = call(base_url, foreign, "GET", "/projects")

    assert expired_response.status_code == foreign_response.status_code == 401
    assert "expired" in expired_response.json()["message"]
    assert "not a valid Oakestra access token" in foreign_response.json()["message"]


def test_admin_deletes_the_database(base_url: str, tokens: dict[str, str]) -> None:
    response = call(base_url, tokens["admin"], "DELETE", "/database")

    assert response.json() == {"deleted": True}
    assert call(base_url, tokens["admin"], "GET", "/projects").json()["total"] == 0
    assert call(base_url, tokens["admin"], "GET", "/nodes").json()["nodes"] == []


def test_api_token_is_created_once_and_checked(tmp_path: Path) -> None:
    first = load_or_create_api_token(tmp_path)
    second = load_or_create_api_token(tmp_path)
    auth = ApiTokenAuth(first)

    assert first == second and len(first) >= 40
    assert auth.authenticate(first).admin
    with pytest.raises(Unauthorized):
        auth.authenticate(first + "x")


def test_oakestra_auth_without_a_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    config = ManagerConfig(home=tmp_path, auth="oakestra", jwt_public_key_file="/missing.pem")

    with pytest.raises(ConfigurationError, match="FLOPS_JWT_PUBLIC_KEY_FILE"):
        config.authenticator()


def test_a_token_expires_by_the_authenticators_clock(signing_key: rsa.RSAPrivateKey) -> None:
    clock = FakeClock(1_700_000_000)
    auth = OakestraJwtAuth(public_pem(signing_key).decode(), clock=clock)
    token = oakestra_token(signing_key, "alice", ["USER"], ttl_s=600, issued_at_s=clock.now_s)

    principal = auth.authenticate(token)
    clock.now_s += 599
    still_valid = auth.authenticate(token)
    clock.now_s += 1

    assert principal.customer == still_valid.customer == "alice"
    assert not principal.admin
    with pytest.raises(Unauthorized, match="expired; refresh it"):
        auth.authenticate(token)


def test_a_token_issued_in_the_future_is_refused(signing_key: rsa.RSAPrivateKey) -> None:
    clock = FakeClock(1_700_000_000)
    auth = OakestraJwtAuth(public_pem(signing_key).decode(), clock=clock, leeway_s=5)
    slightly_ahead = oakestra_token(signing_key, "Admin", ["admin"], issued_at_s=clock.now_s + 5)
    far_ahead = oakestra_token(signing_key, "Admin", ["admin"], issued_at_s=clock.now_s + 60)

    assert auth.authenticate(slightly_ahead).admin
    with pytest.raises(Unauthorized, match="not a valid Oakestra access token"):
        auth.authenticate(far_ahead)


@pytest.mark.parametrize("claims", [{"sub": "alice"}, {"sub": "alice", "exp": "soon"}])
def test_a_token_without_a_numeric_expiry_is_refused(
    signing_key: rsa.RSAPrivateKey, claims: dict[str, Any]
) -> None:
    auth = OakestraJwtAuth(public_pem(signing_key).decode())
    token = jwt.encode(claims, signing_key, algorithm="RS256")

    with pytest.raises(Unauthorized, match="not a valid Oakestra access token"):
        auth.authenticate(token)
