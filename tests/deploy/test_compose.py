"""The production suite (``docker-compose.yml``) for real: configuration, start, use, removal.

The images are the local ones of :func:`compose_testing.suite_images` (the manager from the
repository's ``Containerfile``, stand-ins with the official images' interfaces); everything
else is the suite as an operator runs it: ``.env.example`` with the images, ports and public
address changed, ``docker-compose up -d``, ``down -v``.

On this machine, next to the suite, as a deployment's other machines would be: the Oakestra
double (its workers run the images with buildah, pulling them from the suite's published
registry), two data servers, and a git daemon with the MNIST example repository. The double
and the git daemon listen on Docker's bridge gateway, which the manager container reaches as
``host.docker.internal``; the suite publishes its ports on loopback, so the services on the
double's workers (host network) reach Mosquitto, MLflow and the registry at
``FLOPS_PUBLIC_HOST=127.0.0.1``, and the host's dockerd pulls the trained-model image from it
(a loopback registry is an insecure one by default).
"""

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from compose_testing import (
    ComposeProject,
    GitDaemon,
    docker_gateway,
    docker_images_from,
    env_without_flops,
    oakestra_double_on,
    remove_buildah_names,
    run,
    write_env,
)
from oakestra_double import OakestraDouble, WorkerSpec
from oci_testing import base_image_archive, push_archive, recipe_key
from waiting import wait_until

from flops_manager.client import ManagerClient
from flops_manager.demo import EXAMPLE_REPO, example_sla, local_nodes
from flops_manager.orchestrators.oakestra_client import OakestraClient
from flops_utils.net import find_free_port

pytestmark = [pytest.mark.slow, pytest.mark.oci]

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("manager", "mongo", "mosquitto", "postgres", "mlflow", "registry")
"""The suite's long-running services, each with a health check."""

UP_TIMEOUT_S = 600.0
HEALTHY_TIMEOUT_S = 300.0
NODES_TIMEOUT_S = 60.0
PROJECT_TIMEOUT_S = 1800.0
"""Builds (learner, aggregator, trained-model images with buildah's vfs driver in the manager
container) and two rounds on a loaded 2-core machine."""
PULL_TIMEOUT_S = 600.0
SUITE_TEST_TIMEOUT_S = 4 * 3600
"""The whole test with its fixtures: image builds, the suite up, the project, down."""
ROUNDS = 2
NODES = ("node-1", "node-2")
WORKERS = tuple(WorkerSpec("local", node) for node in NODES)
"""One Oakestra worker per data server, hostname = node id (what the data server registers)."""
INTERNAL_REGISTRY = "registry:5000"
"""The suite's registry as the manager reaches it (its service name, its container port)."""


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
    assert "FLOPS_REGISTRY: registry:5000" in valid.stdout
    assert "FLOPS_REGISTRY_PUBLIC: 192.0.2.10:5001" in valid.stdout

    empty = tmp_path / "empty.env"
    empty.write_text("")
    missing = compose_config(empty)
    assert missing.returncode != 0
    assert "set FLOPS_" in missing.stderr and "in .env" in missing.stderr


@pytest.fixture
def gateway() -> str:
    """This machine's address on Docker's bridge (``host.docker.internal`` in the manager)."""
    return docker_gateway()


@pytest.fixture
def double(oci_tools: None, tmp_path: Path, gateway: str) -> Iterator[OakestraDouble]:
    """The Oakestra double on the bridge gateway, one worker per data server; afterwards its
    process is gone and the images its workers pulled are removed from buildah's storage."""
    with oakestra_double_on(gateway, find_free_port(gateway), tmp_path / "oakestra", WORKERS) as d:
        yield d
    assert not _answers(f"{d.url}/double/stats"), "the Oakestra double still answers"


@pytest.fixture
def example_repo(tmp_path: Path, gateway: str) -> Iterator[str]:
    """The MNIST example as a git repository (``git://``); yields its URL for the manager."""
    with GitDaemon(EXAMPLE_REPO, tmp_path / "git", gateway, "host.docker.internal") as server:
        yield server.url


