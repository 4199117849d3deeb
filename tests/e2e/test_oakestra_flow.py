"""The whole FLOps flow through the ``oakestra`` orchestrator, against the faithful double of
Oakestra's root orchestrator (``tests/oakestra_double``) whose workers really run the images.

Real components: Mosquitto, an MLflow server, Arrow Flight data servers, the
``oci`` builder (buildah, a loopback registry, the debootstrapped base image), the image
builder service, and Flower training between containers (``buildah run --isolation chroot``,
host network) started by the double.
"""

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from flow_testing import MockNodes, with_settings
from oakestra_double import OakestraDouble, WorkerSpec
from waiting import answers_200, wait_until

from flops_manager.auth import read_api_token
from flops_manager.client import ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import EXAMPLE_REPO, example_sla, local_nodes, node_cluster, run_project
from flops_manager.orchestrators.oakestra_client import OakestraClient
from flops_manager.suite import ManagerSuite

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
"""Repositories with their authors' pins (``tests/corpus``), which FLOps' runtime (Flower 1.41:
pyyaml>=6.0.2, numpy 2) cannot share an environment with."""

ROUNDS = 3
RESTART_DELAY_S = 2.0
"""Seconds after which the double's cluster manager restarts a FAILED or DEAD instance
(Oakestra: about 15), short so that a crash loop FLOps did not stop shows up in a test."""
NODES = 3
PROJECT_TIMEOUT_S = 600
HFL_FIRST_NODE, HFL_NODES = NODES + 1, 6
HFL_LEARNERS = [f"node-{n}" for n in range(HFL_FIRST_NODE, HFL_FIRST_NODE + 4)]
WORKERS = (
    *(WorkerSpec("local", f"node-{n}") for n in range(1, NODES + 1)),
    *(
        WorkerSpec(node_cluster(index, 2), f"node-{HFL_FIRST_NODE + index - 1}")
        for index in range(1, HFL_NODES + 1)
    ),
)
"""One Oakestra worker per data-server node, hostname = the node id (what ``flops-data-server``
registers by default): node-1..3 in cluster ``local``; for hierarchical FL node-4..9 alternate
between ``cluster-1`` and ``cluster-2`` (node-8 and node-9 hold no data: they host the cluster
aggregators)."""

pytestmark = [pytest.mark.e2e, pytest.mark.oci]


@pytest.fixture(scope="module")
def double(oci_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OakestraDouble]:
    workdir = Path(tmp_path_factory.mktemp("oakestra"))
    with OakestraDouble(
        workdir, workers=WORKERS, report_delay_s=0.5, restart_delay_s=RESTART_DELAY_S
    ) as running:
        yield running


