"""Client side of the data plane: talk to a node's Arrow Flight data server.

A data server (``flops-data-server``, package ``data_server``) stores one table per *data tag*.
This module is what learners and the mock data provider use to reach it:

- :class:`DataClient` lists, reads, writes and drops tagged tables (``pyarrow.Table``);
- :func:`load_dataset` / :func:`load_dataset_from_env` return a HuggingFace ``datasets.Dataset``
  holding every table whose tag is requested, with the original features (e.g. MNIST ``image``
  ``Array2D((28, 28), "uint8")`` and ``label`` ``ClassLabel`` 0-9).

Wire protocol (shared with ``data_server.server``): descriptor ``FlightDescriptor.for_path(tag)``;
``list_flights`` criteria JSON ``{"tags": [...]}`` (empty → all); ``do_get(Ticket(tag))``;
``do_put`` replaces the tag atomically, and the first batch may carry app metadata
``{"rows": N}`` so the server can discard an interrupted upload; actions ``tags`` (result JSON
``{tag: rows}``) and ``drop`` (body = tag, result JSON ``{"tag", "dropped"}``). User errors
travel as ``FlightServerError`` whose ``extra_info`` is JSON ``{"code", "message", "details"}``.

Security (``data_server.security``): a secure data server speaks TLS with a self-signed
certificate, which the client trusts as its only root (``tls_root_certs``; the manager gives
learners the certificate the node registered, ``$FLOPS_DATA_SERVER_CERT``), and wants
``authorization: Bearer <token>`` on every call (a learner's read token from the manager,
``$FLOPS_DATA_TOKEN``, or the node owner's credential). Refusals raise
:class:`DataAccessDenied`.

How features survive storage and transfer: HuggingFace features live in the Arrow schema
metadata key ``huggingface``. Extension types (``Array2D`` is one, registered by ``datasets``)
are replaced by their plain storage types before a table is sent or stored
(:func:`to_storage_table`), and :func:`table_to_dataset` casts back to the features named in the
metadata. The server therefore never needs ``datasets``. :func:`load_dataset` also keeps the
datasets 2.x/3.x column access on datasets >= 4 (:mod:`flops_utils.dataset_compat`).

``pyarrow.flight`` and ``datasets`` are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from flops_utils import env_vars
from flops_utils.dataset_compat import with_materialized_columns
from flops_utils.errors import FlopsError
from flops_utils.logging import logger

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

TAG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
"""A data tag: 1-63 characters from ``a-z 0-9 _ . -``, starting with a letter or digit."""

HF_METADATA_KEY = b"huggingface"
"""Arrow schema metadata key under which ``datasets`` stores a table's features."""

EXTENSION_FIELD_KEYS = (b"ARROW:extension:name", b"ARROW:extension:metadata")
"""Field metadata keys that describe an Arrow extension type (removed by to_storage_table)."""

ROWS_METADATA_KEY = "rows"
"""Key of the ``do_put`` app metadata (first batch) announcing the number of rows sent."""

DEFAULT_TIMEOUT_S = 30.0
"""Seconds a metadata call (list, tags, drop) may take."""

DEFAULT_TRANSFER_TIMEOUT_S = 600.0
"""Seconds a whole table upload or download may take."""

TARGET_BATCH_BYTES = 4 * 1024 * 1024
"""Approximate size of one record batch sent by :meth:`DataClient.put_table` (4 MiB)."""


class DataPlaneError(FlopsError):
    """The data server reported a failure, or answered something this client cannot read."""

    code = "data_plane_error"


class InvalidDataTag(DataPlaneError):
    """A data tag breaks the rule in :data:`TAG_PATTERN` (or contains ``..``)."""

    code = "invalid_data_tag"


class DataConfigError(DataPlaneError):
    """The data server location or the requested data tags are missing or malformed."""

    code = "data_config_invalid"


class DataServerUnavailable(DataPlaneError):
    """No Arrow Flight data server answered at the given location."""

    code = "data_server_unavailable"


