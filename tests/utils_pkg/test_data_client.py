"""``flops_utils.data_client``: load_dataset over a real Flight data server, features preserved."""

from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_server.mnist import load_mnist, load_mnist_arrays
from data_server.server import DataServer
from flops_utils import env_vars
from flops_utils.data_client import (
    DataClient,
    DataConfigError,
    DataServerUnavailable,
    DataTagsNotFound,
    IncompatibleDataTags,
    InvalidDataTag,
    dataset_to_table,
    load_dataset,
    load_dataset_from_env,
    normalize_location,
    parse_tags,
    table_to_dataset,
    to_storage_table,
)
from flops_utils.ml_repo_building_blocks import load_dataset as user_load_dataset
from flops_utils.net import find_free_port

MNIST_FEATURES = datasets.Features(
    {
        "image": datasets.Array2D(shape=(28, 28), dtype="uint8"),
        "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
    }
)


@pytest.fixture(scope="module")
def mnist() -> datasets.Dataset:
    return load_mnist()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[DataServer]:
    with DataServer(tmp_path / "data") as running:
        yield running


@pytest.fixture
def mnist_server(server: DataServer, mnist: datasets.Dataset) -> DataServer:
    """A data server holding MNIST rows 0-5999 as ``mnist`` and 6000-9999 as ``mnist-extra``."""
    with DataClient(server.location) as client:
        client.put_table("mnist", dataset_to_table(mnist.select(range(6000))))
        client.put_table("mnist-extra", dataset_to_table(mnist.select(range(6000, 10_000))))
    return server


def test_load_dataset_keeps_mnist_features_through_parquet_and_flight(
    mnist_server: DataServer,
) -> None:
    # Execute
    dataset = load_dataset(mnist_server.location, ["mnist"])

    # Assert
    assert dataset.num_rows == 6000
    assert dataset.features == MNIST_FEATURES
    stored_type = dataset.data.schema.field("image").type
    assert isinstance(stored_type, datasets.features.features.Array2DExtensionType)
    assert stored_type.storage_type == pa.list_(pa.list_(pa.uint8()))
    assert dataset.data.schema.field("label").type == pa.int64()
    on_disk = pq.read_schema(mnist_server.data_dir / "mnist.parquet")
    assert on_disk.field("image").type == pa.list_(pa.list_(pa.uint8()))
    assert b"huggingface" in on_disk.metadata


def test_user_repo_usage_gives_28x28_images_with_the_original_values(
    mnist_server: DataServer,
) -> None:
    # Prepare: what examples/mnist_sklearn/data_manager.py does
    images, labels = load_mnist_arrays()
    dataset = load_dataset(mnist_server.location, "mnist")

    # Execute
    dataset.set_format("numpy")
    split = dataset.train_test_split(test_size=0.2, seed=42)
    train_images = np.asarray(split["train"]["image"][:])
    test_labels = np.asarray(split["test"]["label"][:])
    exact = dataset.with_format("numpy", dtype=np.uint8)["image"][:]

    # Assert
    assert train_images.shape == (4800, 28, 28)
    assert np.issubdtype(train_images.dtype, np.integer)
    assert train_images.min() >= 0 and train_images.max() <= 255
    assert test_labels.shape == (1200,)
    assert exact.dtype == np.uint8 and exact.shape == (6000, 28, 28)
    assert np.array_equal(exact, images[:6000])
    assert np.array_equal(dataset.with_format("numpy")["label"][:], labels[:6000])


def test_several_tags_are_concatenated_in_the_requested_order(mnist_server: DataServer) -> None:
    images, _ = load_mnist_arrays()

    dataset = load_dataset(mnist_server.location, "mnist-extra, mnist, not-here")

    assert dataset.num_rows == 10_000
    assert dataset.features == MNIST_FEATURES
    view = dataset.with_format("numpy", dtype=np.uint8)
    assert np.array_equal(view["image"][:4000], images[6000:])
    assert np.array_equal(view["image"][4000:], images[:6000])


def test_tables_with_extension_types_round_trip_too(
    server: DataServer, mnist: datasets.Dataset
) -> None:
    # Prepare: the Dataset's own Arrow table, whose image column is an extension type
    table = mnist.select(range(100)).flatten_indices().data.table
    assert isinstance(table.schema.field("image").type, pa.ExtensionType)

    # Execute
    with DataClient(server.location) as client:
        client.put_table("raw", table)
    dataset = load_dataset(server.location, ["raw"])

    # Assert
    assert dataset.features == MNIST_FEATURES
    assert np.array_equal(
        dataset.with_format("numpy", dtype=np.uint8)["image"][:],
        mnist.with_format("numpy", dtype=np.uint8)["image"][:100],
    )


def test_missing_tags_error_lists_what_the_server_has(mnist_server: DataServer) -> None:
    with pytest.raises(DataTagsNotFound) as caught:
        load_dataset(mnist_server.location, ["cifar10", "svhn"])

    error = caught.value
    assert error.code == "data_tags_not_found"
    assert error.details == ["mnist", "mnist-extra"]
    assert "['cifar10', 'svhn']" in error.message
    assert "['mnist', 'mnist-extra']" in error.message
    assert mnist_server.location in error.message


