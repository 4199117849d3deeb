"""Session-wide fixtures: real components on loopback; the ``oci`` marker for their users."""

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # imported by the fixtures that need them: datasets takes seconds to import
    import datasets

    from data_server.server import DataServer


FIXTURE_MARKERS = {"oci_tools": "oci", "run_training": "slow"}
"""Fixtures that make every test using them (directly or through other fixtures) ``oci`` (the
OCI tools) or ``slow`` (``run_training``: real federated trainings, about 25 s a module)."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Add the markers of :data:`FIXTURE_MARKERS` (so that ``-m "not oci and not slow"``
    leaves those tests out even in modules that are not marked as a whole)."""
    for item in items:
        for fixture in set(getattr(item, "fixturenames", ())) & FIXTURE_MARKERS.keys():
            item.add_marker(FIXTURE_MARKERS[fixture])


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A real Mosquitto broker for the whole test session; ``.url`` is ``mqtt://HOST:PORT``.

    Anonymous clients may do anything on it (the components' tests start services without
    credentials); it still has the dynamic-security plugin and an admin credential
    (``.admin``), so that credentials can be granted on it too."""
    workdir = Path(tmp_path_factory.mktemp("mosquitto"))
    with MosquittoBroker(workdir, anonymous=True) as broker:
        yield broker


@pytest.fixture(scope="session")
def secure_mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A real Mosquitto broker with authentication (the manager's default): no anonymous
    client; ``.admin`` is the admin credential (``mqtt_testing.admin_access`` grants)."""
    with MosquittoBroker(Path(tmp_path_factory.mktemp("mosquitto-secure"))) as broker:
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


@pytest.fixture(scope="session")
def mnist() -> "datasets.Dataset":
    """The bundled MNIST test split (10,000 rows). Do not call ``set_format`` on it."""
    from data_server.mnist import load_mnist

    return load_mnist()


@pytest.fixture
def data_server(tmp_path: Path) -> Iterator["DataServer"]:
    """A running data server on 127.0.0.1 (free port) serving ``tmp_path / "data"``."""
    from data_server.server import DataServer

    with DataServer(tmp_path / "data") as server:
        yield server


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MongoDB wire-protocol server (``secantusd-py``) for the session; yields its
    ``mongodb://HOST:PORT`` (append ``/DATABASE`` for a database of one's own).

    Skips when it cannot run, or fails when ``FLOPS_REQUIRE_OCI=1`` (CI sets it).
    """
    from store_testing import MongoServerUnavailable, SecantusServer

    try:
        server = SecantusServer(Path(tmp_path_factory.mktemp("secantusd"))).start()
    except MongoServerUnavailable as error:
        if os.environ.get("FLOPS_REQUIRE_OCI") == "1":
            pytest.fail(str(error))
        pytest.skip(str(error))
    yield server.url
    server.stop()
