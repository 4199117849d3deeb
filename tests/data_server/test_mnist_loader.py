"""The bundled MNIST test split, read from its IDX files."""

import gzip
from pathlib import Path

import datasets
import numpy as np
import pytest

from data_server.mnist import MNIST_DIR, DatasetFileError, load_mnist_arrays, read_idx

README_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_load_mnist_has_10000_rows_with_typed_features(mnist: datasets.Dataset) -> None:
    assert mnist.num_rows == 10_000
    assert mnist.features["image"] == datasets.Array2D(shape=(28, 28), dtype="uint8")
    assert mnist.features["label"] == datasets.ClassLabel(names=[str(d) for d in range(10)])


def test_load_mnist_holds_the_idx_pixels_and_labels(mnist: datasets.Dataset) -> None:
    # Prepare
    images, labels = load_mnist_arrays()
    view = mnist.with_format("numpy", dtype=np.uint8)

    # Execute
    loaded_images = view["image"][:]
    loaded_labels = view["label"][:]

    # Assert
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert loaded_images.dtype == np.uint8
    assert np.array_equal(loaded_images, images)
    assert np.array_equal(loaded_labels, labels)
    assert np.bincount(labels).tolist() == README_LABEL_COUNTS
    assert 0 < images.mean() < 255 and images.max() == 255


def test_read_idx_rejects_a_file_with_a_wrong_header(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc"))

    with pytest.raises(DatasetFileError) as caught:
        read_idx(bad)

    assert "IDX file of unsigned bytes" in caught.value.message


def test_read_idx_rejects_a_truncated_file(tmp_path: Path) -> None:
    raw = gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    truncated = tmp_path / "labels.gz"
    truncated.write_bytes(gzip.compress(raw[:-10]))

    with pytest.raises(DatasetFileError) as caught:
        read_idx(truncated)

    assert "announces shape (10000,)" in caught.value.message


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DatasetFileError):
        load_mnist_arrays(tmp_path)
