"""Attacks on the REST API itself: malformed and oversized input, a refresh token used as an
access token, a private ``FLOPS_HOME``, credentials in repository URLs (issue: secure by
default, attacks 5 and 6). Each answer must be a 4xx with a JSON error, never a 500, and
nothing of the attacker's input may be stored."""

import base64
import http.server
import json
import os
import stat
import threading
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

from flops_manager.auth import read_api_token
from flops_manager.broker import MosquittoBroker
from flops_manager.config import ManagerConfig
from flops_manager.errors import ConfigurationError
from flops_manager.suite import ManagerSuite

UNUSED_MLFLOW = "http://127.0.0.1:9"
UNCLONABLE = "file:///nonexistent/repo.git"


class Api:
    """``{base}/api/flops`` with a bearer token."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"}

    def __call__(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return requests.request(method, f"{self.base}/api/flops{path}", headers=headers, **kwargs)


@pytest.fixture(scope="module")
def suite(
    tmp_path_factory: pytest.TempPathFactory, mqtt_broker: MosquittoBroker
) -> Iterator[ManagerSuite]:
    home = Path(tmp_path_factory.mktemp("manager-limits"))
    config = ManagerConfig(
        home=home,
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url=UNUSED_MLFLOW,
        insecure=frozenset({"mlflow"}),
    )
    with ManagerSuite(config) as running:
        yield running


@pytest.fixture(scope="module")
def api(suite: ManagerSuite) -> Api:
    token = read_api_token(suite.config.home)
    assert token is not None
    admin = Api(suite.url, token)
    node = {"node_id": "edge-1", "data_server": "grpc://127.0.0.1:9999", "tags": {"mnist": 5}}
    assert admin("POST", "/nodes", json=node).status_code == 200
    return admin


def sla(**fields: Any) -> dict[str, Any]:
    return {
        "ml_repo_url": UNCLONABLE,
        "ml_model_flavor": "sklearn",
        "training_configuration": {"data_tags": ["mnist"]},
        **fields,
    }


def project_count(api: Api) -> int:
    total: int = api("GET", "/projects").json()["total"]
    return total


def test_deeply_nested_json_gets_422_and_stores_nothing(api: Api) -> None:
    before = project_count(api)
    body = '{"ml_repo_url": "x", "training_configuration": ' + "[" * 50_000 + "]" * 50_000 + "}"

    response = api("POST", "/projects", data=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"
    assert "nest" in response.json()["message"]
    assert project_count(api) == before


def test_an_oversized_body_gets_413_and_stores_nothing(api: Api) -> None:
    before = project_count(api)
    padded = sla(ml_repo_ref="x" * (48 * 1024 * 1024))

    response = api("POST", "/projects", json=padded)

    assert response.status_code == 413
    assert response.json()["error"] == "request_entity_too_large"
    assert project_count(api) == before


def test_an_overlong_list_gets_422(api: Api) -> None:
    too_many_steps = sla(post_training_steps=["build_image_for_trained_model"] * 10_000)
    too_many_tags = sla(training_configuration={"data_tags": [f"t{i}" for i in range(1000)]})

    for body in (too_many_steps, too_many_tags):
        response = api("POST", "/projects", json=body)
        assert response.status_code == 422, response.text


@pytest.mark.parametrize("header", ["abc", "-5", "1e9", "9" * 40])
def test_a_bad_last_event_id_gets_422(api: Api, header: str) -> None:
    created = api("POST", "/projects", json=sla())
    project_id = created.json()["project_id"]

    response = api(
        "GET",
        f"/projects/{project_id}/events",
        params={"follow": 1},
        headers={"Last-Event-ID": header},
    )

    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == "Last-Event-ID"


def test_a_good_last_event_id_resumes_after_it(api: Api) -> None:
    project_id = api("POST", "/projects", json=sla()).json()["project_id"]
    deadline = time.monotonic() + 30
    while api("GET", f"/projects/{project_id}").json()["status"] != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.1)

    stream = api(
        "GET",
        f"/projects/{project_id}/events",
        params={"follow": 1},
        headers={"Last-Event-ID": "0"},
    )

    ids = [line for line in stream.text.splitlines() if line.startswith("id: ")]
    assert stream.status_code == 200
    assert ids and ids[0] == "id: 1"


@pytest.mark.parametrize("url", ["https://[evil", "https://[::1", "http://exa mple.com/x"])
def test_a_malformed_repository_url_gets_422(api: Api, url: str) -> None:
    response = api("POST", "/projects", json=sla(ml_repo_url=url))

    assert response.status_code == 422, response.text
    assert response.json()["details"][0]["field"] == "ml_repo_url"


def test_repository_url_credentials_never_come_back(api: Api) -> None:
    secret = "ghp_S3cretT0kenValue"
    url = f"https://alice:{secret}@127.0.0.1:9/repo.git"

    created = api("POST", "/projects", json=sla(ml_repo_url=url))
    project_id = created.json()["project_id"]
    time.sleep(0.5)
    answers = [
        created,
        api("GET", f"/projects/{project_id}"),
        api("GET", "/projects"),
        api("GET", f"/projects/{project_id}/events"),
    ]

    assert created.status_code == 201
    for answer in answers:
        assert secret not in answer.text


def test_flops_home_is_private_to_the_manager(suite: ManagerSuite) -> None:
    home = suite.config.home.resolve()

    files = [entry for entry in home.iterdir() if entry.is_file() and not entry.is_symlink()]

    # a 0700 home keeps everything below it from other users, whatever their own modes
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert {"api-token", "manager.lock"} <= {f.name for f in files}
    for entry in files:
        mode = stat.S_IMODE(entry.stat().st_mode)
        assert mode & 0o077 == 0, f"{entry.name} is {oct(mode)}"


def test_a_world_readable_home_is_made_private_at_start(
    tmp_path: Path, mqtt_broker: MosquittoBroker
) -> None:
    home = tmp_path / "home"
    (home / "db").mkdir(parents=True)
    (home / "api-token").write_text("old-token")
    os.chmod(home, 0o755)
    os.chmod(home / "db", 0o755)
    os.chmod(home / "api-token", 0o644)
    config = ManagerConfig(
        home=home,
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url=UNUSED_MLFLOW,
        insecure=frozenset({"mlflow"}),
    )

    with ManagerSuite(config):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [home, home / "db"]}
        token_mode = stat.S_IMODE((home / "api-token").stat().st_mode)

    assert modes == {"home": 0o700, "db": 0o700}
    assert token_mode == 0o600


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def oakestra_key() -> rsa.RSAPrivateKey:
    return _rsa_key()


@pytest.fixture(scope="module")
def oakestra_api_url(
    tmp_path_factory: pytest.TempPathFactory,
    mqtt_broker: MosquittoBroker,
    oakestra_key: rsa.RSAPrivateKey,
) -> Iterator[str]:
    home = Path(tmp_path_factory.mktemp("manager-oakestra-auth"))
    public = home / "oakestra.pem"
    public.write_bytes(
        oakestra_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config = ManagerConfig(
        home=home,
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url=UNUSED_MLFLOW,
        auth="oakestra",
        insecure=frozenset({"local", "mlflow"}),  # many customers, local; MLflow without auth
        jwt_public_key_file=str(public),
    )
    with ManagerSuite(config) as running:
        yield running.url


def _oakestra_token(key: rsa.RSAPrivateKey, kind: str) -> str:
    """A token as Oakestra's flask-jwt-extended issues it: ``type`` access or refresh."""
    now = int(time.time())
    claims = {"sub": "Admin", "roles": ["ADMIN"], "type": kind, "iat": now, "exp": now + 600}
    return jwt.encode(claims, key, algorithm="RS256")


