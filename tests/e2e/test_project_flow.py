"""The whole FLOps flow on one machine with real components.

Real Mosquitto, a real MLflow server, real Arrow Flight data servers (child processes), real
uv-built environments and real Flower training between child processes.
"""

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flow_testing import MockNodes, processes_mentioning
from waiting import wait_until

from flops_manager.client import ApiError, ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import EXAMPLE_REPO, example_sla, run_project
from flops_manager.suite import ManagerSuite

ROUNDS = 3
PROJECT_TIMEOUT_S = 300

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def suite(manager_config: ManagerConfig) -> Iterator[ManagerSuite]:
    with ManagerSuite(manager_config) as running:
        yield running


@pytest.fixture(scope="module")
def client(suite: ManagerSuite, mnist_nodes: MockNodes) -> Iterator[ManagerClient]:
    """A client of a manager with two local nodes holding IID MNIST partitions (tag mnist)."""
    with mnist_nodes(suite, 2) as api:
        yield api


def two_learner_sla(repo: Path | str = EXAMPLE_REPO, **extra: Any) -> dict[str, Any]:
    sla = example_sla(ROUNDS, min_available_clients=2, min_fit_clients=2, min_evaluate_clients=2)
    sla["ml_repo_url"] = str(repo)
    sla.update(extra)
    return sla


def copy_example(tmp_path: Path, name: str) -> Path:
    repo = tmp_path / name
    shutil.copytree(EXAMPLE_REPO, repo)
    return repo


@pytest.fixture(scope="module")
def first_project(client: ManagerClient) -> dict[str, Any]:
    """The example repository's project, run to its end once per module (the first project of
    this manager, so it builds the environment that later projects reuse)."""
    return run_project(client, two_learner_sla(), PROJECT_TIMEOUT_S)


def test_project_trains_and_logs_a_model_that_predicts_digits(
    first_project: dict[str, Any], suite: ManagerSuite, mlflow_server: Any
) -> None:
    project = first_project

    # Assert: the project's record
    assert project["status"] == "completed", project["status_message"]
    for phase in ("pending", "building", "deploying", "training", "post_training"):
        assert project["phases"][phase]["seconds"] >= 0
    statuses = [e["status"] for e in project["events"] if e["type"] == "status"]
    assert statuses == [
        "pending",
        "building",
        "deploying",
        "training",
        "post_training",
        "completed",
    ]
    assert [r["round"] for r in project["rounds"]] == list(range(1, ROUNDS + 1))
    assert project["metrics"]["accuracy"] >= 0.85
    assert suite.lifecycle.orchestrator.running_services(project["project_id"]) == []

    # Assert: the MLflow run has every round and a model that loads and predicts
    import mlflow

    tracking = mlflow.MlflowClient(mlflow_server.url)
    run_id = project["mlflow"]["run_id"]
    for metric in ("loss", "accuracy"):
        steps = [m.step for m in tracking.get_metric_history(run_id, metric)]
        assert sorted(steps) == list(range(1, ROUNDS + 1))
    mlflow.set_tracking_uri(mlflow_server.url)
    model = mlflow.pyfunc.load_model(project["mlflow"]["model_uri"])
    from data_server.mnist import load_mnist

    digits = load_mnist().select(range(500)).with_format("numpy")
    images = np.asarray(digits["image"][:], dtype=np.float32).reshape(500, -1) / 255.0
    predicted = np.asarray(model.predict(images)).astype(int)
    assert set(predicted) <= set(range(10))
    assert (predicted == np.asarray(digits["label"][:])).mean() >= 0.8


