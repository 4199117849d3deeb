"""Training survives the faults of the issue "survive faults", on the embedded default with
every control on, three MNIST learners and a minimum of two, each fault real:

- SIGKILL one learner mid-training: it is a lost learner, not a failed project; the round it
  was in is aggregated over the others and training goes on while the minimum holds;
- SIGSTOP one learner: it is reported as a straggler, dropped after ``round_timeout_s`` and
  counted as lost, and training goes on;
- SIGKILL the embedded Mosquitto or MLflow mid-training: the manager restarts it on its port,
  the services reconnect (status messages are queued meanwhile, MLflow calls retried), and the
  project completes.

Every test checks that every round reaches the project record and the MLflow run, and that no
process of the project is left.
"""

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import mlflow
import pytest
import requests
from flow_testing import processes_mentioning
from waiting import wait_until

from flops_manager.auth import read_api_token
from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import example_sla, local_nodes
from flops_manager.embedded import EmbeddedState, mlflow_admin
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


def assert_every_round_recorded(
    suite: ManagerSuite, project: dict[str, Any], rounds: int = ROUNDS
) -> None:
    assert project["status"] == "completed", project["status_message"]
    assert [r["round"] for r in project["rounds"]] == list(range(1, rounds + 1))
    steps = run_metric_steps(suite, project["mlflow"]["run_id"], "accuracy")
    assert steps == list(range(1, rounds + 1))
    wait_until(
        lambda: not processes_mentioning(project["project_id"]),
        60,
        lambda: f"processes left: {processes_mentioning(project['project_id'])}",
    )


def start_project(
    suite: ManagerSuite, api: ManagerClient, rounds_first: int = 2, **training: Any
) -> tuple[str, dict[str, Any]]:
    """POST the example SLA (3 learners, minimum 2), wait for ``rounds_first`` rounds; returns
    the project id and one learner's service handle."""
    sla = example_sla(
        ROUNDS, min_available_clients=2, min_fit_clients=2, min_evaluate_clients=2, **training
    )
    project_id = api.create_project(sla)
    wait_until(lambda: rounds_logged(api, project_id, rounds_first), 240, "no rounds", 0.2)
    learner = next(
        h
        for h in suite.lifecycle.get(project_id).service_handles
        if h["name"].startswith("learner-")
    )
    return project_id, learner


def test_a_stalled_learner_is_a_straggler_then_dropped_and_training_completes(
    client: tuple[ManagerSuite, ManagerClient],
) -> None:
    suite, api = client
    project_id, learner = start_project(suite, api, 1, round_timeout_s=20)

    os.killpg(int(learner["pid"]), signal.SIGSTOP)  # stalled, not dead: its sockets stay open
    try:
        project = api.wait_for_project(project_id, PROJECT_TIMEOUT_S)
    finally:
        os.killpg(int(learner["pid"]), signal.SIGCONT)

    stragglers = [e for e in project["events"] if e["status"] == "straggler"]
    assert stragglers, [e["message"] for e in project["events"]]
    assert stragglers[0]["component"] == learner["name"]
    assert "has not answered round" in stragglers[0]["message"]
    assert project["lost_learners"] == [learner["name"]]
    assert_every_round_recorded(suite, project)


@pytest.mark.parametrize("component", ["mqtt", "mlflow"])
def test_training_completes_when_an_embedded_component_is_killed(
    client: tuple[ManagerSuite, ManagerClient], component: str
) -> None:
    suite, api = client
    project_id, _ = start_project(suite, api)
    process = EmbeddedState(suite.config.home.resolve()).process(component)
    assert process is not None

    os.kill(process.pid, signal.SIGKILL)

    project = api.wait_for_project(project_id, PROJECT_TIMEOUT_S)
    assert project["lost_learners"] == []
    assert_every_round_recorded(suite, project)
    health = requests.get(f"{suite.url}/healthz", timeout=5).json()
    assert health["status"] == "ok", health
    restarted = EmbeddedState(suite.config.home.resolve()).process(component)
    assert restarted is not None and restarted.pid != process.pid


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
