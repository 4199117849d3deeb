"""One registered model per customer and repository on an MLflow server with authentication:
the manager's :meth:`MlflowAccess.registered_model` prepares it, each project's aggregator
(its own :class:`MlflowTracker`, with the project's credential) adds a version tagged with the
project, the customer reads every version, and another customer's or repository's projects
get a model of their own.

One real ``mlflow server`` with the basic-auth app for the module; no training (the model is
a tiny scikit-learn model saved the way the model worker saves it).
"""

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.tracking import LoggedModel, MlflowTracker
from flops_manager.mlflow_access import MlflowAccess
from flops_utils.contract.services import experiment_name
from flops_utils.contract.tracking import registered_model_name
from flops_utils.types import MLModelFlavor
from observatory.mlflow_server import MlflowServer

REPO = "https://git.example.com/org/mnist.git"
OTHER_REPO = "https://git.example.com/other/mnist"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secure_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow") / "mlflow", authentication=True) as server:
        yield server


@pytest.fixture(scope="module")
def access(secure_mlflow: MlflowServer) -> MlflowAccess:
    assert secure_mlflow.admin is not None
    return MlflowAccess(
        secure_mlflow.url, secure_mlflow.admin.username, secure_mlflow.admin.password
    )


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mlflow.sklearn
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression().fit(np.array([[0.0], [1.0], [2.0], [3.0]]), [0, 0, 1, 1])
    path = tmp_path_factory.mktemp("model") / "model"
    mlflow.sklearn.save_model(model, str(path), pip_requirements=["scikit-learn"])
    return path


def _project(
    access: MlflowAccess,
    server: MlflowServer,
    saved: Path,
    customer: str,
    repo: str,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[str, LoggedModel]:
    """What the manager and the aggregator do for one project: returns the project id and
    the logged model."""
    project_id = uuid.uuid4().hex[:12]
    env = access.project(project_id, experiment_name(project_id), customer)
    name = access.registered_model(project_id, customer, repo)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    tracker = MlflowTracker(server.url, project_id, name)
    tracker.start_run({"ml_repo_url": repo})
    logged = tracker.log_saved_model(
        saved, MLModelFlavor.SKLEARN, step=1, model_tags={"flops.repo_url": repo}
    )
    tracker.end_run()
    access.revoke(project_id)
    return project_id, logged


def test_projects_of_a_repository_are_versions_of_the_customers_model(
    access: MlflowAccess,
    secure_mlflow: MlflowServer,
    saved_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Execute: two projects of Dana's repository, one of Erin's with the same name, one of
    # another repository of Dana's with the same name.
    def run(customer: str, repo: str) -> tuple[str, LoggedModel]:
        return _project(access, secure_mlflow, saved_model, customer, repo, monkeypatch)

    first, second = run("dana", REPO), run("dana", REPO + "/")
    erin = run("erin", REPO)
    other = run("dana", OTHER_REPO)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", access.admin.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", access.admin.password)
    import mlflow

    client: Any = mlflow.MlflowClient(secure_mlflow.url)
    versions = client.search_model_versions("name = 'flops-dana-mnist'")
    dana = access.customer_credential("dana")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", dana.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", dana.password)
    readable = mlflow.MlflowClient(secure_mlflow.url).get_registered_model("flops-dana-mnist")

    # Assert
    assert first[1].registered_model == second[1].registered_model == "flops-dana-mnist"
    assert (first[1].version, second[1].version) == (1, 2)
    assert sorted((v.version, v.tags["flops.project_id"]) for v in versions) == [
        ("1", first[0]),
        ("2", second[0]),
    ]
    assert erin[1].registered_model == "flops-erin-mnist" and erin[1].version == 1
    assert other[1].registered_model == registered_model_name("dana", OTHER_REPO, True)
    assert readable.tags["flops.customer_id"] == "dana"
