"""Every MLflow run of a failed or cancelled project ends (issue: survive faults, "SIGKILL the
aggregator: its MLflow run stays RUNNING forever"): a killed aggregator never ends its run, so
the manager ends it, FAILED for a failed project and KILLED for a cancelled one."""

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import mlflow
import pytest
from waiting import wait_until

from flops_manager.auth import read_api_token
from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import example_sla, local_nodes
from flops_manager.embedded import mlflow_admin
from flops_manager.suite import ManagerSuite

pytestmark = pytest.mark.e2e

ROUNDS = 2000  # far more than the test waits for: it is stopped in the middle


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ManagerSuite, ManagerClient]]:
    """A secure embedded manager (its own MLflow with authentication) with two MNIST nodes."""
    home = Path(tmp_path_factory.mktemp("runs-end-home"))
    with ManagerSuite(ManagerConfig(home=home, port=0)) as suite:
        token = read_api_token(home)
        api = ManagerClient(suite.url, token=token)
        with local_nodes(2, Path(tmp_path_factory.mktemp("nodes")), suite.url, token):
            api.wait_for_nodes(2, timeout_s=60)
            api.provide_mocks(dataset="mnist", tag="mnist")
            yield suite, api


def _training_with_a_round(api: ManagerClient, project_id: str) -> dict[str, Any] | None:
    project = api.project(project_id)
    assert project["status"] not in ("completed", "failed", "cancelled"), project
    return project if project["rounds"] else None


def _admin_mlflow(suite: ManagerSuite) -> Any:
    admin = mlflow_admin(suite.config.home.resolve())
    assert admin is not None
    return mock.patch.dict(os.environ, admin.env())


def _run_status(suite: ManagerSuite, run_id: str) -> str:
    with _admin_mlflow(suite):
        status: str = mlflow.MlflowClient(suite.mlflow_url).get_run(run_id).info.status
    return status


def _start(suite: ManagerSuite, api: ManagerClient) -> tuple[str, str]:
    """Start a long project; returns its id and its MLflow run id once a round is logged
    (the project record learns the run id only at the end)."""
    sla = example_sla(ROUNDS, min_available_clients=2, min_fit_clients=2, min_evaluate_clients=2)
    project_id = api.create_project(sla)
    wait_until(lambda: _training_with_a_round(api, project_id), 240, "no round was logged", 0.5)
    with _admin_mlflow(suite):
        tracking = mlflow.MlflowClient(suite.mlflow_url)
        experiment = tracking.get_experiment_by_name(f"flops-{project_id}")
        assert experiment is not None
        runs = tracking.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["RUNNING"]
    return project_id, runs[0].info.run_id


def test_a_cancelled_projects_run_is_killed(client: tuple[ManagerSuite, ManagerClient]) -> None:
    suite, api = client
    project_id, run_id = _start(suite, api)

    api.request("DELETE", f"/projects/{project_id}")

    wait_until(
        lambda: _run_status(suite, run_id) == "KILLED",
        30,
        lambda: f"the run is {_run_status(suite, run_id)}, not KILLED",
    )


def test_a_killed_aggregators_run_fails_with_the_project(
    client: tuple[ManagerSuite, ManagerClient],
) -> None:
    suite, api = client
    project_id, run_id = _start(suite, api)
    aggregator = next(
        h for h in suite.lifecycle.get(project_id).service_handles if h["name"] == "aggregator"
    )

    os.killpg(int(aggregator["pid"]), signal.SIGKILL)  # the aggregator and its model worker

    ended = api.wait_for_project(project_id, 120)
    assert ended["status"] == "failed"
    # the real cause, not a learner that lost the connection nor the aggregator's last log line
    assert ended["status_message"].startswith("aggregator was killed by signal 9 (SIGKILL)")
    assert ended["lost_learners"] == []
    wait_until(
        lambda: _run_status(suite, run_id) == "FAILED",
        30,
        lambda: f"the run is {_run_status(suite, run_id)}, not FAILED",
    )
