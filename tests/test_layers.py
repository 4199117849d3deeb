"""The layering check (``python -m scripts.layers``) on synthetic trees and on the repository."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_layers(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.layers", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


CLEAN = {
    "utils_pkg/flops_utils/__init__.py": "",
    "utils_pkg/flops_utils/net.py": "import socket\n",
    "learner/__init__.py": "",
    "learner/main.py": "from flops_utils.net import socket\nimport numpy\n",
    "image_builder/__init__.py": "",
    "image_builder/templates/serve_model.py": "import flops_manager\n",  # copied, not ours
    "flops_manager/__init__.py": "",
    "flops_manager/records.py": "import pydantic\n",
    "flops_manager/store.py": "from flops_manager.records import Record\n",
    "flops_manager/projects.py": "from . import store\nfrom learner import main\n",
    "flops_manager/app.py": "from flops_manager import projects\n",
}


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    result = run_layers("--root", str(write_tree(tmp_path, CLEAN)))

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("relative", "source", "expected"),
    [
        (
            "learner/flower_client.py",
            "\n\ndef f():\n    from flops_manager.sla import StrategyConfig\n",
            "learner/flower_client.py:4: learner.flower_client imports flops_manager.sla "
            "(a runtime role never imports flops_manager",
        ),
        (
            "aggregator/main.py",
            "import data_server.mnist\n",
            "aggregator/main.py:1: aggregator.main imports data_server.mnist "
            "(a runtime role imports only flops_utils, not another role (data_server))",
        ),
        (
            "utils_pkg/flops_utils/net.py",
            "from learner import main\n",
            "utils_pkg/flops_utils/net.py:1: flops_utils.net imports learner.main "
            "(flops_utils is the bottom layer",
        ),
        (
            "flops_manager/store.py",
            "from flops_manager.app import create_app\n",
            "flops_manager/store.py:1: flops_manager.store imports flops_manager.app "
            "(inside flops_manager, the data/base tier does not import the API tier above it)",
        ),
        (
            "flops_manager/orchestrators/local.py",
            "from flops_manager.app import create_app\n",
            "flops_manager/orchestrators/local.py:1: flops_manager.orchestrators.local imports "
            "flops_manager.app (inside flops_manager, the services tier does not import the API",
        ),
        (
            "flops_manager/records.py",
            "from . import projects\n",
            "flops_manager/records.py:1: flops_manager.records imports flops_manager.projects "
            "(inside flops_manager, the data/base tier does not import the lifecycle tier",
        ),
    ],
)
def test_a_violation_is_reported_with_file_line_and_rule(
    tmp_path: Path, relative: str, source: str, expected: str
) -> None:
    write_tree(tmp_path, {**CLEAN, relative: source})

    result = run_layers("--root", str(tmp_path))

    assert result.returncode == 1
    assert result.stdout.startswith(expected), result.stdout
    assert len(result.stdout.splitlines()) == 1


def test_the_repository_keeps_its_layers() -> None:
    result = run_layers()

    assert result.returncode == 0, result.stdout
