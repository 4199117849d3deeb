"""Data servers (issue: secure by default, attack 4): TLS with the certificate the node
registered, and tokens the manager signs. A plain pyarrow client, a token of another node, tag
or key, an expired token, a read token writing or dropping: all refused. The node owner's
credential and the manager's write token may write; the learner's data client reads with the
env the manager gives it. Real Flight servers on loopback, a real manager API and a real
``flops-data-server`` process."""

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import jwt
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from waiting import wait_until
from werkzeug.serving import make_server

from data_server.registration import NodeRegistrar, registration_payload, stored_credential
from data_server.security import DataServerSecurity, owner_credentials
from data_server.server import DataServer
from flops_manager.app import create_app
from flops_manager.auth import ApiTokenAuth, NodeCredentials, WithNodeCredentials
from flops_manager.data_access import DataAccess
from flops_manager.projects import ProjectLifecycle
from flops_manager.store import EmbeddedProjectStore
from flops_utils import env_vars
from flops_utils.data_client import (
    DataAccessDenied,
    DataClient,
    DataServerUnavailable,
    load_dataset_from_env,
)
from flops_utils.net import find_free_port, wait_for_port

NODE = "node-1"
PROJECT = "p-1"
ADMIN_TOKEN = "admin-secret-for-tests"
START_TIMEOUT_S = 30.0
REFUSED = (flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError)


def numbers(count: int) -> pa.Table:
    return pa.table({"x": pa.array(range(count), pa.int64())})


@pytest.fixture
def access(tmp_path: Path) -> DataAccess:
    return DataAccess(tmp_path / "flops-home")


@pytest.fixture
def secure_server(tmp_path: Path, access: DataAccess) -> Iterator[DataServer]:
    """A TLS data server of ``node-1`` trusting ``access``'s key, holding tags ``mnist`` (10
    rows) and ``private`` (3 rows), put there with the owner's credential."""
    data_dir = tmp_path / "node-1"
    security = DataServerSecurity.load(data_dir, NODE, ["127.0.0.1"], access.public_key_pem())
    with DataServer(data_dir, security=security) as server:
        with owner_client(server) as owner:
            owner.put_table("mnist", numbers(10))
            owner.put_table("private", numbers(3))
        yield server


def owner_client(server: DataServer) -> DataClient:
    token, cert = owner_credentials(server.data_dir)
    return DataClient(server.location, token=token, tls_root_certs=cert)


def cert_of(server: DataServer) -> bytes:
    assert server.security is not None
    return server.security.cert_pem.encode()


def raw_client(server: DataServer) -> flight.FlightClient:
    """A plain pyarrow client that trusts the server's certificate (it is public: the node
    registers it) but has no credential of its own."""
    return flight.connect(server.location, tls_root_certs=cert_of(server))


def bearer(token: str) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])


def every_call(
    client: flight.FlightClient, options: flight.FlightCallOptions
) -> dict[str, Callable[[], Any]]:
    """Each kind of call an attacker would try: read, list, describe, write, drop."""

    def do_put() -> None:
        writer, _ = client.do_put(
            flight.FlightDescriptor.for_path("mnist"), numbers(1).schema, options
        )
        writer.write_table(numbers(1))
        writer.close()

    return {
        "do_get": lambda: client.do_get(flight.Ticket(b"mnist"), options).read_all(),
        "list_flights": lambda: list(client.list_flights(b"", options)),
        "get_flight_info": lambda: client.get_flight_info(
            flight.FlightDescriptor.for_path("mnist"), options
        ),
        "tags": lambda: list(client.do_action(flight.Action("tags", b""), options)),
        "do_put": do_put,
        "drop": lambda: list(client.do_action(flight.Action("drop", b"mnist"), options)),
    }


def test_a_client_without_a_token_can_do_nothing(secure_server: DataServer) -> None:
    client = raw_client(secure_server)

    for call in every_call(client, flight.FlightCallOptions()).values():
        with pytest.raises(flight.FlightUnauthenticatedError, match="Bearer"):
            call()

    with owner_client(secure_server) as owner:
        assert owner.list_tags() == {"mnist": 10, "private": 3}  # nothing written or dropped


def test_a_plain_grpc_client_cannot_talk_to_the_tls_server(secure_server: DataServer) -> None:
    plain = flight.connect(secure_server.location.replace("grpc+tls://", "grpc://"))

    with pytest.raises(flight.FlightUnavailableError):
        plain.do_get(flight.Ticket(b"mnist")).read_all()


def test_a_client_that_trusts_another_certificate_is_refused(
    secure_server: DataServer, tmp_path: Path, access: DataAccess
) -> None:
    other = DataServerSecurity.load(tmp_path / "other", NODE, ["127.0.0.1"])
    token = access.issue_read_token(PROJECT, NODE, ["mnist"])

    client = DataClient(secure_server.location, token=token, tls_root_certs=other.cert_pem)

    with client, pytest.raises(DataServerUnavailable, match="certificate"):
        client.get_table("mnist")


