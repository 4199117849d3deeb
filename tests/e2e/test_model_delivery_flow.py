"""The trained model delivered on the embedded default (venv builder, local backend).

Real Mosquitto, MLflow, data servers and Flower training, as in ``test_project_flow``.

Without the embedded registry (``FLOPS_EMBEDDED_REGISTRY=false``): an SLA with
``deploy_trained_model_image`` ends ``completed`` with an ``inference_url`` served from a
virtualenv, whose ``/invocations`` answers real MNIST rows with the digits the trained model
predicts; ``flops model download`` gives a model that loads with ``mlflow.pyfunc`` and
predicts the same, and ``flops model serve --no-image`` serves it too. DELETE of the project
stops the server.

With nothing set (no ``FLOPS_REGISTRY``, no ``FLOPS_BASE_IMAGE``) the manager runs its own
registry and makes the base image itself (debootstrap, cached under ``~/.cache/flops``): both
steps end ``completed`` with ``model_image`` in that registry and an ``inference_url`` served
by the image in the local Docker engine, and ``flops model pull`` + ``flops model serve`` give
the same answers.
"""

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests
from flow_testing import MockNodes, with_settings
from waiting import answers_200, wait_until

from flops_manager import model_delivery as md
from flops_manager.auth import read_api_token
from flops_manager.client import ApiError, ManagerClient
from flops_manager.config import ManagerConfig
from flops_manager.demo import example_sla, run_project
from flops_manager.embedded import EmbeddedState
from flops_manager.suite import ManagerSuite
from flops_utils.net import find_free_port
from observatory.mlflow_server import MlflowServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROJECT_TIMEOUT_S = 420
SERVE_TIMEOUT_S = 240
SCORED = range(9000, 9040)
"""MNIST rows the served model scores."""


@pytest.fixture(scope="module")
def rows(mnist: Any) -> pd.DataFrame:
    """Real MNIST rows as the learners see them (pixels / 255, flattened)."""
    digits = mnist.select(SCORED).with_format("numpy")
    images = np.asarray(digits["image"][:], dtype=np.float64).reshape(len(SCORED), -1) / 255.0
    return pd.DataFrame(images)


def _run(client: ManagerClient, steps: list[str]) -> dict[str, Any]:
    """The example project with ``steps``, run to its end."""
    sla = example_sla(2, min_available_clients=2, min_fit_clients=2, min_evaluate_clients=2)
    sla["post_training_steps"] = steps
    return run_project(client, sla, PROJECT_TIMEOUT_S)


