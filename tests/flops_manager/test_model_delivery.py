"""Delivering the trained model on this machine: what admission accepts, the model's serving
environment, and the local backend's model server with a real MLflow model and server.

The served model is a scikit-learn LogisticRegression trained on real MNIST rows, logged and
registered on the session's MLflow tracking server as the aggregator does it.
"""

import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
import requests
from sklearn.linear_model import LogisticRegression
from waiting import answers_200, wait_until

from data_server.mnist import load_mnist_arrays
from flops_manager import model_delivery as md
from flops_manager.builds import ImageBuildFailed, VenvProjectBuilder, builds_model_images
from flops_manager.lifecycle.admission import UnsupportedSla, check_post_training
from flops_manager.model_delivery import ModelDeliveryError, PullProgress, TrainedModel
from flops_manager.orchestrators.local import LocalOrchestrator
from flops_manager.orchestrators.local_models import (
    RECORD_FILE,
    LocalModelServers,
    container_limits,
)
from flops_manager.process_identity import ProcessIdentity
from flops_manager.sla import PostTrainingStep
from image_builder.model_image import ModelImageBuilder
from image_builder.oci_builder import OciBuilder
from observatory.mlflow_server import MlflowServer

BUILD = PostTrainingStep.BUILD_IMAGE_FOR_TRAINED_MODEL
DEPLOY = PostTrainingStep.DEPLOY_TRAINED_MODEL_IMAGE


# -- admission ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "builds", "serves", "without_image"),
    [
        ([DEPLOY], False, True, True),  # the embedded default: venv builder, local backend
        ([BUILD, DEPLOY], True, True, True),  # the same with FLOPS_REGISTRY/FLOPS_BASE_IMAGE
        ([BUILD], True, True, True),
        ([BUILD, DEPLOY], True, True, False),  # oci builder, oakestra backend
        ([], False, False, False),
    ],
)
def test_post_training_steps_the_manager_can_run_are_accepted(
    steps: list[PostTrainingStep], builds: bool, serves: bool, without_image: bool
) -> None:
    check_post_training(steps, builds, serves, without_image)


@pytest.mark.parametrize(
    ("steps", "builds", "serves", "without_image", "named"),
    [
        ([BUILD], False, True, True, "FLOPS_REGISTRY"),
        ([BUILD, DEPLOY], False, True, True, "FLOPS_BASE_IMAGE"),
        ([DEPLOY], True, False, False, "FLOPS_ORCHESTRATOR"),
        ([DEPLOY], False, True, False, "FLOPS_REGISTRY"),
    ],
)
def test_post_training_steps_the_manager_cannot_run_are_refused_naming_the_fix(
    steps: list[PostTrainingStep], builds: bool, serves: bool, without_image: bool, named: str
) -> None:
    with pytest.raises(UnsupportedSla) as caught:
        check_post_training(steps, builds, serves, without_image)

    assert named in caught.value.message
    assert steps[0].value in caught.value.message


def test_the_venv_builder_builds_model_images_only_with_an_image_builder_service(
    tmp_path: Path,
) -> None:
    builder = VenvProjectBuilder(tmp_path / "envs")

    assert not builds_model_images(builder) and not builder.produces_images
    with pytest.raises(ImageBuildFailed, match="docker-registry and debootstrap"):
        builder.build_model_image("p1", "models:/m/1", "http://127.0.0.1:1", tmp_path)


# -- pure parts -----------------------------------------------------------------------------
def test_pull_progress_counts_finished_layers() -> None:
    progress = PullProgress()
    progress.update({"status": "Pulling from flops/model", "id": "sha256:abc"})
    progress.update({"status": "Pulling fs layer", "id": "aaa"})
    progress.update({"status": "Already exists", "id": "bbb"})
    summary = progress.update({"status": "Pull complete", "id": "aaa"})

    assert summary == "2/2 layers - Pull complete"


