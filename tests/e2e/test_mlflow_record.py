"""The MLflow record of a project, read back with ``MlflowClient`` (issue 15, item 5).

Real Mosquitto, the session's MLflow server, two Arrow Flight data servers with IID MNIST,
uv-built environments and Flower training between child processes: two projects of the
example repository, two learners and two rounds each. The run holds every learner's metrics
for every round, the participants and the provenance, no parameter reads "None", the
experiment opens as model training, and both projects' models are versions of one
registered model, each tagged with its project.
"""

from collections.abc import Iterator
from typing import Any

import pytest
from flow_testing import MockNodes

from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import EXAMPLE_REPO, example_sla, run_project
from flops_manager.suite import ManagerSuite
from flops_utils.contract.tracking import registered_model_name
from observatory.mlflow_server import MlflowServer

ROUNDS = 2
LEARNERS = ("node-1", "node-2")
PROJECT_TIMEOUT_S = 300
PER_LEARNER = ("fit_examples", "fit_seconds", "evaluate_examples", "loss", "accuracy")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def suite(manager_config: ManagerConfig) -> Iterator[ManagerSuite]:
    with ManagerSuite(manager_config) as running:
        running.lifecycle.pipeline.manager_url = running.url  # the runs link back to it
        yield running


@pytest.fixture(scope="module")
def client(suite: ManagerSuite, mnist_nodes: MockNodes) -> Iterator[ManagerClient]:
    """A client of a manager with two local nodes holding IID MNIST partitions (tag mnist)."""
    with mnist_nodes(suite, len(LEARNERS)) as api:
        yield api


@pytest.fixture(scope="module")
def projects(client: ManagerClient) -> list[dict[str, Any]]:
    """Two projects of the example repository, one after the other, run to their end."""
    sla = example_sla(ROUNDS, min_available_clients=2, min_fit_clients=2, min_evaluate_clients=2)
    return [run_project(client, sla, PROJECT_TIMEOUT_S) for _ in range(2)]


@pytest.fixture(scope="module")
def tracking(mlflow_server: MlflowServer) -> Any:
    import mlflow

    return mlflow.MlflowClient(mlflow_server.url)


def test_run_has_every_learners_metrics_for_every_round(
    projects: list[dict[str, Any]], tracking: Any
) -> None:
    # Prepare
    project = projects[0]
    assert project["status"] == "completed", project["status_message"]
    run_id = project["mlflow"]["run_id"]

    # Execute
    def steps(metric: str) -> list[int]:
        return sorted(m.step for m in tracking.get_metric_history(run_id, metric))

    def values(metric: str) -> list[float]:
        history = sorted(tracking.get_metric_history(run_id, metric), key=lambda m: m.step)
        return [m.value for m in history]

    per_learner = {
        f"learner.{node}/{metric}": steps(f"learner.{node}/{metric}")
        for node in LEARNERS
        for metric in PER_LEARNER
    }

    # Assert: every learner, every metric, every round; the counts add up.
    rounds = list(range(1, ROUNDS + 1))
    assert sorted(project["nodes"]) == list(LEARNERS)
    assert per_learner == {key: rounds for key in per_learner}
    assert values("learners") == [2.0] * ROUNDS
    assert values("lost_learners") == [0.0] * ROUNDS
    fit_sums = [
        sum(pair)
        for pair in zip(*(values(f"learner.{n}/fit_examples") for n in LEARNERS), strict=True)
    ]
    assert values("fit_examples") == fit_sums and all(v > 0 for v in fit_sums)
    assert all(0 <= v <= 1 for n in LEARNERS for v in values(f"learner.{n}/accuracy"))
    assert steps("round_seconds") == rounds


def test_run_records_participants_and_provenance(
    projects: list[dict[str, Any]], tracking: Any, suite: ManagerSuite, client: ManagerClient
) -> None:
    # Prepare
    import flwr

    project = projects[0]
    run = tracking.get_run(project["mlflow"]["run_id"])
    experiment = tracking.get_experiment(run.info.experiment_id)
    rows = {n["node_id"]: n["tags"]["mnist"] for n in client.nodes()}
    tags, params = run.data.tags, run.data.params

    # Assert: participants, repository, commit, environment, versions, data, link back
    assert tags["flops.participants"] == ",".join(LEARNERS)
    assert "flops.lost_learners" not in tags
    assert tags["flops.repo_url"] == str(EXAMPLE_REPO)
    assert tags["flops.commit"] == project["environment"]["commit"]
    assert tags["flops.environment_key"] == project["environment"]["key"]
    assert tags["flops.flower_version"] == flwr.__version__
    assert tags["flops.flops_version"] and tags["flops.mlflow_version"]
    assert tags["flops.strategy"] == "FedAvg"
    project_url = f"{suite.url}/api/flops/projects/{project['project_id']}"
    assert tags["flops.project_url"] == project_url
    assert project_url in tags["mlflow.note.content"]
    for node in LEARNERS:
        assert params[f"data.mnist.{node}.rows"] == str(rows[node])
    assert params["data.rows"] == str(sum(rows[n] for n in LEARNERS))
    assert params["learners"] == ",".join(LEARNERS)
    assert params["training_configuration.strategy.name"] == "FedAvg"
    assert [k for k, v in params.items() if v == "None"] == []
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_projects_of_one_repository_are_versions_of_one_registered_model(
    projects: list[dict[str, Any]], tracking: Any
) -> None:
    # Prepare
    records = [p["mlflow"] for p in projects]
    name = registered_model_name("Admin", str(EXAMPLE_REPO))

    # Execute
    versions = [tracking.get_model_version(name, str(r["model_version"])) for r in records]
    model = tracking.get_registered_model(name)

    # Assert: one model, a version per project, tagged with its project and run.
    assert [p["status"] for p in projects] == ["completed", "completed"]
    assert {r["registered_model"] for r in records} == {name}
    assert len({v.version for v in versions}) == 2
    for project, version in zip(projects, versions, strict=True):
        assert version.tags["flops.project_id"] == project["project_id"]
        assert version.run_id == project["mlflow"]["run_id"]
    assert model.tags["flops.repo_url"] == str(EXAMPLE_REPO)
    assert model.tags["flops.customer_id"] == "Admin"