def test_missing_tags_on_an_empty_server(server: DataServer) -> None:
    with pytest.raises(DataTagsNotFound) as caught:
        load_dataset(server.location, "mnist")

    assert caught.value.details == []
    assert "no data at all" in caught.value.message


def test_unreachable_server_is_named(tmp_path: Path) -> None:
    address = f"127.0.0.1:{find_free_port()}"

    with pytest.raises(DataServerUnavailable) as caught:
        load_dataset(address, "mnist")

    assert f"grpc://{address}" in caught.value.message
    assert caught.value.code == "data_server_unavailable"


def test_tags_with_different_features_cannot_be_joined(
    mnist_server: DataServer,
) -> None:
    with DataClient(mnist_server.location) as client:
        client.put_table("numbers", pa.table({"x": [1, 2, 3]}))

    with pytest.raises(IncompatibleDataTags):
        load_dataset(mnist_server.location, ["mnist", "numbers"])


def test_load_dataset_from_env_reads_the_flops_variables(
    mnist_server: DataServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env_vars.DATA_SERVER, mnist_server.location)
    monkeypatch.setenv(env_vars.DATA_TAGS, "mnist-extra")

    from_env = load_dataset_from_env()
    from_user_api = user_load_dataset()

    assert from_env.num_rows == from_user_api.num_rows == 4000
    assert from_user_api.features == MNIST_FEATURES


@pytest.mark.parametrize("missing", [env_vars.DATA_SERVER, env_vars.DATA_TAGS])
def test_load_dataset_from_env_names_a_missing_variable(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    monkeypatch.setenv(env_vars.DATA_SERVER, "grpc://127.0.0.1:1")
    monkeypatch.setenv(env_vars.DATA_TAGS, "mnist")
    monkeypatch.delenv(missing)

    with pytest.raises(DataConfigError) as caught:
        load_dataset_from_env()

    assert f"${missing}" in caught.value.message


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:8815", "grpc://127.0.0.1:8815"),
        ("grpc://node-1:8815", "grpc://node-1:8815"),
        ("grpc+tcp://10.0.0.5:1/", "grpc+tcp://10.0.0.5:1"),
        ("grpc://[::1]:8815", "grpc://[::1]:8815"),
    ],
)
def test_locations_are_normalized(given: str, expected: str) -> None:
    assert normalize_location(given) == expected


@pytest.mark.parametrize("bad", ["", "http://host:80", "grpc://host", "grpc://host:0", "host"])
def test_malformed_locations_are_rejected(bad: str) -> None:
    with pytest.raises(DataConfigError):
        normalize_location(bad)


def test_tags_are_parsed_from_text_or_lists() -> None:
    assert parse_tags(" mnist , mnist-extra,,mnist ") == ["mnist", "mnist-extra"]
    assert parse_tags(["a", "b"]) == ["a", "b"]
    with pytest.raises(DataConfigError):
        parse_tags(" , ")
    with pytest.raises(InvalidDataTag):
        parse_tags("mnist,../secrets")


def test_storage_tables_drop_extension_types_and_keep_features(
    mnist: datasets.Dataset,
) -> None:
    # Prepare
    with_extension = mnist.select(range(10)).flatten_indices().data.table

    # Execute
    plain = to_storage_table(with_extension)
    restored = table_to_dataset(plain)

    # Assert
    assert plain.schema.field("image").type == pa.list_(pa.list_(pa.uint8()))
    assert plain.schema.metadata == with_extension.schema.metadata
    assert restored.features == MNIST_FEATURES


def test_tables_without_metadata_get_inferred_features() -> None:
    dataset = table_to_dataset(pa.table({"x": pa.array([1, 2], pa.int32())}))

    assert dataset.features == datasets.Features({"x": datasets.Value("int32")})


def test_a_certificate_switches_to_tls_and_the_env_supplies_the_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from data_server.security import DataServerSecurity

    security = DataServerSecurity.load(tmp_path / "node", "node-1", ["127.0.0.1"])
    with DataServer(tmp_path / "node", security=security) as secure:
        plain_location = secure.location.replace("grpc+tls://", "grpc://")
        monkeypatch.setenv(env_vars.DATA_TOKEN, security.owner_token)
        monkeypatch.setenv(env_vars.DATA_SERVER_CERT, security.cert_pem)
        with DataClient(plain_location) as from_env:
            stored = from_env.put_table("numbers", pa.table({"x": [1, 2, 3]}))
            location = from_env.location
        without_env = DataClient(secure.location, token="", tls_root_certs="")
        with without_env, pytest.raises(DataServerUnavailable, match="FLOPS_DATA_SERVER_CERT"):
            without_env.list_tags()

    assert stored == 3
    assert location == secure.location