def forged(payload: dict[str, Any]) -> str:
    return jwt.encode(payload, Ed25519PrivateKey.generate(), algorithm="EdDSA")


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda a: a.issue_read_token(PROJECT, "node-2", ["mnist"]), id="other-node"),
        pytest.param(lambda a: a.issue_read_token(PROJECT, NODE, ["private"]), id="other-tag"),
        pytest.param(lambda a: expired(a), id="expired"),
        pytest.param(lambda a: forged(claims_of(a)), id="signed-by-another-key"),
        pytest.param(lambda a: unsigned(claims_of(a)), id="alg-none"),
        pytest.param(lambda a: "not-a-token", id="garbage"),
    ],
)
def test_a_wrong_token_cannot_read_the_tag(
    secure_server: DataServer, access: DataAccess, make_token: Callable[[DataAccess], str]
) -> None:
    client = raw_client(secure_server)

    with pytest.raises(REFUSED, match="data server:"):
        client.do_get(flight.Ticket(b"mnist"), bearer(make_token(access))).read_all()


def claims_of(access: DataAccess) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        access.issue_read_token(PROJECT, NODE, ["mnist"]), options={"verify_signature": False}
    )
    return claims


def expired(access: DataAccess) -> str:
    """A token signed with the manager's own key whose ``exp`` passed two minutes ago (more
    than the data server's clock leeway)."""
    now = int(time.time())
    claims = claims_of(access) | {"exp": now - 120, "iat": now - 300}
    key = serialization.load_pem_private_key(access.key_path.read_bytes(), password=None)
    return jwt.encode(claims, cast(Ed25519PrivateKey, key), algorithm="EdDSA")


def unsigned(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, "", algorithm="none")


def test_a_read_token_reads_only_its_tags_and_cannot_write_or_drop(
    secure_server: DataServer, access: DataAccess
) -> None:
    token = access.issue_read_token(PROJECT, NODE, ["mnist"])
    client = raw_client(secure_server)
    calls = every_call(client, bearer(token))

    assert client.do_get(flight.Ticket(b"mnist"), bearer(token)).read_all().num_rows == 10
    listed = [info.descriptor.path[0] for info in calls["list_flights"]()]
    assert listed == [b"mnist"]  # "private" is not even listed
    with pytest.raises(flight.FlightUnauthorizedError, match="does not cover"):
        client.do_get(flight.Ticket(b"private"), bearer(token)).read_all()
    missing = access.issue_read_token(PROJECT, NODE, ["absent"])
    with pytest.raises(flight.FlightServerError) as not_found:
        client.do_get(flight.Ticket(b"absent"), bearer(missing)).read_all()
    assert "private" not in str(not_found.value) + not_found.value.extra_info.decode()
    for name in ("do_put", "drop"):
        with pytest.raises(flight.FlightUnauthorizedError, match="read token may not"):
            calls[name]()
    with owner_client(secure_server) as owner:
        assert owner.list_tags() == {"mnist": 10, "private": 3}


def test_the_owner_and_the_managers_write_token_may_write_and_drop(
    secure_server: DataServer, access: DataAccess
) -> None:
    cert = cert_of(secure_server).decode()
    write_token = access.issue_write_token(NODE)

    with DataClient(secure_server.location, token=write_token, tls_root_certs=cert) as manager:
        manager.put_table("mocks", numbers(7))
    with owner_client(secure_server) as owner:
        dropped = owner.drop("private")
        tags = owner.list_tags()

    assert dropped is True
    assert tags == {"mnist": 10, "mocks": 7}


