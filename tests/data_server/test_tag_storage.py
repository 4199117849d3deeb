"""Tag validation and the atomic Parquet storage of a data server."""

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_server.storage import TagStorage
from flops_utils.data_client import (
    DataTagsNotFound,
    InvalidDataTable,
    InvalidDataTag,
    validate_tag,
)


def numbers(start: int, count: int) -> pa.Table:
    table = pa.table({"x": pa.array(range(start, start + count), pa.int64())})
    return table.replace_schema_metadata({b"huggingface": b'{"info": {"features": {}}}'})


@pytest.mark.parametrize(
    "tag", ["mnist", "a", "0", "mnist-2024", "cifar10.part_1", "x" * 63, "a.b-c_d"]
)
def test_valid_tags_are_accepted(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize(
    "tag",
    [
        "",
        "..",
        "../etc",
        "a/../../b",
        "a..b",
        "a/b",
        "/abs",
        "a\\b",
        ".hidden",
        "-x",
        "_x",
        "Mnist",
        "MNIST",
        "x" * 64,
        "with space",
        "nul\x00",
        "caf\u00e9",
        "tag\n",
        5,
        None,
    ],
)
def test_invalid_tags_are_rejected_with_the_rule(tag: object) -> None:
    with pytest.raises(InvalidDataTag) as caught:
        validate_tag(tag)

    assert caught.value.code == "invalid_data_tag"
    assert "1-63 characters" in caught.value.message


def test_storage_never_builds_a_path_outside_its_directory(tmp_path: Path) -> None:
    storage = TagStorage(tmp_path / "data")

    with pytest.raises(InvalidDataTag):
        storage.path("../outside")

    assert storage.path("mnist") == (tmp_path / "data" / "mnist.parquet").resolve()


def test_write_then_read_keeps_rows_and_schema_metadata(tmp_path: Path) -> None:
    # Prepare
    storage = TagStorage(tmp_path / "data")
    table = numbers(0, 100)

    # Execute
    rows = storage.write_table("numbers", table)
    read = storage.read_table("numbers")
    info = storage.info("numbers")

    # Assert
    assert rows == 100
    assert read.equals(table)
    assert read.schema.metadata == table.schema.metadata
    assert info.rows == 100 and info.size_bytes > 0
    assert info.schema.metadata == table.schema.metadata
    assert storage.tags() == {"numbers": 100}
    assert (tmp_path / "data" / "numbers.parquet").is_file()


def test_failed_write_leaves_the_previous_table_and_no_temp_file(tmp_path: Path) -> None:
    # Prepare
    data_dir = tmp_path / "data"
    storage = TagStorage(data_dir)
    storage.write_table("numbers", numbers(0, 10))
    before = (data_dir / "numbers.parquet").read_bytes()

    def batches_then_crash() -> Iterator[pa.RecordBatch]:
        yield from numbers(1000, 50).to_batches()
        raise ConnectionError("client went away")

    # Execute
    with pytest.raises(ConnectionError), storage.writer("numbers", numbers(0, 0).schema) as w:
        for batch in batches_then_crash():
            w.write_batch(batch)

    # Assert
    assert (data_dir / "numbers.parquet").read_bytes() == before
    assert storage.read_table("numbers").column("x").to_pylist() == list(range(10))
    assert list(data_dir.iterdir()) == [data_dir / "numbers.parquet"]


def test_a_batch_of_another_schema_aborts_the_write(tmp_path: Path) -> None:
    storage = TagStorage(tmp_path / "data")
    storage.write_table("numbers", numbers(0, 10))
    other = pa.record_batch({"y": pa.array(["a"])})

    with pytest.raises(InvalidDataTable), storage.writer("numbers", numbers(0, 0).schema) as w:
        w.write_batch(other)

    assert storage.tags() == {"numbers": 10}


def test_a_table_without_columns_is_rejected(tmp_path: Path) -> None:
    storage = TagStorage(tmp_path / "data")

    with pytest.raises(InvalidDataTable):
        storage.write_table("empty", pa.table({}))

    assert storage.tags() == {}
    assert list((tmp_path / "data").iterdir()) == []


def test_stale_temp_files_are_removed_and_foreign_files_ignored(tmp_path: Path) -> None:
    # Prepare
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    pq.write_table(numbers(0, 3), data_dir / "ok.parquet")
    pq.write_table(numbers(0, 3), data_dir / "Not-A-Tag.parquet")
    (data_dir / ".ok.abc123.tmp").write_bytes(b"half a file")

    # Execute
    storage = TagStorage(data_dir)

    # Assert
    assert storage.tags() == {"ok": 3}
    assert not (data_dir / ".ok.abc123.tmp").exists()


def test_drop_removes_the_tag_and_reports_whether_it_existed(tmp_path: Path) -> None:
    changes: list[str] = []
    storage = TagStorage(tmp_path / "data", on_change=lambda: changes.append("changed"))
    storage.write_table("numbers", numbers(0, 5))

    assert storage.drop("numbers") is True
    assert storage.drop("numbers") is False
    assert storage.tags() == {}
    assert changes == ["changed", "changed"]
    with pytest.raises(DataTagsNotFound) as caught:
        storage.read_table("numbers")
    assert caught.value.details == []
