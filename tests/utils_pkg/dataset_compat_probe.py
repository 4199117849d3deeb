"""Check the ``load_dataset`` column-access contract in whatever environment runs this script.

Run by ``test_dataset_compat.py`` with the python of a throwaway venv (datasets 2.19 / 3.6 /
4.0, numpy 1.26 or 2.x) and ``PYTHONPATH=utils_pkg``, so that it uses *that* environment's
datasets, numpy and pyarrow. Only numpy, Pillow, datasets and flops_utils are imported.

Usage: ``python dataset_compat_probe.py LOCATION EXPECTED.npz``

- ``LOCATION``: Flight location of a data server holding the tags ``mnist`` (MNIST rows),
  ``mnist-extra`` (further MNIST rows) and ``cifar`` (CIFAR-like ``img`` = HF ``Image`` PNGs,
  ``label`` ClassLabel);
- ``EXPECTED.npz``: arrays ``mnist_images`` (n, 28, 28) uint8, ``mnist_labels`` (n,),
  ``extra_images`` (m, 28, 28), ``cifar_images`` (k, 32, 32, 3) uint8, ``cifar_labels`` (k,).

Prints one JSON object: ``{"versions": {...}, "lazy_columns": bool, "class": str,
"passed": [names], "failed": {name: error}}``; exit status 0 when every check ran (even if
some failed), 2 for bad usage.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import PIL.Image

from flops_utils.data_client import load_dataset
from flops_utils.dataset_compat import returns_lazy_columns, with_materialized_columns

CHECKS: list[Callable[[Any, dict[str, np.ndarray]], None]] = []


def check(function: Callable[[Any, dict[str, np.ndarray]], None]) -> Any:
    CHECKS.append(function)
    return function


def _mnist(ctx: Any) -> datasets.Dataset:
    return load_dataset(ctx, "mnist")


@check
def numpy_split_reshape(location: Any, expected: dict[str, np.ndarray]) -> None:
    """The 2024 FLOps pattern: set_format numpy, train_test_split, column .reshape."""
    ds = _mnist(location)
    ds.set_format("numpy")
    split = ds.train_test_split(test_size=0.2, seed=42)
    n = len(expected["mnist_labels"])
    x = split["train"]["image"].reshape(-1, 784) / 255.0
    y = split["train"]["label"]
    assert isinstance(x, np.ndarray) and x.shape == (n - n // 5, 784), x.shape
    assert isinstance(y, np.ndarray) and y.shape == (n - n // 5,), y.shape
    rows = np.stack([split["train"][i]["image"] for i in range(len(y))])
    assert np.array_equal(split["train"]["image"], rows)
    assert x.min() >= 0.0 and x.max() <= 1.0
    test_images = split["test"]["image"]
    assert isinstance(test_images, np.ndarray) and test_images.shape == (n // 5, 28, 28)
    both = np.concatenate([split["train"]["image"], test_images])
    assert sorted(map(bytes, both.astype(np.uint8))) == sorted(map(bytes, expected["mnist_images"]))


@check
def numpy_column_values(location: Any, expected: dict[str, np.ndarray]) -> None:
    ds = _mnist(location).with_format("numpy")
    images, labels = ds["image"], ds["label"]
    assert isinstance(images, np.ndarray) and images.shape == expected["mnist_images"].shape
    assert np.array_equal(images, expected["mnist_images"])
    assert np.array_equal(labels, expected["mnist_labels"])
    exact = _mnist(location).with_format("numpy", dtype=np.uint8)["image"]
    assert exact.dtype == np.uint8


@check
def lists_without_format(location: Any, expected: dict[str, np.ndarray]) -> None:
    ds = _mnist(location)
    labels, images = ds["label"], ds["image"]
    assert type(labels) is list and labels == expected["mnist_labels"].tolist()
    assert type(images) is list and len(images) == len(labels)
    assert np.array_equal(np.asarray(images[3]), expected["mnist_images"][3])


@check
def derived_datasets(location: Any, expected: dict[str, np.ndarray]) -> None:
    ds = _mnist(location).with_format("numpy")
    images = expected["mnist_images"]
    selected = ds.select([5, 1, 3])["image"]
    assert isinstance(selected, np.ndarray) and np.array_equal(selected, images[[5, 1, 3]])
    shuffled = ds.shuffle(seed=0)
    assert isinstance(shuffled["image"], np.ndarray)
    assert np.array_equal(shuffled.flatten_indices()["image"], shuffled["image"])
    mapped = ds.map(lambda batch: {"double": batch["label"] * 2}, batched=True)
    assert np.array_equal(mapped["double"], expected["mnist_labels"] * 2)
    filtered = ds.filter(lambda row: row["label"] == 7)
    assert np.array_equal(filtered["image"], images[expected["mnist_labels"] == 7])
    plain = ds.with_format(None)["label"]
    assert type(plain) is list
    transformed = ds.with_transform(lambda batch: {"label": [v + 100 for v in batch["label"]]})
    assert list(transformed["label"]) == [v + 100 for v in expected["mnist_labels"].tolist()]
    splits = ds.train_test_split(test_size=0.5, seed=1).with_format("numpy")
    for part in splits.map(lambda b: {"label": b["label"]}, batched=True).values():
        assert isinstance(part["image"], np.ndarray)


@check
def datasets4_style_still_works(location: Any, expected: dict[str, np.ndarray]) -> None:
    ds = _mnist(location).with_format("numpy")
    assert np.array_equal(ds["image"][:], expected["mnist_images"])
    assert int(ds["label"][0]) == int(expected["mnist_labels"][0])
    assert len(ds["label"]) == len(expected["mnist_labels"])
    assert [int(v) for v in ds["label"]] == expected["mnist_labels"].tolist()
    assert ds[0]["image"].shape == (28, 28) and len(ds[:4]["label"]) == 4


@check
def several_tags(location: Any, expected: dict[str, np.ndarray]) -> None:
    ds = load_dataset(location, "mnist, mnist-extra").with_format("numpy")
    both = np.concatenate([expected["mnist_images"], expected["extra_images"]])
    assert isinstance(ds["image"], np.ndarray) and np.array_equal(ds["image"], both)


@check
def images_decode_to_pil(location: Any, expected: dict[str, np.ndarray]) -> None:
    ds = load_dataset(location, "cifar")
    images = ds["img"]
    assert type(images) is list and len(images) == len(expected["cifar_labels"])
    assert all(isinstance(image, PIL.Image.Image) for image in images)
    assert images[0].size == (32, 32) and images[0].mode == "RGB"
    assert np.array_equal(np.asarray(images[4]), expected["cifar_images"][4])
    split = ds.train_test_split(test_size=0.2, seed=42)
    assert isinstance(split["train"]["img"][0], PIL.Image.Image)
    as_numpy = ds.with_format("numpy")["img"]
    assert isinstance(as_numpy, np.ndarray) and np.array_equal(as_numpy, expected["cifar_images"])
    transformed = ds.with_transform(
        lambda batch: {"img": [np.asarray(image).mean() for image in batch["img"]]}
    )
    assert np.allclose(transformed["img"], expected["cifar_images"].mean(axis=(1, 2, 3)))


@check
def public_function_on_a_local_dataset(location: Any, expected: dict[str, np.ndarray]) -> None:
    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=(28, 28), dtype="uint8"),
            "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
        }
    )
    local = datasets.Dataset.from_dict(
        {"image": expected["mnist_images"][:20], "label": expected["mnist_labels"][:20]},
        features=features,
    )
    ds = with_materialized_columns(local)
    assert ds is local
    assert type(ds["label"]) is list
    split = ds.with_format("numpy").train_test_split(test_size=0.25, seed=0)
    assert split["train"]["image"].reshape(-1, 784).shape == (15, 784)
    dd = with_materialized_columns(datasets.DatasetDict({"a": local.select(range(3))}))
    assert type(dd["a"]["label"]) is list


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    location, expected_path = argv[1], argv[2]
    with np.load(expected_path) as npz:
        expected = {name: npz[name] for name in npz.files}
    passed: list[str] = []
    failed: dict[str, str] = {}
    for function in CHECKS:
        try:
            function(location, expected)
        except Exception as exc:
            traceback.print_exc()
            failed[function.__name__] = f"{type(exc).__name__}: {exc}"[:2000]
        else:
            passed.append(function.__name__)
    import pyarrow

    result = {
        "versions": {
            "datasets": datasets.__version__,
            "numpy": np.__version__,
            "pyarrow": pyarrow.__version__,
            "pillow": PIL.__version__,
        },
        "lazy_columns": returns_lazy_columns(),
        "class": type(load_dataset(location, "mnist")).__name__,
        "passed": passed,
        "failed": failed,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
