"""Trained-model images with real MLflow, buildah, skopeo, a registry v2 and a local base image.

A scikit-learn LogisticRegression trained on real MNIST rows is logged to the session's MLflow
tracking server and registered (as the aggregator does it); the module builds its image once,
runs it with ``buildah run`` and scores real MNIST rows over HTTP. The cold build, the reused
build and the image size are printed (``pytest -s``).
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.sklearn
import numpy as np
import pandas as pd
import pytest
import requests
from sklearn.linear_model import LogisticRegression
from waiting import answers_200, wait_until

from data_server.mnist import load_mnist_arrays
from flops_utils.net import find_free_port
from flops_utils.processes import stop_process_groups
from image_builder.errors import (
    DependencyInstallError,
    ModelNotFoundError,
    ModelNotServableError,
    ModelUriError,
    TrackingServerUnreachableError,
)
from image_builder.model_image import (
    LABEL_ARTIFACTS_HASH,
    LABEL_MODEL_NAME,
    LABEL_MODEL_URI,
    LABEL_MODEL_VERSION,
    LABEL_RUN_ID,
    ModelImage,
    ModelImageBuilder,
    render_model_containerfile,
)
from image_builder.oci_builder import IMAGE_UID, LABEL_INPUTS_HASH, OciBuilder
from observatory.mlflow_server import MlflowServer

pytestmark = pytest.mark.oci
SERVE_TEMPLATE = (
    Path(__file__).resolve().parents[2] / "image_builder" / "templates" / "serve_model.py"
)
TRAIN_ROWS = 600
"""MNIST rows the model is trained on (the first ones of the bundled test split)."""
SCORE_ROWS = slice(9000, 9040)
"""MNIST rows the served model scores (not trained on)."""
START_TIMEOUT_S = 120.0
"""Seconds the served model may take to answer ``/ping`` (MLflow imports take ~6 s here)."""


@dataclass(frozen=True)
class RegisteredModel:
    """A model logged to the session's MLflow server and registered as ``name`` version 1."""

    name: str
    run_id: str
    uri: str
    model: LogisticRegression
    scored: np.ndarray
    """Feature rows (float64, pixels / 255) of :data:`SCORE_ROWS`."""


def _mnist_features(rows: slice) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist_arrays()
    features = images[rows].reshape(-1, 28 * 28).astype(np.float64) / 255.0
    return features, labels[rows].astype(np.int64)


def _log_sklearn(
    model: Any, example: pd.DataFrame, name: str, extra_requirements: list[str] | None = None
) -> tuple[str, str]:
    """Log and register ``model`` as the aggregator does; return ``(run_id, models:/ URI)``."""
    requirements = mlflow.sklearn.get_default_pip_requirements(include_skops=True)
    with mlflow.start_run() as run, warnings.catch_warnings():
        # MLflow hints that the int64 class predictions cannot hold missing values
        warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer", UserWarning)
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            input_example=example,
            pip_requirements=[*requirements, *(extra_requirements or [])],
            registered_model_name=name,
        )
    return run.info.run_id, f"models:/{name}/{info.registered_model_version}"


@pytest.fixture(scope="module")
def tracking(mlflow_server: MlflowServer) -> Iterator[str]:
    """The session's MLflow server as this process's tracking URI; yields its URL."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.url)
    yield mlflow_server.url
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def registered(tracking: str) -> RegisteredModel:
    """LogisticRegression on the first :data:`TRAIN_ROWS` MNIST rows, logged and registered."""
    features, labels = _mnist_features(slice(0, TRAIN_ROWS))
    model = LogisticRegression(max_iter=300).fit(features, labels)
    name = f"mnist-{uuid.uuid4().hex[:8]}"
    run_id, uri = _log_sklearn(model, pd.DataFrame(features[:5]), name)
    scored, _ = _mnist_features(SCORE_ROWS)
    return RegisteredModel(name=name, run_id=run_id, uri=uri, model=model, scored=scored)


@pytest.fixture(scope="module")
def model_builder(
    oci_registry: str, oci_base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> ModelImageBuilder:
    """A model image builder pushing to the session's registry, FROM the local Debian base."""
    oci = OciBuilder(
        tmp_path_factory.mktemp("oci-cache"), oci_registry, oci_base_image, tls_verify=False
    )
    return ModelImageBuilder(oci)