@pytest.fixture
def suite(
    tmp_path: Path,
    compose_images: tuple[dict[str, str], dict[str, float]],
    double: OakestraDouble,
) -> Iterator[tuple[ComposeProject, dict[str, str]]]:
    """The suite up (``up -d``) as a project of its own with free ports on loopback, the
    manager pointed at the double and at the base image the test puts into the suite's
    registry; yields it and its ``.env`` settings. Removed (``down -v``) afterwards, with the
    images pulled from its registry (buildah's, dockerd's)."""
    images, seconds = compose_images
    print(f"image builds (s, 0: cached): { ({k: round(v, 1) for k, v in seconds.items()}) }")
    double_port = double.url.rsplit(":", 1)[1]
    settings = {
        **images,
        "FLOPS_PUBLIC_HOST": "127.0.0.1",
        "FLOPS_BIND_ADDRESS": "127.0.0.1",
        "FLOPS_MANAGER_PORT": str(find_free_port()),
        "FLOPS_MQTT_PORT": str(find_free_port()),
        "FLOPS_MLFLOW_PORT": str(find_free_port()),
        "FLOPS_REGISTRY_PORT": str(find_free_port()),
        "FLOPS_OAKESTRA_URL": f"http://host.docker.internal:{double_port}",
        "FLOPS_BASE_IMAGE": f"{INTERNAL_REGISTRY}/flops/base:{recipe_key()}",
        "FLOPS_MONGO_ROOT_PASSWORD": secrets.token_urlsafe(16),
        "FLOPS_MQTT_ADMIN_PASSWORD": secrets.token_urlsafe(16),
        "FLOPS_MLFLOW_ADMIN_PASSWORD": secrets.token_urlsafe(16),
        "FLOPS_POSTGRES_PASSWORD": secrets.token_urlsafe(16),
    }
    env_file = write_env(tmp_path / ".env", settings)
    project = ComposeProject(f"flopstest{secrets.token_hex(4)}", env_file)
    registry = f"127.0.0.1:{settings['FLOPS_REGISTRY_PORT']}"
    try:
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
            started = time.monotonic()
        print(f"'down -v' took {time.monotonic() - started:.1f} s")
    finally:
        remove_buildah_names(registry)
        for image in docker_images_from(registry):
            run(["docker", "image", "rm", "--force", image], check=False)
    for listed in (project.container_ids, project.volume_names, project.network_names):
        assert listed() == [], f"'down -v' left {listed.__name__}: {listed()}"
    assert docker_images_from(registry) == []


@pytest.mark.timeout(SUITE_TEST_TIMEOUT_S)
def test_suite_runs_a_project_on_oakestra_and_leaves_nothing_behind(
    tmp_path: Path,
    suite: tuple[ComposeProject, dict[str, str]],
    double: OakestraDouble,
    example_repo: str,
) -> None:
    """Every service healthy, the manager's components ok through the published port, MLflow
    asking for the .env admin; two data servers on this machine register with node
    credentials; the MNIST example runs through the ``oakestra`` backend: the manager builds
    the learner, aggregator and trained-model images with buildah in its container, pushes
    them to the suite's registry, the double's workers pull them from the published port and
    train two rounds; the browser's tracking route leads to the suite's public MLflow
    address; ``flops model pull`` pulls the model image into this machine's dockerd. The
    fixtures then check that ``down -v`` removed every container, volume and network of the
    project, the double stopped, and no pulled image is left."""
    project, settings = suite
    manager_url = f"http://127.0.0.1:{settings['FLOPS_MANAGER_PORT']}"
    mlflow_url = f"http://127.0.0.1:{settings['FLOPS_MLFLOW_PORT']}"
    registry = f"127.0.0.1:{settings['FLOPS_REGISTRY_PORT']}"
    _assert_services_answer(project, manager_url, mlflow_url, settings)
    timings: dict[str, float] = {}

    # Setup: the base image in the suite's registry, MNIST halves on two data servers
    started = time.monotonic()
    base = push_archive(base_image_archive(), registry)
    assert base.split("/", 1)[1] == settings["FLOPS_BASE_IMAGE"].split("/", 1)[1]
    timings["base image push"] = time.monotonic() - started
    token = project.run("exec", "-T", "manager", "flops", "token").stdout.strip()
    client = ManagerClient(manager_url, token=token)
    nodes_dir = tmp_path / "nodes"
    _place_mnist(nodes_dir)
    with local_nodes(len(NODES), nodes_dir, manager_url, token, register_interval_s=2.0):
        wait_until(
            lambda: sorted(node["node_id"] for node in client.nodes()) == list(NODES),
            timeout_s=NODES_TIMEOUT_S,
            interval_s=0.5,
            message=lambda: f"nodes registered: {client.nodes()}\n{project.logs()}",
        )

        # Execute: the example through the oakestra backend, with the trained-model image
        started = time.monotonic()
        project_id = client.create_project(_sla(example_repo))
        document = client.wait_for_project(project_id, PROJECT_TIMEOUT_S, poll_s=1.0)
        timings["project (builds + 2 rounds + model image)"] = time.monotonic() - started

    # Assert: trained to completion from images of the suite's registry, named as pulled
    assert document["status"] == "completed", (
        f"{document['status_message']}\n{document.get('events', [])[-10:]}\n{project.logs()}"
    )
    assert [r["round"] for r in document["rounds"]] == list(range(1, ROUNDS + 1))
    assert document["metrics"]["accuracy"] >= 0.8
    for role, ref in document["environment"]["images"].items():
        assert ref.startswith(f"{registry}/flops/{role}@sha256:"), ref
    model_ref = document["model_image"]["ref"]
    assert model_ref.startswith(f"{registry}/flops/model@sha256:"), model_ref
    pulled_by_workers = _pulled_by_workers(double)
    for role in ("learner", "aggregator"):
        assert document["environment"]["images"][role] in pulled_by_workers, pulled_by_workers
    oakestra = OakestraClient(double.url, "Admin", "Admin")
    wait_until(
        lambda: not oakestra.list_applications() and not double.instances(),
        timeout_s=60,
        message=lambda: f"left in Oakestra: {oakestra.list_applications()} {double.instances()}",
    )
    oakestra.close()
    _assert_gui_route(manager_url, mlflow_url, project_id)

    # Execute: the CLI pulls the model image into this machine's dockerd
    started = time.monotonic()
    pulled = run(
        [str(Path(sys.executable).with_name("flops")), "model", "pull", project_id,
         "--manager-url", manager_url, "--token", token],
        check=False, timeout_s=PULL_TIMEOUT_S, env={**env_without_flops(), "COLUMNS": "1000"},
    )  # fmt: skip
    timings["flops model pull"] = time.monotonic() - started
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert f"pulled {model_ref}" in pulled.stdout
    assert run(["docker", "image", "inspect", model_ref], check=False).returncode == 0
    print("timings (s):", {name: round(value, 1) for name, value in timings.items()})


