"""Hierarchical FL end to end on the local backend, with real components: a root aggregator,
one cluster aggregator per cluster and two learners per cluster (child processes), Mosquitto,
an MLflow server, Arrow Flight data servers holding IID MNIST quarters, Flower between them.

Four nodes in two clusters (``cluster-1``: node-1, node-3; ``cluster-2``: node-2, node-4),
2 cycles of 2 rounds: every learner trains 4 rounds.
"""

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from waiting import wait_until

from flops_manager.auth import read_api_token
from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import example_sla, local_nodes, run_project
from flops_manager.process_identity import ProcessIdentity
from flops_manager.suite import ManagerSuite

CYCLES, ROUNDS = 2, 2
PROJECT_TIMEOUT_S = 420
CLUSTERS = {"cluster-1": ["node-1", "node-3"], "cluster-2": ["node-2", "node-4"]}

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def suite(manager_config: ManagerConfig) -> Iterator[ManagerSuite]:
    with ManagerSuite(manager_config) as running:
        yield running


@pytest.fixture(scope="module")
def client(
    suite: ManagerSuite, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ManagerClient]:
    """A client (admin) of a manager with four local nodes in two clusters holding MNIST."""
    token = read_api_token(suite.config.home)
    api = ManagerClient(suite.url, token=token)
    workdir = Path(tmp_path_factory.mktemp("hfl-nodes"))
    with local_nodes(4, workdir, suite.url, token, register_interval_s=2.0, clusters=2):
        api.wait_for_nodes(4, timeout_s=30)
        api.provide_mocks(dataset="mnist", tag="mnist")
        yield api


def hierarchical_sla(
    per_cluster_minimum: int = 2, rounds: int = ROUNDS, **extra: Any
) -> dict[str, Any]:
    sla = example_sla(
        rounds,
        mode="hierarchical",
        training_cycles=CYCLES,
        min_available_clients=per_cluster_minimum,
        min_fit_clients=per_cluster_minimum,
        min_evaluate_clients=per_cluster_minimum,
    )
    sla.update(extra)
    return sla


@pytest.fixture(scope="module")
def first_project(client: ManagerClient) -> dict[str, Any]:
    return run_project(client, hierarchical_sla(), PROJECT_TIMEOUT_S)


def test_a_hierarchical_project_trains_every_cluster_and_logs_the_tree_in_mlflow(
    first_project: dict[str, Any], suite: ManagerSuite, mlflow_server: Any
) -> None:
    project = first_project

    # Assert: the record's tree
    assert project["status"] == "completed", project["status_message"]
    tree = project["hierarchy"]
    assert [c["round"] for c in tree["root"]["cycles"]] == [1, 2]
    assert {c["name"]: c["learners"] for c in tree["clusters"]} == CLUSTERS
    for cluster in tree["clusters"]:
        steps = [(r["cycle"], r["round"], r["step"]) for r in cluster["rounds"]]
        assert steps == [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4)], cluster["name"]
        assert all(r["learners"] == 2 for r in cluster["rounds"])
        assert cluster["lost"] is None and cluster["lost_learners"] == []
    assert project["metrics"]["accuracy"] >= 0.85
    assert project["services"][:3] == [
        "aggregator",
        "cluster-aggregator-cluster-1",
        "cluster-aggregator-cluster-2",
    ]
    assert suite.lifecycle.orchestrator.running_services(project["project_id"]) == []

    # Assert: MLflow: the root's parent run per cycle, a nested child run per cluster
    import mlflow

    tracking = mlflow.MlflowClient(mlflow_server.url)
    parent_id = project["mlflow"]["run_id"]
    parent = tracking.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["training_configuration.mode"] == "hierarchical"
    for metric in ("loss", "accuracy"):
        assert sorted(m.step for m in tracking.get_metric_history(parent_id, metric)) == [1, 2]
    children = tracking.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        for metric in ("loss", "accuracy"):
            history = tracking.get_metric_history(child.info.run_id, metric)
            assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert {c["run_id"] for c in tree["clusters"]} == {c.info.run_id for c in children}

    # Assert: the registered model loads and predicts held-out digits
    mlflow.set_tracking_uri(mlflow_server.url)
    model = mlflow.pyfunc.load_model(project["mlflow"]["registered_model_uri"])
    from data_server.mnist import load_mnist

    digits = load_mnist().select(range(500)).with_format("numpy")
    images = np.asarray(digits["image"][:], dtype=np.float32).reshape(500, -1) / 255.0
    predicted = np.asarray(model.predict(images)).astype(int)
    assert (predicted == np.asarray(digits["label"][:])).mean() >= 0.85


