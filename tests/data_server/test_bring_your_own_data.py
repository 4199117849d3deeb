"""A node owner's own dataset: written with datasets, put with ``flops data put``, read back by
``load_dataset()`` with its HuggingFace features (CIFAR-style ``img`` Image, ClassLabel)."""

import io
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from data_server.server import DataServer
from flops_utils.ml_repo_building_blocks import load_dataset

LABELS = ["airplane", "automobile", "bird"]


def _cifar_style(rows: int) -> datasets.Dataset:
    """``rows`` 32x32 RGB PNG images (``img``: ``Image()``) with a ``label`` ClassLabel."""
    rng = np.random.default_rng(1)
    images = []
    for _ in range(rows):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=LABELS)}
    )
    return datasets.Dataset.from_dict(
        {"img": images, "label": [i % len(LABELS) for i in range(rows)]}, features=features
    )


def _flops(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flops_manager.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_parquet_file_put_with_the_cli_comes_back_with_its_features(
    data_server: DataServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the node owner's dataset, written the way the README says
    path = tmp_path / "my-cifar.parquet"
    _cifar_style(12).to_parquet(str(path))

    # Execute
    put = _flops("data", "put", str(path), "--tag", "cifar", "--data-server", data_server.location)
    listed = _flops("data", "ls", "--data-server", data_server.location)
    monkeypatch.setenv("FLOPS_DATA_SERVER", data_server.location)
    monkeypatch.setenv("FLOPS_DATA_TAGS", "cifar")
    loaded = load_dataset()

    # Assert
    assert put.returncode == 0, put.stdout + put.stderr
    assert "stored 12 rows under tag 'cifar'" in put.stdout
    assert listed.stdout.split() == ["cifar", "12"]
    assert loaded.features["label"].names == LABELS
    assert isinstance(loaded[0]["img"], Image.Image) and loaded[0]["img"].size == (32, 32)
    assert loaded["label"] == [i % 3 for i in range(12)]  # a list, as datasets 2.x/3.x gave


def test_put_of_a_file_that_is_not_parquet_is_a_clear_error(
    data_server: DataServer, tmp_path: Path
) -> None:
    # Prepare: a CSV where a Parquet file was expected, in a directory with a telling name
    path = tmp_path / "secret-dir" / "data.csv"
    path.parent.mkdir()
    path.write_text("a,b\n1,2\n")

    # Execute
    put = _flops("data", "put", str(path), "--tag", "x", "--data-server", data_server.location)
    missing = _flops("data", "put", str(tmp_path / "nope.parquet"), "--tag", "x")

    # Assert: exit 1, one reason with the fix, no traceback and no host path
    assert put.returncode == 1
    assert "data.csv is not a readable Parquet file" in put.stdout
    assert "Dataset.to_parquet" in put.stdout
    assert "Traceback" not in put.stdout + put.stderr and str(tmp_path) not in put.stdout
    assert missing.returncode == 1 and "nope.parquet: no such file" in missing.stdout