class DataTagsNotFound(DataPlaneError):
    """None of the requested tags is on the data server; ``details`` lists the tags it has."""

    code = "data_tags_not_found"


class InvalidDataTable(DataPlaneError):
    """A table sent to the data server was rejected (no columns, or the upload was cut short)."""

    code = "invalid_data_table"


class DataAccessDenied(DataPlaneError):
    """The data server refused the call: no, an invalid, an expired or a too narrow token."""

    code = "data_access_denied"


class IncompatibleDataTags(DataPlaneError):
    """The tables of several requested tags have different features and cannot be joined."""

    code = "incompatible_data_tags"


ERRORS_BY_CODE: dict[str, type[DataPlaneError]] = {
    cls.code: cls
    for cls in (
        DataPlaneError,
        InvalidDataTag,
        DataConfigError,
        DataServerUnavailable,
        DataTagsNotFound,
        InvalidDataTable,
        IncompatibleDataTags,
        DataAccessDenied,
    )
}
"""Error ``code`` → exception class; the server sends codes, the client raises the class."""


def validate_tag(tag: object) -> str:
    """Return ``tag`` if it is a valid data tag (see :data:`TAG_PATTERN`, no ``..``).

    Raises :class:`InvalidDataTag` naming the rule otherwise. Tags become file names on the
    data server, so anything that could escape its data directory is rejected.
    """
    if not isinstance(tag, str) or not TAG_PATTERN.fullmatch(tag) or ".." in tag:
        raise InvalidDataTag(
            f"Data tag {tag!r} is invalid. Use 1-63 characters from a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit and without '..'.",
            details=[{"tag": repr(tag), "pattern": TAG_PATTERN.pattern}],
        )
    return tag


def parse_tags(tags: str | Sequence[str]) -> list[str]:
    """Turn ``"a, b"`` or ``["a", "b"]`` into a list of valid, distinct tags (order kept).

    Raises :class:`DataConfigError` when no tag is given and :class:`InvalidDataTag` for a
    malformed one.
    """
    items = tags.split(",") if isinstance(tags, str) else list(tags)
    result: list[str] = []
    for item in items:
        tag = item.strip() if isinstance(item, str) else item
        if tag == "":
            continue
        if validate_tag(tag) not in result:
            result.append(tag)
    if not result:
        raise DataConfigError(
            "No data tags were given. Set the SLA's training_configuration.data_tags "
            f"(or ${env_vars.DATA_TAGS}) to at least one tag, e.g. 'mnist'."
        )
    return result


def normalize_location(location: str) -> str:
    """Return ``location`` as a Flight URI: ``HOST:PORT`` becomes ``grpc://HOST:PORT``.

    Accepted schemes: ``grpc``, ``grpc+tcp``, ``grpc+tls``. Raises :class:`DataConfigError`
    for anything else or a missing port.
    """
    return _parse_location(location)[0]


def _parse_location(location: str) -> tuple[str, str, str]:
    """``(normalized location, scheme, host)``; see :func:`normalize_location`."""
    text = location.strip() if isinstance(location, str) else ""
    if text and "://" not in text:
        text = f"grpc://{text}"
    match = re.fullmatch(
        r"(grpc|grpc\+tcp|grpc\+tls)://(\[[0-9a-fA-F:]+\]|[^:/\[\]]+):(\d+)/?", text
    )
    if not match or not 0 < int(match.group(3)) < 65536:
        raise DataConfigError(
            f"Data server location {location!r} is not of the form grpc://HOST:PORT. "
            f"Fix ${env_vars.DATA_SERVER} or the node's registered data server address."
        )
    return text.rstrip("/"), match.group(1), match.group(2).strip("[]")


def _env_or(value: str | None, name: str) -> str | None:
    """``value``, or when it is ``None`` the non-empty environment variable ``name``."""
    if value is not None:
        return value or None
    return os.environ.get(name, "").strip() or None


def _strip_extension_metadata(metadata: dict[bytes, bytes] | None) -> dict[bytes, bytes] | None:
    if not metadata:
        return None
    kept = {k: v for k, v in metadata.items() if k not in EXTENSION_FIELD_KEYS}
    return kept or None


