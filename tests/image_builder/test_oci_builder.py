"""The oci builder with real buildah, skopeo, a registry v2 on loopback and a local base image.

One module-wide build of the example repository (``examples/mnist_sklearn``, copied as a plain
directory) feeds most tests; the cold build, the no-op rebuild and the code-only rebuild print
their times (``pytest -s``).
"""

import importlib.metadata
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from builder_testing import copy_example
from oci_testing import layer_sizes, run_in_image, skopeo_json
from packaging.utils import canonicalize_name

from flops_utils.net import find_free_port
from image_builder.buildah import build_failure, condense_tool_error, failing_step, strip_tag
from image_builder.errors import (
    BaseImageError,
    BuildToolMissingError,
    DependencyInstallError,
    ImageBuildError,
    RegistryUnreachableError,
)
from image_builder.oci_builder import (
    IMAGE_UID,
    LABEL_INPUTS_HASH,
    UNUSED_DEPENDENCIES,
    BuiltImage,
    BuiltImages,
    OciBuilder,
    render_containerfile,
)
from image_builder.repo import content_hash

pytestmark = pytest.mark.oci
USER_ENV_CHECK = """
import importlib.metadata, importlib.util, json, os, sys
import flops_utils, flops_utils.model_worker, model_manager, data_manager, numpy, sklearn
import pyarrow, pyarrow.flight, datasets, mlflow
from flops_utils.ml_repo_templates import ModelManagerTemplate
print(json.dumps({
    "executable": sys.executable,
    "prefix": sys.prefix,
    "flops_utils": flops_utils.__file__,
    "model_manager": model_manager.__file__,
    "data_manager": data_manager.__file__,
    "is_template": issubclass(model_manager.ModelManager, ModelManagerTemplate),
    "parameters": [list(p.shape) for p in model_manager.ModelManager().get_model_parameters()],
    "flwr": importlib.util.find_spec("flwr") is not None,
    "versions": {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()},
}))
"""
"""Run in the learner image with ``$FLOPS_USER_PYTHON``: the repository's environment."""

LEARNER_CHECK = """
import importlib.metadata, importlib.util, json, os, shutil, subprocess, sys
import flops_utils, learner, flwr, numpy
import learner.main, learner.flower_client, flwr.client, flops_utils.model_worker_client
from flwr.client import start_client
site = os.path.dirname(os.path.dirname(numpy.__file__))
with open(os.path.join(site, "numpy/__pycache__/__init__.cpython-311.pyc"), "rb") as pyc:
    header = pyc.read(16)
with open(os.path.join(site, "numpy/__init__.py"), "rb") as source:
    source_hash = importlib.util.source_hash(source.read())
user = subprocess.run(
    [os.environ["FLOPS_USER_PYTHON"], "-c", USER_ENV_CHECK],
    capture_output=True, text=True, check=True,
).stdout.strip().splitlines()[-1]
print(json.dumps({
    "uid": os.getuid(),
    "cwd": os.getcwd(),
    "prefix": sys.prefix,
    "flwr": flwr.__version__,
    "numpy": numpy.__version__,
    "flops_utils": flops_utils.__file__,
    "learner": learner.__file__,
    "user": json.loads(user),
    "in_runtime": {name: importlib.util.find_spec(name) is not None
                   for name in ("mlflow", "sklearn", "pyarrow", "datasets", "pandas")},
    "compilers": [c for c in ("gcc", "cc", "g++", "clang") if shutil.which(c)],
    "caches": [p for p in ("/root/.cache", "/home/flops/.cache", "/opt/flops/venv/.cache",
                           "/opt/flops/user-venv/.cache") if os.path.exists(p)],
    "mnt": os.listdir("/mnt"),
    "repo_writable": os.access("/opt/flops/repo", os.W_OK),
    "versions": {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()},
    "test_suites": sorted(
        os.path.relpath(os.path.join(top, name), venv)
        for venv in ("/opt/flops/venv", "/opt/flops/user-venv")
        for package in ("numpy", "scipy", "pandas", "sklearn", "pyarrow")
        for top, dirs, _ in os.walk(os.path.join(venv, "lib/python3.11/site-packages", package))
        for name in dirs if name in ("tests", "test")
    ),
    "pyc_hash_checked": int.from_bytes(header[4:8], "little") == 0b11
                        and header[8:16] == source_hash,
}))
""".replace("USER_ENV_CHECK", repr(USER_ENV_CHECK))
"""Run in the learner image with its entrypoint's interpreter (FLOps' runtime)."""

