"""MLflow behind authentication (issue: secure by default, attack 5: "MLflow itself has no
authentication, and every customer gets its URL").

One real ``mlflow server`` running the basic-auth app (``MlflowServer(authentication=True)``)
for the module, administered by the manager's real :class:`MlflowAccess`; clients are the real
``mlflow`` Python API (authenticating with ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` like the
aggregator) and the aggregator's own :class:`MlflowTracker`. Anonymous calls are refused, a
project's credential writes only its own experiment, a customer reads only their own projects
and writes nothing, and the admin password is neither world-readable nor on a command line.
"""

import os
import re
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from aggregator.tracking import MlflowTracker
from flops_manager.mlflow_access import MlflowAccess, customer_username, project_username
from flops_utils.contract.services import experiment_name
from flops_utils.types import MLModelFlavor
from observatory.mlflow_server import (
    AUTH_CONFIG_FILE,
    MlflowCredential,
    MlflowServer,
    read_admin_credential,
)

SEARCH = "/api/2.0/mlflow/experiments/search"


@dataclass(frozen=True)
class Project:
    """A project prepared by :meth:`MlflowAccess.project` and
    :meth:`MlflowAccess.registered_model`: its id, experiment name, customer, the aggregators'
    env vars and the registered model its final model becomes a version of."""

    project_id: str
    experiment: str
    customer: str
    env: dict[str, str]
    registered_model: str


@pytest.fixture(scope="module")
def secure_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server with the basic-auth app; ``.admin`` is its admin."""
    workdir = Path(tmp_path_factory.mktemp("mlflow-secure")) / "mlflow"
    with MlflowServer(workdir, authentication=True) as server:
        yield server


@pytest.fixture(scope="module")
def access(secure_mlflow_server: MlflowServer) -> MlflowAccess:
    admin = secure_mlflow_server.admin
    assert admin is not None
    return MlflowAccess(secure_mlflow_server.url, admin.username, admin.password)


def _new_project(access: MlflowAccess, customer: str) -> Project:
    project_id = uuid.uuid4().hex[:12]
    name = experiment_name(project_id)
    env = access.project(project_id, name, customer)
    model = access.registered_model(
        project_id, customer, f"https://git.example.org/{customer}/mnist.git"
    )
    return Project(project_id, name, customer, env, model)


@pytest.fixture(scope="module")
def alice_project(access: MlflowAccess) -> Project:
    return _new_project(access, "alice")


@pytest.fixture(scope="module")
def bob_project(access: MlflowAccess) -> Project:
    return _new_project(access, "bob")


def _as(monkeypatch: pytest.MonkeyPatch, credential: MlflowCredential | dict[str, str]) -> None:
    """Make the ``mlflow`` API of this process authenticate as ``credential``."""
    env = credential.env() if isinstance(credential, MlflowCredential) else credential
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _client(server: MlflowServer) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=server.url)


def _status(exc: BaseException) -> int:
    """The HTTP status of the tracking server's answer that ``exc`` reports: a
    ``RestException`` (JSON error body) or MLflow's ``error code 403 != 200`` text (plain
    bodies, as the basic-auth app's 401 and 403)."""
    from mlflow.exceptions import RestException

    if isinstance(exc, RestException):
        return int(exc.get_http_status_code())  # type: ignore[no-untyped-call]
    match = re.search(r"error code (\d{3}) != ", str(exc))
    assert match, exc
    return int(match.group(1))


def test_anonymous_calls_are_refused_but_health_answers(
    secure_mlflow_server: MlflowServer, alice_project: Project
) -> None:
    # Prepare: a project's experiment exists.
    url = secure_mlflow_server.url

    # Execute: what any host on the network could do with the URL.
    search = requests.post(f"{url}{SEARCH}", json={"max_results": 10}, timeout=10)
    by_name = requests.get(
        f"{url}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": alice_project.experiment},
        timeout=10,
    )
    signup = requests.post(
        f"{url}/api/2.0/mlflow/users/create",
        json={"username": "mallory", "password": "p" * 20},
        timeout=10,
    )
    health = requests.get(f"{url}/health", timeout=10)

    # Assert
    assert (search.status_code, by_name.status_code, signup.status_code) == (401, 401, 401)
    assert alice_project.experiment not in search.text + by_name.text
    assert health.status_code == 200
    assert secure_mlflow_server.serves_as_configured()