def test_a_model_server_that_ends_before_serving_is_reported_with_its_reason() -> None:
    with pytest.raises(ModelDeliveryError, match="ended before serving: exit code 3"):
        md.wait_until_serving("http://127.0.0.1:9", 5, lambda: "exit code 3")


def _write_model_dir(path: Path, requirements: list[str]) -> Path:
    path.mkdir(parents=True)
    (path / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: x\n")
    (path / "requirements.txt").write_text("\n".join(requirements) + "\n")
    return path


def test_the_install_plan_is_the_model_images_and_its_key_follows_the_requirements(
    tmp_path: Path,
) -> None:
    installed = {"numpy": "1.26.4", "pandas": "2.2.3", "scikit-learn": "1.9.1"}
    first = md.install_plan(
        _write_model_dir(tmp_path / "a", ["mlflow==3.17.2", "scikit-learn==1.9.1"]), installed
    )
    other = md.install_plan(
        _write_model_dir(tmp_path / "b", ["mlflow==3.17.2", "scikit-learn==1.8.0"]), installed
    )

    names = [line.split("==")[0] for line in first.requirements]
    assert names == ["scikit-learn", "numpy", "pandas", "mlflow-skinny"]  # MLflow: the manager's
    assert "numpy==1.26.4" in first.constraints
    assert first.key("py") == md.install_plan(tmp_path / "a", installed).key("py")
    assert first.key("py") != other.key("py") != first.key("py2")


def test_a_directory_without_an_mlflow_model_has_no_install_plan(tmp_path: Path) -> None:
    from image_builder.errors import ModelNotServableError

    (tmp_path / "m").mkdir()
    with pytest.raises(ModelNotServableError):
        md.install_plan(tmp_path / "m", {})


# -- the local backend's model server --------------------------------------------------------
def test_a_recorded_model_server_is_stopped_by_a_later_manager_process(tmp_path: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    identity = ProcessIdentity.of(server.pid)
    assert identity is not None
    (tmp_path / "p1").mkdir()
    record = f'{{"url": "http://127.0.0.1:1", "process": {identity.to_dict()}}}'
    (tmp_path / "p1" / RECORD_FILE).write_text(record.replace("'", '"'))
    later = LocalModelServers(tmp_path, md.ModelEnvironments(tmp_path / "envs"))

    assert later.stop("p1") is True
    server.wait(timeout=15)
    assert not (tmp_path / "p1" / RECORD_FILE).exists()
    assert later.stop("p1") is False


@pytest.fixture(scope="module")
def registered_model(mlflow_server: MlflowServer) -> Iterator[tuple[str, LogisticRegression]]:
    """A LogisticRegression on 600 MNIST rows registered as ``<name>`` version 1, with the
    flavor's pip requirements as the aggregator logs them; yields its ``models:/`` URI and the
    model."""
    images, labels = load_mnist_arrays()
    features = images[:600].reshape(-1, 784).astype(np.float64) / 255.0
    model = LogisticRegression(max_iter=200).fit(features, labels[:600])
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.url)
    name = f"delivery-{uuid.uuid4().hex[:8]}"
    try:
        with mlflow.start_run(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer")
            info = mlflow.sklearn.log_model(
                model,
                name="model",
                input_example=pd.DataFrame(features[:3]),
                pip_requirements=mlflow.sklearn.get_default_pip_requirements(include_skops=True),
                registered_model_name=name,
            )
        yield f"models:/{name}/{info.registered_model_version}", model
    finally:
        mlflow.set_tracking_uri(previous)


def _scored_rows() -> np.ndarray:
    images, _ = load_mnist_arrays()
    rows: np.ndarray = images[9000:9020].reshape(-1, 784).astype(np.float64) / 255.0
    return rows


@pytest.mark.slow
def test_the_local_backend_serves_the_trained_model_and_delete_stops_it(
    tmp_path: Path,
    mlflow_server: MlflowServer,
    registered_model: tuple[str, LogisticRegression],
) -> None:
    uri, model = registered_model
    orchestrator = LocalOrchestrator(tmp_path / "services", lambda *args: None)
    rows = _scored_rows()
    try:
        url = orchestrator.deploy_model("p1", TrainedModel(uri, mlflow_server.url))

        assert url.startswith("http://127.0.0.1:")
        answer = requests.post(
            f"{url}/invocations",
            json={"dataframe_split": pd.DataFrame(rows).to_dict(orient="split")},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == model.predict(rows).tolist()
    finally:
        stopped = orchestrator.stop_inference("p1")
        orchestrator.close()
    assert stopped
    wait_until(lambda: not answers_200(f"{url}/ping"), timeout_s=15)


def test_a_model_the_tracking_server_does_not_have_is_a_clear_error(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    with pytest.raises(ModelDeliveryError, match="does not exist"):
        md.download_model_dir("models:/no-such-model/1", mlflow_server.url, tmp_path / "m")


# -- the SLA's resource_constraints on the trained-model container ---------------------------
READ_CGROUP_LIMITS = (
    "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max 2>/dev/null || cat "
    "/sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us "
    "/sys/fs/cgroup/cpu/cpu.cfs_period_us"
)
"""The container's memory limit (bytes), CPU quota and period (microseconds) as the kernel
holds them: cgroup v2 files, else cgroup v1's (Docker here runs with v1)."""


def test_the_container_limits_are_the_slas_memory_and_vcpus() -> None:
    limits = container_limits({"memory": 600, "vcpus": 1, "storage": 2000}, host_cpus=2)

    assert limits == {"mem_limit": "600m", "memswap_limit": "600m", "nano_cpus": 10**9}


def test_more_vcpus_than_the_machine_has_are_refused_with_the_reason() -> None:
    with pytest.raises(ModelDeliveryError, match="vcpus is 4, but this machine has 2 CPU"):
        container_limits({"memory": 600, "vcpus": 4}, host_cpus=2)


@pytest.mark.slow
def test_the_model_container_runs_within_the_slas_memory_and_vcpus(
    tmp_path: Path,
    mlflow_server: MlflowServer,
    registered_model: tuple[str, LogisticRegression],
    oci_registry: str,
    oci_base_image: str,
) -> None:
    # Prepare: the registered model's image, built from the local base into the registry.
    uri, model = registered_model
    oci = OciBuilder(tmp_path / "oci-cache", oci_registry, oci_base_image, tls_verify=False)
    image = ModelImageBuilder(oci).build(uri, mlflow_server.url, tmp_path / "work")
    engine = md.docker_engine()
    if engine is None:
        pytest.fail("no Docker engine answers (scripts/bootstrap starts dockerd)")
    servers = LocalModelServers(tmp_path / "servers", md.ModelEnvironments(tmp_path / "envs"))
    rows = _scored_rows()
    try:
        # Execute
        url = servers.serve(
            "p-limits",
            TrainedModel("", "", image=image.image.pinned_ref),
            {"memory": 700, "vcpus": 1, "storage": 2000},
        )

        # Assert: Docker and the kernel's cgroup hold the limits, and the model serves.
        label = {"label": f"{md.CONTAINER_LABEL}=p-limits"}
        (container,) = engine.containers.list(filters=label)
        assert container.attrs["HostConfig"]["Memory"] == 700 * 2**20
        assert container.attrs["HostConfig"]["NanoCpus"] == 10**9
        cgroup = container.exec_run(["sh", "-c", READ_CGROUP_LIMITS])
        assert cgroup.exit_code == 0, cgroup.output
        assert cgroup.output.decode().split() == [str(700 * 2**20), "100000", "100000"]
        answer = requests.post(
            f"{url}/invocations",
            json={"dataframe_split": pd.DataFrame(rows).to_dict(orient="split")},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == model.predict(rows).tolist()
    finally:
        servers.stop("p-limits")
