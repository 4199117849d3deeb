"""The production suite (``docker-compose.yml``) for real: configuration, start, use, removal.

The images are the local ones of :func:`compose_testing.suite_images` (the manager from the
repository's ``Containerfile``, stand-ins with the official images' interfaces); everything
else is the suite as an operator runs it: ``.env.example`` with the images, ports and public
address changed, ``docker-compose up -d``, ``down -v``.
"""

import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from compose_testing import ComposeProject, env_without_flops, run, write_env
from waiting import wait_until

from flops_manager.client import ManagerClient
from flops_manager.demo import local_nodes
from flops_utils.net import find_free_port

pytestmark = [pytest.mark.slow, pytest.mark.oci]

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("manager", "mongo", "mosquitto", "postgres", "mlflow", "registry")
"""The suite's long-running services, each with a health check."""

UP_TIMEOUT_S = 600.0
HEALTHY_TIMEOUT_S = 300.0
NODES_TIMEOUT_S = 60.0


def compose_config(env_file: Path | None) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` of the repository with ``env_file`` (``None``: none), in an
    environment without ``FLOPS_*`` variables."""
    options = ["--env-file", str(env_file)] if env_file is not None else []
    return run(
        ["docker-compose", "--project-directory", str(REPO), *options,
         "-f", str(REPO / "docker-compose.yml"), "config"],
        check=False,
        env=env_without_flops(),
        cwd=env_file.parent if env_file is not None else REPO / "tests",
    )  # fmt: skip


def test_config_is_valid_with_only_the_env_example(tmp_path: Path) -> None:
    """``.env.example`` alone is a complete configuration; without it, compose names the
    first password it lacks instead of starting a suite without one."""
    if run(["which", "docker-compose"], check=False).returncode != 0:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env_file = tmp_path / ".env"
    env_file.write_text((REPO / ".env.example").read_text())

    valid = compose_config(env_file)
    assert valid.returncode == 0, valid.stderr
    assert "FLOPS_DB_URL: mongodb://flops:change-me-mongo-password@mongo:27017/" in valid.stdout
    assert "FLOPS_MLFLOW_PUBLIC_URL: http://192.0.2.10:5000" in valid.stdout

    empty = tmp_path / "empty.env"
    empty.write_text("")
    missing = compose_config(empty)
    assert missing.returncode != 0
    assert "set FLOPS_" in missing.stderr and "in .env" in missing.stderr


@pytest.fixture
def suite(
    tmp_path: Path, compose_images: tuple[dict[str, str], dict[str, float]]
) -> Iterator[tuple[ComposeProject, dict[str, str]]]:
    """The suite up (``up -d``) as a project of its own with free ports on loopback; yields it
    and its ``.env`` settings. Removed (``down -v``) afterwards."""
    images, _ = compose_images
    settings = {
        **images,
        "FLOPS_PUBLIC_HOST": "127.0.0.1",
        "FLOPS_BIND_ADDRESS": "127.0.0.1",
        "FLOPS_MANAGER_PORT": str(find_free_port()),
        "FLOPS_MQTT_PORT": str(find_free_port()),
        "FLOPS_MLFLOW_PORT": str(find_free_port()),
        "FLOPS_REGISTRY_PORT": str(find_free_port()),
        "FLOPS_OAKESTRA_URL": "http://host.docker.internal:10000",
        "FLOPS_MONGO_ROOT_PASSWORD": secrets.token_urlsafe(16),
        "FLOPS_MQTT_ADMIN_PASSWORD": secrets.token_urlsafe(16),
        "FLOPS_MLFLOW_ADMIN_PASSWORD": secrets.token_urlsafe(16),
        "FLOPS_POSTGRES_PASSWORD": secrets.token_urlsafe(16),
    }
    env_file = write_env(tmp_path / ".env", settings)
    project = ComposeProject(f"flopstest{secrets.token_hex(4)}", env_file)
    with project:
        started = time.monotonic()
        up = project.run("up", "-d", check=False, timeout_s=UP_TIMEOUT_S)
        assert up.returncode == 0, f"{up.stderr[-2000:]}\n{project.logs()}"
        wait_until(
            lambda: all(project.health().get(s) == "healthy" for s in SERVICES),
            timeout_s=HEALTHY_TIMEOUT_S,
            interval_s=1.0,
            message=lambda: f"services not healthy: {project.health()}\n{project.logs()}",
        )
        print(f"suite healthy {time.monotonic() - started:.1f} s after 'up -d'")
        yield project, settings
    for listed in (project.container_ids, project.volume_names, project.network_names):
        assert listed() == [], f"'down -v' left {listed.__name__}: {listed()}"


def test_suite_serves_nodes_and_leaves_nothing_behind(
    tmp_path: Path, suite: tuple[ComposeProject, dict[str, str]]
) -> None:
    """Every service healthy; the manager's health names its components ok through the
    published port; MLflow asks for the .env admin; two data servers on this machine register
    through the published API with node credentials the admin token issued; the fixture then
    checks that ``down -v`` removed every container, volume and network of the project."""
    project, settings = suite
    manager_url = f"http://127.0.0.1:{settings['FLOPS_MANAGER_PORT']}"
    assert project.health()["mqtt-init"] == "exited(0)"

    health = requests.get(f"{manager_url}/healthz", timeout=10).json()
    assert health["status"] == "ok", health
    for component in ("store", "mqtt", "mlflow"):
        assert health["components"][component]["status"] == "ok", health

    mlflow_url = f"http://127.0.0.1:{settings['FLOPS_MLFLOW_PORT']}"
    probe = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(probe, timeout=10).status_code == 401
    admin = ("flops-admin", settings["FLOPS_MLFLOW_ADMIN_PASSWORD"])
    assert requests.get(probe, auth=admin, timeout=10).status_code == 200

    token = project.run("exec", "-T", "manager", "flops", "token").stdout.strip()
    client = ManagerClient(manager_url, token=token)
    with local_nodes(2, tmp_path / "nodes", manager_url, token, register_interval_s=2.0):
        registered = wait_until(
            lambda: sorted(node["node_id"] for node in client.nodes()) == ["node-1", "node-2"],
            timeout_s=NODES_TIMEOUT_S,
            interval_s=0.5,
            message=lambda: f"nodes registered: {client.nodes()}\n{project.logs()}",
        )
    assert registered