def to_storage_table(table: pa.Table) -> pa.Table:
    """Return ``table`` with top-level extension types replaced by their storage types.

    Schema metadata (the ``huggingface`` features) is kept; field metadata describing an
    extension type is dropped. Rows and values are unchanged (zero-copy). This is the form in
    which tables travel over Flight and are stored as Parquet, so neither side needs the
    extension types registered.
    """
    import pyarrow as pa

    fields = []
    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        if isinstance(field.type, pa.ExtensionType):
            storage_type = field.type.storage_type
            column = pa.chunked_array([chunk.storage for chunk in column.chunks], storage_type)
            field = pa.field(field.name, storage_type, field.nullable)
        field_metadata = _strip_extension_metadata(field.metadata)
        fields.append(
            field.with_metadata(field_metadata) if field_metadata else field.remove_metadata()
        )
        columns.append(column)
    schema = pa.schema(fields, metadata=table.schema.metadata)
    return pa.Table.from_arrays(columns, schema=schema)


def features_from_schema(schema: pa.Schema) -> datasets.Features | None:
    """Return the HuggingFace features stored in ``schema``'s ``huggingface`` metadata.

    ``None`` when there is no such metadata, it cannot be parsed, or it does not name exactly
    the schema's columns. The features are reordered to the schema's column order.
    """
    import datasets

    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    if raw is None:
        return None
    try:
        info = json.loads(raw.decode())
        features = datasets.Features.from_dict(info["info"]["features"])
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable 'huggingface' schema metadata: %s", exc)
        return None
    if sorted(features) != sorted(schema.names):
        logger.warning(
            "ignoring 'huggingface' schema metadata: it names columns %s, the table has %s",
            sorted(features),
            sorted(schema.names),
        )
        return None
    return datasets.Features({name: features[name] for name in schema.names})


def table_to_dataset(table: pa.Table) -> datasets.Dataset:
    """Wrap an Arrow table in a ``datasets.Dataset``, restoring the features in its metadata.

    Plain storage columns are cast to the features' types (e.g. ``list<list<uint8>>`` →
    ``Array2D((28, 28), "uint8")``). Without usable metadata the features are inferred from the
    Arrow types. Raises :class:`InvalidDataTable` when the columns cannot be cast to the
    features the metadata names.
    """
    import datasets
    from datasets.table import table_cast

    features = features_from_schema(table.schema)
    if features is not None:
        try:
            table = table_cast(table, features.arrow_schema)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise InvalidDataTable(
                f"The table's columns do not match the features in its metadata ({exc}). "
                "Push the data again with the features of the dataset it came from."
            ) from exc
    return datasets.Dataset(table)


def dataset_to_table(dataset: datasets.Dataset) -> pa.Table:
    """Return the rows of ``dataset`` (in order, honouring select/shuffle) as a storage table.

    The result carries the dataset's features in the ``huggingface`` schema metadata and has
    plain Arrow types (see :func:`to_storage_table`); :func:`table_to_dataset` inverts it.
    """
    table = dataset.with_format("arrow")[:].combine_chunks()
    table = table.replace_schema_metadata(dataset.features.arrow_schema.metadata)
    return to_storage_table(table)


def _first_line(exc: BaseException) -> str:
    """The readable part of a (Flight) error message: no gRPC prefix, detail or traceback."""
    text = str(exc).strip()
    text = text.split(". Detail:", 1)[0]
    text = re.sub(r"^Flight returned [a-z ]+ error, with message: ", "", text)
    return text.splitlines()[0] if text else type(exc).__name__


