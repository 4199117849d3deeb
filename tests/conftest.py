"""Session-wide fixtures: real components on loopback (DESIGN.md §4)."""

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_testing import MqttRecorder
from oci_testing import (
    LocalRegistry,
    base_image_archive,
    missing_requirements,
    prune_other_registries,
    push_archive,
    use_test_storage,
)

from flops_manager.broker import MosquittoBroker
from observatory.mlflow_server import MlflowServer


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A real Mosquitto broker for the whole test session; ``.url`` is ``mqtt://HOST:PORT``."""
    with MosquittoBroker(Path(tmp_path_factory.mktemp("mosquitto"))) as broker:
        yield broker


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server (SQLite + served artifacts) for the whole session;
    ``.url`` is ``http://HOST:PORT``."""
    with MlflowServer(Path(tmp_path_factory.mktemp("mlflow"))) as server:
        yield server


@pytest.fixture(scope="session")
def oci_tools() -> Iterator[None]:
    """buildah, skopeo, docker-registry and debootstrap as root, with a test-only storage.

    Skips the OCI tests when something is missing, or fails them when ``FLOPS_REQUIRE_OCI=1``
    (CI sets it, so that a broken bootstrap cannot pass silently).
    """
    missing = missing_requirements()
    if missing:
        message = f"the OCI tests need {', '.join(missing)}; run scripts/bootstrap"
        if os.environ.get("FLOPS_REQUIRE_OCI") == "1":
            pytest.fail(message)
        pytest.skip(message)
    previous = os.environ.get("CONTAINERS_STORAGE_CONF")
    use_test_storage()
    yield
    if previous is None:
        os.environ.pop("CONTAINERS_STORAGE_CONF", None)
    else:
        os.environ["CONTAINERS_STORAGE_CONF"] = previous


@pytest.fixture(scope="session")
def oci_registry(oci_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real registry v2 on loopback for the session; yields its ``127.0.0.1:PORT``.

    Its storage (about 350 MB after the builder tests) is deleted at the end, and local image
    names of earlier sessions' registries are pruned from the test storage.
    """
    workdir = tmp_path_factory.mktemp("registry")
    with LocalRegistry(workdir) as registry:
        yield registry.address
        prune_other_registries(registry.address)
    shutil.rmtree(workdir / "storage", ignore_errors=True)


@pytest.fixture(scope="session")
def oci_base_image(oci_registry: str) -> str:
    """The local Debian 12 + python3 base image, pushed to the session's registry; its ref."""
    return push_archive(base_image_archive(), oci_registry)


@pytest.fixture
def project_id() -> str:
    """A fresh project id (12 hex), as the manager makes them."""
    return uuid.uuid4().hex[:12]


@pytest.fixture
def recorder(mqtt_broker: MosquittoBroker, project_id: str) -> Iterator[MqttRecorder]:
    """Every status message of ``project_id`` on the session's broker."""
    rec = MqttRecorder(mqtt_broker, project_id)
    yield rec
    rec.close()