def test_the_learners_data_client_reads_with_the_env_the_manager_gives(
    secure_server: DataServer, access: DataAccess, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = {"node_id": NODE, "data_server_cert": cert_of(secure_server).decode()}
    env = access.learner_env(PROJECT, node, ["mnist"])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(env_vars.DATA_SERVER, secure_server.location)
    monkeypatch.setenv(env_vars.DATA_TAGS, "mnist")

    dataset = load_dataset_from_env()

    assert set(env) == {env_vars.DATA_TOKEN, env_vars.DATA_SERVER_CERT}
    assert dataset["x"] == list(range(10))
    monkeypatch.setenv(env_vars.DATA_TAGS, "private")
    with pytest.raises(DataAccessDenied, match="does not cover"):
        load_dataset_from_env()


def test_the_key_is_kept_private_and_reused(tmp_path: Path, access: DataAccess) -> None:
    again = DataAccess(tmp_path / "flops-home")

    assert again.public_key_pem() == access.public_key_pem()
    assert access.key_path.stat().st_mode & 0o777 == 0o600


def test_the_data_servers_secrets_are_private(secure_server: DataServer) -> None:
    directory = secure_server.data_dir / ".security"

    assert directory.stat().st_mode & 0o777 == 0o700
    modes = {path.name: path.stat().st_mode & 0o777 for path in directory.iterdir()}
    assert modes == {"owner-token": 0o600, "tls-cert.pem": 0o600, "tls-key.pem": 0o600}


@pytest.fixture
def node_credentials(tmp_path: Path) -> NodeCredentials:
    return NodeCredentials(tmp_path / "flops-home")


@pytest.fixture
def manager_api(
    tmp_path: Path, access: DataAccess, node_credentials: NodeCredentials
) -> Iterator[tuple[str, EmbeddedProjectStore]]:
    """The manager's real REST API (no lifecycle: only node routes are called) on loopback,
    with ``access`` installed and node credentials."""
    store = EmbeddedProjectStore(tmp_path / "db")
    app = create_app(
        cast(ProjectLifecycle, None),
        store,
        "http://127.0.0.1:9",
        WithNodeCredentials(ApiTokenAuth(ADMIN_TOKEN), node_credentials),
        node_credentials,
        access,
    )
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", store
    server.shutdown()
    thread.join(5)
    store.close()


def test_a_data_server_process_registers_its_cert_and_trusts_the_managers_tokens(
    manager_api: tuple[str, EmbeddedProjectStore], access: DataAccess, tmp_path: Path
) -> None:
    url, store = manager_api
    port = find_free_port()
    log = tmp_path / "node.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "data_server", "--data-dir", str(tmp_path / "node-data")),
                *("--port", str(port), "--node-id", NODE, "--manager-url", url),
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, env_vars.API_TOKEN: ADMIN_TOKEN},
        )
    try:
        assert wait_for_port("127.0.0.1", port, START_TIMEOUT_S), log.read_text()
        node = wait_until(
            lambda: next((n for n in store.list_nodes() if n.get("data_server_cert")), None),
            START_TIMEOUT_S,
            lambda: log.read_text(),
        )
        # Execute: the admin's POST /mocks pushes over TLS with a write token
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        accepted = requests.post(
            f"{url}/api/flops/mocks",
            json={"dataset": "mnist", "tag": "mnist"},
            headers=admin,
            timeout=30,
        )
        job = accepted.json()
        job_url = url + accepted.headers["Location"]

        def finished() -> dict[str, Any] | None:
            answer: dict[str, Any] = requests.get(job_url, headers=admin, timeout=10).json()
            return answer if answer["status"] != "running" else None

        pushed = wait_until(finished, 120, "the mock data job did not end")
        env = access.learner_env(PROJECT, node, ["mnist"])
        with DataClient(
            node["data_server"],
            token=env[env_vars.DATA_TOKEN],
            tls_root_certs=env[env_vars.DATA_SERVER_CERT],
        ) as learner:
            rows = learner.find_tags(["mnist"])
        anonymous = DataClient(
            node["data_server"], token="", tls_root_certs=node["data_server_cert"]
        )
        with anonymous, pytest.raises(DataAccessDenied, match="Bearer"):
            anonymous.list_tags()
    finally:
        process.terminate()
        process.wait(15)

    assert node["data_server"] == f"grpc+tls://127.0.0.1:{port}"
    assert node["data_server_cert"] == owner_credentials(tmp_path / "node-data")[1]
    assert accepted.status_code == 202, accepted.text
    assert pushed["status"] == "done" and pushed["job_id"] == job["job_id"], pushed
    assert rows == {"mnist": 10_000}
    assert ADMIN_TOKEN not in log.read_text()


def test_a_registrar_refreshes_its_node_credential_after_half_its_lifetime(
    manager_api: tuple[str, EmbeddedProjectStore], tmp_path: Path
) -> None:
    # Prepare: a credential issued 100 s ago, valid for 150 s (past half its lifetime)
    url, store = manager_api
    issuer = NodeCredentials(tmp_path / "flops-home", clock=lambda: time.time() - 100)
    old = issuer.issue(NODE, ttl_s=150)
    kept = tmp_path / "node-data" / ".security" / "manager-credential"
    registrar = NodeRegistrar(
        url,
        lambda: registration_payload(NODE, "grpc+tls://127.0.0.1:1", "local", {}),
        token=old.token,
        credential_file=kept,
    )

    # Execute
    registered = registrar.register_once()
    registered_again = registrar.register_once()  # with the new credential
    registrar.stop()

    # Assert
    fresh = stored_credential(kept)
    assert registered and registered_again, registrar.last_error
    assert fresh is not None and fresh != old.token
    assert jwt.decode(fresh, options={"verify_signature": False})["exp"] > old.expires_at
    assert kept.stat().st_mode & 0o777 == 0o600
    assert [n["node_id"] for n in store.list_nodes()] == [NODE]