class DataClient:
    """A connection to one node's Arrow Flight data server.

    Args:
        location: ``grpc://HOST:PORT`` (``HOST:PORT`` is accepted too); ``grpc+tls://`` for
            TLS (also used whenever ``tls_root_certs`` is set).
        timeout_s: seconds a metadata call may take. Defaults to 30.
        transfer_timeout_s: seconds one table upload or download may take. Defaults to 600.
        token: the bearer credential sent with every call (a data token or the node owner's
            credential). ``None``: ``$FLOPS_DATA_TOKEN`` if set, else none; ``""``: none.
        tls_root_certs: PEM certificate(s) the server's certificate must chain to (the node's
            registered certificate). ``None``: ``$FLOPS_DATA_SERVER_CERT`` if set, else the
            system's roots for ``grpc+tls`` and plain gRPC otherwise; ``""``: not from env.
        override_hostname: the name to check the server's certificate against instead of the
            location's host.

    Every method raises :class:`DataServerUnavailable` (naming the address) when no server
    answers, :class:`InvalidDataTag` for a malformed tag, and another :class:`DataPlaneError`
    subclass for what the server rejects. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        location: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
        token: str | None = None,
        tls_root_certs: str | None = None,
        override_hostname: str | None = None,
    ) -> None:
        import pyarrow.flight as flight

        self.location, scheme, _ = _parse_location(location)
        root_certs = _env_or(tls_root_certs, env_vars.DATA_SERVER_CERT)
        if root_certs and scheme != "grpc+tls":
            self.location = "grpc+tls://" + self.location.split("://", 1)[1]
        self.timeout_s = timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self._flight = flight
        credential = _env_or(token, env_vars.DATA_TOKEN)
        self._headers = [(b"authorization", f"Bearer {credential}".encode())] if credential else []
        tls: dict[str, Any] = {}
        if root_certs:
            tls["tls_root_certs"] = root_certs.encode()
        if override_hostname:
            tls["override_hostname"] = override_hostname
        try:
            self._client = flight.connect(self.location, **tls)
        except Exception as exc:  # pyarrow raises ArrowInvalid & co for a bad URI
            raise DataConfigError(
                f"Cannot use data server location {self.location!r}: {_first_line(exc)}. "
                f"Fix ${env_vars.DATA_SERVER}."
            ) from exc

    def __enter__(self) -> DataClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._client.close()

    def _options(self, transfer: bool = False) -> Any:
        timeout = self.transfer_timeout_s if transfer else self.timeout_s
        return self._flight.FlightCallOptions(timeout=timeout, headers=self._headers)

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """Turn Flight/Arrow errors raised inside the block into DataPlaneError subclasses."""
        import pyarrow as pa

        flight = self._flight
        try:
            yield
        except FlopsError:
            raise
        except flight.FlightServerError as exc:
            raise self._server_error(exc, what) from exc
        except (flight.FlightUnauthenticatedError, flight.FlightUnauthorizedError) as exc:
            raise DataAccessDenied(
                f"The data server at {self.location} refused to {what}: {_first_line(exc)}",
                details=[{"location": self.location}],
            ) from exc
        except (flight.FlightUnavailableError, flight.FlightTimedOutError) as exc:
            reason = (
                f"it did not answer within the timeout ({_first_line(exc)})"
                if isinstance(exc, flight.FlightTimedOutError)
                else _first_line(exc)
            )
            raise DataServerUnavailable(
                f"Cannot reach the data server at {self.location} to {what}: {reason}. "
                "Check that flops-data-server runs there and the address is right (a secure "
                f"data server needs TLS with its certificate, ${env_vars.DATA_SERVER_CERT}).",
                details=[{"location": self.location}],
            ) from exc
        except (pa.ArrowException, OSError) as exc:
            raise DataPlaneError(
                f"The data server at {self.location} failed to {what}: {_first_line(exc)}. "
                "Check that the address points to a flops-data-server and see its log.",
                details=[{"location": self.location}],
            ) from exc

    def _server_error(self, exc: Exception, what: str) -> DataPlaneError:
        extra = getattr(exc, "extra_info", b"") or b""
        try:
            info = json.loads(extra.decode())
            cls = ERRORS_BY_CODE.get(str(info["code"]), DataPlaneError)
            return cls(str(info["message"]), details=list(info.get("details") or []))
        except (ValueError, KeyError, TypeError, AttributeError):
            return DataPlaneError(
                f"The data server at {self.location} failed to {what}: {_first_line(exc)}.",
                details=[{"location": self.location}],
            )

    def list_tags(self) -> dict[str, int]:
        """Return every tag on the server with its row count, ``{tag: rows}`` (action ``tags``)."""
        with self._translated("list its data tags"):
            results = list(
                self._client.do_action(self._flight.Action("tags", b""), self._options())
            )
        try:
            raw = json.loads(results[0].body.to_pybytes().decode())
            return {str(tag): int(rows) for tag, rows in raw.items()}
        except (IndexError, ValueError, AttributeError, TypeError) as exc:
            raise DataPlaneError(
                f"The data server at {self.location} sent an unreadable tag list. "
                "Check that the address points to a flops-data-server."
            ) from exc

    def find_tags(self, tags: str | Sequence[str]) -> dict[str, int]:
        """Return ``{tag: rows}`` for those of ``tags`` the server holds (``list_flights``).

        ``tags`` is a list or a comma-separated string. Raises :class:`InvalidDataTag`.
        """
        wanted = parse_tags(tags)
        criteria = json.dumps({"tags": wanted}).encode()
        found: dict[str, int] = {}
        with self._translated("list its datasets"):
            for info in self._client.list_flights(criteria, self._options()):
                found[info.descriptor.path[0].decode()] = int(info.total_records)
        return found

    def get_schema(self, tag: str) -> pa.Schema:
        """Return the Arrow schema (with metadata) stored for ``tag``.

        Raises :class:`DataTagsNotFound` when the server has no such tag.
        """
        descriptor = self._flight.FlightDescriptor.for_path(validate_tag(tag))
        with self._translated(f"describe tag {tag!r}"):
            return self._client.get_schema(descriptor, self._options()).schema

    def get_table(self, tag: str) -> pa.Table:
        """Download the table stored under ``tag`` (plain storage types, features in metadata).

        Raises :class:`DataTagsNotFound` (``details`` = the server's tags) when it is missing.
        """
        ticket = self._flight.Ticket(validate_tag(tag).encode())
        with self._translated(f"send tag {tag!r}"):
            reader = self._client.do_get(ticket, self._options(transfer=True))
            return reader.read_all()

    def put_table(self, tag: str, table: pa.Table) -> int:
        """Store ``table`` under ``tag`` on the server, replacing what was there; return its rows.

        Extension types are sent as storage types, the schema metadata is kept. The server
        writes a temporary file and renames it, so readers see the old or the new table, never
        a mix. Raises :class:`InvalidDataTable` for a table without columns.
        """
        import pyarrow as pa

        validate_tag(tag)
        table = to_storage_table(table).combine_chunks()  # e.g. one chunk per row after take
        if table.num_columns == 0:
            raise InvalidDataTable(
                f"The table for tag {tag!r} has no columns. Push a table with at least one column."
            )
        max_rows = max(1, TARGET_BATCH_BYTES * table.num_rows // max(1, table.nbytes))
        batches = table.to_batches(max_chunksize=max_rows)
        descriptor = self._flight.FlightDescriptor.for_path(tag)
        announce = pa.py_buffer(json.dumps({ROWS_METADATA_KEY: table.num_rows}).encode())
        with self._translated(f"store tag {tag!r}"):
            writer, ack_reader = self._client.do_put(
                descriptor, table.schema, self._options(transfer=True)
            )
            try:
                for index, batch in enumerate(batches):
                    if index == 0:
                        writer.write_with_metadata(batch, announce)
                    else:
                        writer.write_batch(batch)
                writer.done_writing()
                ack = ack_reader.read()
            finally:
                writer.close()
        try:
            return int(json.loads(ack.to_pybytes().decode())["rows"])
        except (AttributeError, ValueError, KeyError, TypeError):
            return int(table.num_rows)

    def drop(self, tag: str) -> bool:
        """Delete the table stored under ``tag``; ``True`` if there was one (action ``drop``)."""
        action = self._flight.Action("drop", validate_tag(tag).encode())
        with self._translated(f"drop tag {tag!r}"):
            results = list(self._client.do_action(action, self._options()))
        try:
            return bool(json.loads(results[0].body.to_pybytes().decode())["dropped"])
        except (IndexError, ValueError, KeyError, AttributeError, TypeError):
            return False


def load_dataset(location: str, tags: str | Sequence[str]) -> datasets.Dataset:
    """Return every table on the data server whose tag is in ``tags``, as one Dataset.

    Args:
        location: ``grpc://HOST:PORT`` of the node's data server.
        tags: tag names (a list, or a comma-separated string), e.g. ``["mnist"]``.

    Returns a ``datasets.Dataset`` (Arrow-backed, in memory): the tables of the matching tags
    concatenated in the order of ``tags``, with their HuggingFace features restored (MNIST:
    ``image`` ``Array2D((28, 28), "uint8")``, ``label`` ``ClassLabel`` '0'..'9'). Tags the
    server lacks are skipped with a warning.

    Column access works as in datasets 2.x/3.x whatever datasets version is installed:
    ``dataset["image"]`` is the whole column (a ``numpy.ndarray`` under
    ``set_format("numpy")``, a list otherwise), also on datasets derived from it, not the lazy
    ``Column`` of datasets >= 4 (see :mod:`flops_utils.dataset_compat`).

    Note: ``datasets`` formats integer columns as ``int64`` under ``set_format("numpy")``;
    pass ``dtype=numpy.uint8`` to ``set_format`` to get the stored ``uint8`` values.

    Raises :class:`DataTagsNotFound` (message and ``details`` list the server's tags) when no
    requested tag is there, :class:`DataServerUnavailable` naming the address when nothing
    answers, :class:`IncompatibleDataTags` when the tags' features differ,
    :class:`InvalidDataTag` / :class:`DataConfigError` for malformed input.
    """
    wanted = parse_tags(tags)
    with DataClient(location) as client:
        found = client.find_tags(wanted)
        if not found:
            available = sorted(client.list_tags())
            raise DataTagsNotFound(
                f"The data server at {client.location} holds none of the data tags {wanted}; "
                f"it has {available or 'no data at all'}. Push data for these tags "
                "(e.g. with the manager's /mocks endpoint) or change the SLA's data_tags.",
                details=available,
            )
        missing = [tag for tag in wanted if tag not in found]
        if missing:
            logger.warning("data server %s has no data for tags %s", client.location, missing)
        loaded = [tag for tag in wanted if tag in found]
        parts = [table_to_dataset(client.get_table(tag)) for tag in loaded]
    if len(parts) == 1:
        return with_materialized_columns(parts[0])
    import datasets

    mismatched = [
        tag for tag, part in zip(loaded, parts, strict=True) if part.features != parts[0].features
    ]
    if mismatched:
        raise IncompatibleDataTags(
            f"The data of tags {mismatched} has other columns or types than that of tag "
            f"{loaded[0]!r} ({list(parts[0].features)}), so they cannot be joined. Request "
            "tags that hold the same kind of data.",
            details=[
                {"tag": tag, "columns": list(part.features)}
                for tag, part in zip(loaded, parts, strict=True)
            ],
        )
    return with_materialized_columns(datasets.concatenate_datasets(parts))


def load_dataset_from_env() -> datasets.Dataset:
    """:func:`load_dataset` with ``$FLOPS_DATA_SERVER`` and ``$FLOPS_DATA_TAGS``.

    Raises :class:`DataConfigError` naming the variable when one is unset or empty, and
    whatever :func:`load_dataset` raises.
    """
    location = os.environ.get(env_vars.DATA_SERVER, "").strip()
    tags = os.environ.get(env_vars.DATA_TAGS, "").strip()
    for name, value in ((env_vars.DATA_SERVER, location), (env_vars.DATA_TAGS, tags)):
        if not value:
            raise DataConfigError(
                f"${name} is not set. FLOps sets it for learners; to run outside FLOps, "
                f"export {name} (see flops_utils.env_vars)."
            )
    return load_dataset(location, tags)