def test_admin_password_is_private_and_not_in_process_listings(
    secure_mlflow_server: MlflowServer,
) -> None:
    # Prepare
    workdir = secure_mlflow_server.workdir
    admin = read_admin_credential(workdir)
    assert admin is not None and admin == secure_mlflow_server.admin
    pid = secure_mlflow_server.pid
    assert pid is not None

    # Execute: the process table and the environment of every process of the server's group.
    listing = subprocess.run(
        ["ps", "-ww", "-eo", "pid,pgid,args"], capture_output=True, text=True, check=True
    ).stdout
    group = [line.split()[0] for line in listing.splitlines()[1:] if line.split()[1] == str(pid)]
    environments = [Path(f"/proc/{p}/environ").read_bytes() for p in group]

    # Assert: 0600 file in a 0700 directory; the password nowhere else.
    assert stat.S_IMODE((workdir / AUTH_CONFIG_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
    assert len(group) >= 2  # mlflow server and its uvicorn worker
    assert admin.password not in listing
    assert admin.password not in secure_mlflow_server.log_path.read_text()
    assert all(admin.password.encode() not in env for env in environments)
    assert "basic-auth" in listing


def test_project_credential_writes_its_own_experiment_only(
    secure_mlflow_server: MlflowServer,
    access: MlflowAccess,
    alice_project: Project,
    bob_project: Project,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: act as Alice's project's aggregator.
    _as(monkeypatch, alice_project.env)
    client = _client(secure_mlflow_server)
    own = client.get_experiment_by_name(alice_project.experiment)

    # Execute: log to its own experiment, then reach for Bob's.
    run = client.create_run(own.experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    visible = [e.name for e in client.search_experiments()]
    with pytest.raises(Exception) as read_other:
        client.get_experiment_by_name(bob_project.experiment)
    bob_id = access.ensure_experiment(bob_project.experiment, bob_project.project_id)
    with pytest.raises(Exception) as write_other:
        client.create_run(bob_id)

    # Assert
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.value, m.step) for m in history] == [(0.5, 1)]
    assert visible == [alice_project.experiment]
    assert _status(read_other.value) == 403
    assert _status(write_other.value) == 403
    assert alice_project.env["MLFLOW_TRACKING_USERNAME"] == project_username(
        alice_project.project_id
    )


def test_customer_reads_own_projects_only_and_cannot_write(
    secure_mlflow_server: MlflowServer,
    access: MlflowAccess,
    alice_project: Project,
    bob_project: Project,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a run in each project, logged by each project's credential.
    run_ids = {}
    for project in (alice_project, bob_project):
        _as(monkeypatch, project.env)
        client = _client(secure_mlflow_server)
        experiment = client.get_experiment_by_name(project.experiment)
        run_ids[project.customer] = client.create_run(experiment.experiment_id).info.run_id
    alice = access.customer_credential("alice")
    _as(monkeypatch, alice)
    client = _client(secure_mlflow_server)

    # Execute
    visible = [e.name for e in client.search_experiments()]
    own_run = client.get_run(run_ids["alice"])
    attempts: list[Callable[[], object]] = [
        lambda: client.get_run(run_ids["bob"]),
        lambda: client.get_registered_model(bob_project.registered_model),
        lambda: client.log_metric(run_ids["alice"], "loss", 9.0),
        lambda: client.create_run(own_run.info.experiment_id),
        lambda: client.delete_experiment(own_run.info.experiment_id),
    ]
    refused = []
    for attempt in attempts:
        with pytest.raises(Exception) as err:
            attempt()
        refused.append(_status(err.value))

    # Assert: only Alice's experiment, read-only.
    assert alice.username == customer_username("alice")
    assert visible == [alice_project.experiment]
    assert own_run.info.run_id == run_ids["alice"]
    assert refused == [403] * 5
    assert client.get_metric_history(run_ids["alice"], "loss") == []


def test_aggregator_flow_registers_a_model_the_customer_can_read(
    secure_mlflow_server: MlflowServer,
    access: MlflowAccess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a fresh project of Carol, a tiny sklearn model saved as the model worker does.
    import mlflow
    import mlflow.sklearn
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    project = _new_project(access, "carol")
    model = LogisticRegression().fit(np.array([[0.0], [1.0], [2.0], [3.0]]), [0, 0, 1, 1])
    saved = tmp_path / "saved"
    mlflow.sklearn.save_model(model, str(saved), pip_requirements=["scikit-learn"])
    _as(monkeypatch, project.env)
    mlflow.set_tracking_uri(secure_mlflow_server.url)

    # Execute: the aggregator's own tracker, then the plain mlflow API with a registered name.
    tracker = MlflowTracker(
        secure_mlflow_server.url, project.project_id, registered_model=project.registered_model
    )
    tracker.start_run({"training_configuration": {"training_rounds": 1}})
    tracker.log_round(1, loss=0.3, accuracy=0.9)
    logged = tracker.log_saved_model(saved, MLModelFlavor.SKLEARN, step=1)
    tracker.end_run()
    mlflow.set_experiment(project.experiment)
    with mlflow.start_run() as run:
        mlflow.log_metric("accuracy", 0.95)
        mlflow.sklearn.log_model(
            model,
            name="model",
            registered_model_name=project.registered_model,
            pip_requirements=["scikit-learn"],
        )
    access.revoke(project.project_id)
    _as(monkeypatch, access.customer_credential("carol"))
    client = _client(secure_mlflow_server)
    versions = sorted(
        int(v.version) for v in client.search_model_versions(f"name = '{project.registered_model}'")
    )
    tracker_run = client.get_run(str(tracker.run_id))
    loaded = mlflow.pyfunc.load_model(logged.registered_model_uri)
    _as(monkeypatch, project.env)
    with pytest.raises(Exception) as err:
        client.get_run(run.info.run_id)

    # Assert: both versions registered; Carol reads the runs, metrics and model files; the
    # revoked project credential no longer works.
    assert logged.version == 1 and versions == [1, 2]
    assert tracker_run.data.metrics == {"loss": 0.3, "accuracy": 0.9}
    assert list(loaded.predict(np.array([[0.0], [3.0]]))) == [0, 1]
    assert _status(err.value) == 401


def test_customer_credential_rotates(
    secure_mlflow_server: MlflowServer, access: MlflowAccess, alice_project: Project
) -> None:
    # Prepare
    first = access.customer_credential("alice")

    # Execute
    second = access.customer_credential("alice")

    # Assert: the old password stops working, the new one works.
    def status(credential: MlflowCredential) -> int:
        response = requests.post(
            f"{secure_mlflow_server.url}{SEARCH}",
            json={"max_results": 10},
            auth=(credential.username, credential.password),
            timeout=10,
        )
        return response.status_code

    assert first.username == second.username and first.password != second.password
    assert (status(first), status(second)) == (401, 200)
    assert os.environ.get("MLFLOW_TRACKING_PASSWORD") not in (first.password, second.password)
