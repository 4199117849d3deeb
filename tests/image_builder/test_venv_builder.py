"""The venv builder with real git repositories, real uv and the machine's uv cache."""

import fcntl
import importlib.metadata
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import git
import pytest
from builder_testing import ExampleRepo, commit_all, copy_example

from flops_utils.model_worker_client import ModelWorker
from image_builder.errors import DependencyInstallError, EnvironmentBuildError, RepoLayoutError
from image_builder.python_env import (
    condense_uv_error,
    file_lock,
    run_uv_with_fallbacks,
    undeclared_conflicts,
    uv_command,
)
from image_builder.venv_builder import BuiltEnvironment, VenvBuilder

IMPORT_CHECK = (
    "import json, importlib.util, mlflow, sklearn, numpy, datasets, flops_utils, model_manager, "
    "data_manager; from flops_utils.ml_repo_templates import ModelManagerTemplate; "
    "import flops_utils.model_worker; "
    "print(json.dumps({'mlflow': mlflow.__version__, 'numpy': numpy.__version__, "
    "'model_manager': model_manager.__file__, 'flops_utils': flops_utils.__file__, "
    "'absent': [m for m in ('flwr', 'learner', 'aggregator', 'flops_manager', 'paho') "
    "if importlib.util.find_spec(m) is not None], "
    "'is_template': issubclass(model_manager.ModelManager, ModelManagerTemplate)}))"
)