FLOWER_ROUNDS = """
import faulthandler, importlib.metadata, json, os, socket, sys, threading
faulthandler.dump_traceback_later(120, exit=True)
import numpy as np
from flwr.server import Server, ServerConfig, SimpleClientManager
from flwr.server.server import run_fl
from flwr.server.strategy import FedAvg
from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server
from flops_utils.model_worker_client import ModelWorker
from learner.flower_client import run_client
# the example's ModelManager with random data instead of the data server's
os.makedirs("/tmp/repo", exist_ok=True)
with open("/tmp/repo/model_manager.py", "w") as wrapper:
    wrapper.write(
        "import importlib.util, numpy as np\\n"
        "spec = importlib.util.spec_from_file_location("
        "'example', '/opt/flops/repo/model_manager.py')\\n"
        "example = importlib.util.module_from_spec(spec)\\n"
        "spec.loader.exec_module(example)\\n"
        "class ModelManager(example.ModelManager):\\n"
        "    def set_model_data(self):\\n"
        "        rng = np.random.default_rng(0)\\n"
        "        self.train = self.test = (rng.random((60, 784)), np.arange(60) % 10)\\n"
    )
probe = socket.socket()
probe.bind(("127.0.0.1", 0))
address = f"127.0.0.1:{probe.getsockname()[1]}"
probe.close()
clients = SimpleClientManager()
strategy = FedAvg(min_fit_clients=1, min_evaluate_clients=1, min_available_clients=1)
grpc_server = start_grpc_server(client_manager=clients, server_address=address)
def serve():
    try:
        run_fl(Server(client_manager=clients, strategy=strategy), ServerConfig(num_rounds=2))
    finally:
        grpc_server.stop(grace=1)
server = threading.Thread(target=serve, daemon=True)
server.start()
env = {**os.environ, "PYTHONPATH": "/opt/flops/runtime"}
with ModelWorker("/tmp/repo", env=env) as manager:
    manager.set_model_data()
    stats = run_client(manager, address, max_wait_s=30)
    worker = manager.facts
server.join(30)
top = {name.split(".")[0] for name in sys.modules}
owners = importlib.metadata.packages_distributions()
print(json.dumps({
    "fit_rounds": stats.fit_rounds,
    "evaluate_rounds": stats.evaluate_rounds,
    "worker": worker,
    "modules": sorted(top),
    "distributions": sorted({d.lower() for name in top for d in owners.get(name, [])}),
}))
"""
"""Two Flower rounds in the learner image: the FLOps learner's client (``learner.flower_client``,
``start_client``, in FLOps' runtime) against Flower's gRPC server, on loopback, with the
example's ModelManager in a model worker (``$FLOPS_USER_PYTHON``, the repository's environment)."""

AGGREGATOR_CHECK = """
import importlib.metadata, json, mlflow, aggregator.main, flops_manager.sla
import aggregator.flower_server, aggregator.tracking, flops_utils
from flwr.server import start_server, Server, ServerConfig, SimpleClientManager
from flwr.server.strategy import FedAvg
print(json.dumps({
    "mlflow": mlflow.__version__,
    "aggregator": aggregator.main.__file__,
    "dists": sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions()),
}))
"""


MLFLOW_2024_CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "sklearn_mlflow2024"
"""A repository with the conda.yaml MLflow 2.12 writes (exact 2024 pins, Python 3.10)."""

MLFLOW_2024_CONDA = """\
channels:
- conda-forge
dependencies:
- python=3.10.14
- pip<=24.0
- mlflow=2.12.1
- numpy=1.26.4
- scipy=1.13.0
- pyyaml=6.0.1
- packaging=24.0
- psutil=5.9.8
- cloudpickle=3.0.0
- scikit-learn=1.4.2
name: mlflow-env
"""

