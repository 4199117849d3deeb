"""Property-based tests of the served OpenAPI document with schemathesis.

Schemathesis generates requests for every documented operation (valid and invalid bodies,
queries and paths, with the admin's token) and checks each response: no 5xx, status codes,
content types and bodies as documented. Not checked: that every schema-valid request is
accepted, because some SLA rules relate two fields (``min_fit_clients`` must not exceed
``min_available_clients``), which JSON Schema cannot state. ``POST /mocks`` is left out: it
pushes data to the registered nodes' data servers, which here are whatever addresses the
generator invented.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

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
        home=home, port=0, mqtt_url=mqtt_broker.url, mlflow_url="http://127.0.0.1:9"
    )
    with ManagerSuite(config) as suite:
        yield suite


def test_every_operation_answers_as_documented(served: ManagerSuite) -> None:
    token = read_api_token(served.config.home)
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi/openapi.json")
    schema = schema.exclude(path="/api/flops/mocks", method="POST")
    sent: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            sent.append(case.operation.label)
            case.call_and_validate(
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
                excluded_checks=[schemathesis.checks.positive_data_acceptance],
            )

        check()

    assert len(sent) >= MIN_REQUESTS, f"only {len(sent)} generated requests"
    assert len(set(sent)) == 10, f"operations covered: {sorted(set(sent))}"
