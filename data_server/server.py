"""The Arrow Flight service of a data server, and :class:`DataServer` to run it in-process.

Protocol (the client is :class:`flops_utils.data_client.DataClient`):

- ``list_flights(criteria)``: one ``FlightInfo`` per stored tag; ``criteria`` is empty (all
  tags) or JSON ``{"tags": [...]}`` (only those tags, if stored). ``total_records`` = rows,
  ``total_bytes`` = Parquet file size, one endpoint with ticket = tag and no locations (fetch
  from this server).
- ``get_flight_info`` / ``get_schema`` for ``FlightDescriptor.for_path(tag)``.
- ``do_get(Ticket(tag))``: the table, streamed in record batches with its schema metadata.
- ``do_put(FlightDescriptor.for_path(tag))``: replaces the tag atomically (temporary file +
  ``os.replace``). If the first batch's app metadata is JSON ``{"rows": N}`` and fewer or more
  rows arrive, the upload is discarded (an interrupted client looks like a clean end of stream
  to the server). Answers one ``PutResult`` with JSON ``{"tag", "rows"}``.
- actions ``tags`` (result JSON ``{tag: rows}``) and ``drop`` (body = tag; result JSON
  ``{"tag", "dropped": bool}``).

Errors the caller caused are raised as ``FlightServerError`` whose ``extra_info`` is JSON
``{"code", "message", "details"}`` of a :class:`flops_utils.errors.FlopsError`.

With a :class:`data_server.security.DataServerSecurity` the server speaks TLS
(``grpc+tls://``) and every call needs ``authorization: Bearer <credential>``: read tokens
may read (and list) only their tags, ``do_put`` and ``drop`` need the node owner's credential
or a manager write token (see :mod:`data_server.security`). Refusals are
``FlightUnauthenticatedError`` (no or invalid credential) and ``FlightUnauthorizedError``
(the credential does not allow the call). Without one, the server is open (plain gRPC, no
authentication: ``FLOPS_INSECURE=data``, in-process tests).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from data_server.security import (
    MIDDLEWARE_KEY,
    AuthMiddleware,
    AuthMiddlewareFactory,
    Caller,
    DataServerSecurity,
    unauthorized,
)
from data_server.storage import StorageError, TagInfo, TagStorage
from flops_utils.data_client import (
    ROWS_METADATA_KEY,
    DataTagsNotFound,
    InvalidDataTable,
    InvalidDataTag,
    validate_tag,
)
from flops_utils.errors import FlopsError
from flops_utils.logging import logger

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
"""Bind addresses that mean "every interface"; clients on this machine use 127.0.0.1."""

STOP_TIMEOUT_S = 10.0
"""Seconds :meth:`DataServer.stop` waits for running calls before abandoning them."""


class DataServerStartError(FlopsError):
    """The Flight server could not listen on the requested host and port."""

    code = "data_server_start_failed"


class InvalidRequest(FlopsError):
    """A Flight request is malformed (bad criteria, descriptor, ticket or action)."""

    code = "invalid_request"


def flight_error(error: FlopsError) -> flight.FlightServerError:
    """Wrap ``error`` for the client: message as text, ``{"code","message","details"}`` as extra."""
    extra = json.dumps({"code": error.code, "message": error.message, "details": error.details})
    return flight.FlightServerError(error.message, extra_info=extra.encode())


def _tag_from_descriptor(descriptor: flight.FlightDescriptor) -> str:
    if descriptor.descriptor_type != flight.DescriptorType.PATH or len(descriptor.path) != 1:
        raise InvalidRequest(
            "A dataset is addressed by FlightDescriptor.for_path(tag) with exactly one path "
            "element. Use the tag name as the only path element."
        )
    return validate_tag(_decode(descriptor.path[0], "descriptor path"))


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidDataTag(
            f"The {what} is not UTF-8 text. Send the data tag as UTF-8 bytes."
        ) from None


def _parse_criteria(criteria: bytes | None) -> list[str] | None:
    if not criteria or not criteria.strip():
        return None
    try:
        parsed = json.loads(criteria.decode("utf-8"))
        tags = parsed["tags"]
        if not isinstance(tags, list):
            raise TypeError("tags is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest(
            f'list_flights criteria must be empty or JSON {{"tags": [...]}} ({exc}). '
            "Send a JSON object with a list of tag names."
        ) from None
    return [validate_tag(tag) for tag in tags]


def _expected_rows(app_metadata: pa.Buffer | None) -> int | None:
    if app_metadata is None:
        return None
    try:
        value = json.loads(app_metadata.to_pybytes().decode())[ROWS_METADATA_KEY]
        return int(value)
    except (ValueError, KeyError, TypeError):
        return None


def _flight_info(info: TagInfo) -> flight.FlightInfo:
    """One tag as a FlightInfo: descriptor path [tag], one endpoint (ticket = tag, this server)."""
    descriptor = flight.FlightDescriptor.for_path(info.tag)
    endpoint = flight.FlightEndpoint(info.tag.encode(), [])
    return flight.FlightInfo(info.schema, descriptor, [endpoint], info.rows, info.size_bytes)


OWNER = Caller("owner")
"""The caller of every call on a server without security."""


def _check_read(caller: Caller, tags: list[str]) -> None:
    """Refuse (``FlightUnauthorizedError``) when ``caller`` may not read one of ``tags``."""
    denied = [tag for tag in tags if not caller.may_read(tag)]
    if denied:
        raise unauthorized(
            f"the data token does not cover tag(s) {denied} (it allows {sorted(caller.tags)}). "
            "Ask the manager for a token for these tags (the SLA's data_tags)."
        )


def _scoped(caller: Caller, tag: str, call: Callable[[], Any]) -> Any:
    """Run ``call`` (a storage read of ``tag``); a read token holder learns of a missing tag
    only that it is missing, not which other tags the server holds."""
    try:
        return call()
    except DataTagsNotFound:
        if caller.kind == "owner":
            raise
        raise DataTagsNotFound(
            f"This data server has no data tag {tag!r}. Ask the node's owner to push it."
        ) from None


def _check_write(caller: Caller, what: str) -> None:
    """Refuse (``FlightUnauthorizedError``) unless ``caller`` may write."""
    if not caller.may_write:
        raise unauthorized(
            f"a read token may not {what}. Use the node owner's credential "
            "(<data-dir>/.security/owner-token on the node) or a manager write token."
        )


class FlopsFlightServer(flight.FlightServerBase):  # type: ignore[misc]
    """The Flight service over one :class:`TagStorage` (see the module docstring).

    Args:
        storage: where tagged tables live.
        location: ``grpc://HOST:PORT`` to listen on (port 0: the OS picks one);
            ``grpc+tls://HOST:PORT`` with ``security``.
        security: TLS material and credentials; ``None`` serves plain gRPC to anyone.

    Starts listening when constructed (pyarrow's behaviour); ``port`` is the bound port.
    """

    def __init__(
        self, storage: TagStorage, location: str, security: DataServerSecurity | None = None
    ) -> None:
        if security is None:
            super().__init__(location)
        else:
            super().__init__(
                location,
                tls_certificates=[flight.CertKeyPair(cert=security.cert_pem, key=security.key_pem)],
                middleware={MIDDLEWARE_KEY: AuthMiddlewareFactory(security)},
            )
        self.storage = storage
        self.security = security

    def _caller(self, context: flight.ServerCallContext) -> Caller:
        """The authenticated caller of this call (:data:`OWNER` without security)."""
        if self.security is None:
            return OWNER
        middleware = context.get_middleware(MIDDLEWARE_KEY)
        if not isinstance(middleware, AuthMiddleware):  # the factory refuses before this
            raise unauthorized("the call was not authenticated.")
        return middleware.caller

    def _guard(self, call: Callable[[], Any]) -> Any:
        """Run ``call``; FLOps errors and I/O errors go to the client as FlightServerError."""
        try:
            return call()
        except FlopsError as exc:
            raise flight_error(exc) from exc
        except OSError as exc:
            logger.exception("data server I/O error")
            error = StorageError(
                f"The data server could not read or write its data directory ({exc}). "
                "Check the disk space and permissions of --data-dir on that node."
            )
            raise flight_error(error) from exc

    def list_flights(
        self, context: flight.ServerCallContext, criteria: bytes
    ) -> Iterator[flight.FlightInfo]:
        """Yield a FlightInfo per stored tag, filtered by JSON criteria ``{"tags": [...]}``."""
        caller = self._caller(context)
        tags = self._guard(lambda: _parse_criteria(criteria))
        if tags is not None:
            _check_read(caller, tags)
        infos = self._guard(lambda: self.storage.infos(tags))
        for info in infos:
            if caller.may_read(info.tag):
                yield _flight_info(info)

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        """Describe one tag (rows, bytes, schema); ``data_tags_not_found`` if missing."""
        return _flight_info(self._readable_info(context, descriptor))

    def _readable_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> TagInfo:
        caller = self._caller(context)
        tag: str = self._guard(lambda: _tag_from_descriptor(descriptor))
        _check_read(caller, [tag])
        info: TagInfo = self._guard(lambda: _scoped(caller, tag, lambda: self.storage.info(tag)))
        return info

    def get_schema(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.SchemaResult:
        """Return one tag's schema (with its ``huggingface`` metadata)."""
        return flight.SchemaResult(self._readable_info(context, descriptor).schema)

    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.GeneratorStream:
        """Stream the table of the tag named by ``ticket``."""
        caller = self._caller(context)
        tag: str = self._guard(lambda: validate_tag(_decode(ticket.ticket, "ticket")))
        _check_read(caller, [tag])

        def open_stream() -> flight.GeneratorStream:
            schema, batches = _scoped(caller, tag, lambda: self.storage.open_batches(tag))
            return flight.GeneratorStream(schema, batches)

        return self._guard(open_stream)

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        """Replace the descriptor's tag with the uploaded stream, atomically."""
        _check_write(self._caller(context), "store data")

        def receive() -> int:
            tag = _tag_from_descriptor(descriptor)
            expected: int | None = None
            with self.storage.writer(tag, reader.schema) as table_writer:
                first = True
                while True:
                    try:
                        chunk = reader.read_chunk()
                    except StopIteration:
                        break
                    if first:
                        expected = _expected_rows(chunk.app_metadata)
                        first = False
                    if chunk.data is not None:
                        table_writer.write_batch(chunk.data)
                if expected is not None and table_writer.rows != expected:
                    raise InvalidDataTable(
                        f"The upload for tag {tag!r} ended after {table_writer.rows} of "
                        f"{expected} rows; the previous data was kept. Push the table again."
                    )
            return table_writer.rows

        rows = self._guard(receive)
        tag = descriptor.path[0].decode()
        writer.write(pa.py_buffer(json.dumps({"tag": tag, "rows": rows}).encode()))

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        """Name and describe the actions ``tags`` and ``drop``."""
        return [
            ("tags", "Return JSON {tag: rows} of every stored tag."),
            ("drop", "Delete the tag given as the body; returns JSON {tag, dropped}."),
        ]

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> list[bytes]:
        """Run ``tags`` or ``drop`` (see :meth:`list_actions`)."""
        caller = self._caller(context)

        def run() -> list[bytes]:
            if action.type == "tags":
                tags = {t: n for t, n in self.storage.tags().items() if caller.may_read(t)}
                return [json.dumps(tags).encode()]
            if action.type == "drop":
                _check_write(caller, "drop data")
                body = action.body.to_pybytes() if action.body is not None else b""
                tag = validate_tag(_decode(body, "drop action body"))
                dropped = self.storage.drop(tag)
                return [json.dumps({"tag": tag, "dropped": dropped}).encode()]
            raise InvalidRequest(
                f"Unknown action {action.type!r}. The data server supports 'tags' and 'drop'."
            )

        result: list[bytes] = self._guard(run)
        return result


class DataServer:
    """A data server running in this process (for the CLI, tests and the demo).

    Args:
        data_dir: directory holding ``<tag>.parquet`` (created if missing).
        host: address to bind. Defaults to ``127.0.0.1``; ``0.0.0.0`` binds every interface.
        port: TCP port; 0 (default) lets the OS pick one (read it from :attr:`port`).
        on_change: called after a tag was written or dropped (e.g. to re-register the node).
        security: serve TLS and require credentials (see :mod:`data_server.security`);
            ``None`` (the default) serves plain gRPC without authentication.

    ``start()`` returns once the server listens; ``stop()`` shuts it down, waiting at most
    :data:`STOP_TIMEOUT_S` seconds for running calls. Also a context manager.
    Raises :class:`DataServerStartError` when the port cannot be bound and
    :class:`data_server.storage.StorageError` when ``data_dir`` is unusable.
    """

    def __init__(
        self,
        data_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        on_change: Callable[[], None] | None = None,
        security: DataServerSecurity | None = None,
    ) -> None:
        self.host = host
        self.security = security
        self.requested_port = port
        self.storage = TagStorage(data_dir, on_change=on_change)
        self._server: FlopsFlightServer | None = None
        self._port: int | None = None

    @property
    def data_dir(self) -> Path:
        """The directory holding the Parquet files."""
        return self.storage.data_dir

    @property
    def port(self) -> int:
        """The bound TCP port; raises ``RuntimeError`` before :meth:`start`."""
        if self._port is None:
            raise RuntimeError("DataServer is not started")
        return self._port

    @property
    def scheme(self) -> str:
        """``grpc+tls`` with security, else ``grpc``."""
        return "grpc" if self.security is None else "grpc+tls"

    @property
    def location(self) -> str:
        """``grpc://HOST:PORT`` (``grpc+tls://`` with security) clients on this machine connect
        to (wildcards → 127.0.0.1)."""
        host = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> DataServer:
        """Start listening; returns ``self``. Idempotent."""
        if self._server is not None:
            return self
        bind_host = f"[{self.host}]" if ":" in self.host else self.host
        bind = f"{self.scheme}://{bind_host}:{self.requested_port}"
        try:
            self._server = FlopsFlightServer(self.storage, bind, self.security)
        except (pa.ArrowException, OSError) as exc:
            raise DataServerStartError(
                f"The data server cannot listen on {self.host}:{self.requested_port} ({exc}). "
                "Choose a free port or stop the process that uses it.",
            ) from exc
        self._port = int(self._server.port)
        logger.info("data server listening on %s (data in %s)", self.location, self.data_dir)
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Shut down, waiting up to ``timeout_s`` seconds for running calls. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        done = threading.Event()

        def shutdown() -> None:
            server.shutdown()
            done.set()

        threading.Thread(target=shutdown, name="flight-shutdown", daemon=True).start()
        if not done.wait(timeout_s):
            logger.warning("data server: calls still running after %.0f s; not waiting", timeout_s)
        else:
            logger.info("data server on %s stopped", self.location)

    def __enter__(self) -> DataServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