VERSIONS_CHECK = """
import importlib.metadata, json, os, subprocess, sys
code = (
    "import importlib.metadata, json, sys, flops_utils.model_worker, model_manager, mlflow\\n"
    "print(json.dumps({'prefix': sys.prefix, 'mlflow': mlflow.__version__, 'versions': "
    "{d.metadata['Name'].lower(): d.version for d in importlib.metadata.distributions()}}))"
)
user = subprocess.run(
    [os.environ["FLOPS_USER_PYTHON"], "-c", code], capture_output=True, text=True, check=True
).stdout.strip().splitlines()[-1]
print(json.dumps({
    "prefix": sys.prefix,
    "versions": {d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions()},
    "user": json.loads(user),
}))
"""
"""The versions of both environments of a learner image, and the repository's imports."""


def _inspect(ref: str) -> dict[str, object]:
    return skopeo_json("inspect", "--tls-verify=false", f"docker://{ref}")


def _run_in_image(image: BuiltImage, code: str) -> dict[str, object]:
    """Run ``python -c code`` in a container of the pushed image (pulled by digest)."""
    return run_in_image(image.pinned_ref, code)


def _uncompressed_size(image: BuiltImage) -> int:
    """Sum of the image's layer sizes in local storage (uncompressed tar), bytes."""
    return sum(layer_sizes(image.ref))


@pytest.fixture(scope="module")
def oci_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("oci-cache")


@pytest.fixture(scope="module")
def builder(oci_registry: str, oci_base_image: str, oci_cache: Path) -> OciBuilder:
    """A builder pushing to the session's loopback registry, FROM the local Debian base."""
    return OciBuilder(oci_cache, oci_registry, oci_base_image, tls_verify=False)


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example repository as a plain directory (module-wide), with a file of its own: the
    same content built by other tests of the session (the Oakestra flow) would be reused,
    labelled with their copy's path as its source."""
    path = copy_example(tmp_path_factory.mktemp("repos") / "mnist")
    (path / "OCI_BUILDER_TEST.md").write_text("built by tests/image_builder/test_oci_builder.py\n")
    return path