def _expected(
    project: dict[str, Any], mlflow_server: MlflowServer, rows: pd.DataFrame
) -> list[int]:
    """The digits the project's trained model predicts for :func:`rows`, loaded with MLflow."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.url)
    model = mlflow.pyfunc.load_model(project["mlflow"]["registered_model_uri"])
    return [int(d) for d in np.asarray(model.predict(rows))]


def _predict(url: str, rows: pd.DataFrame) -> list[int]:
    answer = requests.post(
        f"{url}/invocations",
        json={"dataframe_split": rows.to_dict(orient="split")},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return [int(d) for d in answer.json()["predictions"]]


def _cli_env(tmp_path: Path) -> dict[str, str]:
    uv_cache = os.environ.get("UV_CACHE_DIR") or str(Path.home() / ".cache" / "uv")
    return {
        **os.environ,
        "COLUMNS": "200",
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "UV_CACHE_DIR": uv_cache,
    }


def _flops(suite: ManagerSuite, *args: str) -> list[str]:
    token = read_api_token(suite.config.home)
    assert token is not None
    flops = str(Path(sys.executable).with_name("flops"))
    return [flops, *args, "--manager-url", suite.url, "--token", token]


class TestWithoutARegistry:
    """No registry (``FLOPS_EMBEDDED_REGISTRY=false``): the model is served from a
    virtualenv made for it."""

    @pytest.fixture(scope="class")
    def suite(self, manager_config: ManagerConfig) -> Iterator[ManagerSuite]:
        with ManagerSuite(with_settings(manager_config, embedded_registry=False)) as running:
            yield running

    @pytest.fixture(scope="class")
    def client(self, suite: ManagerSuite, mnist_nodes: MockNodes) -> Iterator[ManagerClient]:
        with mnist_nodes(suite, 2) as api:
            yield api

    @pytest.fixture(scope="class")
    def served(self, client: ManagerClient) -> dict[str, Any]:
        return _run(client, ["deploy_trained_model_image"])

    @pytest.fixture(scope="class")
    def expected(
        self, served: dict[str, Any], mlflow_server: MlflowServer, rows: pd.DataFrame
    ) -> list[int]:
        return _expected(served, mlflow_server, rows)

    @pytest.mark.parametrize(
        ("steps", "named"),
        [
            (["build_image_for_trained_model"], "FLOPS_REGISTRY"),
            (["build_image_for_trained_model", "deploy_trained_model_image"], "debootstrap"),
        ],
    )
    def test_building_the_model_image_is_refused_at_once_naming_the_fix(
        self, client: ManagerClient, steps: list[str], named: str
    ) -> None:
        before = client.request("GET", "/projects")["total"]
        sla = example_sla(2, min_available_clients=2)
        sla["post_training_steps"] = steps

        with pytest.raises(ApiError) as caught:
            client.create_project(sla)

        assert caught.value.status == 422
        assert "build_image_for_trained_model" in caught.value.message
        assert named in caught.value.message and "FLOPS_EMBEDDED_REGISTRY" in caught.value.message
        assert client.request("GET", "/projects")["total"] == before  # nothing was created

    def test_the_deployed_model_serves_the_digits_the_trained_model_predicts(
        self, served: dict[str, Any], rows: pd.DataFrame, expected: list[int]
    ) -> None:
        assert served["status"] == "completed", served["status_message"]
        url = served["inference_url"]
        assert url and url.startswith("http://127.0.0.1:")
        deployed = [e for e in served["events"] if e["status"] == "deployed"]
        assert deployed and url in deployed[0]["message"]
        assert not [e for e in served["events"] if e["status"] == "skipped"]

        assert _predict(url, rows) == expected
        assert len(set(expected)) >= 5  # real digits, not one class

    def test_flops_model_download_gives_a_model_that_predicts_the_same(
        self,
        suite: ManagerSuite,
        served: dict[str, Any],
        rows: pd.DataFrame,
        expected: list[int],
        tmp_path: Path,
    ) -> None:
        import mlflow

        target = tmp_path / "model"
        done = subprocess.run(
            _flops(suite, "model", "download", served["project_id"], str(target)),
            capture_output=True, text=True, env=_cli_env(tmp_path), timeout=180, check=False,
        )  # fmt: skip

        assert done.returncode == 0, done.stdout + done.stderr
        assert served["mlflow"]["registered_model_uri"] in done.stdout
        assert (target / "MLmodel").is_file()
        model = mlflow.pyfunc.load_model(str(target))
        assert [int(d) for d in np.asarray(model.predict(rows))] == expected

    def test_flops_model_serve_no_image_serves_the_same_until_stopped(
        self,
        suite: ManagerSuite,
        served: dict[str, Any],
        rows: pd.DataFrame,
        expected: list[int],
        tmp_path: Path,
    ) -> None:
        port = find_free_port()
        command = _flops(suite, "model", "serve", served["project_id"], "--no-image")
        log = (tmp_path / "serve.log").open("w")
        server = subprocess.Popen(
            [*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
            env=_cli_env(tmp_path), start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(
                lambda: answers_200(f"{url}/ping") or server.poll() is not None,
                timeout_s=SERVE_TIMEOUT_S,
            )
            # the server answers /ping a moment before the CLI prints its line
            wait_until(
                lambda: (
                    "serving at" in (tmp_path / "serve.log").read_text()
                    or server.poll() is not None
                ),
                timeout_s=30,
            )
            output = (tmp_path / "serve.log").read_text()
            assert server.poll() is None, output
            assert f"serving at {url}/invocations" in output

            assert _predict(url, rows) == expected
        finally:
            server.send_signal(signal.SIGTERM)
            returncode = server.wait(timeout=30)
            log.close()
        assert returncode == 0, (tmp_path / "serve.log").read_text()
        assert not answers_200(f"{url}/ping")

    def test_delete_stops_the_trained_model_server(
        self, client: ManagerClient, served: dict[str, Any]
    ) -> None:
        url = served["inference_url"]
        assert answers_200(f"{url}/ping")

        stopped = client.request("DELETE", f"/projects/{served['project_id']}")

        assert stopped["status"] == "completed"
        assert stopped["inference_url"] is None
        wait_until(lambda: not answers_200(f"{url}/ping"), timeout_s=20)


@pytest.mark.oci
class TestNothingSet:
    """No FLOPS_REGISTRY, no FLOPS_BASE_IMAGE: the suite runs its own registry and the
    manager makes the base image; the venv builder's manager builds the trained-model image,
    and the local backend runs it in the local Docker engine."""

    @pytest.fixture(scope="class")
    def suite(
        self,
        manager_config: ManagerConfig,
        oci_tools: None,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[ManagerSuite]:
        config = with_settings(manager_config, home=tmp_path_factory.mktemp("flops-home-nothing"))
        assert not config.registry and not config.base_image
        with ManagerSuite(config) as running:
            yield running

    @pytest.fixture(scope="class")
    def client(self, suite: ManagerSuite, mnist_nodes: MockNodes) -> Iterator[ManagerClient]:
        if md.docker_engine() is None:
            pytest.fail("no Docker engine answers (scripts/bootstrap starts dockerd)")
        with mnist_nodes(suite, 2) as api:
            yield api

    @pytest.fixture(scope="class")
    def served(self, client: ManagerClient) -> Iterator[dict[str, Any]]:
        project = _run(client, ["build_image_for_trained_model", "deploy_trained_model_image"])
        yield project
        client.request("DELETE", f"/projects/{project['project_id']}")
        engine = md.docker_engine()
        image = project.get("model_image") or {}
        if engine is not None and image.get("ref"):  # the model image pulled into dockerd
            for pulled in engine.images.list(name=str(image["ref"]).split("@")[0]):
                engine.images.remove(pulled.id, force=True)

    @pytest.fixture(scope="class")
    def expected(
        self, served: dict[str, Any], mlflow_server: MlflowServer, rows: pd.DataFrame
    ) -> list[int]:
        return _expected(served, mlflow_server, rows)

    def test_both_steps_end_completed_with_the_image_serving_the_model(
        self,
        suite: ManagerSuite,
        served: dict[str, Any],
        rows: pd.DataFrame,
        expected: list[int],
    ) -> None:
        assert served["status"] == "completed", served["status_message"]
        image = served["model_image"]
        health = requests.get(f"{suite.url}/healthz", timeout=5).json()
        assert health["components"]["registry"] == {"status": "ok"}
        registry = EmbeddedState(suite.config.home.resolve()).port("registry")
        assert image and image["ref"].startswith(f"127.0.0.1:{registry}/flops/model@sha256:")
        messages = [e["message"] for e in served["events"]]
        assert any(f"base image pushed to 127.0.0.1:{registry}/flops/base:" in m for m in messages)
        assert image["model_uri"] == served["mlflow"]["registered_model_uri"]
        project_id = served["project_id"]
        engine = md.docker_engine()
        assert engine is not None
        running = engine.containers.list(filters={"label": f"{md.CONTAINER_LABEL}={project_id}"})
        assert len(running) == 1
        assert image["ref"] in running[0].image.attrs["RepoDigests"]
        limits = running[0].attrs["HostConfig"]  # the SLA's default resource_constraints
        assert (limits["Memory"], limits["NanoCpus"]) == (2000 * 2**20, 10**9)

        assert _predict(served["inference_url"], rows) == expected

    def test_flops_model_pull_and_serve_give_the_same_answers(
        self,
        suite: ManagerSuite,
        served: dict[str, Any],
        rows: pd.DataFrame,
        expected: list[int],
        tmp_path: Path,
    ) -> None:
        project_id = served["project_id"]
        pulled = subprocess.run(
            _flops(suite, "model", "pull", project_id),
            capture_output=True, text=True, env=_cli_env(tmp_path), timeout=300, check=False,
        )  # fmt: skip
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        assert f"pulled {served['model_image']['ref']}" in pulled.stdout

        port = find_free_port()
        log = (tmp_path / "serve.log").open("w")
        server = subprocess.Popen(
            [*_flops(suite, "model", "serve", project_id), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=_cli_env(tmp_path),
            start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(
                lambda: answers_200(f"{url}/ping") or server.poll() is not None,
                timeout_s=SERVE_TIMEOUT_S,
            )
            assert server.poll() is None, (tmp_path / "serve.log").read_text()

            assert _predict(url, rows) == expected
        finally:
            server.send_signal(signal.SIGTERM)
            returncode = server.wait(timeout=60)
            log.close()
        assert returncode == 0, (tmp_path / "serve.log").read_text()
        assert not answers_200(f"{url}/ping")

    def test_delete_removes_the_model_container(
        self, client: ManagerClient, served: dict[str, Any]
    ) -> None:
        project_id = served["project_id"]
        engine = md.docker_engine()
        assert engine is not None
        label = {"label": f"{md.CONTAINER_LABEL}={project_id}"}

        client.request("DELETE", f"/projects/{project_id}")

        assert engine.containers.list(all=True, filters=label) == []
        assert not answers_200(f"{served['inference_url']}/ping")
