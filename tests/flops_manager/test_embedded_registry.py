"""The embedded OCI registry and the base image the manager makes: a real ``docker-registry``,
real buildah pushes, a real manager suite (on the session's broker and MLflow server)."""

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from mqtt_testing import manager_mqtt
from waiting import wait_until

from flops_manager.base_image import BaseImageMaker, recipe_key, registry_has
from flops_manager.broker import MosquittoBroker
from flops_manager.builds import VenvProjectBuilder, builds_model_images
from flops_manager.config import ManagerConfig
from flops_manager.embedded import EmbeddedState, registry_address, start_registry
from flops_manager.embedded_registry import (
    RegistryServer,
    RegistryUnavailable,
    missing_tools,
    registry_answers,
)
from flops_manager.suite import ManagerSuite
from observatory.mlflow_server import MlflowServer

RESTART_TIMEOUT_S = 30.0

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason=f"needs {', '.join(missing_tools())}")


def test_the_registry_serves_the_v2_api_with_its_storage_in_its_workdir(tmp_path: Path) -> None:
    with RegistryServer(tmp_path / "registry") as registry:
        assert registry.answers()
        assert registry.address == f"127.0.0.1:{registry.port}"
        assert (tmp_path / "registry" / "config.yml").stat().st_mode & 0o077 == 0
        secret = (tmp_path / "registry" / "http-secret").read_text()

    assert not registry_answers(registry.url)
    with RegistryServer(tmp_path / "registry", port=registry.port) as again:
        assert again.answers()
    assert (tmp_path / "registry" / "http-secret").read_text() == secret  # kept


def test_a_fixed_registry_port_another_program_holds_fails_naming_the_setting(
    tmp_path: Path,
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        state = EmbeddedState(tmp_path)

        with pytest.raises(RegistryUnavailable, match=f"FLOPS_REGISTRY_PORT={port}"):
            start_registry(tmp_path, state, port=port, port_setting="FLOPS_REGISTRY_PORT")


@pytest.mark.oci
def test_a_pushed_base_image_survives_a_restart_on_the_recorded_port(
    tmp_path: Path, oci_base_image: str
) -> None:
    # Prepare: the base image (its archive is cached by the session) pushed by the maker.
    state = EmbeddedState(tmp_path)
    first = start_registry(tmp_path, state)
    try:
        maker = BaseImageMaker(registry_address(first))
        heard: list[str] = []
        ref = maker.ref(heard.append)
        assert ref == f"{registry_address(first)}/flops/base:{recipe_key()}"
        assert any("base image pushed" in m for m in heard)
        reused = start_registry(tmp_path, EmbeddedState(tmp_path))
        assert reused.reused and reused.pid == first.pid
    finally:
        first.stop()

    # Execute
    second = start_registry(tmp_path, EmbeddedState(tmp_path))
    try:
        # Assert: same port, the image is still there, and the maker pushes nothing again.
        assert second.port == first.port and second.pid != first.pid
        assert registry_has(ref)
        heard.clear()
        assert BaseImageMaker(registry_address(second)).ref(heard.append) == ref
        assert heard == []
    finally:
        second.stop()


@pytest.fixture
def suite_config(
    tmp_path: Path, mqtt_broker: MosquittoBroker, mlflow_server: MlflowServer
) -> ManagerConfig:
    return ManagerConfig(
        home=tmp_path / "home",
        port=0,
        **manager_mqtt(mqtt_broker),
        mlflow_url=mlflow_server.url,
        insecure=frozenset({"mlflow"}),
    )


@pytest.fixture
def suite(suite_config: ManagerConfig) -> Iterator[ManagerSuite]:
    with ManagerSuite(suite_config) as running:
        yield running


def _registry_status(suite: ManagerSuite) -> str:
    health = requests.get(f"{suite.url}/healthz", timeout=5).json()
    return str(health["components"]["registry"]["status"])


def test_the_suite_runs_a_registry_for_model_images_and_restarts_it_on_its_port(
    suite: ManagerSuite,
) -> None:
    home = suite.config.home.resolve()
    state = EmbeddedState(home)
    old, port = state.process("registry"), state.port("registry")
    assert old is not None and _registry_status(suite) == "ok"
    builder = suite.lifecycle.builder
    assert isinstance(builder, VenvProjectBuilder) and builds_model_images(builder)
    assert builder.model_images is not None
    assert builder.model_images.settings.registry == f"127.0.0.1:{port}"

    os.kill(old.pid, signal.SIGKILL)

    wait_until(
        lambda: (
            (new := EmbeddedState(home).process("registry")) is not None
            and new.pid != old.pid
            and _registry_status(suite) == "ok"
        ),
        RESTART_TIMEOUT_S,
        "the registry was not restarted",
    )
    assert EmbeddedState(home).port("registry") == port
    assert registry_answers(f"http://127.0.0.1:{port}")


def test_without_the_embedded_registry_the_venv_builder_builds_no_model_images(
    suite_config: ManagerConfig,
) -> None:
    config = suite_config.model_copy(update={"embedded_registry": False})

    with ManagerSuite(config) as running:
        health = requests.get(f"{running.url}/healthz", timeout=5).json()
        builder = running.lifecycle.builder

    assert "registry" not in health["components"]
    assert not builds_model_images(builder)
    assert EmbeddedState(config.home.resolve()).port("registry") == 0


def test_the_suite_stops_its_registry_with_it(suite_config: ManagerConfig) -> None:
    with ManagerSuite(suite_config):
        process = EmbeddedState(suite_config.home.resolve()).process("registry")
        assert process is not None and process.is_alive()

    assert process.wait(10)


def test_the_registry_settings_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLOPS_REGISTRY_PORT", "5123")
    monkeypatch.setenv("FLOPS_EMBEDDED_REGISTRY", "false")

    config = ManagerConfig.from_env()

    assert config.registry_port == 5123 and config.embedded_registry is False
    assert ManagerConfig().embedded_registry is True and ManagerConfig().registry_port == 0