@pytest.fixture(scope="module")
def first_build(
    builder: OciBuilder, example_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> BuiltImages:
    """The example's learner and aggregator images, built and pushed once per module."""
    images = builder.build(
        str(example_dir), None, tmp_path_factory.mktemp("work"), flavor="sklearn"
    )
    sizes = {image.role: layer_sizes(image.ref) for image in images.images}
    print(
        f"\nfirst build of the example images: {images.seconds:.1f} s "
        f"(learner {images.learner.seconds:.1f} s, aggregator {images.aggregator.seconds:.1f} s; "
        f"reused: {images.cache_hit}); uncompressed MB per layer: "
        + "; ".join(
            f"{role} {sum(layers) / 1e6:.0f} = {'+'.join(f'{s / 1e6:.0f}' for s in layers)}"
            for role, layers in sizes.items()
        )
    )
    return images


@pytest.fixture(scope="module")
def mlflow2024_build(
    builder: OciBuilder, first_build: BuiltImages, tmp_path_factory: pytest.TempPathFactory
) -> BuiltImages:
    """The images of an MLflow-2024-style repository (the corpus's, else the example with that
    conda.yaml), built after the example's (whose FLOps runtime layers they reuse)."""
    path = tmp_path_factory.mktemp("repos") / "mlflow2024"
    if (MLFLOW_2024_CORPUS / "conda.yaml").is_file():
        shutil.copytree(MLFLOW_2024_CORPUS, path, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        copy_example(path)
        (path / "conda.yaml").write_text(MLFLOW_2024_CONDA, encoding="utf-8")
    images = builder.build(str(path), None, tmp_path_factory.mktemp("work"), flavor="sklearn")
    sizes = {image.role: layer_sizes(image.ref) for image in images.images}
    print(
        f"\nbuild of the MLflow-2024 repository's images: {images.seconds:.1f} s; uncompressed "
        "MB per layer: "
        + "; ".join(
            f"{role} {sum(layers) / 1e6:.0f} = {'+'.join(f'{s / 1e6:.0f}' for s in layers)}"
            for role, layers in sizes.items()
        )
    )
    return images


# -- real builds -----------------------------------------------------------------------------
def test_images_are_pushed_tagged_by_inputs_and_labelled(
    first_build: BuiltImages, example_dir: Path, oci_registry: str
) -> None:
    # Execute
    found = {image.role: _inspect(image.ref) for image in first_build.images}

    # Assert
    assert first_build.commit == content_hash(example_dir)
    assert len(first_build.key) == 32
    for image in first_build.images:
        info = found[image.role]
        labels = info["Labels"]
        assert isinstance(labels, dict)
        assert image.repository == f"{oci_registry}/flops/{image.role}"
        assert image.tag == first_build.key
        assert isinstance(info["RepoTags"], list)
        assert first_build.key in info["RepoTags"]  # other modules push other keys
        assert info["Digest"] == image.digest
        assert labels[LABEL_INPUTS_HASH] == first_build.key
        assert labels["org.opencontainers.image.source"] == str(example_dir)
        assert labels["org.opencontainers.image.revision"] == first_build.commit
        assert labels["org.opencontainers.image.title"] == f"flops-{image.role}"
        assert labels["org.flops.ml-model-flavor"] == "sklearn"
        config = skopeo_json("inspect", "--config", "--tls-verify=false", f"docker://{image.ref}")
        settings = config["config"]
        assert isinstance(settings, dict)
        assert settings["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
        assert settings["Entrypoint"] == ["/opt/flops/venv/bin/python", "-m", image.role]
        assert "FLOPS_ML_REPO_DIR=/opt/flops/repo" in settings["Env"]
        assert "FLOPS_USER_PYTHON=/opt/flops/user-venv/bin/python" in settings["Env"]


def test_learner_image_runs_flops_runtime_and_repository(first_build: BuiltImages) -> None:
    # Execute
    seen = _run_in_image(first_build.learner, LEARNER_CHECK)

    # Assert: the runtime and the repository import as the non-root user, nothing else left
    assert seen["uid"] == IMAGE_UID
    assert seen["cwd"] == "/opt/flops/repo"
    assert seen["prefix"] == "/opt/flops/venv"
    assert seen["flwr"] == importlib.metadata.version("flwr")
    assert seen["numpy"] == importlib.metadata.version("numpy")
    assert seen["flops_utils"] == "/opt/flops/runtime/flops_utils/__init__.py"
    assert seen["learner"] == "/opt/flops/runtime/learner/__init__.py"
    # FLOps' runtime holds no user code's packages, no data loading, no MLflow
    assert seen["in_runtime"] == dict.fromkeys(
        ("mlflow", "sklearn", "pyarrow", "datasets", "pandas"), False
    )
    assert seen["compilers"] == [] and seen["caches"] == [] and seen["mnt"] == []
    assert seen["repo_writable"] is True
    versions = seen["versions"]
    assert isinstance(versions, dict) and {"flwr", "numpy", "paho-mqtt"} <= set(versions)
    manager = {
        canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
    }
    differing = {
        name: (version, manager[canonicalize_name(name)])
        for name, version in versions.items()
        if canonicalize_name(name) in manager and manager[canonicalize_name(name)] != version
    }
    assert differing == {}  # every distribution the manager also has is at the same version
    # the repository's environment: its code, flops_utils (PYTHONPATH), data loading, MLflow
    user = seen["user"]
    assert isinstance(user, dict)
    assert user["prefix"] == "/opt/flops/user-venv"
    assert user["flops_utils"] == "/opt/flops/runtime/flops_utils/__init__.py"
    assert user["model_manager"] == "/opt/flops/repo/model_manager.py"
    assert user["data_manager"] == "/opt/flops/repo/data_manager.py"
    assert user["is_template"] is True
    assert user["parameters"] == [[10, 784], [10]]
    assert user["flwr"] is False  # FLOps' runtime stays out of the repository's environment
    user_versions = user["versions"]
    assert isinstance(user_versions, dict)
    assert {"scikit-learn", "numpy", "pyarrow", "datasets", "mlflow"} <= set(user_versions)
    # slim: no unused server-side dependencies, no test suites, bytecode kept (hash-checked)
    assert not {canonicalize_name(name) for name in versions} & set(UNUSED_DEPENDENCIES)
    assert seen["test_suites"] == [] and seen["pyc_hash_checked"] is True
    # base 123 MB, FLOps' runtime 186 MB, the repository's environment 738 MB (the example
    # requires the full mlflow there); one merged environment was 573 MB (696 MB in all)
    layers = layer_sizes(first_build.learner.ref)
    assert layers[3] < 250_000_000  # FLOps' runtime environment
    assert _uncompressed_size(first_build.learner) < 1_150_000_000


def test_learner_image_trains_flower_rounds_without_the_left_out_packages(
    first_build: BuiltImages,
) -> None:
    # Execute
    seen = _run_in_image(first_build.learner, FLOWER_ROUNDS)

    # Assert: the learner's process imported FLOps' runtime only; sklearn ran in the worker
    print(f"\ndistributions imported by the learner's process: {seen['distributions']}")
    assert (seen["fit_rounds"], seen["evaluate_rounds"]) == (2, 2)
    worker = seen["worker"]
    assert isinstance(worker, dict)
    assert worker["python"] and "numpy" in worker["versions"]
    modules = seen["modules"]
    assert isinstance(modules, list) and {"flwr", "grpc", "learner"} <= set(modules)
    assert not {"sklearn", "pyarrow", "datasets", "pandas", "mlflow"} & set(modules)
    left_out = {"uv", "uvloop", "uvicorn", "httptools", "watchfiles", "websockets", "dotenv"}
    left_out |= {"prompt_toolkit", "wcwidth", "greenlet", "hf_xet"}
    assert not left_out & set(modules)


def test_aggregator_image_adds_mlflow_on_the_learner_layers(first_build: BuiltImages) -> None:
    # Execute
    seen = _run_in_image(first_build.aggregator, AGGREGATOR_CHECK)
    learner_layers = _inspect(first_build.learner.ref)["Layers"]
    aggregator_layers = _inspect(first_build.aggregator.ref)["Layers"]

    # Assert: base, user, FLOps' runtime and the repository's environment are the same blobs;
    # the aggregator's runtime has the MLflow tracking client (mlflow-skinny), not the server
    assert seen["mlflow"] == importlib.metadata.version("mlflow-skinny")
    assert seen["aggregator"] == "/opt/flops/runtime/aggregator/main.py"
    dists = seen["dists"]
    assert isinstance(dists, list)
    assert {"mlflow-skinny", "uvicorn", "python-dotenv", "sqlalchemy", "alembic"} <= set(dists)
    assert not {"mlflow", "pandas", "scikit-learn", "matplotlib"} & set(dists)
    assert not {"uv", "uvloop", "prompt-toolkit", "greenlet"} & set(dists)
    assert isinstance(learner_layers, list) and isinstance(aggregator_layers, list)
    assert learner_layers[:6] == aggregator_layers[:6]
    assert learner_layers[6:] != aggregator_layers[6:]


def test_repository_pins_clashing_with_flower_build_in_their_own_environment(
    first_build: BuiltImages, mlflow2024_build: BuiltImages
) -> None:
    # Execute: numpy==1.26.4 and pyyaml==6.0.1 against Flower 1.41 (pyyaml>=6.0.2), numpy 2
    seen = _run_in_image(mlflow2024_build.learner, VERSIONS_CHECK)
    example_layers = _inspect(first_build.learner.ref)["Layers"]
    layers = _inspect(mlflow2024_build.learner.ref)["Layers"]

    # Assert: the repository's environment has its pins, FLOps' runtime the manager's versions
    user = seen["user"]
    assert isinstance(user, dict) and user["prefix"] == "/opt/flops/user-venv"
    user_versions = user["versions"]
    assert isinstance(user_versions, dict)
    assert user_versions["numpy"] == "1.26.4" and user_versions["pyyaml"] == "6.0.1"
    assert user_versions["scipy"] == "1.13.0" and user_versions["scikit-learn"] == "1.4.2"
    assert user["mlflow"] == "2.12.1"
    assert {"pyarrow", "datasets"} <= set(user_versions) and "flwr" not in user_versions
    runtime = seen["versions"]
    assert isinstance(runtime, dict) and seen["prefix"] == "/opt/flops/venv"
    assert runtime["flwr"] == importlib.metadata.version("flwr") == "1.41.0"
    assert runtime["numpy"] == importlib.metadata.version("numpy")
    assert runtime["pyyaml"] == importlib.metadata.version("pyyaml")
    # FLOps' runtime layers (base, user, runtime files, runtime environment) are the example's
    assert isinstance(example_layers, list) and isinstance(layers, list)
    assert layers[:4] == example_layers[:4] and layers[4:6] != example_layers[4:6]


def test_same_inputs_again_reuse_the_pushed_images(
    builder: OciBuilder, first_build: BuiltImages, example_dir: Path, tmp_path: Path
) -> None:
    # Execute
    steps: list[tuple[str, dict[str, Any]]] = []
    again = builder.build(
        str(example_dir), None, tmp_path / "work", flavor="sklearn",
        on_progress=lambda step, data: steps.append((step, data)),
    )  # fmt: skip
    print(f"\nno-op build: {again.seconds:.2f} s")

    # Assert
    assert again.cache_hit and all(image.reused for image in again.images)
    assert again.seconds < 2.0
    assert again.key == first_build.key
    assert [i.digest for i in again.images] == [i.digest for i in first_build.images]
    assert not any((tmp_path / "work").iterdir())
    # the milestones: nothing built, both images reused
    assert [step for step, _ in steps] == [
        "base_resolved", "repository_fetched", "image_reused", "image_reused",
    ]  # fmt: skip
    assert steps[1][1]["commit"] == again.commit
    assert [data["ref"] for _, data in steps[2:]] == [i.pinned_ref for i in again.images]


def test_code_only_change_rebuilds_only_the_repository_layer(
    builder: OciBuilder, first_build: BuiltImages, tmp_path: Path
) -> None:
    # Prepare: the same repository with an edited model_manager.py
    path = copy_example(tmp_path / "edited")
    model_manager = path / "model_manager.py"
    model_manager.write_text(model_manager.read_text() + "\n# tuned\n", encoding="utf-8")

    # Execute
    edited = builder.build(str(path), None, tmp_path / "work", flavor="sklearn")
    print(f"\ncode-only rebuild of both images: {edited.seconds:.1f} s")

    # Assert
    assert not edited.cache_hit and edited.key != first_build.key
    for before, after in zip(first_build.images, edited.images, strict=True):
        old_layers = _inspect(before.ref)["Layers"]
        new_layers = _inspect(after.ref)["Layers"]
        assert isinstance(old_layers, list) and isinstance(new_layers, list)
        assert new_layers[:-1] == old_layers[:-1]
        assert new_layers[-1] != old_layers[-1]
    assert edited.seconds < 60


def test_uninstallable_dependency_is_a_clean_error(builder: OciBuilder, tmp_path: Path) -> None:
    # Prepare
    path = copy_example(tmp_path / "plain")
    (path / "conda.yaml").unlink()
    (path / "requirements.txt").write_text(
        "scikit-learn>=1.5\nthis-package-does-not-exist-flops==1.0\n"
    )

    # Execute
    with pytest.raises(DependencyInstallError) as caught:
        builder.build(str(path), None, tmp_path / "work", flavor="sklearn")

    # Assert
    message = caught.value.message
    assert caught.value.code == "dependency_install_failed"
    assert "this-package-does-not-exist-flops" in message
    assert "\n" not in message and len(message) < 600
    assert message.endswith("Fix the requirement in requirements.txt.")
    assert "the repository's own, from requirements.txt" in message


def test_failed_build_step_reports_its_last_lines(
    oci_registry: str, oci_base_image: str, oci_cache: Path, example_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a base image interpreter that does not exist
    builder = OciBuilder(
        oci_cache, oci_registry, oci_base_image, tls_verify=False, python="/usr/bin/python9"
    )

    # Execute
    with pytest.raises(ImageBuildError) as caught:
        builder.build(str(example_dir), None, tmp_path / "work", flavor="sklearn")

    # Assert
    message = caught.value.message
    assert caught.value.code == "image_build_failed"
    assert message.startswith("Building the learner image failed at step 4/15 (RUN ")
    assert "python9" in message and "The full log is " in message
    assert "\n" not in message and len(message) < 800
    assert Path(message.rsplit("The full log is ", 1)[1].rstrip(".")).is_file()


def test_unreachable_registry_is_a_clean_error(
    oci_base_image: str, example_dir: Path, tmp_path: Path
) -> None:
    # Prepare: nothing listens on the target registry's port
    dead = f"127.0.0.1:{find_free_port()}"
    builder = OciBuilder(tmp_path / "cache", dead, oci_base_image, tls_verify=False)

    # Execute
    with pytest.raises(RegistryUnreachableError) as caught:
        builder.build(str(example_dir), None, tmp_path / "work", flavor="sklearn")

    # Assert
    assert caught.value.code == "registry_unreachable"
    assert dead in caught.value.message and "connection refused" in caught.value.message
    assert "\n" not in caught.value.message


def test_missing_base_image_is_a_clean_error(
    oci_registry: str, example_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    base = f"{oci_registry}/flops/base:no-such-tag"
    builder = OciBuilder(tmp_path / "cache", oci_registry, base, tls_verify=False)

    # Execute
    with pytest.raises(BaseImageError) as caught:
        builder.build(str(example_dir), None, tmp_path / "work", flavor="sklearn")

    # Assert
    assert base in caught.value.message


# -- no build needed -------------------------------------------------------------------------
@pytest.fixture
def no_tools_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    yield


@pytest.mark.usefixtures("no_tools_on_path")
def test_missing_buildah_names_the_install_line(tmp_path: Path) -> None:
    # Prepare
    builder = OciBuilder(tmp_path / "cache", "127.0.0.1:5000", "127.0.0.1:5000/flops/base:x")

    # Execute
    with pytest.raises(BuildToolMissingError) as caught:
        builder.build(str(tmp_path), None, tmp_path / "work")

    # Assert
    assert caught.value.code == "build_tool_missing"
    assert "buildah and skopeo are not installed" in caught.value.message
    assert "apt-get install buildah skopeo" in caught.value.message


def test_other_platform_is_refused_before_any_work(tmp_path: Path) -> None:
    # Prepare
    builder = OciBuilder(tmp_path / "cache", "127.0.0.1:5000", "127.0.0.1:5000/flops/base:x")

    # Execute
    with pytest.raises(ImageBuildError) as caught:
        builder.build(str(tmp_path), None, tmp_path / "work", platform="linux/s390x")

    # Assert
    assert "linux/s390x" in caught.value.message and "not supported" in caught.value.message


def test_containerfile_puts_dependencies_before_code_and_labels_last() -> None:
    # Execute
    text = render_containerfile(
        "aggregator",
        "reg:5000/flops/base@sha256:abc",
        "python3",
        {"org.opencontainers.image.source": 'https://h/r "x" $HOME\\y'},
    )

    # Assert
    order = [
        text.index("FROM reg:5000/flops/base@sha256:abc"),
        text.index("RUN useradd"),
        text.index("COPY runtime-build/ /opt/flops/build/runtime/"),
        text.index("install.sh python3 /opt/flops/build/runtime/requirements.txt"),
        text.index("COPY user-build/ /opt/flops/build/user/"),
        text.index("install.sh python3 /opt/flops/build/user/requirements.txt"),
        text.index("install.sh python3 /opt/flops/build/aggregator/requirements.txt"),
        text.index("COPY aggregator-runtime/ /opt/flops/runtime/"),
        text.index("COPY --chown=10001:10001 repo/ /opt/flops/repo/"),
        text.index("LABEL "),
        text.index('ENTRYPOINT ["/opt/flops/venv/bin/python", "-m", "aggregator"]'),
    ]
    assert order == sorted(order)
    assert 'org.opencontainers.image.source="https://h/r \\"x\\" \\$HOME\\\\y"' in text
    assert 'org.opencontainers.image.title="flops-aggregator"' in text
    assert "$" not in text.replace("\\$HOME", "")
    check = "'import numpy, pyarrow, pyarrow.flight, datasets'"
    assert f"/opt/flops/user-venv \\\n        {check}" in text
    assert "FLOPS_USER_PYTHON=/opt/flops/user-venv/bin/python" in text


def test_build_failure_output_is_condensed(tmp_path: Path) -> None:
    # Prepare: buildah output of a failed RUN step and of a failed dependency install
    failed_run = (
        "STEP 3/13: COPY build/ /opt/flops/build/\n--> 0e34ab67bf1\n"
        "STEP 4/13: RUN --mount=type=bind,source=tools,target=/flops-tools sh install.sh\n"
        "error: No interpreter found for executable name `python9` in search path\n"
        "subprocess exited with status 1\n"
        'Error: building at STEP "RUN --mount=type=bind": exit status 1\n'
    )
    failed_install = (
        "STEP 4/13: RUN sh install.sh\n##flops-uv-attempt offline\n"
        "  \u00d7 No solution found when resolving dependencies:\n"
        "  \u2570\u2500\u25b6 Because nope was not found in the cache and you require "
        "nope==1, we can conclude that your requirements are unsatisfiable.\n##flops-uv-end\n"
        "##flops-uv-attempt online\n"
        "  \u00d7 No solution found when resolving dependencies:\n"
        "  \u2570\u2500\u25b6 Because nope was not found in the package registry and you "
        "require nope==1, we can conclude that your requirements are unsatisfiable.\n"
        "##flops-uv-end\n"
        "subprocess exited with status 42\n"
    )

    # Execute
    step, tail = failing_step(failed_run)
    build_error = build_failure("learner", failed_run, tmp_path / "x.log")
    install_error = build_failure("learner", failed_install, tmp_path / "x.log")

    # Assert
    assert step.startswith("4/13 (RUN --mount=type=bind,source=tools,") and step.endswith("...)")
    assert tail == "error: No interpreter found for executable name `python9` in search path"
    assert isinstance(build_error, ImageBuildError)
    assert isinstance(install_error, DependencyInstallError)
    assert "not found in the package registry" in install_error.message


def test_skopeo_errors_are_condensed() -> None:
    # Prepare
    stderr = (
        'time="2026-11-25T13:59:10Z" level=fatal msg="Error parsing image name '
        '\\"docker://127.0.0.1:1/flops/x:y\\": pinging container registry 127.0.0.1:1: Get '
        '\\"http://127.0.0.1:1/v2/\\": dial tcp 127.0.0.1:1: connect: connection refused"\n'
    )

    # Execute
    condensed = condense_tool_error(stderr)

    # Assert
    assert condensed == (
        'pinging container registry 127.0.0.1:1: Get "http://127.0.0.1:1/v2/": dial tcp '
        "127.0.0.1:1: connect: connection refused"
    )


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("127.0.0.1:5000/flops/base:bookworm", "127.0.0.1:5000/flops/base"),
        ("127.0.0.1:5000/flops/base", "127.0.0.1:5000/flops/base"),
        ("reg.example/base@sha256:0123", "reg.example/base"),
        ("reg.example/base:1@sha256:0123", "reg.example/base"),
    ],
)
def test_strip_tag(image: str, name: str) -> None:
    assert strip_tag(image) == name


def test_image_key_changes_with_every_input(tmp_path: Path) -> None:
    # Prepare
    builder = OciBuilder(tmp_path, "r:5000", "r:5000/base:1")
    inputs: list[Any] = ["c" * 40, "d" * 64, "sha256:" + "b" * 64, "sklearn", "linux/amd64"]
    inputs.append({"learner": "x"})
    changes: list[Any] = ["e" * 40, "f" * 64, "sha256:" + "a" * 64, "pytorch", "linux/arm64"]
    changes.append({"learner": "y"})

    # Execute
    key = builder.image_key(*inputs)
    variants = [
        builder.image_key(*[*inputs[:i], changed, *inputs[i + 1 :]])
        for i, changed in enumerate(changes)
    ]

    # Assert
    assert len(key) == 32 and key == builder.image_key(*inputs)
    assert len({key, *variants}) == 7
