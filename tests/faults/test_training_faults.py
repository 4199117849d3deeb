"""A learner killed mid-training is a lost learner, not a failed project (issue: survive faults,
"SIGKILL one learner of 3 (min 2) mid-training: the project fails 0.7 s later"): the round it
was in is aggregated over the other learners, training goes on while the minimum holds, and
every round reaches both the project record and the MLflow run."""

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

ROUNDS = 8
PROJECT_TIMEOUT_S = 420.0


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ManagerSuite, ManagerClient]]:
    """A manager on the embedded default (every control on) with three MNIST nodes."""
    home = Path(tmp_path_factory.mktemp("lost-learner-home"))
    with ManagerSuite(ManagerConfig(home=home, port=0)) as suite:
        token = read_api_token(home)
        api = ManagerClient(suite.url, token=token)
        with local_nodes(3, Path(tmp_path_factory.mktemp("nodes")), suite.url, token):
            api.wait_for_nodes(3, timeout_s=60)
            api.provide_mocks(dataset="mnist", tag="mnist")
            yield suite, api


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose environment mentions ``text`` (the services carry FLOPS_PROJECT_ID)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def run_metric_steps(suite: ManagerSuite, run_id: str, metric: str) -> list[int]:
    """The steps at which the MLflow run logged ``metric`` (read as the MLflow admin)."""
    admin = mlflow_admin(suite.config.home.resolve())
    assert admin is not None
    with mock.patch.dict(os.environ, admin.env()):
        history = mlflow.MlflowClient(suite.mlflow_url).get_metric_history(run_id, metric)
    return sorted(m.step for m in history)


def rounds_logged(api: ManagerClient, project_id: str, at_least: int) -> dict[str, Any] | None:
    project = api.project(project_id)
    assert project["status"] not in ("completed", "failed", "cancelled"), project
    return project if len(project["rounds"]) >= at_least else None


def test_a_learner_killed_mid_training_is_lost_and_training_completes(
    client: tuple[ManagerSuite, ManagerClient],
) -> None:
    suite, api = client
    sla = example_sla(ROUNDS, min_available_clients=2, min_fit_clients=2, min_evaluate_clients=2)
    project_id = api.create_project(sla)
    wait_until(lambda: rounds_logged(api, project_id, 2), 240, "no second round", 0.2)
    learner = next(
        h
        for h in suite.lifecycle.get(project_id).service_handles
        if h["name"].startswith("learner-")
    )

    os.killpg(int(learner["pid"]), signal.SIGKILL)  # the learner and its model worker

    project = api.wait_for_project(project_id, PROJECT_TIMEOUT_S)
    assert project["status"] == "completed", project["status_message"]
    assert project["lost_learners"] == [learner["name"]]
    assert [r["round"] for r in project["rounds"]] == list(range(1, ROUNDS + 1))
    lost = [e for e in project["events"] if e["component"] == learner["name"]]
    assert any("training goes on with 2 learner(s)" in e["message"] for e in lost), lost
    run_id = project["mlflow"]["run_id"]
    assert run_metric_steps(suite, run_id, "accuracy") == list(range(1, ROUNDS + 1))
    wait_until(
        lambda: not processes_mentioning(project_id),
        30,
        lambda: f"processes left: {processes_mentioning(project_id)}",
    )
