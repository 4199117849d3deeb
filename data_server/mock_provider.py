"""Mock data provider: partition a bundled dataset and push one part to each node's data server.

Partitioning uses Flower Datasets' partitioners (``flwr_datasets.partitioner``):

- ``iid``: the rows are shuffled with ``seed``, then :class:`IidPartitioner` cuts contiguous
  shards; part sizes differ by at most one row.
- ``dirichlet``: :class:`DirichletPartitioner` with ``partition_by="label"``: for every label,
  the share each part gets is drawn from Dirichlet(``alpha``) (Hsu et al., 2019, "Measuring
  the Effects of Non-Identical Data Distribution for Federated Visual Classification").
  Small ``alpha`` (e.g. 0.1) gives strongly label-skewed parts, large ``alpha`` near-IID ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from data_server.mnist import load_mnist
from flops_utils.data_client import DataClient, dataset_to_table, validate_tag
from flops_utils.errors import FlopsError
from flops_utils.logging import logger

if TYPE_CHECKING:
    import datasets

DATASETS: dict[str, Callable[[], datasets.Dataset]] = {"mnist": load_mnist}
"""Bundled datasets by name (nothing is downloaded)."""

PARTITIONINGS = ("iid", "dirichlet")

MAX_MIN_PARTITION_SIZE = 10
"""Upper bound of the Dirichlet ``min_partition_size`` (Flower Datasets' default)."""


class UnknownDataset(FlopsError):
    """The requested dataset is not bundled; ``details`` lists the known names."""

    code = "unknown_dataset"


class InvalidPartitioning(FlopsError):
    """Partitioning parameters are out of range or the partitioner could not satisfy them."""

    code = "invalid_partitioning"


def load_named_dataset(name: str) -> datasets.Dataset:
    """Return the bundled dataset called ``name``; raises :class:`UnknownDataset`."""
    loader = DATASETS.get(name)
    if loader is None:
        known = sorted(DATASETS)
        raise UnknownDataset(
            f"Unknown mock dataset {name!r}. Choose one of {known}.", details=known
        )
    return loader()


def min_partition_size(num_rows: int, num_partitions: int) -> int:
    """The Dirichlet ``min_partition_size``: 10, lowered to a tenth of the mean part size.

    With 10,000 rows this stays 10 up to 100 parts and reaches 1 at 1,000 parts, so the
    partitioner's resampling (at most 10 tries) rarely runs out.
    """
    return max(1, min(MAX_MIN_PARTITION_SIZE, num_rows // (10 * num_partitions)))


def partition(
    dataset: datasets.Dataset,
    num_partitions: int,
    partitioning: str = "iid",
    alpha: float = 0.5,
    seed: int = 42,
) -> list[datasets.Dataset]:
    """Split ``dataset`` into ``num_partitions`` disjoint parts that together hold every row.

    Args:
        dataset: rows to split; must have a ``label`` column for ``dirichlet``.
        num_partitions: number of parts, 1 ≤ n ≤ rows.
        partitioning: ``"iid"`` or ``"dirichlet"`` (see the module docstring).
        alpha: Dirichlet concentration (> 0); ignored for ``iid``. Defaults to 0.5.
        seed: random seed; the same inputs give the same parts. Defaults to 42.

    Returns the parts in order (features kept). Raises :class:`InvalidPartitioning` for
    parameters out of range or when the Dirichlet sampling cannot give every part
    :func:`min_partition_size` rows (raise ``alpha`` or lower ``num_partitions``).
    """
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if partitioning not in PARTITIONINGS:
        raise InvalidPartitioning(
            f"Unknown partitioning {partitioning!r}. Choose one of {list(PARTITIONINGS)}."
        )
    if not 1 <= num_partitions <= len(dataset):
        raise InvalidPartitioning(
            f"Cannot split {len(dataset)} rows into {num_partitions} parts. "
            f"Use between 1 and {len(dataset)} nodes."
        )
    if partitioning == "dirichlet":
        if not alpha > 0:
            raise InvalidPartitioning(f"alpha must be positive, got {alpha}. Use e.g. 0.5.")
        if "label" not in dataset.column_names:
            raise InvalidPartitioning(
                "Dirichlet partitioning needs a 'label' column. Use partitioning='iid'."
            )
        partitioner: IidPartitioner | DirichletPartitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size(len(dataset), num_partitions),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
        partitioner.dataset = dataset
    else:
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = dataset.shuffle(seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parts = [partitioner.load_partition(index) for index in range(num_partitions)]
        except ValueError as exc:
            raise InvalidPartitioning(
                f"Could not partition {len(dataset)} rows into {num_partitions} parts with "
                f"alpha={alpha} ({exc}). Raise alpha or use fewer nodes."
            ) from exc
    for warning in caught:
        logger.info("partitioner: %s", warning.message)
    return parts


def provide_mock_data(
    dataset_name: str,
    node_locations: dict[str, str],
    tag: str | None = None,
    partitioning: str = "iid",
    alpha: float = 0.5,
    seed: int = 42,
    credentials: dict[str, tuple[str, str]] | None = None,
) -> dict[str, int]:
    """Partition a bundled dataset across nodes and store part *i* on node *i* under ``tag``.

    Args:
        dataset_name: a key of :data:`DATASETS` (``"mnist"``).
        node_locations: ``{node_id: "grpc://HOST:PORT"}``; parts follow this order.
        tag: data tag to store under; defaults to ``dataset_name``.
        partitioning, alpha, seed: as in :func:`partition`.
        credentials: ``{node_id: (token, certificate PEM)}`` for secure data servers (a write
            token or the owner's credential, and the server's certificate); a node missing
            here is reached with :class:`DataClient`'s defaults (``$FLOPS_DATA_TOKEN`` /
            ``$FLOPS_DATA_SERVER_CERT`` if set, else plain gRPC without a token).

    Returns ``{node_id: rows stored}``. Each node's previous table for ``tag`` is replaced.
    Raises :class:`UnknownDataset`, :class:`InvalidPartitioning`,
    :class:`flops_utils.data_client.InvalidDataTag` and the
    :class:`flops_utils.data_client.DataPlaneError` subclasses of :class:`DataClient`
    (e.g. ``DataServerUnavailable`` naming the node's address).
    """
    tag = validate_tag(tag or dataset_name)
    if not node_locations:
        raise InvalidPartitioning("No nodes were given. Pass at least one node's data server.")
    dataset = load_named_dataset(dataset_name)
    parts = partition(dataset, len(node_locations), partitioning, alpha, seed)
    stored: dict[str, int] = {}
    for (node_id, location), part in zip(node_locations.items(), parts, strict=True):
        token, cert = (credentials or {}).get(node_id, (None, None))
        with DataClient(location, token=token, tls_root_certs=cert) as client:
            stored[node_id] = client.put_table(tag, dataset_to_table(part))
        logger.info(
            "mock data: %d rows of %s as %r on %s", stored[node_id], dataset_name, tag, node_id
        )
    return stored
