"""Real-world-style ML repositories train, save and reload in their own virtualenvs.

For each repository of the corpus (``tests/corpus/<name>/``) the test builds the user
environment the way the builder will: a uv virtualenv with the repository's pins translated
to pip lines (:func:`image_builder.dependencies.read_requirements`), the repository's own
mlflow pin kept, plus what the FLOps worker needs (:data:`WORKER_EXTRAS`, and
``mlflow-skinny`` when the repository pins no mlflow) and ``flops_utils`` through a ``.pth``
file. Environments are cached under ``~/.cache/flops/test-venvs/<hash>`` (override with
``$FLOPS_TEST_VENV_CACHE``); a cold build downloads from PyPI, a warm one is instant.

Inside that environment a worker process simulates classic FL: two learners (each on its
own data tag of a real Flight data server), an aggregator ``ModelManager()`` without data,
FedAvg of the parameters for a few rounds, then
:func:`flops_utils.model_saving.save_model` of the aggregator's model. A second, fresh
process (without the repository on ``sys.path``) loads the saved directory with
``mlflow.pyfunc.load_model`` and predicts held-out MNIST rows.
"""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_server.mnist import load_mnist, load_mnist_arrays
from data_server.server import DataServer
from flops_utils import env_vars
from flops_utils.data_client import DataClient, dataset_to_table
from flops_utils.model_saving import ModelSavingError, save_model
from image_builder.dependencies import (
    dependency_hash,
    find_dependency_file,
    read_requirements,
    requirement_name,
)
from image_builder.python_env import MLFLOW_DISTRIBUTIONS, USER_ENV_MLFLOW, USER_ENV_REQUIREMENTS

CORPUS_DIR = Path(__file__).resolve().parent
FLOPS_ROOT = CORPUS_DIR.parents[1]
UTILS_PKG_DIR = FLOPS_ROOT / "utils_pkg"
WHEELS_DIR = Path("/opt/wheels")
VENV_CACHE = Path(
    os.environ.get("FLOPS_TEST_VENV_CACHE", Path.home() / ".cache" / "flops" / "test-venvs")
)

WORKER_EXTRAS = list(USER_ENV_REQUIREMENTS)
"""What the FLOps worker process needs in every user environment (the builder's lines)."""

MLFLOW_EXTRA = USER_ENV_MLFLOW
"""Added when the repository pins no mlflow (it saves the final model)."""

OLD_MLFLOW_EXTRA = "setuptools<81"
"""Added when the repository pins its own mlflow: MLflow 2.x imports ``pkg_resources``
(``mlflow/utils/requirements_utils.py``) without requiring setuptools, uv venvs have no
setuptools, and setuptools 81 removed ``pkg_resources``."""

NUMPY1_PYARROW_CAP = "pyarrow<26"
"""Added when the resolution has NumPy 1: pyarrow 26 raises "pyarrow requires NumPy 2.0 or
newer" at import, yet its metadata requires no numpy, so uv pairs it with NumPy 1."""

ENV_RECIPE = "corpus-env-2"
"""Bump to rebuild every cached environment after changing how they are made."""

UV_TIMEOUT_S = 1200
WORKER_TIMEOUT_S = 900
ROUNDS = 3

LEARNER_SHARDS = {"mnist-a": range(0, 2000), "mnist-b": range(2000, 4000)}
"""Data tag → MNIST rows (of the bundled 10,000) one simulated learner trains on."""

HELD_OUT_ROWS = range(9000, 10_000)
"""MNIST rows no learner sees; the saved model is scored on them."""


@dataclass(frozen=True)
class CorpusRepo:
    """A corpus repository and how its model's inputs are prepared (as its data_manager does)."""

    name: str
    flavor: str
    pixel_mean: float = 0.0
    pixel_std: float = 1.0

    @property
    def path(self) -> Path:
        return CORPUS_DIR / self.name


REPOS = [
    CorpusRepo("sklearn_mlflow2024", "sklearn"),
    CorpusRepo("pytorch_mnist", "pytorch", pixel_mean=0.1307, pixel_std=0.3081),
    CorpusRepo("keras_tf212", "keras"),
]


@dataclass(frozen=True)
class UserEnv:
    """A built user virtualenv: its ``python``, requirements and what uv resolved."""

    path: Path
    python: Path
    requirements: list[str]
    resolved: dict[str, str]
    build_seconds: float
    reused: bool


# --- building user environments ---------------------------------------------------------


