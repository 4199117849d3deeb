"""Partitioning the bundled MNIST across nodes and pushing the parts to real data servers."""

from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pytest

from data_server.mock_provider import (
    InvalidPartitioning,
    UnknownDataset,
    partition,
    provide_mock_data,
)
from data_server.server import DataServer
from flops_utils.data_client import DataClient, DataServerUnavailable, load_dataset
from flops_utils.net import find_free_port


def label_shares(part: datasets.Dataset) -> np.ndarray:
    labels = np.asarray(part.with_format("numpy")["label"][:])
    counts = np.bincount(labels, minlength=10)
    shares: np.ndarray = counts / counts.sum()
    return shares


def mean_distance_to_global(parts: list[datasets.Dataset], mnist: datasets.Dataset) -> float:
    """Mean total-variation distance between each part's label shares and MNIST's."""
    overall = label_shares(mnist)
    return float(np.mean([0.5 * np.abs(label_shares(p) - overall).sum() for p in parts]))


def row_ids(part: datasets.Dataset) -> set[int]:
    return set(np.asarray(part.with_format("numpy")["row"][:]).tolist())


@pytest.fixture(scope="module")
def numbered(mnist: datasets.Dataset) -> datasets.Dataset:
    """MNIST with a ``row`` column (0..9999) to check that parts are disjoint and complete."""
    return mnist.add_column("row", np.arange(mnist.num_rows))


def test_iid_parts_are_balanced_disjoint_and_complete(
    numbered: datasets.Dataset, mnist: datasets.Dataset
) -> None:
    # Execute
    parts = partition(numbered, 3, "iid", seed=42)

    # Assert
    sizes = [p.num_rows for p in parts]
    assert sum(sizes) == 10_000
    assert max(sizes) - min(sizes) <= 1
    ids = [row_ids(p) for p in parts]
    assert set().union(*ids) == set(range(10_000))
    assert sum(len(i) for i in ids) == 10_000
    assert mean_distance_to_global(parts, mnist) < 0.05
    assert parts[0].features["image"] == mnist.features["image"]


def test_dirichlet_parts_are_label_skewed_and_complete(
    numbered: datasets.Dataset, mnist: datasets.Dataset
) -> None:
    # Execute
    parts = partition(numbered, 4, "dirichlet", alpha=0.3, seed=7)

    # Assert
    assert sum(p.num_rows for p in parts) == 10_000
    assert set().union(*(row_ids(p) for p in parts)) == set(range(10_000))
    assert min(p.num_rows for p in parts) >= 10
    assert mean_distance_to_global(parts, mnist) > 0.25


def test_partitioning_is_reproducible_with_a_seed(numbered: datasets.Dataset) -> None:
    first = partition(numbered, 2, "dirichlet", alpha=0.5, seed=3)
    second = partition(numbered, 2, "dirichlet", alpha=0.5, seed=3)

    assert [row_ids(p) for p in first] == [row_ids(p) for p in second]


@pytest.mark.parametrize(
    ("num_partitions", "partitioning", "alpha"),
    [(0, "iid", 0.5), (10_001, "iid", 0.5), (2, "by-zipcode", 0.5), (2, "dirichlet", 0.0)],
)
def test_bad_partitioning_parameters_are_rejected(
    mnist: datasets.Dataset, num_partitions: int, partitioning: str, alpha: float
) -> None:
    with pytest.raises(InvalidPartitioning):
        partition(mnist, num_partitions, partitioning, alpha)


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(UnknownDataset) as caught:
        provide_mock_data("imagenet", {"n1": "grpc://127.0.0.1:1"})

    assert caught.value.details == ["mnist"]
    assert "'imagenet'" in caught.value.message and "['mnist']" in caught.value.message


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[DataServer, DataServer]]:
    with DataServer(tmp_path / "n1") as first, DataServer(tmp_path / "n2") as second:
        yield first, second


def test_provide_mock_data_pushes_one_part_per_node(
    two_servers: tuple[DataServer, DataServer],
) -> None:
    # Prepare
    first, second = two_servers
    nodes = {"node-1": first.location, "node-2": second.location}

    # Execute
    rows = provide_mock_data("mnist", nodes, tag="mnist", partitioning="iid", seed=42)

    # Assert
    assert rows == {"node-1": 5000, "node-2": 5000}
    for server in (first, second):
        with DataClient(server.location) as client:
            assert client.list_tags() == {"mnist": 5000}
        local = load_dataset(server.location, ["mnist"])
        assert local.num_rows == 5000
        assert local.features["image"] == datasets.Array2D(shape=(28, 28), dtype="uint8")


def test_provide_mock_data_names_an_unreachable_node(tmp_path: Path) -> None:
    dead = f"grpc://127.0.0.1:{find_free_port()}"

    with pytest.raises(DataServerUnavailable) as caught:
        provide_mock_data("mnist", {"node-1": dead})

    assert dead in caught.value.message
