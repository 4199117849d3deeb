"""On-disk storage of a data server: one Parquet file per data tag, ``<data_dir>/<tag>.parquet``.

Writes are atomic: a table is written to a hidden temporary file in the same directory
(``.<tag>.<random>.tmp``), flushed to disk, then renamed over the old file with
``os.replace``. Readers therefore see the old or the new table, never a partial one, and a
failed or interrupted write leaves the old file untouched. Tags are validated with
:func:`flops_utils.data_client.validate_tag`, so no tag can name a path outside ``data_dir``.

Tables are stored with plain Arrow types and their schema metadata (the HuggingFace features,
see :mod:`flops_utils.data_client`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from flops_utils.data_client import (
    DataTagsNotFound,
    InvalidDataTable,
    to_storage_table,
    validate_tag,
)
from flops_utils.errors import FlopsError
from flops_utils.logging import logger

SUFFIX = ".parquet"
TEMP_SUFFIX = ".tmp"


class StorageError(FlopsError):
    """The data directory cannot be created or written."""

    code = "data_storage_error"


@dataclass(frozen=True)
class TagInfo:
    """What is stored under one tag: ``rows`` (count), ``size_bytes`` (file size), ``schema``."""

    tag: str
    rows: int
    size_bytes: int
    schema: pa.Schema


class AtomicTableWriter:
    """Writes one tag's new table to a temporary file; commits by rename on a clean exit.

    Use through :meth:`TagStorage.writer`. ``write_batch`` appends a record batch (extension
    types are stored as their storage types). Leaving the ``with`` block normally renames the
    file over ``<tag>.parquet``; leaving it with an exception, or calling :meth:`abort`, deletes
    the temporary file and keeps the old table.
    """

    def __init__(
        self,
        storage: TagStorage,
        tag: str,
        schema: pa.Schema,
    ) -> None:
        self.tag = tag
        self.rows = 0
        self._storage = storage
        self._schema = to_storage_table(schema.empty_table()).schema
        if len(self._schema) == 0:
            raise InvalidDataTable(
                f"The table for tag {tag!r} has no columns. Push a table with at least one column."
            )
        fd, name = tempfile.mkstemp(prefix=f".{tag}.", suffix=TEMP_SUFFIX, dir=storage.data_dir)
        os.close(fd)
        self._temp_path = Path(name)
        self._done = False
        try:
            self._writer = pq.ParquetWriter(str(self._temp_path), self._schema)
        except BaseException:
            self._temp_path.unlink(missing_ok=True)
            raise

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Append ``batch`` (its schema must match the announced one, metadata aside)."""
        table = to_storage_table(pa.Table.from_batches([batch]))
        if not table.schema.equals(self._schema, check_metadata=False):
            raise InvalidDataTable(
                f"A batch for tag {self.tag!r} has schema {table.schema.to_string()!r}, not the "
                "announced one. Send batches of one schema per upload."
            )
        self._writer.write_table(table.replace_schema_metadata(self._schema.metadata))
        self.rows += batch.num_rows

    def commit(self) -> int:
        """Flush, fsync and rename the temporary file over the tag's file; return the rows."""
        self._writer.close()
        with open(self._temp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self._temp_path, self._storage.path(self.tag))
        self._done = True
        self._storage.notify_change()
        logger.info("stored tag %r: %d rows", self.tag, self.rows)
        return self.rows

    def abort(self) -> None:
        """Delete the temporary file; the tag keeps its previous table (idempotent)."""
        if self._done:
            return
        self._done = True
        try:
            self._writer.close()
        finally:
            self._temp_path.unlink(missing_ok=True)

    def __enter__(self) -> AtomicTableWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None and not self._done:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