def repo_requirements(repo_dir: Path) -> list[str]:
    """The pip lines the builder installs for ``repo_dir``: its translated pins (mlflow kept),
    the worker extras, and ``mlflow-skinny`` unless mlflow is pinned (else ``setuptools<81``,
    see :data:`OLD_MLFLOW_EXTRA`)."""
    dependency_file = find_dependency_file(repo_dir)
    assert dependency_file is not None, f"{repo_dir} has no dependency file"
    lines = read_requirements(dependency_file, keep_mlflow=True)
    names = {requirement_name(line) for line in lines}
    extras = list(WORKER_EXTRAS)
    if names & MLFLOW_DISTRIBUTIONS:
        extras.append(OLD_MLFLOW_EXTRA)
    else:
        extras.append(MLFLOW_EXTRA)
    return lines + extras


def base_python() -> Path:
    """The interpreter FLOps itself runs on (not the .venv's wrapper)."""
    return Path(getattr(sys, "_base_executable", sys.executable))


def uv(args: list[str], timeout: float = UV_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["uv", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "UV_PYTHON_DOWNLOADS": "never", "VIRTUAL_ENV": ""},
        check=False,
    )
    assert result.returncode == 0, f"uv {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def parse_pins(compiled: str) -> dict[str, str]:
    """``name==version`` lines of ``uv pip compile`` output as ``{name: version}``."""
    pins: dict[str, str] = {}
    for line in compiled.splitlines():
        if "==" in line and not line.startswith((" ", "#", "-")):
            name, version = line.split("==", 1)
            pins[name.strip()] = version.split(";")[0].strip()
    return pins


def _major(version: str | None) -> int:
    return int(version.split(".")[0]) if version else 0


