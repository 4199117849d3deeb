"""The local protocol between a FLOps role and the model worker that runs the user's code.

The learner and the aggregator run in FLOps' own pinned environment (Flower, MQTT, the MLflow
tracking client); the ML repository's ``ModelManager`` runs in a *model worker* process
(:mod:`flops_utils.model_worker`) started from the repository's own environment, with the
repository's pins exactly. This module is the narrow wire between them, imported on both sides,
so it depends on the standard library and NumPy only, and works with NumPy 1.24 to 2.x.

Framing (one message each way per call, over a ``socket.socketpair`` whose worker end is
inherited as file descriptor ``$FLOPS_MODEL_WORKER_FD``)::

    4 bytes   big-endian unsigned length H of the JSON header
    H bytes   UTF-8 JSON header, an object; its "arrays" key lists the byte lengths below
    ...       each array in NumPy's ``.npy`` format (``numpy.lib.format``, no pickles)

Requests carry ``{"v": PROTOCOL_VERSION, "op": ...}``; replies ``{"ok": true, ...}`` or
``{"ok": false, "kind", "exc_type", "message"}``. The ``.npy`` format is NumPy's own stable
file format (format versions 1.0-3.0, readable by every NumPy since 1.17), which is why arrays
travel in it rather than as pickles: a NumPy 2 pickle names ``numpy._core``, which NumPy 1.x
cannot import.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any, BinaryIO

import numpy as np

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change of the operations or the framing."""

WORKER_FD_VARIABLE = "FLOPS_MODEL_WORKER_FD"
"""The environment variable holding the worker's end of the socket pair (an inherited fd)."""

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""A header longer than this is a protocol error (a header holds names and numbers only)."""

_LENGTH = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not a protocol message, or closed the connection."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (end of stream at a message boundary)."""


def write_message(
    stream: BinaryIO, header: dict[str, Any], arrays: list[np.ndarray[Any, Any]] | None = None
) -> None:
    """Write one message: ``header`` (JSON-serializable dict) and ``arrays`` (numeric arrays).

    Raises ``ValueError`` for an object array (it would need a pickle) and ``OSError`` when the
    stream is closed.
    """
    payloads = []
    for array in arrays or []:
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
        payloads.append(buffer.getvalue())
    encoded = json.dumps({**header, "arrays": [len(p) for p in payloads]}).encode("utf-8")
    stream.write(_LENGTH.pack(len(encoded)) + encoded)
    for payload in payloads:
        stream.write(payload)
    stream.flush()


def read_message(stream: BinaryIO) -> tuple[dict[str, Any], list[np.ndarray[Any, Any]]]:
    """Read one message; returns ``(header, arrays)``.

    Raises :class:`ConnectionClosed` at end of stream before a message, and
    :class:`ProtocolError` for a truncated or malformed message.
    """
    prefix = stream.read(_LENGTH.size)
    if not prefix:
        raise ConnectionClosed("the peer closed the connection")
    if len(prefix) < _LENGTH.size:
        raise ProtocolError("truncated message length")
    (length,) = _LENGTH.unpack(prefix)
    if length > MAX_HEADER_BYTES:
        raise ProtocolError(f"message header of {length} bytes is over the limit")
    try:
        header = json.loads(_read_exactly(stream, length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"message header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object")
    sizes = header.pop("arrays", [])
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
        raise ProtocolError("message header has a malformed 'arrays' list")
    arrays = []
    for size in sizes:
        buffer = io.BytesIO(_read_exactly(stream, size))
        try:
            arrays.append(np.lib.format.read_array(buffer, allow_pickle=False))
        except ValueError as exc:
            raise ProtocolError(f"an array is not in .npy format ({exc})") from None
    return header, arrays


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ProtocolError(f"truncated message: {len(data)} of {size} bytes")
    return data
