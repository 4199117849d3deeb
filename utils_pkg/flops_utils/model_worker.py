"""The model worker: runs the ML repository's ``ModelManager`` in the repository's own environment.

Started by a FLOps role (learner or aggregator, through
:class:`flops_utils.model_worker_client.ModelWorker`) as ``python -m flops_utils.model_worker``
with the interpreter of the environment built from the repository's dependency file. It serves
the operations of :mod:`flops_utils.model_worker_protocol` on the inherited socket
``$FLOPS_MODEL_WORKER_FD`` until it is told to stop or the role closes the connection:

- ``hello``: ``{"protocol", "python", "versions": {distribution: version}}``;
- ``load`` ``{"repo_dir"}``: import ``model_manager.ModelManager`` from ``repo_dir`` and
  instantiate it (no data);
- ``call`` ``{"method"}`` + arrays: one of :data:`CALLS`, returning arrays or numbers;
- ``save_model`` ``{"flavor", "path"}`` + the final parameters: set them, then save
  ``ModelManager.get_model()`` with MLflow's flavor module into ``path``
  (:func:`flops_utils.model_saving.save_model`); the role uploads the directory;
- ``stop``: reply and exit 0.

Whatever the user's code raises is replied as ``{"ok": false, "kind": "user_code", "exc_type",
"message"}`` (kind ``data_unavailable`` for a FLOps data-plane error raised by
``load_dataset()``, ``model_saving`` for a model that cannot be saved); the worker keeps
serving. Its stdout and stderr are the role's, so the user's prints land in the service log.

Only the standard library, NumPy and ``flops_utils`` modules free of other dependencies are
imported here: this runs with whatever versions the repository pinned.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import socket
import sys
from typing import Any

import numpy as np

from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.model_worker_protocol import (
    PROTOCOL_VERSION,
    WORKER_FD_VARIABLE,
    ConnectionClosed,
    ProtocolError,
    read_message,
    write_message,
)
from flops_utils.user_code import one_line

CALLS = (
    "set_model_data",
    "get_model_parameters",
    "set_model_parameters",
    "fit_model",
    "evaluate_model",
)
"""The ``ModelManager`` methods a role may call through ``call``."""

REPORTED_DISTRIBUTIONS = (
    "numpy", "pandas", "pyarrow", "datasets", "mlflow", "mlflow-skinny", "scikit-learn",
    "torch", "tensorflow", "keras",
)  # fmt: skip
"""Distributions whose versions ``hello`` reports (those installed)."""

MAX_MESSAGE_CHARS = 500


class _Failure(Exception):
    """An error to reply with (``kind``, the original exception type's name, one line)."""

    def __init__(self, kind: str, exc: BaseException, what: str) -> None:
        text = getattr(exc, "message", None) or str(exc) or "(no message)"
        super().__init__(one_line(f"{what}: {text}" if what else text, MAX_MESSAGE_CHARS))
        self.kind = kind
        self.exc_type = type(exc).__name__


class ModelWorkerServer:
    """Serves one role's requests over ``stream`` (a binary file object of the socket)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.model_manager: Any = None

    def serve(self) -> int:
        """Answer requests until ``stop`` or the role closes the connection; returns 0.

        Raises :class:`ProtocolError` when the role sends a malformed message.
        """
        while True:
            try:
                header, arrays = read_message(self.stream)
            except ConnectionClosed:
                return 0
            op = header.get("op")
            try:
                reply, out = self._handle(op, header, arrays)
            except _Failure as failure:
                write_message(
                    self.stream,
                    {
                        "ok": False,
                        "kind": failure.kind,
                        "exc_type": failure.exc_type,
                        "message": str(failure),
                    },
                )
                continue
            write_message(self.stream, {"ok": True, **reply}, out)
            if op == "stop":
                return 0

    def _handle(
        self, op: Any, header: dict[str, Any], arrays: list[np.ndarray[Any, Any]]
    ) -> tuple[dict[str, Any], list[np.ndarray[Any, Any]]]:
        if header.get("v") != PROTOCOL_VERSION:
            raise _Failure(
                "protocol",
                ProtocolError(f"protocol version {header.get('v')!r}, not {PROTOCOL_VERSION}"),
                "request",
            )
        if op == "hello":
            return {"protocol": PROTOCOL_VERSION, **environment_facts()}, []
        if op == "stop":
            return {}, []
        if op == "load":
            self.model_manager = _load_model_manager(str(header.get("repo_dir") or os.getcwd()))
            return {}, []
        if self.model_manager is None:
            raise _Failure("protocol", ProtocolError(f"{op!r} before 'load'"), "request")
        if op == "call":
            return self._call(str(header.get("method")), arrays)
        if op == "save_model":
            return self._save_model(str(header.get("flavor")), str(header.get("path")), arrays)
        raise _Failure("protocol", ProtocolError(f"unknown operation {op!r}"), "request")

    def _call(
        self, method: str, arrays: list[np.ndarray[Any, Any]]
    ) -> tuple[dict[str, Any], list[np.ndarray[Any, Any]]]:
        if method not in CALLS:
            raise _Failure("protocol", ProtocolError(f"unknown method {method!r}"), "request")
        mm = self.model_manager
        try:
            if method == "set_model_data":
                mm.set_model_data()
                return {}, []
            if method == "get_model_parameters":
                return {}, [np.asarray(p) for p in mm.get_model_parameters()]
            if method == "set_model_parameters":
                mm.set_model_parameters(arrays)
                return {}, []
            if method == "fit_model":
                return {"num_examples": int(mm.fit_model())}, []
            loss, accuracy, num_examples = mm.evaluate_model()
            return {
                "loss": float(loss),
                "accuracy": float(accuracy),
                "num_examples": int(num_examples),
            }, []
        except FlopsError as exc:  # raised by FLOps code the repository called: load_dataset()
            raise _Failure("data_unavailable", exc, "") from exc
        except Exception as exc:
            raise _Failure("user_code", exc, "") from exc

    def _save_model(
        self, flavor: str, path: str, arrays: list[np.ndarray[Any, Any]]
    ) -> tuple[dict[str, Any], list[np.ndarray[Any, Any]]]:
        from flops_utils.model_saving import ModelSavingError, save_model

        mm = self.model_manager
        steps: list[tuple[str, Any]] = [
            ("ModelManager.set_model_parameters", lambda: mm.set_model_parameters(arrays)),
            ("ModelManager.get_model", mm.get_model),
        ]
        example_fn = getattr(mm, "get_input_example", None)
        if callable(example_fn):
            steps.append(("ModelManager.get_input_example", example_fn))
        results = []
        for what, step in steps:
            try:
                results.append(step())
            except Exception as exc:
                raise _Failure("user_code", exc, f"{what} raised {type(exc).__name__}") from exc
        model = results[1]
        example = results[2] if len(results) > 2 else None
        try:
            facts = save_model(model, flavor, path, input_example=example)
        except ModelSavingError as exc:
            raise _Failure("model_saving", exc, "saving the model") from exc
        return dict(facts), []


def _load_model_manager(repo_dir: str) -> Any:
    from flops_utils.ml_repo_files_proxy import get_model_manager

    try:
        return get_model_manager(repo_dir)
    except Exception as exc:
        raise _Failure("user_code", exc, "") from exc


def environment_facts() -> dict[str, Any]:
    """``{"python": "3.11.7", "versions": {name: version}}`` of this environment."""
    versions = {}
    for name in REPORTED_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"python": platform.python_version(), "versions": versions}


def main() -> int:
    """Entry point of ``python -m flops_utils.model_worker``; returns the exit status.

    Exit 2 when ``$FLOPS_MODEL_WORKER_FD`` is missing (started by hand), 3 on a protocol error.
    """
    fd_text = os.environ.get(WORKER_FD_VARIABLE, "")
    if not fd_text.isdigit():
        print(
            f"flops_utils.model_worker is started by a FLOps learner or aggregator; "
            f"{WORKER_FD_VARIABLE} is not set.",
            file=sys.stderr,
        )
        return 2
    connection = socket.socket(fileno=int(fd_text))
    stream = connection.makefile("rwb")
    try:
        return ModelWorkerServer(stream).serve()
    except ProtocolError as exc:
        logger.error("model worker: %s", exc)
        return 3
    except OSError:  # the role closed the connection while a reply was written
        return 0
    finally:
        with contextlib.suppress(OSError):  # flushing to a role that already hung up
            stream.close()
        connection.close()


if __name__ == "__main__":
    sys.exit(main())