def _run_in_env(env: BuiltEnvironment, code: str) -> dict[str, object]:
    """Run ``code`` with the environment's interpreter from ``/`` and parse its JSON output."""
    result = subprocess.run(
        [str(env.python), "-c", code],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    parsed: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One environment cache for the module: the cold build happens once."""
    return tmp_path_factory.mktemp("env-cache")


@pytest.fixture(scope="module")
def module_repo(tmp_path_factory: pytest.TempPathFactory) -> ExampleRepo:
    """The example ML repository as a git repository with one commit (module-wide)."""
    path = copy_example(tmp_path_factory.mktemp("repos") / "mnist")
    repo = git.Repo.init(path, initial_branch="main")
    first = commit_all(repo, "example")
    repo.close()
    return ExampleRepo(path=path, first=first, second=first)


@pytest.fixture(scope="module")
def cold_build(
    cache_dir: Path, module_repo: ExampleRepo, tmp_path_factory: pytest.TempPathFactory
) -> BuiltEnvironment:
    """The example repository's environment, built from an empty cache."""
    builder = VenvBuilder(cache_dir)
    env = builder.build(str(module_repo.path), None, tmp_path_factory.mktemp("work"))
    print(f"\ncold build of the example environment: {env.seconds:.2f} s")
    return env


def test_cold_build_holds_the_repository_and_flops_utils_only(
    cold_build: BuiltEnvironment, module_repo: ExampleRepo
) -> None:
    # Execute
    imported = _run_in_env(cold_build, IMPORT_CHECK)

    # Assert: the repository's requirements with flops_utils, and none of FLOps' runtime
    assert not cold_build.cache_hit
    assert cold_build.commit == module_repo.first
    assert imported["absent"] == []
    assert imported["numpy"] == cold_build.versions["numpy"]
    assert imported["mlflow"] == importlib.metadata.version("mlflow")  # the manager's: cached
    assert imported["model_manager"] == str(cold_build.repo_dir / "model_manager.py")
    utils_root = Path(__file__).resolve().parents[2] / "utils_pkg"
    assert imported["flops_utils"] == str(utils_root / "flops_utils" / "__init__.py")
    assert imported["is_template"] is True
    assert cold_build.notes == ()
    assert not (cold_build.repo_dir / ".git").exists()
    metadata = json.loads((cold_build.env_dir / "flops-env.json").read_text())
    assert metadata["requirements"] == ["numpy>=2", "scikit-learn>=1.5", "mlflow"]
    assert metadata["commit"] == module_repo.first
    assert not list((cold_build.env_dir.parent).glob(".tmp-*"))


def test_second_build_is_a_fast_cache_hit(
    cold_build: BuiltEnvironment, cache_dir: Path, module_repo: ExampleRepo, tmp_path: Path
) -> None:
    # Prepare: a second project, with its own builder instance, uses the same repository
    builder = VenvBuilder(cache_dir)

    # Execute
    env = builder.build(module_repo.path.as_uri(), module_repo.first, tmp_path / "work")

    # Assert
    assert env.cache_hit
    assert env.seconds < 1.0
    assert (env.key, env.python, env.repo_dir) == (
        cold_build.key,
        cold_build.python,
        cold_build.repo_dir,
    )
    assert not any((tmp_path / "work").iterdir())


@pytest.mark.slow  # about 10 s: a second full environment build
def test_changed_dependency_file_gives_new_environment(
    cold_build: BuiltEnvironment, cache_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the same repository with one more requirement in conda.yaml
    path = copy_example(tmp_path / "repo")
    conda = path / "conda.yaml"
    conda.write_text(conda.read_text() + "      - joblib\n", encoding="utf-8")
    with git.Repo.init(path, initial_branch="main") as repo:
        commit_all(repo, "joblib")

    # Execute
    env = VenvBuilder(cache_dir).build(str(path), None, tmp_path / "work")

    # Assert
    assert not env.cache_hit
    assert env.key != cold_build.key
    assert _run_in_env(env, "import joblib, model_manager; print('{}')") == {}


def test_concurrent_builds_of_one_key_build_once(cache_dir: Path, tmp_path: Path) -> None:
    # Prepare: a plain directory with a requirements.txt; two projects build it at once
    path = copy_example(tmp_path / "plain")
    (path / "conda.yaml").unlink()
    (path / "requirements.txt").write_text("scikit-learn>=1.5\n-r extra/base.txt\n")
    (path / "extra").mkdir()
    (path / "extra" / "base.txt").write_text("threadpoolctl\n")
    results: list[BuiltEnvironment] = []
    failures: list[BaseException] = []

    def build(index: int) -> None:
        try:
            results.append(VenvBuilder(cache_dir).build(str(path), None, tmp_path / f"w{index}"))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    # Assert
    assert not failures
    assert sorted(env.cache_hit for env in results) == [False, True]
    assert results[0].key == results[1].key
    assert results[0].commit == results[1].commit and len(results[0].commit) == 64
    assert _run_in_env(results[0], "import threadpoolctl; print('{}')") == {}


@pytest.mark.slow  # about 17 s: installs the repository's exact pins
def test_the_repository_pins_are_installed_exactly_as_written(
    cache_dir: Path, tmp_path: Path
) -> None:
    # Prepare: pins of 2024 that FLOps' own runtime cannot share (flwr 1.41 needs
    # pyyaml>=6.0.2, FLOps runs numpy 2), and a Python version FLOps does not have
    path = copy_example(tmp_path / "plain")
    (path / "conda.yaml").write_text(
        "name: mlflow-env\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.10.14\n"
        "  - pip<=24.0\n  - numpy=1.26.4\n  - pyyaml=6.0.1\n  - scikit-learn=1.5.2\n",
        encoding="utf-8",
    )

    # Execute
    env = VenvBuilder(cache_dir).build(str(path), None, tmp_path / "work")

    # Assert
    versions: object = _run_in_env(
        env,
        "import json, numpy, yaml, sklearn, datasets, flops_utils.data_client; "
        "print(json.dumps([numpy.__version__, yaml.__version__, sklearn.__version__]))",
    )
    assert versions == ["1.26.4", "6.0.1", "1.5.2"]
    assert env.versions["numpy"] == "1.26.4"
    assert "datasets" in env.versions and "mlflow-skinny" in env.versions
    assert len(env.notes) == 1
    assert "Python 3.10.14" in env.notes[0] and sys.version.split()[0] in env.notes[0]
    # The repository's code runs there; arrays cross between NumPy 1.26 and the runtime's 2.x
    with ModelWorker(env.repo_dir, python=env.python) as worker:
        assert worker.facts["versions"]["numpy"] == "1.26.4"
        parameters = worker.get_model_parameters()
        worker.set_model_parameters([p + 1 for p in parameters])
        assert [p.shape for p in parameters] == [(10, 784), (10,)]
        assert all((p == 1).all() for p in worker.get_model_parameters())


def test_uninstallable_requirement_is_a_clean_error(cache_dir: Path, tmp_path: Path) -> None:
    # Prepare
    path = copy_example(tmp_path / "plain")
    conda = path / "conda.yaml"
    conda.write_text(
        conda.read_text() + "      - this-package-does-not-exist-flops==1.0\n", encoding="utf-8"
    )

    # Execute
    with pytest.raises(DependencyInstallError) as caught:
        VenvBuilder(cache_dir).build(str(path), None, tmp_path / "work")

    # Assert
    message = caught.value.message
    assert caught.value.code == "dependency_install_failed"
    assert "this-package-does-not-exist-flops" in message
    assert "repository's own, from conda.yaml" in message
    assert "\n" not in message and ".tmp-" not in message and len(message) < 800
    assert str(cache_dir) not in message and str(tmp_path) not in message
    assert not list((cache_dir / "envs").glob(".tmp-*"))


def test_a_pin_against_what_flops_utils_needs_names_both_sides(
    cache_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the repository pins a datasets release older than flops_utils supports
    path = copy_example(tmp_path / "plain")
    (path / "conda.yaml").unlink()
    (path / "requirements.txt").write_text("scikit-learn>=1.5\ndatasets==2.10.0\n")

    # Execute
    with pytest.raises(DependencyInstallError) as caught:
        VenvBuilder(cache_dir).build(str(path), None, tmp_path / "work")

    # Assert: the resolver's reason, FLOps' line named as FLOps', the file as the fix
    message = caught.value.message
    assert "datasets==2.10.0" in message
    assert "FLOps added datasets>=2.14" in message
    assert "Fix the requirement in requirements.txt" in message
    assert str(tmp_path) not in message


def test_condense_uv_error_reads_tty_diagnostics() -> None:
    # Prepare: uv's diagnostic as printed on a terminal
    stderr = (
        "Using Python 3.11.7 environment at: /cache/envs/.tmp-x/venv\n"
        "  \u00d7 No solution found when resolving dependencies:\n"
        "  \u2570\u2500\u25b6 Because foo was not found in the package registry and you require\n"
        "      foo==1.0, we can conclude that your requirements are unsatisfiable.\n"
        "\n      hint: Packages were unavailable because the network was disabled.\n"
    )

    # Execute
    condensed = condense_uv_error(stderr)

    # Assert
    assert condensed == (
        "No solution found when resolving dependencies: because foo was not found in the "
        "package registry and you require foo==1.0, we can conclude that your requirements "
        "are unsatisfiable"
    )


def test_layout_error_surfaces_from_build_and_work_dir_is_cleaned(
    cache_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    path = copy_example(tmp_path / "plain")
    (path / "data_manager.py").unlink()

    # Execute
    with pytest.raises(RepoLayoutError) as caught:
        VenvBuilder(cache_dir).build(str(path), None, tmp_path / "work")

    # Assert
    assert "data_manager.py" in caught.value.message
    assert not any((tmp_path / "work").iterdir())


def test_uv_falls_back_to_python_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Prepare: no uv executable on PATH; the uv Python package is installed in the manager
    monkeypatch.setenv("PATH", str(tmp_path))

    # Execute
    command = uv_command()
    result = subprocess.run(
        [*command, "--version"], capture_output=True, text=True, timeout=30, check=False
    )

    # Assert
    assert command == [sys.executable, "-m", "uv"]
    assert result.returncode == 0 and result.stdout.startswith("uv ")


def test_build_lock_wait_is_bounded(tmp_path: Path) -> None:
    # Prepare: another build holds the key's lock
    lock = tmp_path / "k.lock"
    holder = os.open(lock, os.O_CREAT | os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)

    # Execute
    started = time.monotonic()
    try:
        with pytest.raises(EnvironmentBuildError) as caught, file_lock(lock, timeout_s=0.3):
            pass
    finally:
        os.close(holder)

    # Assert
    assert 0.3 <= time.monotonic() - started < 2
    assert "retry" in caught.value.message


def _scripted_uv(outcomes: list[tuple[int, str]]) -> tuple[Any, list[list[str]]]:
    """A ``run`` for :func:`run_uv_with_fallbacks` answering ``outcomes`` in order; the second
    item lists the arguments of every call."""
    calls: list[list[str]] = []

    def run(args: list[str]) -> tuple[int, str]:
        calls.append(list(args))
        return outcomes[len(calls) - 1]

    return run, calls


OFFLINE_MISS = (
    "error: Failed to download `tinydep==1.0`\n"
    "  Caused by: Network connectivity is disabled, but the requested data wasn't found in "
    "the cache"
)


def test_a_package_missing_from_the_cache_is_fetched_online(tmp_path: Path) -> None:
    # uv's offline miss mentions a failed download: that is no network outage
    run, calls = _scripted_uv([(2, OFFLINE_MISS), (0, "")])

    mode, errors = run_uv_with_fallbacks(run, ["pip", "install"], tmp_path / "c.txt")

    assert mode == "online"
    assert calls[0][-1] == "--offline" and "--offline" not in calls[1]
    assert errors == [("offline", OFFLINE_MISS)]


def test_an_unreachable_index_stops_after_the_first_online_attempt(tmp_path: Path) -> None:
    unreachable = "error: Failed to fetch: `https://pypi.org/simple/tinydep/`: dns error"
    run, calls = _scripted_uv([(2, OFFLINE_MISS), (2, unreachable), (0, "")])

    mode, errors = run_uv_with_fallbacks(run, ["pip", "install"], tmp_path / "c.txt")

    assert mode is None and len(calls) == 2
    assert [m for m, _ in errors] == ["offline", "online"]


def test_undeclared_conflicts_add_the_missing_bounds() -> None:
    # Execute / Assert: the combinations measured here, and those that need nothing
    assert list(undeclared_conflicts({"numpy": "1.26.4", "pyarrow": "26.0.1"})) == ["pyarrow<26"]
    assert list(undeclared_conflicts({"datasets": "2.19.2", "pyarrow": "21.0.0"})) == ["pyarrow<20"]
    assert list(undeclared_conflicts({"mlflow": "2.12.1"})) == ["setuptools<81"]
    assert list(undeclared_conflicts({"mlflow-skinny": "2.15.1", "setuptools": "82.0"})) == [
        "setuptools<81"
    ]
    assert undeclared_conflicts({"mlflow": "2.12.1", "setuptools": "80.10.2"}) == {}
    assert undeclared_conflicts({"mlflow-skinny": "2.16.2"}) == {}
    assert undeclared_conflicts({"numpy": "1.26.4", "pyarrow": "25.0.1"}) == {}
    assert undeclared_conflicts({"numpy": "2.4.6", "pyarrow": "26.0.1"}) == {}
    assert undeclared_conflicts({"datasets": "4.0.0", "pyarrow": "25.0.1"}) == {}
