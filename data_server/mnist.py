"""The bundled MNIST test split (10,000 images) as a HuggingFace ``datasets.Dataset``.

Source files: ``data_server/datasets/mnist/t10k-{images-idx3,labels-idx1}-ubyte.gz`` (IDX
format, gzip; see the README there). Y. LeCun, C. Cortes, C. Burges, "The MNIST database of
handwritten digits". Nothing is downloaded.

Features: ``image`` = ``Array2D(shape=(28, 28), dtype="uint8")`` (pixels 0-255) and
``label`` = ``ClassLabel(names=["0", ..., "9"])``; the same as HuggingFace's ``mnist`` except
that images are arrays instead of PNG-encoded ``Image`` values.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from flops_utils.data_client import table_to_dataset
from flops_utils.errors import FlopsError

if TYPE_CHECKING:
    import datasets

MNIST_DIR = Path(__file__).resolve().parent / "datasets" / "mnist"
IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
LABEL_NAMES = [str(digit) for digit in range(NUM_CLASSES)]

IDX_UBYTE = 0x08
"""IDX type code of unsigned bytes, the only one MNIST uses."""


class DatasetFileError(FlopsError):
    """A bundled dataset file is missing or not in the expected format."""

    code = "dataset_file_invalid"


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes into an array of its dimensions.

    IDX header: two zero bytes, a type byte (0x08 = uint8), the number of dimensions ``d``,
    then ``d`` big-endian uint32 sizes; the data follows. Returns a read-only ``uint8``
    array of shape ``(size_0, ..., size_{d-1})``. Raises :class:`DatasetFileError` when the
    file is missing, not uint8 IDX, or shorter/longer than its header says.
    """
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise DatasetFileError(
            f"Cannot read the dataset file {path} ({exc}). Restore it from the repository."
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE:
        raise DatasetFileError(
            f"{path} is not an IDX file of unsigned bytes. Restore it from the repository."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise DatasetFileError(
            f"{path} holds {len(raw) - header} data bytes but its header announces shape "
            f"{shape}. Restore it from the repository."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist_arrays(directory: Path = MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: uint8 arrays of shape ``(10000, 28, 28)`` and ``(10000,)``.

    Raises :class:`DatasetFileError` if a file is unreadable or the counts disagree.
    """
    images = read_idx(directory / IMAGES_FILE)
    labels = read_idx(directory / LABELS_FILE)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or labels.shape != images.shape[:1]:
        raise DatasetFileError(
            f"MNIST files in {directory} disagree: images {images.shape}, labels "
            f"{labels.shape}. Restore them from the repository."
        )
    return images, labels


def array2d_storage(images: np.ndarray) -> pa.ListArray:
    """Return ``images`` of shape ``(n, h, w)`` as Arrow ``list<list<value>>`` (zero-copy values).

    This is the storage type of ``datasets.Array2D``: one outer list of ``h`` rows per image.
    """
    n, height, width = images.shape
    values = pa.array(np.ascontiguousarray(images).reshape(-1))
    row_offsets = pa.array(np.arange(0, n * height * width + 1, width, dtype=np.int32))
    rows = pa.ListArray.from_arrays(row_offsets, values)
    image_offsets = pa.array(np.arange(0, n * height + 1, height, dtype=np.int32))
    return pa.ListArray.from_arrays(image_offsets, rows)


def mnist_features() -> datasets.Features:
    """Return the MNIST features: ``image`` Array2D (28, 28) uint8, ``label`` ClassLabel 0-9."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Array2D(shape=IMAGE_SHAPE, dtype="uint8"),
            "label": datasets.ClassLabel(names=LABEL_NAMES),
        }
    )


def mnist_table(directory: Path = MNIST_DIR) -> pa.Table:
    """Return MNIST as a storage table: ``image`` ``list<list<uint8>>``, ``label`` ``int64``.

    The schema metadata holds the HuggingFace features of :func:`mnist_features`, so
    :func:`flops_utils.data_client.table_to_dataset` turns it into the typed Dataset.
    """
    images, labels = load_mnist_arrays(directory)
    metadata = mnist_features().arrow_schema.metadata
    table = pa.table({"image": array2d_storage(images), "label": labels.astype(np.int64)})
    return table.replace_schema_metadata(metadata)


def load_mnist(directory: Path = MNIST_DIR) -> datasets.Dataset:
    """Return the bundled MNIST test split as a Dataset of 10,000 rows (in file order).

    Features: see :func:`mnist_features`. Takes about 0.2 s. Raises :class:`DatasetFileError`.
    """
    return table_to_dataset(mnist_table(directory))