def _assert_services_answer(
    project: ComposeProject, manager_url: str, mlflow_url: str, settings: dict[str, str]
) -> None:
    """The init step ran; the manager's health names its components ok; MLflow asks for a
    login and takes the .env admin."""
    assert project.health()["mqtt-init"] == "exited(0)"
    health = requests.get(f"{manager_url}/healthz", timeout=10).json()
    assert health["status"] == "ok", health
    for component in ("store", "mqtt", "mlflow"):
        assert health["components"][component]["status"] == "ok", health
    probe = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(probe, timeout=10).status_code == 401
    admin = ("flops-admin", settings["FLOPS_MLFLOW_ADMIN_PASSWORD"])
    assert requests.get(probe, auth=admin, timeout=10).status_code == 200


def _place_mnist(nodes_dir: Path) -> None:
    """IID halves of the bundled MNIST as each node's ``mnist`` table, put into the data
    servers' directories as their owners would."""
    from data_server.mock_provider import load_named_dataset, partition
    from data_server.storage import TagStorage
    from flops_utils.data_client import dataset_to_table

    parts = partition(load_named_dataset("mnist"), len(NODES))
    for node, part in zip(NODES, parts, strict=True):
        TagStorage(nodes_dir / node).write_table("mnist", dataset_to_table(part))


def _sla(repo_url: str) -> dict[str, Any]:
    """The example's SLA: two rounds on both nodes, the trained-model image built."""
    document = example_sla(
        ROUNDS, min_available_clients=2, min_fit_clients=2, min_evaluate_clients=2
    )
    document["ml_repo_url"] = repo_url
    document["training_configuration"]["max_clients"] = len(NODES)
    document["post_training_steps"] = ["build_image_for_trained_model"]
    return document


def _assert_gui_route(manager_url: str, mlflow_url: str, project_id: str) -> None:
    """A browser opening the project's tracking route is sent to the suite's public MLflow
    address, which answers (a login: MLflow's basic-auth app)."""
    gui = requests.get(
        f"{manager_url}/api/flops/tracking/projects/{project_id}",
        headers={"Accept": "text/html"},
        allow_redirects=False,
        timeout=10,
    )
    assert gui.status_code == 302, gui.text
    location = gui.headers["Location"]
    assert location.startswith(f"{mlflow_url}/"), location
    assert requests.get(location, timeout=10).status_code in (200, 401)


def _pulled_by_workers(double: OakestraDouble) -> set[str]:
    """The image references the double's workers pulled (``buildah from ... REF`` in the
    instances' logs)."""
    pulled = set()
    for log in (double.workdir / "instances").glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("$ buildah from "):
                pulled.add(line.split()[-1])
    return pulled


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False