class TagStorage:
    """The tagged tables of one data server, kept as Parquet files in ``data_dir``.

    Args:
        data_dir: directory holding ``<tag>.parquet`` files; created if missing. Leftover
            temporary files of interrupted writes are deleted.
        on_change: called (without arguments) after a tag was written or dropped.

    Raises :class:`StorageError` when ``data_dir`` cannot be created,
    :class:`flops_utils.data_client.InvalidDataTag` for a malformed tag and
    :class:`flops_utils.data_client.DataTagsNotFound` when reading a tag that is not there.
    """

    def __init__(self, data_dir: str | Path, on_change: Callable[[], None] | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.on_change = on_change
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"Cannot create the data directory {self.data_dir}: {exc.strerror}. "
                "Pass a writable --data-dir."
            ) from exc
        for stale in self.data_dir.glob(f".*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)

    def notify_change(self) -> None:
        """Call ``on_change``; its errors are logged, never raised."""
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                logger.exception("data change callback failed")

    def path(self, tag: str) -> Path:
        """Return ``<data_dir>/<tag>.parquet`` after validating ``tag``."""
        return self.data_dir / f"{validate_tag(tag)}{SUFFIX}"

    def _not_found(self, tag: str) -> DataTagsNotFound:
        available = sorted(self.tags())
        return DataTagsNotFound(
            f"This data server has no data tag {tag!r}; it has {available or 'no data at all'}. "
            "Push data for the tag first or ask for one of those.",
            details=available,
        )

    def _tag_paths(self) -> Iterator[tuple[str, Path]]:
        for path in sorted(self.data_dir.glob(f"*{SUFFIX}")):
            tag = path.name[: -len(SUFFIX)]
            try:
                validate_tag(tag)
            except FlopsError:
                continue
            yield tag, path

    def info(self, tag: str) -> TagInfo:
        """Return rows, file size and schema of ``tag``; raises ``DataTagsNotFound``."""
        path = self.path(tag)
        try:
            metadata = pq.read_metadata(path)
            schema = metadata.schema.to_arrow_schema()
            return TagInfo(tag, metadata.num_rows, path.stat().st_size, schema)
        except FileNotFoundError:
            raise self._not_found(tag) from None

    def tags(self) -> dict[str, int]:
        """Return ``{tag: rows}`` for every stored tag (unreadable files are skipped)."""
        result: dict[str, int] = {}
        for tag, path in self._tag_paths():
            try:
                result[tag] = pq.read_metadata(path).num_rows
            except (OSError, pa.ArrowException) as exc:
                logger.warning("skipping unreadable data file %s: %s", path, exc)
        return result

    def infos(self, tags: list[str] | None = None) -> list[TagInfo]:
        """Return :class:`TagInfo` of ``tags`` that exist (all stored tags when ``None``)."""
        names = sorted(self.tags()) if tags is None else [validate_tag(tag) for tag in tags]
        result = []
        for tag in names:
            try:
                result.append(self.info(tag))
            except DataTagsNotFound:
                continue
            except (OSError, pa.ArrowException) as exc:
                logger.warning("skipping unreadable data for tag %r: %s", tag, exc)
        return result

    def read_table(self, tag: str) -> pa.Table:
        """Return the whole table of ``tag`` (with its schema metadata)."""
        path = self.path(tag)
        try:
            return pq.read_table(path)
        except FileNotFoundError:
            raise self._not_found(tag) from None

    def open_batches(
        self, tag: str, batch_rows: int = 65_536
    ) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """Return the schema of ``tag`` and an iterator over its record batches.

        The file is opened now, so a concurrent replace or drop does not affect the stream.
        ``batch_rows`` bounds the rows per batch.
        """
        path = self.path(tag)
        try:
            parquet_file = pq.ParquetFile(path)
        except FileNotFoundError:
            raise self._not_found(tag) from None
        schema = parquet_file.schema_arrow

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                yield from parquet_file.iter_batches(batch_size=batch_rows)
            finally:
                parquet_file.close()

        return schema, batches()

    def writer(self, tag: str, schema: pa.Schema) -> AtomicTableWriter:
        """Start an atomic replacement of ``tag``'s table (see :class:`AtomicTableWriter`).

        Raises :class:`flops_utils.data_client.InvalidDataTable` for a schema without columns.
        """
        validate_tag(tag)
        return AtomicTableWriter(self, tag, schema)

    def write_table(self, tag: str, table: pa.Table) -> int:
        """Atomically replace ``tag``'s table with ``table``; return the rows stored."""
        with self.writer(tag, table.schema) as writer:
            for batch in table.to_batches():
                writer.write_batch(batch)
        return writer.rows

    def drop(self, tag: str) -> bool:
        """Delete ``tag``'s table; ``True`` if it existed."""
        try:
            self.path(tag).unlink()
        except FileNotFoundError:
            return False
        self.notify_change()
        logger.info("dropped tag %r", tag)
        return True
