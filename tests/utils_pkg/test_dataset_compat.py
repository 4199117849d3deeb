"""``flops_utils.dataset_compat``: ``load_dataset()`` keeps datasets 2.x/3.x column access.

In-process tests use the project's datasets (4.x, whose ``Dataset.__getitem__(str)`` returns a
lazy ``Column``) with a real Flight data server. The cross-version tests run
``dataset_compat_probe.py`` against the same server from throwaway venvs with older datasets
and numpy 1.26; the venvs are cached under ``~/.cache/flops/test-venvs/<hash>`` (first run: a
few seconds per venv with a warm uv cache, later runs reuse them).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import pytest

from data_server.mnist import load_mnist, load_mnist_arrays
from data_server.server import DataServer
from flops_utils import dataset_compat
from flops_utils.data_client import DataClient, dataset_to_table, load_dataset
from flops_utils.dataset_compat import (
    materialized_columns_class,
    returns_lazy_columns,
    with_materialized_columns,
)

UTILS_PKG = Path(__file__).resolve().parents[2] / "utils_pkg"
PROBE = Path(__file__).resolve().parent / "dataset_compat_probe.py"
VENV_CACHE = Path.home() / ".cache" / "flops" / "test-venvs"
MNIST_ROWS = 1000
EXTRA_ROWS = 200
CIFAR_ROWS = 40
CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    """The values the data server holds, as plain arrays (see dataset_compat_probe.py)."""
    images, labels = load_mnist_arrays()
    rng = np.random.default_rng(7)
    return {
        "mnist_images": np.ascontiguousarray(images[:MNIST_ROWS]),
        "mnist_labels": labels[:MNIST_ROWS].astype(np.int64),
        "extra_images": np.ascontiguousarray(images[MNIST_ROWS : MNIST_ROWS + EXTRA_ROWS]),
        "cifar_images": rng.integers(0, 256, size=(CIFAR_ROWS, 32, 32, 3), dtype=np.uint8),
        "cifar_labels": np.arange(CIFAR_ROWS, dtype=np.int64) % 10,
    }


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, expected: dict[str, np.ndarray]
) -> Iterator[DataServer]:
    """A data server with tags ``mnist`` (1000 rows), ``mnist-extra`` (200), ``cifar`` (40).

    ``cifar``: ``img`` = HF ``Image()`` (PNG-encoded 32x32 RGB), ``label`` ClassLabel.
    """
    mnist = load_mnist()
    cifar = datasets.Dataset.from_dict(
        {
            "img": [PIL.Image.fromarray(image) for image in expected["cifar_images"]],
            "label": expected["cifar_labels"].tolist(),
        },
        features=datasets.Features(
            {"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR_CLASSES)}
        ),
    )
    with DataServer(tmp_path_factory.mktemp("compat-data")) as running:
        with DataClient(running.location) as client:
            client.put_table("mnist", dataset_to_table(mnist.select(range(MNIST_ROWS))))
            client.put_table(
                "mnist-extra",
                dataset_to_table(mnist.select(range(MNIST_ROWS, MNIST_ROWS + EXTRA_ROWS))),
            )
            client.put_table("cifar", dataset_to_table(cifar))
        yield running


@pytest.fixture
def mnist(server: DataServer) -> datasets.Dataset:
    return load_dataset(server.location, "mnist")


# --- in process (the project's datasets 4.x) -------------------------------------------------


def test_the_project_datasets_has_lazy_columns() -> None:
    """Guards the premise: without the module, datasets 4 returns a Column here."""
    plain = datasets.Dataset.from_dict({"x": [1, 2, 3]}).with_format("numpy")

    assert returns_lazy_columns()
    assert not isinstance(plain["x"], np.ndarray | list)
    assert not hasattr(plain["x"], "reshape")


def test_the_original_flops_pattern_gives_arrays(
    mnist: datasets.Dataset, expected: dict[str, np.ndarray]
) -> None:
    # Execute: what repositories written for the original FLOps do
    mnist.set_format("numpy")
    split = mnist.train_test_split(test_size=0.2, seed=42)
    x = split["train"]["image"].reshape(-1, 784) / 255.0
    y = split["train"]["label"]

    # Assert
    assert isinstance(split, datasets.DatasetDict)
    assert isinstance(x, np.ndarray) and x.shape == (800, 784)
    assert isinstance(y, np.ndarray) and y.shape == (800,)
    assert x.min() >= 0.0 and x.max() <= 1.0
    row_by_row = np.stack([split["train"][i]["image"] for i in range(800)])
    assert np.array_equal(split["train"]["image"], row_by_row)
    assert np.array_equal(y, [split["train"][i]["label"] for i in range(800)])
    everything = np.concatenate([split["train"]["image"], split["test"]["image"]])
    assert sorted(map(bytes, everything.astype(np.uint8))) == sorted(
        map(bytes, expected["mnist_images"])
    )


def _unshuffled(shuffled: datasets.Dataset) -> Any:
    """Back to the original order with select (``sort`` warns under pyarrow 25)."""
    order = np.argsort(shuffled["row"])
    return shuffled.select(order.tolist()).with_format("numpy")["image"]


ACCESS_PATTERNS: dict[str, Callable[[datasets.Dataset], Any]] = {
    "set_format": lambda ds: (ds.set_format("numpy"), ds["image"])[1],
    "with_format": lambda ds: ds.with_format("numpy")["image"],
    "with_format_uint8": lambda ds: ds.with_format("numpy", dtype=np.uint8)["image"],
    "select": lambda ds: ds.with_format("numpy").select(range(MNIST_ROWS))["image"],
    "select_then_format": lambda ds: ds.select(range(MNIST_ROWS)).with_format("numpy")["image"],
    "shuffle_flatten_unshuffle": lambda ds: _unshuffled(
        ds.add_column("row", list(range(MNIST_ROWS))).shuffle(seed=3).flatten_indices()
    ),
    "map": lambda ds: ds.with_format("numpy").map(lambda b: {"label": b["label"]}, batched=True)[
        "image"
    ],
    "filter_all": lambda ds: ds.with_format("numpy").filter(lambda row: True)["image"],
    "split_then_concat": lambda ds: np.concatenate(
        [
            part["image"]
            for part in ds.with_format("numpy")
            .train_test_split(test_size=0.3, shuffle=False)
            .values()
        ]
    ),
    "datasetdict_with_format": lambda ds: (
        datasets.DatasetDict({"all": ds}).with_format("numpy")["all"].with_format("numpy")["image"]
    ),
    "datasets4_slice": lambda ds: ds.with_format("numpy")["image"][:],
}


@pytest.mark.parametrize("pattern", ACCESS_PATTERNS)
def test_numpy_column_access_on_derived_datasets(
    mnist: datasets.Dataset, expected: dict[str, np.ndarray], pattern: str
) -> None:
    result = ACCESS_PATTERNS[pattern](mnist)

    assert isinstance(result, np.ndarray)
    assert result.shape == (MNIST_ROWS, 28, 28)
    assert np.array_equal(result, expected["mnist_images"])


def test_derived_datasets_keep_the_class_and_give_the_right_rows(
    mnist: datasets.Dataset, expected: dict[str, np.ndarray]
) -> None:
    images, labels = expected["mnist_images"], expected["mnist_labels"]
    ds = mnist.with_format("numpy")
    subclass = materialized_columns_class()

    selected = ds.select([9, 2, 4])
    shuffled = ds.shuffle(seed=0)
    sevens = ds.filter(lambda row: row["label"] == 7)
    mapped = ds.map(lambda batch: {"double": batch["label"] * 2}, batched=True)
    renamed = ds.rename_column("label", "digit")
    split = ds.train_test_split(test_size=0.1, seed=1)
    split_mapped = split.map(lambda batch: {"y": batch["label"]}, batched=True).shuffle(seed=2)

    for derived in (selected, shuffled, sevens, mapped, renamed, *split.values()):
        assert type(derived) is subclass
    assert all(type(part) is subclass for part in split_mapped.values())
    assert np.array_equal(selected["image"], images[[9, 2, 4]])
    assert np.array_equal(shuffled.flatten_indices()["image"], shuffled["image"])
    assert np.array_equal(sevens["image"], images[labels == 7])
    assert np.array_equal(mapped["double"], labels * 2)
    assert np.array_equal(renamed["digit"], labels)
    assert isinstance(split_mapped["train"]["y"], np.ndarray)
    assert split["test"]["image"].shape == (100, 28, 28)


def test_without_a_format_columns_are_lists(
    mnist: datasets.Dataset, expected: dict[str, np.ndarray]
) -> None:
    labels = mnist["label"]
    images = mnist.select(range(5))["image"]
    reformatted = mnist.with_format("numpy").with_format(None)["label"]

    assert type(labels) is list and labels == expected["mnist_labels"].tolist()
    assert type(images) is list and len(images) == 5
    assert type(images[0]) is list and len(images[0]) == 28 and len(images[0][0]) == 28
    assert np.array_equal(np.asarray(images), expected["mnist_images"][:5])
    assert type(reformatted) is list


def test_with_transform_gives_the_transformed_column(
    mnist: datasets.Dataset, expected: dict[str, np.ndarray]
) -> None:
    transformed = mnist.with_transform(lambda batch: {"label": [v + 10 for v in batch["label"]]})

    values = transformed["label"]

    assert type(values) is list
    assert values == (expected["mnist_labels"] + 10).tolist()
    assert type(transformed) is materialized_columns_class()


def test_datasets4_style_code_keeps_working(
    mnist: datasets.Dataset, expected: dict[str, np.ndarray]
) -> None:
    ds = mnist.with_format("numpy")

    assert np.array_equal(ds["image"][:10], expected["mnist_images"][:10])
    assert int(ds["label"][3]) == expected["mnist_labels"][3]
    assert len(ds["label"]) == MNIST_ROWS
    assert [int(v) for v in ds["label"]] == expected["mnist_labels"].tolist()
    assert ds[0]["image"].shape == (28, 28)
    assert ds[[1, 2]]["image"].shape == (2, 28, 28)
    assert ds[2:5]["label"].tolist() == expected["mnist_labels"][2:5].tolist()
    assert ds.with_format("arrow")["label"].to_pylist() == expected["mnist_labels"].tolist()
    assert len(ds.__getitems__([0, 1])) == 2


def test_image_features_decode_to_pil(server: DataServer, expected: dict[str, np.ndarray]) -> None:
    ds = load_dataset(server.location, "cifar")

    images = ds["img"]
    split = ds.train_test_split(test_size=0.25, seed=42)
    as_numpy = ds.with_format("numpy")["img"]

    assert type(images) is list and len(images) == CIFAR_ROWS
    assert all(isinstance(image, PIL.Image.Image) for image in images)
    assert images[0].size == (32, 32) and images[0].mode == "RGB"
    assert np.array_equal(np.stack([np.asarray(i) for i in images]), expected["cifar_images"])
    assert len(split["train"]["img"]) == 30
    assert isinstance(split["test"]["img"][0], PIL.Image.Image)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.shape == (CIFAR_ROWS, 32, 32, 3)
    assert ds["label"] == expected["cifar_labels"].tolist()


def test_several_tags_are_concatenated_with_materialized_columns(
    server: DataServer, expected: dict[str, np.ndarray]
) -> None:
    ds = load_dataset(server.location, ["mnist", "mnist-extra"])

    images = ds.with_format("numpy")["image"]

    assert type(ds) is materialized_columns_class()
    assert np.array_equal(
        images, np.concatenate([expected["mnist_images"], expected["extra_images"]])
    )


def test_pickle_and_multiprocess_map_keep_the_class(mnist: datasets.Dataset) -> None:
    subclass = materialized_columns_class()
    ds = mnist.with_format("numpy")

    restored = pickle.loads(pickle.dumps(ds))
    mapped = ds.map(lambda batch: {"y": batch["label"] + 1}, batched=True, num_proc=2)

    assert type(restored) is subclass and isinstance(restored["label"], np.ndarray)
    assert type(mapped) is subclass
    assert np.array_equal(mapped["y"], ds["label"] + 1)
    assert dataset_compat.MaterializedColumnsDataset is subclass


def test_errors_match_datasets_3() -> None:
    ds = with_materialized_columns(datasets.Dataset.from_dict({"x": [1, 2]}))

    with pytest.raises(KeyError, match="Column y not in the dataset"):
        ds["y"]
    with pytest.raises(TypeError, match=r"datasets\.Dataset or datasets\.DatasetDict"):
        with_materialized_columns([1, 2])
    with pytest.raises(AttributeError):
        dataset_compat.NoSuchThing  # noqa: B018


def test_public_function_handles_dataset_dicts_and_returns_the_same_object() -> None:
    plain = datasets.Dataset.from_dict({"x": [1, 2, 3]})
    splits = datasets.DatasetDict({"a": plain.select([0]), "b": plain.select([1, 2])})

    same = with_materialized_columns(plain)
    same_dict = with_materialized_columns(splits)

    assert same is plain and same_dict is splits
    assert plain["x"] == [1, 2, 3]
    assert splits["b"]["x"] == [2, 3]
    assert splits["b"].with_format("numpy")["x"].tolist() == [2, 3]


@pytest.mark.parametrize(
    ("version", "lazy"), [("2.14.0", False), ("3.6.0", False), ("4.0.0", True), ("4.1.dev0", True)]
)
def test_lazy_columns_start_with_datasets_4(version: str, lazy: bool) -> None:
    assert returns_lazy_columns(version) is lazy


def test_unreadable_versions_are_rejected() -> None:
    with pytest.raises(ValueError, match="major version"):
        returns_lazy_columns("dev")


def test_importing_the_module_does_not_import_datasets() -> None:
    code = (
        "import sys, flops_utils.dataset_compat, flops_utils.data_client; "
        "heavy = {'datasets', 'numpy', 'pyarrow'} & set(sys.modules); "
        "assert not heavy, heavy"
    )

    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)


# --- across datasets versions ----------------------------------------------------------------

CROSS_VERSION_ENVS: dict[str, list[str]] = {
    # pyarrow 26 wheels import only with numpy >= 2 but do not declare it, so the resolver
    # would pick a pyarrow that fails at import next to numpy 1.26: cap it. datasets 2.19
    # also breaks with pyarrow >= 20 on its own (ArrayExtensionArray.to_pylist() lacks the
    # maps_as_pydicts argument pyarrow 20 passes; fixed in datasets 3.x), hence < 20 there.
    "datasets-2.19-numpy-1.26": ["datasets==2.19.2", "numpy==1.26.4", "pyarrow<20", "pillow"],
    "datasets-3.6-numpy-2": ["datasets==3.6.0", "pillow"],
    "datasets-4.0-numpy-1.26": ["datasets==4.0.0", "numpy==1.26.4", "pyarrow<26", "pillow"],
}
"""Throwaway environments: name → requirements (pyarrow & co. as the resolver picks)."""


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def cached_venv(requirements: list[str]) -> Path:
    """Return the python of a venv with ``requirements``, created once under VENV_CACHE.

    The directory name hashes the requirements and this interpreter's version, so a changed
    list gets a new venv. Built in a temporary directory and renamed when complete, so an
    interrupted run leaves no half-installed venv behind. Fails the test when uv fails.
    """
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("the cross-version tests need uv on PATH")
    key = json.dumps([sys.version, platform.machine(), sorted(requirements)])
    target = VENV_CACHE / hashlib.sha256(key.encode()).hexdigest()[:16]
    python = target / "bin" / "python"
    if (target / ".complete").exists():
        return python
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    building = VENV_CACHE / f"{target.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    created = _run([uv, "venv", "--quiet", "--python", sys.executable, str(building)], 120)
    assert created.returncode == 0, f"uv venv failed: {created.stderr[-2000:]}"
    installed = _run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            str(building / "bin" / "python"),
            *requirements,
        ],
        480,
    )
    if installed.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        pytest.fail(f"uv pip install {requirements} failed: {installed.stderr[-3000:]}")
    (building / ".complete").write_text(json.dumps(requirements) + "\n")
    try:
        building.rename(target)
    except OSError:  # another run finished the same venv first
        shutil.rmtree(building, ignore_errors=True)
    return python


def run_probe(
    python: Path | str, server: DataServer, expected_file: Path, home: Path
) -> dict[str, Any]:
    """Run dataset_compat_probe.py with ``python`` and only utils_pkg on its path."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    }
    env.update(
        PYTHONPATH=str(UTILS_PKG),
        PYTHONNOUSERSITE="1",
        HF_HOME=str(home),
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    probe = subprocess.run(
        [str(python), str(PROBE), server.location, str(expected_file)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=home,
        check=False,
    )
    assert probe.returncode == 0, f"probe crashed:\n{probe.stderr[-4000:]}"
    result: dict[str, Any] = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, f"{result}\n{probe.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def expected_file(
    tmp_path_factory: pytest.TempPathFactory, expected: dict[str, np.ndarray]
) -> Path:
    path = tmp_path_factory.mktemp("compat-expected") / "expected.npz"
    np.savez(path, **expected)  # type: ignore[arg-type]  # numpy stubs type **kwds as bool
    return path


def test_probe_passes_in_the_project_environment(
    server: DataServer, expected_file: Path, tmp_path: Path
) -> None:
    result = run_probe(sys.executable, server, expected_file, tmp_path)

    assert result["versions"]["datasets"] == datasets.__version__
    assert result["lazy_columns"] is True
    assert result["class"] == "MaterializedColumnsDataset"


@pytest.mark.parametrize("env_name", CROSS_VERSION_ENVS)
def test_contract_holds_in_other_datasets_versions(
    env_name: str, server: DataServer, expected_file: Path, tmp_path: Path
) -> None:
    requirements = CROSS_VERSION_ENVS[env_name]
    python = cached_venv(requirements)

    result = run_probe(python, server, expected_file, tmp_path)

    pinned = next(r for r in requirements if r.startswith("datasets=="))
    assert result["versions"]["datasets"] == pinned.removeprefix("datasets==")
    if "numpy==1.26.4" in requirements:
        assert result["versions"]["numpy"] == "1.26.4"
    major = int(result["versions"]["datasets"].split(".")[0])
    assert result["lazy_columns"] is (major >= 4)
    assert result["class"] == ("MaterializedColumnsDataset" if major >= 4 else "Dataset")
    assert len(result["passed"]) >= 8
