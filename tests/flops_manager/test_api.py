"""The manager's REST API: success and error answers on a real waitress server; project views
and internal errors on the WSGI app over a real embedded store."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import jsonschema_rs
import pytest
import requests
from flask.testing import FlaskClient
from mqtt_testing import manager_mqtt
from waiting import wait_until
from werkzeug.test import TestResponse

from flops_manager.api_models import mask_credentials
from flops_manager.app import create_app
from flops_manager.auth import Authenticator, Principal, read_api_token
from flops_manager.broker import MosquittoBroker
from flops_manager.config import ManagerConfig
from flops_manager.errors import NotFound
from flops_manager.projects import ProjectLifecycle
from flops_manager.records import ProjectRecord
from flops_manager.sla import ProjectSLA
from flops_manager.store import EmbeddedProjectStore, ProjectStore
from flops_manager.suite import ManagerSuite
from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.errors import FlopsError
from flops_utils.logging import logger

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
    def ended() -> dict[str, Any] | None:
        project: dict[str, Any] = api("GET", f"/projects/{project_id}").json()
        return project if project["status"] in ("completed", "failed", "cancelled") else None

    return wait_until(ended, timeout_s, f"project {project_id} did not end", interval_s=0.1)


def test_health_and_api_docs_need_no_token(suite: ManagerSuite) -> None:
    health = requests.get(f"{suite.url}/healthz", timeout=5)
    spec = requests.get(f"{suite.url}/openapi/openapi.json", timeout=5)
    swagger = requests.get(f"{suite.url}/openapi/swagger", timeout=5)

    assert health.status_code == 200
    # this suite's MLflow URL answers nothing: degraded, naming the component
    assert health.json()["status"] == "degraded"
    assert health.json()["components"]["api"] == {"status": "ok"}
    assert health.json()["components"]["mlflow"]["status"] == "down"
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


def test_mocks_run_as_a_job_that_reports_a_failed_push(api: Api) -> None:
    register(api, "mock-dead", {})  # its data server (grpc://127.0.0.1:9999) answers nothing

    accepted = api("POST", "/mocks", json={"nodes": ["mock-dead"], "tag": "deadtag"})
    job_path = accepted.headers["Location"].removeprefix("/api/flops")
    ended = wait_until(
        lambda: job if (job := api("GET", job_path).json())["status"] != "running" else None,
        120,
        "the mock data job did not end",
    )

    assert accepted.status_code == 202
    assert accepted.json()["status"] == "running" and accepted.json()["tag"] == "deadtag"
    assert ended["status"] == "failed" and ended["rows"] == {}
    assert "mock-dead" in ended["message"] or "9999" in ended["message"], ended
    assert (
        "deadtag"
        not in next(n for n in api("GET", "/nodes").json()["nodes"] if n["node_id"] == "mock-dead")[
            "tags"
        ]
    )
    assert api("GET", "/mocks/0123456789ab").status_code == 404


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


# --- views and internal errors, on the WSGI app with a real embedded store --------------------

PID = 424242
LOG_PATH = "/srv/flops-home/projects/p-1/aggregator.log"
PYTHON_PATH = "/srv/flops-home/envs/abc/bin/python"
SECRET = "s3cr3t-token"


class TokenAuth(Authenticator):
    """``admin-token`` is the admin; ``<name>-token`` is customer ``<name>``."""

    def authenticate(self, token: str) -> Principal:
        if token == "admin-token":
            return Principal(customer="Admin", admin=True)
        return Principal(customer=token.removesuffix("-token"))


class StoreLifecycle:
    """The part of ``ProjectLifecycle`` the read-only routes use, over a real store; ``failure``
    (when set) is raised by ``get`` to force an error inside a route."""

    def __init__(self, store: ProjectStore) -> None:
        self.store = store
        self.failure: Exception | None = None

    def get(self, project_id: str) -> ProjectRecord:
        if self.failure is not None:
            raise self.failure
        record = self.store.get_project(project_id)
        if record is None:
            raise NotFound(f"No project has id {project_id!r}.")
        return record


def stored_record(project_id: str = "p-1", customer: str = "alice") -> ProjectRecord:
    now = time.time()
    return ProjectRecord(
        _id=project_id,
        project_id=project_id,
        customer_id=customer,
        status=ProjectStatus.TRAINING,
        status_message="round 1 of 3",
        created_at=now,
        updated_at=now,
        sla=ProjectSLA(
            customerID=customer, ml_repo_url=f"https://alice:{SECRET}@git.example/ml.git"
        ).model_dump(mode="json"),
        nodes=["edge-0"],
        services=["aggregator", "learner-edge-0"],
        service_handles=[{"name": "aggregator", "pid": PID, "log_path": LOG_PATH}],
        aggregator_address="10.0.0.5:40123",
        environment={
            "commit": "a" * 40,
            "key": "b" * 32,
            "cache_hit": True,
            "seconds": 0.5,
            "python": PYTHON_PATH,
            "repo_dir": "/srv/flops-home/repos/abc",
            "versions": {"torch": "2.3.0"},
        },
    )


@pytest.fixture
def views(tmp_path: Path) -> Iterator[tuple[FlaskClient, StoreLifecycle]]:
    store = EmbeddedProjectStore(tmp_path / "db")
    store.insert_project(stored_record())
    lifecycle = StoreLifecycle(store)
    app = create_app(cast(ProjectLifecycle, lifecycle), store, UNUSED_MLFLOW, TokenAuth())
    yield app.test_client(), lifecycle
    store.close()


def get(client: FlaskClient, path: str, token: str) -> TestResponse:
    return client.get(f"/api/flops{path}", headers={"Authorization": f"Bearer {token}"})


def test_a_customer_sees_no_internals_and_no_credentials(
    views: tuple[FlaskClient, StoreLifecycle],
) -> None:
    client, _ = views

    response = get(client, "/projects/p-1", "alice-token")

    body = response.get_json()
    assert response.status_code == 200
    assert "admin" not in body
    for internal in (str(PID), LOG_PATH, PYTHON_PATH, "/srv/flops-home", "10.0.0.5", SECRET):
        assert internal not in response.text
    assert body["sla"]["ml_repo_url"] == "https://alice:***@git.example/ml.git"
    assert body["environment"] == {
        "commit": "a" * 40,
        "key": "b" * 32,
        "cache_hit": True,
        "seconds": 0.5,
        "versions": {"torch": "2.3.0"},
        "notes": [],
        "images": {},
    }


def test_the_admin_sees_handles_paths_and_the_aggregator_address(
    views: tuple[FlaskClient, StoreLifecycle],
) -> None:
    client, _ = views

    admin = get(client, "/projects/p-1", "admin-token").get_json()["admin"]

    assert admin["service_handles"] == [{"name": "aggregator", "pid": PID, "log_path": LOG_PATH}]
    assert admin["environment_paths"]["python"] == PYTHON_PATH
    assert admin["aggregator_address"] == "10.0.0.5:40123"


def test_another_customers_project_is_not_found(
    views: tuple[FlaskClient, StoreLifecycle],
) -> None:
    client, _ = views

    assert get(client, "/projects/p-1", "bob-token").status_code == 404


@pytest.mark.parametrize("token", ["alice-token", "admin-token"])
def test_the_project_sent_is_exactly_what_the_openapi_document_says(
    views: tuple[FlaskClient, StoreLifecycle], token: str
) -> None:
    client, _ = views
    document = client.get("/openapi/openapi.json").get_json()
    operation = document["paths"]["/api/flops/projects/{project_id}"]["get"]
    reference = operation["responses"]["200"]["content"]["application/json"]["schema"]
    schemas = document["components"]["schemas"]
    validator = jsonschema_rs.validator_for({**reference, "components": {"schemas": schemas}})

    body = get(client, "/projects/p-1", token).get_json()

    assert schemas["ProjectView"]["additionalProperties"] is False
    assert schemas["ProjectInternals"]["additionalProperties"] is False
    validator.validate(body)
    assert not validator.is_valid({**body, "pid": PID})


def test_an_internal_error_is_a_500_with_a_correlation_id_in_body_header_and_log(
    views: tuple[FlaskClient, StoreLifecycle], caplog: pytest.LogCaptureFixture
) -> None:
    client, lifecycle = views
    lifecycle.failure = RuntimeError(f"disk broke under {LOG_PATH}")
    logger.addHandler(caplog.handler)
    try:
        response = get(client, "/projects/p-1", "alice-token")
    finally:
        logger.removeHandler(caplog.handler)

    correlation_id = response.headers["X-Correlation-ID"]
    assert response.status_code == 500
    assert response.get_json() == {
        "error": "internal_error",
        "message": f"Internal server error (correlation id {correlation_id}); the manager's "
        "log has the details.",
        "details": [],
    }
    assert len(correlation_id) == 32
    assert LOG_PATH not in response.text and "Traceback" not in response.text
    logged = [r for r in caplog.records if correlation_id in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None and "disk broke" in caplog.text


def test_an_unmapped_flops_error_is_a_500_not_a_400(
    views: tuple[FlaskClient, StoreLifecycle],
) -> None:
    client, lifecycle = views

    class Unmapped(FlopsError):
        """An error type the status table does not know."""

        code = "unmapped_for_test"

    lifecycle.failure = Unmapped("the manager's own fault")
    response = get(client, "/projects/p-1", "alice-token")

    assert response.status_code == 500
    assert response.get_json()["error"] == "internal_error"
    assert response.headers["X-Correlation-ID"] in response.get_json()["message"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://alice:tok@git.example/x.git", "https://alice:***@git.example/x.git"),
        ("http://u:p@ss@h/x", "http://u:***@h/x"),
        ("ssh://u:pw@h:22/x", "ssh://u:***@h:22/x"),
        ("https://ghp_abc@github.com/a/b", "https://***@github.com/a/b"),
        ("ssh://git@github.com/a/b", "ssh://git@github.com/a/b"),
        ("git@github.com:a/b.git", "git@github.com:a/b.git"),
        ("https://github.com/a/b", "https://github.com/a/b"),
        ("/srv/repos/model", "/srv/repos/model"),
    ],
)
def test_credentials_in_the_repository_url_are_masked(url: str, shown: str) -> None:
    assert mask_credentials(url) == shown