def started_project(client: ManagerClient, sla: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """POST ``sla`` and wait until every cluster reported its first round; returns the id and
    the admin view at that moment."""
    project_id = client.create_project(sla)

    def first_rounds() -> dict[str, Any] | None:
        project = client.project(project_id)
        assert project["status"] in ("pending", "building", "deploying", "training"), project[
            "status_message"
        ]
        tree = project.get("hierarchy") or {"clusters": []}
        ready = tree["clusters"] and all(c["rounds"] for c in tree["clusters"])
        return project if ready else None

    project = wait_until(first_rounds, PROJECT_TIMEOUT_S, interval_s=0.2)
    return project_id, project


def identity_of(project: dict[str, Any], service: str) -> ProcessIdentity:
    handle = next(h for h in project["admin"]["service_handles"] if h["name"] == service)
    identity = ProcessIdentity.from_dict(handle)
    assert identity is not None
    return identity


def all_identities(project: dict[str, Any]) -> list[ProcessIdentity]:
    return [identity_of(project, h["name"]) for h in project["admin"]["service_handles"]]


def test_a_killed_cluster_aggregator_fails_the_project_naming_its_cluster(
    client: ManagerClient, first_project: dict[str, Any]
) -> None:
    # Prepare: both clusters trained a round; each needs 2 learners, the root 2 clusters.
    project_id, project = started_project(client, hierarchical_sla(per_cluster_minimum=2))

    # Execute
    os.killpg(identity_of(project, "cluster-aggregator-cluster-2").pid, signal.SIGKILL)
    ended = client.wait_for_project(project_id, PROJECT_TIMEOUT_S)

    # Assert: failed naming the cluster; nothing of the project is left running
    assert ended["status"] == "failed"
    assert "cluster cluster-2 lost" in ended["status_message"], ended["status_message"]
    assert all(identity.wait(20) for identity in all_identities(project))


def test_a_learner_killed_inside_a_cluster_is_tolerated_while_the_cluster_keeps_its_minimum(
    client: ManagerClient, first_project: dict[str, Any]
) -> None:
    # Prepare: each cluster needs 1 learner; 4 rounds per cycle, so that rounds of cluster-1
    # are still to come when the learner is killed, however fast its first ones were
    sla = hierarchical_sla(per_cluster_minimum=1, rounds=4)
    project_id, project = started_project(client, sla)

    # Execute
    os.killpg(identity_of(project, "learner-node-3").pid, signal.SIGKILL)
    ended = client.wait_for_project(project_id, PROJECT_TIMEOUT_S)

    # Assert: completed without node-3; cluster-1's last rounds had one learner
    assert ended["status"] == "completed", ended["status_message"]
    cluster_1 = next(c for c in ended["hierarchy"]["clusters"] if c["name"] == "cluster-1")
    assert cluster_1["lost_learners"] == ["learner-node-3"]
    assert cluster_1["lost"] is None
    assert cluster_1["rounds"][-1]["learners"] == 1
    assert [c["round"] for c in ended["hierarchy"]["root"]["cycles"]] == [1, 2]


def test_cancelling_mid_cycle_removes_every_service(
    client: ManagerClient, first_project: dict[str, Any], suite: ManagerSuite
) -> None:
    project_id, project = started_project(client, hierarchical_sla())

    cancelled = client.request("DELETE", f"/projects/{project_id}")

    assert cancelled["status"] == "cancelled"
    assert suite.lifecycle.orchestrator.running_services(project_id) == []
    assert all(identity.wait(20) for identity in all_identities(project))


def test_a_hierarchical_sla_no_cluster_can_run_is_refused_listing_the_clusters(
    client: ManagerClient,
) -> None:
    from flops_manager.client import ApiError

    with pytest.raises(ApiError) as raised:
        client.create_project(hierarchical_sla(per_cluster_minimum=3))

    assert raised.value.status == 409
    assert "No cluster can take part" in raised.value.message
    assert {d["cluster"] for d in raised.value.details} == {"cluster-1", "cluster-2"}
