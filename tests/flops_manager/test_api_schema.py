"""Property-based tests of the served OpenAPI document with schemathesis.

Schemathesis generates requests for every documented operation (valid and invalid bodies,
queries and paths, with the admin's token) and checks each response: no 5xx, status codes,
content types and bodies as documented. Not checked: that every schema-valid request is
accepted, because some SLA rules relate two fields (``min_fit_clients`` must not exceed
``min_available_clients``), which JSON Schema cannot state. ``POST /mocks`` is left out: it
pushes data to the registered nodes' data servers, which here are whatever addresses the
generator invented. The generated project ids never exist, so a real project is also fetched
and cancelled and its answers checked against the document (``additionalProperties: false``:
nothing undocumented is sent).
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from mqtt_testing import manager_mqtt
from schemathesis.core.result import Ok
from schemathesis.schemas import BaseSchema
from waiting import wait_until

from flops_manager.auth import read_api_token
from flops_manager.broker import MosquittoBroker
from flops_manager.config import ManagerConfig
from flops_manager.suite import ManagerSuite

EXAMPLES_PER_OPERATION = 120
MIN_REQUESTS = 1000


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, mqtt_broker: MosquittoBroker
) -> Iterator[ManagerSuite]:
    home = Path(tmp_path_factory.mktemp("manager-schema"))
    config = ManagerConfig(
        home=home,
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url="http://127.0.0.1:9",
        insecure=frozenset({"mlflow"}),
    )
    with ManagerSuite(config) as suite:
        yield suite


def test_every_operation_answers_as_documented(served: ManagerSuite) -> None:
    token = read_api_token(served.config.home)
    schema: BaseSchema = schemathesis.openapi.from_url(f"{served.url}/openapi/openapi.json")
    schema = schema.exclude(path="/api/flops/mocks", method="POST")
    sent: list[str] = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: schemathesis.Case[Any]) -> None:
            sent.append(case.operation.label)
            case.call_and_validate(
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
                excluded_checks=[schemathesis.checks.positive_data_acceptance],
            )

        check()

    assert len(sent) >= MIN_REQUESTS, f"only {len(sent)} generated requests"
    assert len(set(sent)) == 15, f"operations covered: {sorted(set(sent))}"


def test_a_real_project_is_sent_exactly_as_documented(served: ManagerSuite) -> None:
    token = read_api_token(served.config.home)
    headers = {"Authorization": f"Bearer {token}"}
    api = f"{served.url}/api/flops"
    node = {"node_id": "schema-node", "data_server": "grpc://127.0.0.1:9999", "tags": {"t": 1}}
    requests.post(f"{api}/nodes", json=node, headers=headers, timeout=10).raise_for_status()
    sla = {
        "ml_repo_url": "file:///nonexistent/repo.git",
        "training_configuration": {"data_tags": ["t"]},
    }
    created = requests.post(f"{api}/projects", json=sla, headers=headers, timeout=10)
    project_id = created.json()["project_id"]
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi/openapi.json")
    document = requests.get(f"{served.url}/openapi/openapi.json", timeout=10).json()

    answers = []
    for method in ("GET", "DELETE"):
        operation = schema["/api/flops/projects/{project_id}"][method]
        case = operation.Case(path_parameters={"project_id": project_id})
        answers.append(case.call_and_validate(headers=headers, timeout=30))
    ended = wait_until_ended(f"{api}/projects/{project_id}", headers)

    assert [a.status_code for a in answers] == [200, 200]
    assert ended["admin"]["service_handles"] == []
    assert document["components"]["schemas"]["ProjectView"]["additionalProperties"] is False


def wait_until_ended(url: str, headers: dict[str, str], timeout_s: float = 30) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        project: dict[str, Any] = requests.get(url, headers=headers, timeout=10).json()
        return project if project["status"] in ("completed", "failed", "cancelled") else None

    return wait_until(ended, timeout_s, f"{url} did not end", interval_s=0.1)