def user_env(repo: CorpusRepo) -> UserEnv:
    """Build (or reuse) the cached virtualenv of ``repo``.

    Key: the requirement lines, the interpreter, the wheel directory, the ``utils_pkg`` path
    and :data:`ENV_RECIPE`. The environment is made in a staging directory (``uv venv
    --relocatable``) and renamed into place only when complete.
    """
    requirements = repo_requirements(repo.path)
    python = base_python()
    key = dependency_hash(
        [
            *requirements,
            f"# python {python.resolve()} {sys.version_info[:3]}",
            f"# find-links {WHEELS_DIR}",
            f"# utils {UTILS_PKG_DIR}",
            f"# recipe {ENV_RECIPE}",
        ]
    )[:16]
    target = VENV_CACHE / key
    info_file = target / "flops-test-env.json"
    with file_lock(VENV_CACHE / f"{key}.lock"):
        if info_file.is_file():
            info = json.loads(info_file.read_text())
            return UserEnv(
                target,
                target / "bin" / "python",
                info["requirements"],
                info["resolved"],
                info["build_seconds"],
                reused=True,
            )
        started = time.monotonic()
        staging = VENV_CACHE / f"{key}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        uv(["venv", "--relocatable", "--python", str(python), str(staging)], timeout=120)
        staging_python = staging / "bin" / "python"
        requirements_in = staging / "flops-requirements.in"
        requirements_in.write_text("\n".join(requirements) + "\n")
        find_links = ["--find-links", str(WHEELS_DIR)] if WHEELS_DIR.is_dir() else []
        compile_args = [
            "pip",
            "compile",
            "--quiet",
            "--python",
            str(staging_python),
            *find_links,
            str(requirements_in),
        ]
        compiled = uv(compile_args).stdout
        resolved = parse_pins(compiled)
        if _major(resolved.get("numpy")) < 2 and _major(resolved.get("pyarrow")) >= 26:
            # pyarrow 26 needs NumPy 2 at import but does not declare it: resolve again
            requirements = [*requirements, NUMPY1_PYARROW_CAP]
            requirements_in.write_text("\n".join(requirements) + "\n")
            compiled = uv(compile_args).stdout
            resolved = parse_pins(compiled)
        torch_version = resolved.get("torch")
        # Only the local CPU wheel may be used; anything else would download a CUDA build.
        assert torch_version is None or torch_version.endswith("+cpu"), (
            f"uv resolved torch=={torch_version}, not the CPU wheel of {WHEELS_DIR}"
        )
        (staging / "flops-requirements.txt").write_text(compiled)
        uv(
            [
                "pip",
                "install",
                "--python",
                str(staging_python),
                *find_links,
                "-r",
                str(staging / "flops-requirements.txt"),
            ]
        )
        site_packages = subprocess.run(
            [str(staging_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        (Path(site_packages) / "flops_utils_src.pth").write_text(f"{UTILS_PKG_DIR}\n")
        seconds = round(time.monotonic() - started, 1)
        (staging / "flops-test-env.json").write_text(
            json.dumps(
                {"requirements": requirements, "resolved": resolved, "build_seconds": seconds},
                indent=2,
            )
        )
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return UserEnv(target, target / "bin" / "python", requirements, resolved, seconds, False)


# --- the worker scripts -------------------------------------------------------------------

TRAIN_AND_SAVE = r"""
import json, os, sys, time

import numpy as np

args = json.loads(sys.argv[1])
sys.path.insert(0, args["repo"])
os.chdir(args["repo"])
from model_manager import ModelManager
from flops_utils.model_saving import save_model

started = time.monotonic()
learners = []
for tag in args["tags"]:
    os.environ["FLOPS_DATA_TAGS"] = tag
    learner = ModelManager()
    learner.set_model_data()
    learners.append(learner)
aggregator = ModelManager()  # like the aggregator: no data
parameters = [np.asarray(p) for p in aggregator.get_model_parameters()]
rounds = []
for _ in range(args["rounds"]):
    results = []
    for learner in learners:
        learner.set_model_parameters([np.copy(p) for p in parameters])
        samples = learner.fit_model()
        results.append(([np.asarray(p) for p in learner.get_model_parameters()], samples))
    total = sum(samples for _, samples in results)
    parameters = [
        (sum(params[i] * samples for params, samples in results) / total).astype(
            parameters[i].dtype
        )
        for i in range(len(parameters))
    ]
    evaluations = []
    for learner in learners:
        learner.set_model_parameters([np.copy(p) for p in parameters])
        loss, accuracy, samples = learner.evaluate_model()
        evaluations.append((float(loss), float(accuracy), int(samples)))
    rounds.append(evaluations)
aggregator.set_model_parameters(parameters)
trained = time.monotonic()
info = save_model(aggregator.get_model(), args["flavor"], args["model_dir"])
with open(args["result"], "w") as handle:
    json.dump(
        {
            "rounds": rounds,
            "save_info": info,
            "train_seconds": trained - started,
            "save_seconds": time.monotonic() - trained,
        },
        handle,
    )
"""

LOAD_AND_PREDICT = r"""
import json, sys, time

import numpy as np

args = json.loads(sys.argv[1])
started = time.monotonic()
import mlflow.pyfunc

model = mlflow.pyfunc.load_model(args["model_dir"])
images = np.load(args["images"]).astype(np.float32).reshape(-1, 784) / 255.0
images = ((images - args["mean"]) / args["std"]).astype(np.float32)
output = np.asarray(model.predict(images))
predicted = output.argmax(axis=1) if output.ndim == 2 else output.astype(np.int64)
labels = np.load(args["labels"])
with open(args["result"], "w") as handle:
    json.dump(
        {
            "accuracy": float((predicted == labels).mean()),
            "output_shape": list(output.shape),
            "seconds": time.monotonic() - started,
            "mlflow_version": mlflow.__version__,
        },
        handle,
    )
"""


def run_worker(env: UserEnv, script: str, args: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """Run ``script`` with ``args`` (JSON) in ``env``; return the JSON it writes."""
    result_file = cwd / f"result-{time.monotonic_ns()}.json"
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "VIRTUAL_ENV", "UV_"))
    }
    environment.update(
        MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", HF_DATASETS_OFFLINE="1"
    )
    result = subprocess.run(
        [str(env.python), "-c", script, json.dumps({**args, "result": str(result_file)})],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"worker failed in {env.path}:\n{result.stderr[-6000:]}"
    return dict(json.loads(result_file.read_text()))


@pytest.fixture(scope="module")
def mnist_data_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataServer]:
    """A running Flight data server on loopback with one tag per :data:`LEARNER_SHARDS` entry."""
    mnist = load_mnist()
    with DataServer(tmp_path_factory.mktemp("corpus-data") / "data") as server:
        with DataClient(server.location) as client:
            for tag, rows in LEARNER_SHARDS.items():
                client.put_table(tag, dataset_to_table(mnist.select(rows)))
        yield server


# --- tests --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("repo", REPOS, ids=[repo.name for repo in REPOS])
def test_corpus_repo_trains_saves_and_reloads_in_its_own_env(
    repo: CorpusRepo,
    mnist_data_server: DataServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the user env, a copy of the repository, held-out rows
    env = user_env(repo)
    print(f"\n{repo.name}: env {env.path} reused={env.reused} build={env.build_seconds}s")
    print(
        "  resolved:",
        {name: env.resolved.get(name) for name in ("numpy", "datasets", "pyarrow", "pandas")},
        {
            name: v
            for name, v in env.resolved.items()
            if name.startswith(("mlflow", "torch", "tensorflow", "keras"))
        },
    )
    repo_copy = tmp_path / "repo"
    shutil.copytree(repo.path, repo_copy)
    images, labels = load_mnist_arrays()
    held_out = np.asarray(HELD_OUT_ROWS)
    np.save(tmp_path / "images.npy", images[held_out])
    np.save(tmp_path / "labels.npy", labels[held_out])
    monkeypatch.setenv(env_vars.DATA_SERVER, mnist_data_server.location)
    model_dir = tmp_path / "model"

    # Execute: FL rounds and saving in the user env, then loading in a fresh process
    trained = run_worker(
        env,
        TRAIN_AND_SAVE,
        {
            "repo": str(repo_copy),
            "tags": list(LEARNER_SHARDS),
            "rounds": ROUNDS,
            "flavor": repo.flavor,
            "model_dir": str(model_dir),
        },
        tmp_path,
    )
    loaded = run_worker(
        env,
        LOAD_AND_PREDICT,
        {
            "model_dir": str(model_dir),
            "images": str(tmp_path / "images.npy"),
            "labels": str(tmp_path / "labels.npy"),
            "mean": repo.pixel_mean,
            "std": repo.pixel_std,
        },
        tmp_path,
    )
    print(
        f"  train {trained['train_seconds']:.1f}s save {trained['save_seconds']:.1f}s "
        f"load+predict {loaded['seconds']:.1f}s; rounds {trained['rounds']}; "
        f"saved {trained['save_info']}; held-out accuracy {loaded['accuracy']:.3f}"
    )

    # Assert
    last_round = trained["rounds"][-1]
    assert [samples for _, _, samples in last_round] == [400, 400]
    assert all(accuracy > 0.6 for _, accuracy, _ in last_round), trained["rounds"]
    assert trained["save_info"]["flavor"] == repo.flavor
    assert (model_dir / "MLmodel").is_file()
    assert loaded["accuracy"] > 0.6
    assert loaded["output_shape"][0] == len(held_out)
    mlflow_pin = env.resolved.get("mlflow") or env.resolved.get("mlflow-skinny")
    assert trained["save_info"]["mlflow_version"] == mlflow_pin == loaded["mlflow_version"]


# --- save_model errors, in FLOps' own environment ------------------------------------------


def test_save_model_names_the_type_when_the_model_does_not_fit_the_flavor(
    tmp_path: Path,
) -> None:
    parameters = [np.zeros((10, 784)), np.zeros(10)]

    with pytest.raises(ModelSavingError) as caught:
        save_model(parameters, "sklearn", tmp_path / "model")

    message = caught.value.message
    assert "ModelManager.get_model()" in message
    assert "list" in message
    assert "scikit-learn" in message
    assert not (tmp_path / "model").exists()


def test_save_model_suggests_the_flavor_a_model_of_another_library_needs(
    tmp_path: Path,
) -> None:
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(ModelSavingError) as caught:
        save_model(LogisticRegression(), "pytorch", tmp_path / "model")

    message = caught.value.message
    assert "sklearn.linear_model" in message and "LogisticRegression" in message
    assert "'sklearn'" in message


def test_save_model_names_the_pip_line_of_a_missing_flavor_library(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("tensorflow is installed here")

    with pytest.raises(ModelSavingError) as caught:
        save_model(object(), "tensorflow", tmp_path / "model")

    message = caught.value.message
    assert "pip install tensorflow" in message
    assert "ml_model_flavor" not in message or "tensorflow" in message


def test_save_model_rejects_an_unknown_flavor(tmp_path: Path) -> None:
    with pytest.raises(ModelSavingError) as caught:
        save_model(object(), "xgboost", tmp_path / "model")

    assert "sklearn" in caught.value.message and "'xgboost'" in caught.value.message


def test_save_model_saves_an_untrained_sklearn_model_in_the_flops_env(tmp_path: Path) -> None:
    # Prepare: what an aggregator holds before any fit (coef_ set by hand, no n_features_in_)
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression()
    model.classes_ = np.arange(3)
    model.coef_ = np.eye(3, 4)
    model.intercept_ = np.zeros(3)

    # Execute
    info = save_model(model, "sklearn", tmp_path / "model")

    # Assert
    import mlflow.pyfunc

    loaded = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    predicted = loaded.predict(np.eye(3, 4, dtype=np.float32) * 5)
    assert list(np.asarray(predicted)) == [0, 1, 2]
    assert info["flavor"] == "sklearn"
    assert info["mlflow_version"] == mlflow.__version__


def test_model_saving_imports_nothing_but_the_stdlib() -> None:
    code = (
        "import sys, flops_utils.model_saving as m; "
        "bad = sorted(n for n in ('mlflow', 'numpy', 'torch', 'sklearn', 'pandas') "
        "if n in sys.modules); print(bad)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
    assert sysconfig.get_path("stdlib")  # the check above ran in a plain interpreter
