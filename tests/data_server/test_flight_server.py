"""The Arrow Flight protocol of the data server, exercised over loopback with real clients."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from data_server.server import DataServer, DataServerStartError
from flops_utils.data_client import (
    DataClient,
    DataServerUnavailable,
    DataTagsNotFound,
    InvalidDataTable,
    InvalidDataTag,
)


def numbers(start: int, count: int) -> pa.Table:
    return pa.table({"x": pa.array(range(start, start + count), pa.int64())})


def error_code(exc: flight.FlightServerError) -> str:
    code: str = json.loads(exc.extra_info.decode())["code"]
    return code


def test_put_get_list_drop_round_trip(data_server: DataServer) -> None:
    # Prepare
    table = numbers(0, 1000).replace_schema_metadata({b"huggingface": b"{}"})

    with DataClient(data_server.location) as client:
        # Execute
        stored = client.put_table("numbers", table)
        tags_after_put = client.list_tags()
        fetched = client.get_table("numbers")
        dropped = client.drop("numbers")
        dropped_again = client.drop("numbers")
        tags_after_drop = client.list_tags()

    # Assert
    assert stored == 1000
    assert tags_after_put == {"numbers": 1000}
    assert fetched.equals(table)
    assert fetched.schema.metadata == {b"huggingface": b"{}"}
    assert (dropped, dropped_again) == (True, False)
    assert tags_after_drop == {}
    assert not (data_server.data_dir / "numbers.parquet").exists()


def test_put_replaces_the_previous_table(data_server: DataServer) -> None:
    with DataClient(data_server.location) as client:
        client.put_table("numbers", numbers(0, 10))
        client.put_table("numbers", numbers(500, 3))

        assert client.get_table("numbers").column("x").to_pylist() == [500, 501, 502]
        assert client.list_tags() == {"numbers": 3}


def test_list_flights_filters_by_tags_in_json_criteria(data_server: DataServer) -> None:
    # Prepare
    with DataClient(data_server.location) as client:
        for tag, rows in (("alpha", 1), ("beta", 2), ("gamma", 3)):
            client.put_table(tag, numbers(0, rows))
    raw = flight.connect(data_server.location)

    # Execute
    everything = {i.descriptor.path[0].decode(): i for i in raw.list_flights()}
    filtered = list(raw.list_flights(json.dumps({"tags": ["gamma", "alpha", "nope"]}).encode()))
    with DataClient(data_server.location) as client:
        found = client.find_tags("beta, nope")

    # Assert
    assert {tag: info.total_records for tag, info in everything.items()} == {
        "alpha": 1,
        "beta": 2,
        "gamma": 3,
    }
    assert sorted(i.descriptor.path[0].decode() for i in filtered) == ["alpha", "gamma"]
    gamma = everything["gamma"]
    assert gamma.total_bytes > 0
    assert gamma.schema.names == ["x"]
    assert gamma.endpoints[0].ticket.ticket == b"gamma"
    assert found == {"beta": 2}
    raw.close()


@pytest.mark.parametrize(
    ("criteria", "code"),
    [
        (b"not json", "invalid_request"),
        (b'{"tags": "alpha"}', "invalid_request"),
        (b'{"tags": ["../etc"]}', "invalid_data_tag"),
    ],
)
def test_malformed_criteria_are_rejected(
    data_server: DataServer, criteria: bytes, code: str
) -> None:
    raw = flight.connect(data_server.location)

    with pytest.raises(flight.FlightServerError) as caught:
        list(raw.list_flights(criteria))

    assert error_code(caught.value) == code
    raw.close()


def test_flight_info_and_do_get_by_ticket(data_server: DataServer) -> None:
    with DataClient(data_server.location) as client:
        client.put_table("numbers", numbers(7, 4))
    raw = flight.connect(data_server.location)

    info = raw.get_flight_info(flight.FlightDescriptor.for_path("numbers"))
    table = raw.do_get(info.endpoints[0].ticket).read_all()

    assert info.total_records == 4
    assert table.column("x").to_pylist() == [7, 8, 9, 10]
    raw.close()


@pytest.mark.parametrize("tag", ["../escape", "..", "UPPER", "a/b", "x" * 64])
def test_path_tricks_are_rejected_on_every_call(data_server: DataServer, tag: str) -> None:
    # Prepare
    raw = flight.connect(data_server.location)
    descriptor = flight.FlightDescriptor.for_path(tag)
    schema = numbers(0, 1).schema

    # Execute
    with pytest.raises(flight.FlightServerError) as on_get:
        raw.do_get(flight.Ticket(tag.encode())).read_all()
    with pytest.raises(flight.FlightServerError) as on_info:
        raw.get_flight_info(descriptor)
    with pytest.raises(flight.FlightServerError) as on_drop:
        list(raw.do_action(flight.Action("drop", tag.encode())))
    writer, reader = raw.do_put(descriptor, schema)
    with pytest.raises(flight.FlightServerError) as on_put:
        writer.write_table(numbers(0, 1))
        writer.done_writing()
        reader.read()
        writer.close()

    # Assert
    for caught in (on_get, on_info, on_drop, on_put):
        assert error_code(caught.value) == "invalid_data_tag"
    assert list(data_server.data_dir.parent.rglob("*.parquet")) == []
    raw.close()


def test_missing_tag_error_lists_the_tags_the_server_has(data_server: DataServer) -> None:
    with DataClient(data_server.location) as client:
        client.put_table("mnist", numbers(0, 1))

        with pytest.raises(DataTagsNotFound) as caught:
            client.get_table("cifar10")

    assert caught.value.details == ["mnist"]
    assert "'cifar10'" in caught.value.message and "['mnist']" in caught.value.message


def test_upload_shorter_than_announced_is_discarded(data_server: DataServer) -> None:
    # Prepare: the tag holds 10 rows; an upload announces 1000 rows but sends 100
    with DataClient(data_server.location) as client:
        client.put_table("numbers", numbers(0, 10))
    raw = flight.connect(data_server.location)
    table = numbers(1000, 100)
    writer, reader = raw.do_put(flight.FlightDescriptor.for_path("numbers"), table.schema)

    # Execute
    with pytest.raises(flight.FlightServerError) as caught:
        writer.write_with_metadata(table.to_batches()[0], pa.py_buffer(b'{"rows": 1000}'))
        writer.done_writing()
        reader.read()
        writer.close()

    # Assert
    assert error_code(caught.value) == "invalid_data_table"
    with DataClient(data_server.location) as client:
        assert client.get_table("numbers").column("x").to_pylist() == list(range(10))
    assert [p.name for p in data_server.data_dir.iterdir()] == ["numbers.parquet"]
    raw.close()


def test_interrupted_upload_keeps_the_previous_table(data_server: DataServer) -> None:
    # Prepare
    with DataClient(data_server.location) as client:
        client.put_table("numbers", numbers(0, 10))
    raw = flight.connect(data_server.location)
    table = numbers(1000, 1000)
    writer, _ = raw.do_put(flight.FlightDescriptor.for_path("numbers"), table.schema)

    # Execute: send the first of ten batches, then drop the connection
    batches = table.to_batches(max_chunksize=100)
    writer.write_with_metadata(batches[0], pa.py_buffer(b'{"rows": 1000}'))
    raw.close()
    del writer
    data_server.stop()  # returns once the server has ended the interrupted upload

    # Assert
    assert [p.name for p in data_server.data_dir.iterdir()] == ["numbers.parquet"]
    with DataServer(data_server.data_dir) as restarted, DataClient(restarted.location) as client:
        assert client.get_table("numbers").column("x").to_pylist() == list(range(10))


def test_table_without_columns_is_refused_by_the_client(data_server: DataServer) -> None:
    with DataClient(data_server.location) as client, pytest.raises(InvalidDataTable):
        client.put_table("empty", pa.table({}))


def test_client_validates_tags_before_sending(data_server: DataServer) -> None:
    with DataClient(data_server.location) as client, pytest.raises(InvalidDataTag):
        client.put_table("../x", numbers(0, 1))


def test_unknown_action_is_rejected(data_server: DataServer) -> None:
    raw = flight.connect(data_server.location)

    with pytest.raises(flight.FlightServerError) as caught:
        list(raw.do_action(flight.Action("format-disk", b"")))
    actions = {a.type for a in raw.list_actions()}

    assert error_code(caught.value) == "invalid_request"
    assert actions == {"tags", "drop"}
    raw.close()


def test_a_second_server_on_a_used_port_fails_clearly(
    data_server: DataServer, tmp_path: Path
) -> None:
    second = DataServer(tmp_path / "other", "127.0.0.1", data_server.port)

    with pytest.raises(DataServerStartError) as caught:
        second.start()

    assert str(data_server.port) in caught.value.message


def test_server_lifecycle(tmp_path: Path) -> None:
    server = DataServer(tmp_path / "data")
    with pytest.raises(RuntimeError):
        _ = server.location

    server.start()
    location = server.location
    with DataClient(location) as client:
        assert client.list_tags() == {}
    server.stop()
    server.stop()

    assert location.startswith("grpc://127.0.0.1:")
    with DataClient(location, timeout_s=5) as client, pytest.raises(DataServerUnavailable):
        client.list_tags()


def test_a_table_with_columns_but_no_rows_is_stored(data_server: DataServer) -> None:
    with DataClient(data_server.location) as client:
        stored = client.put_table("empty", numbers(0, 0))
        fetched = client.get_table("empty")

        assert stored == 0
        assert client.list_tags() == {"empty": 0}
    assert fetched.num_rows == 0 and fetched.schema.names == ["x"]