def test_an_oakestra_refresh_token_is_not_an_access_token(
    oakestra_api_url: str, oakestra_key: rsa.RSAPrivateKey
) -> None:
    access = Api(oakestra_api_url, _oakestra_token(oakestra_key, "access"))
    refresh = Api(oakestra_api_url, _oakestra_token(oakestra_key, "refresh"))

    refused = refresh("GET", "/projects")

    assert access("GET", "/projects").status_code == 200
    assert refused.status_code == 401
    assert "refresh token" in refused.json()["message"]


def test_many_customers_on_the_local_orchestrator_are_refused(tmp_path: Path) -> None:
    public = tmp_path / "oakestra.pem"
    public.write_bytes(
        _rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    config = ManagerConfig(
        home=tmp_path / "home",
        port=0,
        auth="oakestra",
        jwt_public_key_file=str(public),
        mqtt_url="mqtt://127.0.0.1:9",
        mlflow_url=UNUSED_MLFLOW,
        insecure=frozenset({"mlflow"}),
    )

    with pytest.raises(ConfigurationError, match="FLOPS_ORCHESTRATOR=oakestra"):
        ManagerSuite(config).start()
    assert not (tmp_path / "home").exists()  # refused before anything was created


def _customer_token(key: rsa.RSAPrivateKey, customer: str) -> str:
    now = int(time.time())
    claims = {"sub": customer, "roles": ["USER"], "type": "access", "iat": now, "exp": now + 600}
    return jwt.encode(claims, key, algorithm="RS256")


def test_customers_never_learn_node_addresses(
    oakestra_api_url: str, oakestra_key: rsa.RSAPrivateKey
) -> None:
    admin = Api(oakestra_api_url, _oakestra_token(oakestra_key, "access"))
    alice = Api(oakestra_api_url, _customer_token(oakestra_key, "alice"))
    address = "grpc://10.1.2.3:8815"
    node = {"node_id": "edge-9", "data_server": address, "hostname": "worker-9", "tags": {"x": 1}}
    assert admin("POST", "/nodes", json=node).status_code == 200
    too_many = {
        "customerID": "alice",
        "ml_repo_url": "https://127.0.0.1:9/none.git",
        "training_configuration": {"data_tags": ["x"], "min_available_clients": 5},
    }

    listed = alice("GET", "/nodes")
    refused = alice("POST", "/projects", json=too_many)

    assert listed.status_code == 200
    assert {n["node_id"] for n in listed.json()["nodes"]} >= {"edge-9"}
    assert refused.status_code == 409
    for answer in (listed, refused):
        assert address not in answer.text and "10.1.2.3" not in answer.text
        assert "worker-9" not in answer.text
    assert address in admin("GET", "/nodes").text


@pytest.mark.parametrize("url", ["/proc/self/root/etc", "file:///etc", "./examples/x"])
def test_a_customer_cannot_build_from_a_manager_directory(
    oakestra_api_url: str, oakestra_key: rsa.RSAPrivateKey, url: str
) -> None:
    alice = Api(oakestra_api_url, _customer_token(oakestra_key, "alice"))
    body = {
        "customerID": "alice",
        "ml_repo_url": url,
        "training_configuration": {"data_tags": ["x"]},
    }

    refused = alice("POST", "/projects", json=body)

    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == "ml_repo_url_not_allowed"
    assert alice("GET", "/projects").json()["total"] == 0


class _BasicAuthGit(http.server.BaseHTTPRequestHandler):
    """A git HTTP server that asks for basic auth and records the credentials it gets."""

    seen: list[str]

    def do_GET(self) -> None:
        header = self.headers.get("Authorization")
        if header is None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.end_headers()
            return
        self.seen.append(base64.b64decode(header.split()[1]).decode())
        self.send_response(404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


def test_repository_credentials_are_stored_apart_and_still_reach_git(
    suite: ManagerSuite, api: Api
) -> None:
    seen: list[str] = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), type("Git", (_BasicAuthGit,), {"seen": seen})
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "ghp_ApartT0ken"
    url = f"http://alice:{secret}@127.0.0.1:{server.server_address[1]}/repo.git"
    try:
        project_id = api("POST", "/projects", json=sla(ml_repo_url=url)).json()["project_id"]
        deadline = time.monotonic() + 60
        while api("GET", f"/projects/{project_id}").json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        server.shutdown()
        server.server_close()
    record = suite.lifecycle.get(project_id)

    assert secret not in json.dumps(record.sla)  # the SLA (views, MLflow params) has none
    assert record.repo_userinfo == f"alice:{secret}"
    assert f"alice:{secret}" in seen  # the build still cloned with it