def test_the_cli_shows_the_finished_project_in_words(
    suite: ManagerSuite, first_project: dict[str, Any], tmp_path: Path
) -> None:
    import subprocess
    import sys

    from flops_manager.auth import read_api_token

    token = read_api_token(suite.config.home)
    assert token is not None
    flops = str(Path(sys.executable).with_name("flops"))
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "160", "XDG_CONFIG_HOME": str(tmp_path)}
    project_id = first_project["project_id"]

    def run(*args: str) -> str:
        done = subprocess.run(
            [flops, *args], capture_output=True, text=True, env=env, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    logged_in = run("login", "--manager-url", suite.url, "--token", token)
    listed = run("list")  # with the stored login: no option, no variable
    summary = run("status", project_id)
    nodes = run("nodes")
    tracking = run("tracking")  # this suite's MLflow has no authentication: the address only
    unknown_node = subprocess.run(
        [flops, "data", "ls", "--node", "node-9"], capture_output=True, text=True, env=env,
        timeout=60, check=False,
    )  # fmt: skip
    node_tags = subprocess.run(
        [flops, "data", "ls", "--node", "node-1"], capture_output=True, text=True, env=env,
        timeout=60, check=False,
    )  # fmt: skip

    assert "logged in" in logged_in
    assert ((tmp_path / "flops" / "login.json").stat().st_mode & 0o777) == 0o600
    assert token not in logged_in + listed + summary + nodes
    assert project_id in listed and "completed" in listed
    assert "status    completed" in summary
    assert "training" in summary.split("phases", 1)[1].splitlines()[0]
    rows = [line.split() for line in summary.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == [str(r) for r in range(1, ROUNDS + 1)]
    assert "node-1" in nodes and "mnist (" in nodes
    assert tracking.splitlines()[0] == f"MLflow    {suite.tracking_url}"
    assert "no login" in tracking
    assert unknown_node.returncode == 1
    assert "no registered node 'node-9' (registered: node-1, node-2)" in unknown_node.stdout
    # node-1's TLS data server, found through the manager, refuses a caller without its
    # certificate; the error names the address the manager gave and nothing of gRPC's own logs.
    assert node_tags.returncode == 1
    assert "data server at grpc+tls://127.0.0.1:" in node_tags.stdout
    assert "I0000" not in node_tags.stderr and "Traceback" not in node_tags.stderr


def test_second_project_reuses_the_environment(
    client: ManagerClient, first_project: dict[str, Any]
) -> None:
    assert first_project["status"] == "completed", first_project["status_message"]
    project = run_project(client, two_learner_sla(), PROJECT_TIMEOUT_S)

    assert project["status"] == "completed", project["status_message"]
    assert project["environment"]["cache_hit"] is True
    assert project["phases"]["building"]["seconds"] < 5


def test_repo_that_cannot_be_cloned_fails_with_the_git_error(client: ManagerClient) -> None:
    sla = two_learner_sla("file:///nonexistent/flops-repo.git")

    project = run_project(client, sla, PROJECT_TIMEOUT_S)

    assert project["status"] == "failed"
    assert "nonexistent/flops-repo.git" in project["status_message"]
    assert "\n" not in project["status_message"]


def test_repo_without_model_manager_fails_naming_the_file(
    client: ManagerClient, tmp_path: Path
) -> None:
    repo = copy_example(tmp_path, "no-model-manager")
    (repo / "model_manager.py").unlink()

    project = run_project(client, two_learner_sla(repo), PROJECT_TIMEOUT_S)

    assert project["status"] == "failed"
    assert "model_manager.py" in project["status_message"]


def test_crashing_learner_fails_the_project_and_leaves_no_process(
    client: ManagerClient, suite: ManagerSuite, tmp_path: Path
) -> None:
    repo = copy_example(tmp_path, "crashing-learner")
    source = (repo / "data_manager.py").read_text()
    (repo / "data_manager.py").write_text(
        source.replace(
            "        dataset = load_dataset()\n",
            "        raise RuntimeError('local data is corrupt')\n",
        )
    )

    project = run_project(client, two_learner_sla(repo), PROJECT_TIMEOUT_S)

    assert project["status"] == "failed"
    assert "local data is corrupt" in project["status_message"]
    assert "learner" in project["status_message"]
    assert suite.lifecycle.orchestrator.running_services(project["project_id"]) == []
    # the services are stopped in the background after the project failed (SIGTERM, then
    # SIGKILL after the stop timeout): wait for that, not for a fixed time
    wait_until(
        lambda: not processes_mentioning(project["project_id"]),
        30,
        lambda: f"processes left: {processes_mentioning(project['project_id'])}",
    )


def test_too_few_nodes_with_the_tag_is_a_409(client: ManagerClient) -> None:
    sla = two_learner_sla()
    sla["training_configuration"]["data_tags"] = ["cifar10"]

    with pytest.raises(ApiError) as caught:
        client.create_project(sla)

    assert caught.value.status == 409
    assert {d["node_id"] for d in caught.value.details} == {"node-1", "node-2"}
    assert all(d["tags"] == {"mnist": 5000} for d in caught.value.details)