@pytest.fixture(scope="module")
def first_build(
    model_builder: ModelImageBuilder,
    registered: RegisteredModel,
    tracking: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> ModelImage:
    """The registered model's image, built (or found in the registry) once per module."""
    image = model_builder.build(registered.uri, tracking, tmp_path_factory.mktemp("work"))
    size_mb = _uncompressed_size(image.ref) / 1e6
    print(
        f"\nmodel image: {'reused' if image.reused else 'built'} in {image.seconds:.1f} s "
        f"(build and push {image.image.seconds:.1f} s); {size_mb:.0f} MB uncompressed"
    )
    return image


# -- helpers ---------------------------------------------------------------------------------
def _tool(*args: str, timeout: float = 300) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _inspect(ref: str, *extra: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(
        _tool("skopeo", "inspect", *extra, "--tls-verify=false", f"docker://{ref}", timeout=120)
    )
    return parsed


def _uncompressed_size(ref: str) -> int:
    """Sum of the image's layer sizes in local storage (uncompressed tar), bytes."""
    manifest = _tool("buildah", "inspect", "--type", "image", "--format", "{{.Manifest}}", ref)
    return sum(int(layer["size"]) for layer in json.loads(manifest)["layers"])


class RunningModel:
    """``buildah run`` of a model image's entrypoint in the background, on the host network."""

    def __init__(self, image: ModelImage, log: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.container = _tool(
            "buildah", "from", "--tls-verify=false", f"docker://{image.pinned_ref}"
        ).strip()
        config = _inspect(image.ref, "--config")["config"]
        self.entrypoint: list[str] = config["Entrypoint"]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                ["buildah", "run", "--isolation", "chroot", "--network", "host",
                 "--env", f"PORT={port}", self.container, "--", *self.entrypoint],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Seconds until ``GET /ping`` answered 200; fails with the log on exit or timeout."""
        started = time.monotonic()

        def answers() -> bool:
            assert self.process.poll() is None, self.log.read_text(errors="replace")[-3000:]
            return answers_200(f"{self.url}/ping")

        wait_until(
            answers,
            timeout_s,
            lambda: f"no /ping: {self.log.read_text(errors='replace')[-3000:]}",
            interval_s=0.25,
        )
        return time.monotonic() - started

    def invoke(self, payload: dict[str, Any]) -> requests.Response:
        return requests.post(f"{self.url}/invocations", json=payload, timeout=60)

    def stop(self) -> None:
        stop_process_groups([self.process])
        _tool("buildah", "rm", self.container, timeout=120)


@pytest.fixture(scope="module")
def served(
    first_build: ModelImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningModel]:
    """The model image running (its entrypoint) on a free port until the module ends."""
    port = find_free_port()
    running = RunningModel(first_build, tmp_path_factory.mktemp("serve") / "serve.log", port)
    try:
        seconds = running.wait_ready()
        print(f"\nmodel image served /ping after {seconds:.1f} s")
        yield running
    finally:
        running.stop()


# -- the image -------------------------------------------------------------------------------
def test_model_image_is_pushed_labelled_and_configured(
    first_build: ModelImage, registered: RegisteredModel, oci_registry: str
) -> None:
    # Execute
    info = _inspect(first_build.ref)
    config = _inspect(first_build.ref, "--config")["config"]

    # Assert
    labels = info["Labels"]
    assert first_build.repository == f"{oci_registry}/flops/model"
    # other tests of the session (the Oakestra flow) push other model images to the repository
    assert len(first_build.tag) == 32 and first_build.tag in info["RepoTags"]
    assert info["Digest"] == first_build.digest
    assert labels[LABEL_INPUTS_HASH] == first_build.tag
    assert labels[LABEL_MODEL_URI] == registered.uri
    assert labels[LABEL_MODEL_NAME] == registered.name
    assert labels[LABEL_MODEL_VERSION] == "1"
    assert labels[LABEL_RUN_ID] == registered.run_id
    assert labels[LABEL_ARTIFACTS_HASH] == first_build.artifacts_hash
    assert labels["org.flops.mlflow-version"] == mlflow.__version__
    assert first_build.resolved.run_id == registered.run_id
    assert first_build.port == 8080
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["/opt/flops/venv/bin/python", "/opt/flops/serve_model.py"]
    assert "PORT=8080" in config["Env"] and "8080/tcp" in config["ExposedPorts"]


def test_model_image_holds_mlflow_skinny_and_the_model_only(first_build: ModelImage) -> None:
    # Prepare
    code = (
        "import importlib.metadata as m, json, os; print(json.dumps({'uid': os.getuid(), "
        "'dists': sorted(d.metadata['Name'].lower() for d in m.distributions()), "
        "'model': sorted(os.listdir('/opt/flops/model')), "
        "'writable': os.access('/opt/flops/model', os.W_OK)}))"
    )
    container = _tool("buildah", "from", "--tls-verify=false", f"docker://{first_build.pinned_ref}")

    # Execute
    try:
        output = _tool(
            "buildah", "run", "--isolation", "chroot", container.strip(), "--",
            "python", "-c", code,
        )  # fmt: skip
    finally:
        _tool("buildah", "rm", container.strip(), timeout=120)
    seen = json.loads(output.strip().splitlines()[-1])

    # Assert: the small MLflow, the model's libraries, a read-only model, the non-root user
    dists = set(seen["dists"])
    assert seen["uid"] == IMAGE_UID
    assert {"mlflow-skinny", "scikit-learn", "skops", "numpy", "pandas", "uvicorn"} <= dists
    assert not {"mlflow", "flask", "sqlalchemy", "alembic", "matplotlib"} & dists
    assert "MLmodel" in seen["model"] and seen["writable"] is False
    assert _uncompressed_size(first_build.ref) < 700_000_000


def test_served_model_predicts_like_the_trained_model(
    served: RunningModel, registered: RegisteredModel
) -> None:
    # Prepare
    frame = pd.DataFrame(registered.scored)
    expected = registered.model.predict(registered.scored).tolist()

    # Execute
    split = served.invoke({"dataframe_split": frame.to_dict(orient="split")})
    inputs = served.invoke({"inputs": registered.scored.tolist()})
    health = requests.get(f"{served.url}/health", timeout=10)
    version = requests.get(f"{served.url}/version", timeout=10)

    # Assert
    assert split.status_code == 200, split.text
    assert split.json() == {"predictions": expected}
    assert inputs.status_code == 200, inputs.text
    assert inputs.json() == {"predictions": expected}
    assert len(set(expected)) > 3  # a real classifier, not a constant
    assert health.status_code == 200
    assert version.text == mlflow.__version__


def test_served_model_rejects_input_of_the_wrong_shape(served: RunningModel) -> None:
    # Execute
    response = served.invoke({"inputs": [[0.0, 1.0, 2.0]]})

    # Assert: MLflow's schema enforcement answers 400 with its error document
    assert response.status_code == 400
    assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "missing inputs" in response.json()["message"].lower()


def test_same_model_again_reuses_the_image(
    model_builder: ModelImageBuilder,
    first_build: ModelImage,
    registered: RegisteredModel,
    tracking: str,
    tmp_path: Path,
) -> None:
    # Execute
    steps: list[tuple[str, dict[str, Any]]] = []
    again = model_builder.build(
        registered.uri, tracking, tmp_path / "work",
        on_progress=lambda step, data: steps.append((step, data)),
    )  # fmt: skip
    print(f"\nmodel image reused in {again.seconds:.2f} s")

    # Assert
    assert again.reused and again.image.reused
    assert (again.tag, again.digest) == (first_build.tag, first_build.digest)
    assert again.seconds < 10.0
    assert list((tmp_path / "work").iterdir()) == []
    assert [step for step, _ in steps] == ["base_resolved", "model_downloaded", "image_reused"]
    assert steps[1][1]["model_uri"] == again.resolved.uri
    assert steps[2][1]["ref"] == again.pinned_ref


def test_alias_resolves_to_the_same_pinned_image(
    model_builder: ModelImageBuilder,
    first_build: ModelImage,
    registered: RegisteredModel,
    tracking: str,
    tmp_path: Path,
) -> None:
    # Prepare
    mlflow.MlflowClient(tracking).set_registered_model_alias(registered.name, "champion", "1")

    # Execute
    by_alias = model_builder.build(f"models:/{registered.name}@champion", tracking, tmp_path)

    # Assert
    assert by_alias.resolved.uri == registered.uri and by_alias.resolved.version == "1"
    assert by_alias.reused and by_alias.digest == first_build.digest


def test_run_uri_gets_its_own_labels_on_the_same_dependency_layers(
    model_builder: ModelImageBuilder,
    first_build: ModelImage,
    registered: RegisteredModel,
    tracking: str,
    tmp_path: Path,
) -> None:
    # Prepare
    uri = f"runs:/{registered.run_id}/model"

    # Execute
    by_run = model_builder.build(uri, tracking, tmp_path)
    print(f"\nmodel image for {uri}: {by_run.seconds:.1f} s")

    # Assert: other labels; MLflow writes the URI's registry name and version (none here) into
    # the downloaded registered_model_meta, so only the model layer differs
    info = _inspect(by_run.ref)
    first_layers = _inspect(first_build.ref)["Layers"]
    assert not by_run.reused and by_run.tag != first_build.tag
    assert by_run.artifacts_hash != first_build.artifacts_hash
    assert info["Labels"][LABEL_MODEL_URI] == uri
    assert info["Labels"][LABEL_RUN_ID] == registered.run_id
    assert info["Labels"][LABEL_MODEL_NAME] == info["Labels"][LABEL_MODEL_VERSION] == ""
    assert info["Layers"][:-1] == first_layers[:-1]
    assert info["Layers"][-1] != first_layers[-1]


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "uri",
    [
        "models:/{name}/7",
        "models:/no-such-model-flops/1",
        "runs:/0123456789abcdef0123456789abcdef/model",
        "models:/{name}@no-such-alias",
    ],
    ids=["version", "name", "run", "alias"],
)
def test_unknown_model_is_a_clean_error(
    model_builder: ModelImageBuilder,
    registered: RegisteredModel,
    tracking: str,
    tmp_path: Path,
    uri: str,
) -> None:
    # Prepare
    uri = uri.format(name=registered.name)

    # Execute
    with pytest.raises(ModelNotFoundError) as caught:
        model_builder.build(uri, tracking, tmp_path / "work")

    # Assert
    message = caught.value.message
    assert caught.value.code == "model_not_found"
    assert message.startswith(f"The model {uri} does not exist in the MLflow tracking server")
    assert "\n" not in message and len(message) < 600
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []


def test_artifacts_that_are_not_a_model_are_refused(
    model_builder: ModelImageBuilder, tracking: str, tmp_path: Path
) -> None:
    # Prepare: a run holding a plain text artifact
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("not a model\n")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(notes), artifact_path="notes")

    # Execute
    with pytest.raises(ModelNotServableError) as caught:
        model_builder.build(f"runs:/{run.info.run_id}/notes", tracking, tmp_path / "work")

    # Assert
    assert caught.value.code == "model_not_servable"
    assert "no MLmodel file; found README.txt" in caught.value.message


def test_unreachable_tracking_server_is_a_clean_error(
    model_builder: ModelImageBuilder, tmp_path: Path
) -> None:
    # Prepare: nothing listens there
    dead = f"http://127.0.0.1:{find_free_port()}"

    # Execute
    with pytest.raises(TrackingServerUnreachableError) as caught:
        model_builder.build("models:/anything/1", dead, tmp_path / "work")

    # Assert
    assert caught.value.code == "tracking_server_unreachable"
    assert caught.value.message == (
        f"Cannot reach the MLflow tracking server at {dead} (Connection refused); start it or "
        "fix the tracking URL (FLOPS_MLFLOW_URL)."
    )


def test_uninstallable_model_requirement_is_the_resolvers_message(
    model_builder: ModelImageBuilder, tracking: str, tmp_path: Path
) -> None:
    # Prepare: a model logged with a requirement no index has
    features, labels = _mnist_features(slice(0, 200))
    model = LogisticRegression(max_iter=100).fit(features, labels)
    name = f"broken-{uuid.uuid4().hex[:8]}"
    _, uri = _log_sklearn(
        model, pd.DataFrame(features[:2]), name, ["this-package-does-not-exist-flops==1.0"]
    )

    # Execute
    started = time.monotonic()
    with pytest.raises(DependencyInstallError) as caught:
        model_builder.build(uri, tracking, tmp_path / "work")
    print(f"\nfailed model image build: {time.monotonic() - started:.1f} s")

    # Assert
    message = caught.value.message
    assert caught.value.code == "dependency_install_failed"
    assert message.startswith(f"Cannot install the requirements of the model {uri}: ")
    assert "this-package-does-not-exist-flops" in message
    assert "\n" not in message and len(message) < 700
    assert message.endswith(
        "Fix the model's pip requirements (its requirements.txt) and log it again."
    )


@pytest.mark.parametrize(
    "uri", ["s3://bucket/model", "models:/", "models:/a/1/2", "runs:/abc", "model.pkl", ""]
)
def test_malformed_model_uri_is_refused_before_any_work(tmp_path: Path, uri: str) -> None:
    # Prepare: a builder whose registry and base image do not exist
    oci = OciBuilder(tmp_path / "cache", "127.0.0.1:9", "127.0.0.1:9/flops/base:x")

    # Execute
    with pytest.raises(ModelUriError) as caught:
        ModelImageBuilder(oci).build(uri, "http://127.0.0.1:9", tmp_path / "work")

    # Assert
    assert caught.value.code == "model_uri_invalid"
    assert "models:/<name>/<version>" in caught.value.message
    assert not (tmp_path / "work").exists()


# -- no build needed -------------------------------------------------------------------------
def test_containerfile_installs_before_copying_the_model() -> None:
    # Execute
    text = render_model_containerfile(
        "reg:5000/flops/base@sha256:abc", "python3", {LABEL_MODEL_URI: 'models:/m "x" $HOME'}, 9000
    )

    # Assert
    order = [
        text.index("FROM reg:5000/flops/base@sha256:abc"),
        text.index("RUN useradd --uid 10001"),
        text.index("install.sh python3 /opt/flops/build/requirements.txt"),
        text.index("COPY serve_model.py /opt/flops/serve_model.py"),
        text.index("COPY model/ /opt/flops/model/"),
        text.index("PORT=9000"),
        text.index(f'LABEL {LABEL_MODEL_URI}="models:/m \\"x\\" \\$HOME"'),
        text.index("USER 10001:10001"),
        text.index("EXPOSE 9000"),
        text.index('ENTRYPOINT ["/opt/flops/venv/bin/python", "/opt/flops/serve_model.py"]'),
    ]
    assert order == sorted(order)


@pytest.mark.parametrize("port", ["abc", "0", "70000"])
def test_entrypoint_refuses_a_bad_port(port: str) -> None:
    # Execute
    result = subprocess.run(
        [sys.executable, str(SERVE_TEMPLATE)],
        env={**os.environ, "PORT": port},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Assert
    assert result.returncode == 2
    assert result.stderr.strip() == f"serve_model: PORT={port!r} is not an integer in 1..65535"


def test_serving_pins_are_the_managers_mlflow(tmp_path: Path) -> None:
    # Prepare
    builder = ModelImageBuilder(OciBuilder(tmp_path, "127.0.0.1:9", "127.0.0.1:9/flops/base:x"))

    # Execute
    pins = builder.serving_pins

    # Assert: the skinny distribution of the manager's own MLflow
    assert importlib.metadata.version("mlflow-skinny") == mlflow.__version__
    assert pins == [f"mlflow-skinny=={mlflow.__version__}"]