@pytest.fixture(scope="module")
def suite(
    manager_config: ManagerConfig, double: OakestraDouble, oci_registry: str, oci_base_image: str
) -> Iterator[ManagerSuite]:
    config = with_settings(
        manager_config,
        orchestrator="oakestra",
        oakestra_url=double.url,  # FLOPS_BUILDER unset: the oakestra backend implies oci
        registry=oci_registry,
        registry_tls_verify=False,
        base_image=oci_base_image,
    )
    with ManagerSuite(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(suite: ManagerSuite, mnist_nodes: MockNodes) -> Iterator[ManagerClient]:
    """A manager client with three nodes holding IID MNIST partitions (tag ``mnist``)."""
    with mnist_nodes(suite, NODES) as api:
        yield api


@pytest.fixture
def oakestra(double: OakestraDouble) -> Iterator[OakestraClient]:
    """A client of the double, to look at what FLOps left there."""
    client = OakestraClient(double.url, "Admin", "Admin")
    yield client
    client.close()


def sla(learners: int = NODES, minimum: int = 2, **extra: Any) -> dict[str, Any]:
    document = example_sla(
        ROUNDS, min_available_clients=minimum, min_fit_clients=minimum, min_evaluate_clients=minimum
    )
    document["ml_repo_url"] = str(EXAMPLE_REPO)
    document["training_configuration"]["max_clients"] = learners
    document.update(extra)
    return document


def wait_for_status(client: ManagerClient, project_id: str, status: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        project = client.project(project_id)
        if project["status"] == status:
            return project
        assert project["status"] not in ("failed", "cancelled", "completed"), project
        return None

    return wait_until(reached, PROJECT_TIMEOUT_S, f"{project_id} never reached {status}", 0.2)


def assert_nothing_left(oakestra: OakestraClient, double: OakestraDouble) -> None:
    def left() -> str:
        return f"left in Oakestra: {oakestra.list_applications()} / instances {double.instances()}"

    wait_until(lambda: not oakestra.list_applications() and not double.instances(), 30, left, 0.2)


def test_project_trains_on_the_workers_holding_the_data_and_cleans_up(
    client: ManagerClient,
    double: OakestraDouble,
    oakestra: OakestraClient,
    mlflow_server: Any,
) -> None:
    # Execute: watch Oakestra while the project trains
    steps = ["build_image_for_trained_model", "deploy_trained_model_image"]
    project_id = client.create_project(sla(post_training_steps=steps))
    wait_for_status(client, project_id, "training")
    running = _wait_for_learners(double, NODES)
    project = client.wait_for_project(project_id, PROJECT_TIMEOUT_S, poll_s=0.2)

    # Assert: trained to completion with every round in MLflow
    assert project["status"] == "completed", project["status_message"]
    assert [r["round"] for r in project["rounds"]] == list(range(1, ROUNDS + 1))
    assert project["metrics"]["accuracy"] >= 0.8
    images = project["environment"]["images"]
    assert set(images) == {"learner", "aggregator"} and "@sha256:" in images["learner"]
    import mlflow

    tracking = mlflow.MlflowClient(mlflow_server.url)
    history = tracking.get_metric_history(project["mlflow"]["run_id"], "accuracy")
    assert sorted(m.step for m in history) == list(range(1, ROUNDS + 1))
    # the learners ran from the learner image, one on each node's worker
    learner_workers = sorted(i["worker"] for i in running if "learner" in i["image"])
    assert learner_workers == [f"node-{n}" for n in range(1, NODES + 1)]
    # the builder reported over MQTT, recorded as project events
    builder_events = [e for e in project["events"] if e.get("component") == "builder"]
    assert [e["status"] for e in builder_events][:1] == ["started"]
    # the trained-model image serves the registered model version
    model_image = project["model_image"]
    assert model_image["model_uri"] == project["mlflow"]["registered_model_uri"]
    assert "/flops/model@sha256:" in model_image["ref"] and model_image["port"] == 8080
    assert _registry_has(model_image["ref"])
    # ... and runs on a worker as the project's trained-model server, until the project is
    # deleted: it predicts digits from real MNIST rows
    predictions = _predict(project["inference_url"], mnist_rows(50))
    assert (predictions == mnist_labels(50)).mean() >= 0.8
    client.request("DELETE", f"/projects/{project_id}")
    assert client.project(project_id)["inference_url"] is None
    # nothing is left in Oakestra
    assert_nothing_left(oakestra, double)


@pytest.mark.parametrize(
    ("name", "saved_with"),
    [
        ("sklearn_mlflow2024", {"flops.saved_with.mlflow_version": "2.12.1"}),
        ("pytorch_mnist", {"flops.saved_with.library_version": "2.13.0+cpu"}),
    ],
)
def test_a_corpus_repository_trains_in_its_own_environment(
    client: ManagerClient,
    double: OakestraDouble,
    oakestra: OakestraClient,
    mlflow_server: Any,
    tmp_path: Path,
    name: str,
    saved_with: dict[str, str],
) -> None:
    # Setup: the corpus repository as a plain directory, with its own flavor
    repo = tmp_path / name
    shutil.copytree(CORPUS / name, repo, ignore=shutil.ignore_patterns("__pycache__"))
    document = sla()
    document["ml_repo_url"] = str(repo)
    flavor = json.loads((repo / "sla.json").read_text())["ml_model_flavor"]
    document["ml_model_flavor"] = flavor

    # Execute
    project = run_project(client, document, PROJECT_TIMEOUT_S)

    # Assert: trained in the learner images (the model worker in the repository's environment),
    # the final model saved there with the repository's libraries, uploaded and registered by
    # the aggregator
    assert project["status"] == "completed", project["status_message"]
    assert [r["round"] for r in project["rounds"]] == list(range(1, ROUNDS + 1))
    assert project["metrics"]["accuracy"] >= 0.7
    import mlflow

    tracking = mlflow.MlflowClient(mlflow_server.url)
    model_id = project["mlflow"]["model_uri"].removeprefix("models:/")
    tags = tracking.get_logged_model(model_id).tags
    assert tags["flops.flavor"] == flavor
    for key, value in saved_with.items():
        assert tags.get(key) == value, tags
    assert project["mlflow"]["registered_model_uri"]
    assert_nothing_left(oakestra, double)


def test_failed_services_answer_fails_the_project_with_oakestras_reason(
    client: ManagerClient, double: OakestraDouble, oakestra: OakestraClient
) -> None:
    # Setup: the network manager refuses the next service (the aggregator)
    double.refuse_services(1, "no free subnet for the service")

    # Execute
    project = run_project(client, sla(), PROJECT_TIMEOUT_S)

    # Assert
    assert project["status"] == "failed"
    assert "no free subnet for the service" in project["status_message"]
    assert_nothing_left(oakestra, double)


def test_after_a_root_restart_a_project_goes_on_without_a_learner_that_went_dead(
    client: ManagerClient, double: OakestraDouble, oakestra: OakestraClient
) -> None:
    # Setup: a first project (refused at once) logs the manager in; then the Oakestra root
    # restarts, so its jwt-generator signs with a new key pair
    double.refuse_services(1, "no free subnet for the service")
    assert run_project(client, sla(), PROJECT_TIMEOUT_S)["status"] == "failed"
    double.rotate_keys()

    # Execute: the second project, three learners, two needed; one container is killed
    project = _kill_a_learner_mid_training(client, double, sla(learners=3, minimum=2), "node-3")

    # Assert: the DEAD learner is a lost learner, it was deleted at once (no restart by the
    # cluster manager), and the project completed
    assert project["status"] == "completed", project["status_message"]
    lost = [e for e in project["events"] if "training goes on with 2 learner(s)" in e["message"]]
    assert lost and lost[0]["component"].endswith("node-3")
    assert "killed by signal 9" in lost[0]["message"]
    assert "Oakestra reports the instance DEAD" in lost[0]["message"]
    assert project["lost_learners"] == ["learner-node-3"]
    assert _restarts(double, project["victim_service_id"]) == 0
    assert_nothing_left(oakestra, double)


def test_a_dead_aggregator_fails_the_project_naming_it(
    client: ManagerClient, double: OakestraDouble, oakestra: OakestraClient
) -> None:
    # Setup
    project_id = client.create_project(sla(learners=3, minimum=2))
    wait_for_status(client, project_id, "training")
    aggregator = _running_instance(double, "aggregator", None)

    # Execute: the aggregator's container is killed mid-training
    double.kill_instance(aggregator["service_id"], aggregator["instance_number"])
    project = client.wait_for_project(project_id, PROJECT_TIMEOUT_S, poll_s=0.2)

    # Assert: failed, naming the aggregator's crash (not the "finished" path)
    assert project["status"] == "failed"
    assert project["status_message"].startswith("aggregator "), project["status_message"]
    assert "killed by signal 9" in project["status_message"]
    assert "without reporting a result" not in project["status_message"]
    assert _restarts(double, aggregator["service_id"]) == 0
    assert_nothing_left(oakestra, double)


def test_failed_learner_without_enough_learners_left_fails_the_project(
    client: ManagerClient, double: OakestraDouble, oakestra: OakestraClient
) -> None:
    # Execute: two learners, two needed
    project = _kill_a_learner_mid_training(client, double, sla(learners=2, minimum=2), None)

    # Assert
    assert project["status"] == "failed"
    assert "learner-node-" in project["status_message"]
    assert_nothing_left(oakestra, double)


def test_cancelling_mid_training_deletes_everything(
    client: ManagerClient, double: OakestraDouble, oakestra: OakestraClient
) -> None:
    # Setup
    project_id = client.create_project(sla())
    wait_for_status(client, project_id, "training")
    assert oakestra.list_applications()

    # Execute
    cancelled = client.request("DELETE", f"/projects/{project_id}")

    # Assert
    assert cancelled["status"] == "cancelled"
    assert_nothing_left(oakestra, double)


def test_hierarchical_fl_places_each_cluster_aggregator_in_its_cluster_and_completes(
    suite: ManagerSuite,
    client: ManagerClient,
    double: OakestraDouble,
    oakestra: OakestraClient,
    mlflow_server: Any,
    tmp_path: Path,
) -> None:
    # Setup: two clusters of two learners (tag mnist-hfl) and one spare worker each
    token = read_api_token(suite.config.home)
    with local_nodes(
        HFL_NODES, tmp_path, suite.url, token, register_interval_s=2.0, clusters=2,
        first=HFL_FIRST_NODE,
    ):  # fmt: skip
        client.wait_for_nodes(NODES + HFL_NODES, timeout_s=30)
        client.provide_mocks(dataset="mnist", tag="mnist-hfl", nodes=HFL_LEARNERS)
        document = sla(minimum=2, learners=2)
        document["training_configuration"].update(
            mode="hierarchical", training_cycles=2, training_rounds=2, data_tags=["mnist-hfl"]
        )

        # Execute: note where each service runs while the project trains
        project_id = client.create_project(document)
        training = wait_for_status(client, project_id, "training")
        placed = {i["worker"]: i["image"] for i in _wait_for_learners(double, 4)}
        project = client.wait_for_project(project_id, PROJECT_TIMEOUT_S, poll_s=0.5)

    # Assert: the tree completed; cluster aggregators ran on the spare worker of their cluster
    assert project["status"] == "completed", project["status_message"]
    assert training["hierarchy"] is not None
    clusters = {c["name"]: c for c in project["hierarchy"]["clusters"]}
    assert {name: c["learners"] for name, c in clusters.items()} == {
        "cluster-1": ["node-4", "node-6"],
        "cluster-2": ["node-5", "node-7"],
    }
    assert all(len(c["rounds"]) == 4 for c in clusters.values())
    assert [c["round"] for c in project["hierarchy"]["root"]["cycles"]] == [1, 2]
    assert "aggregator" in placed["node-8"] and "aggregator" in placed["node-9"]
    assert all("learner" in placed[node] for node in HFL_LEARNERS)
    assert project["metrics"]["accuracy"] >= 0.85
    import mlflow

    tracking = mlflow.MlflowClient(mlflow_server.url)
    parent_id = project["mlflow"]["run_id"]
    children = tracking.search_runs(
        [project["mlflow"]["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
    )
    assert len(children) == 2
    assert_nothing_left(oakestra, double)


def mnist_rows(count: int) -> np.ndarray:
    """The first ``count`` MNIST test images as float rows in [0, 1] (the example's input)."""
    from data_server.mnist import load_mnist

    digits = load_mnist().select(range(count)).with_format("numpy")
    return np.asarray(digits["image"][:], dtype=np.float32).reshape(count, -1) / 255.0


def mnist_labels(count: int) -> np.ndarray:
    from data_server.mnist import load_mnist

    return np.asarray(load_mnist().select(range(count)).with_format("numpy")["label"][:])


def _predict(url: str, rows: np.ndarray) -> np.ndarray:
    """POST ``rows`` to the scoring server at ``url`` once it answers ``/ping``."""
    wait_until(lambda: answers_200(f"{url}/ping"), 60, f"{url}/ping never answered 200", 0.3)
    response = requests.post(f"{url}/invocations", json={"inputs": rows.tolist()}, timeout=30)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["predictions"]).astype(int)


def _wait_for_learners(double: OakestraDouble, count: int) -> list[dict[str, Any]]:
    """The double's instances once ``count`` learner instances are scheduled on workers."""

    def scheduled() -> list[dict[str, Any]] | None:
        instances = double.instances()
        return instances if sum("learner" in i["image"] for i in instances) >= count else None

    return wait_until(
        scheduled, 60, lambda: f"fewer than {count} learner instances: {double.instances()}", 0.1
    )


def _registry_has(pinned_ref: str) -> bool:
    result = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{pinned_ref}"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    return result.returncode == 0


def _kill_a_learner_mid_training(
    client: ManagerClient, double: OakestraDouble, document: dict[str, Any], worker: str | None
) -> dict[str, Any]:
    """Start a project of ``document``, kill a learner (on ``worker``, or any) once training
    runs, and return the project at its end."""
    project_id = client.create_project(document)
    wait_for_status(client, project_id, "training")
    victim = _running_instance(double, "learner", worker)
    double.kill_instance(victim["service_id"], victim["instance_number"])
    project = client.wait_for_project(project_id, PROJECT_TIMEOUT_S, poll_s=0.2)
    return {**project, "victim_service_id": victim["service_id"]}


def _running_instance(double: OakestraDouble, role: str, worker: str | None) -> dict[str, Any]:
    """An instance of ``role``'s image (on ``worker``, or any) once its process runs (after
    the pull)."""

    def running() -> dict[str, Any] | None:
        for instance in double.instances():
            wanted = worker is None or instance["worker"] == worker
            started = instance["status"] == "RUNNING" and instance["pid"]
            if f"/{role}@" in instance["image"] and started and wanted:
                return instance
        return None

    return wait_until(running, 60, lambda: f"no running {role} instance: {double.instances()}", 0.2)


def _restarts(double: OakestraDouble, service_id: str) -> int:
    """How often the double's cluster manager restarted the service's instance: each run
    has its own log, ``oakdouble-<id>-<instance>-<run>.log``."""
    logs = (double.workdir / "instances").glob(f"oakdouble-{service_id[:12]}-0-*.log")
    return len(list(logs)) - 1
