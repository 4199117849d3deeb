"""The role's side of the model worker: the user's ``ModelManager``, one process away.

:class:`ModelWorker` starts ``python -m flops_utils.model_worker`` with the interpreter of the
ML repository's own environment (``$FLOPS_USER_PYTHON``; default: this interpreter, for an
image whose one environment holds both) and is itself a :class:`ModelManagerTemplate`: the
learner's Flower client and the aggregator call it as they would call the user's object, and
each call crosses the process boundary with :mod:`flops_utils.model_worker_protocol`.

Why a process boundary: the repository's pins are the repository's (e.g. ``numpy==1.26.4``,
``pyyaml==6.0.1``), FLOps' runtime has its own (Flower 1.41 needs ``pyyaml>=6.0.2``); each side
keeps its versions. Flower's own deployment runtime separates app code from the SuperNode the
same way. A crash in user code (a segfault, ``sys.exit``, the kernel's OOM killer) ends the
worker, not the role, which then reports what happened.

Errors raised by the methods:

- :class:`RemoteUserCodeError` subclasses named after the user's exception type
  (``ValueError``, ...), whose text is the user's message: the role wraps them as it wraps
  in-process user errors;
- :class:`ModelWorkerDataError` (a :class:`FlopsError`) for a data-plane error raised by
  ``load_dataset()`` inside the user's code;
- :class:`ModelWorkerDied` (a :class:`UserCodeError`) when the worker process ended;
- :class:`ModelWorkerStartError` when the worker cannot be started (interpreter missing,
  ``flops_utils`` not importable there, protocol mismatch);
- :class:`ModelSaveFailed` from :meth:`ModelWorker.save_model`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flops_utils import env_vars
from flops_utils.errors import FlopsError
from flops_utils.logging import logger
from flops_utils.ml_repo_templates import ModelManagerTemplate
from flops_utils.model_worker_protocol import (
    PROTOCOL_VERSION,
    WORKER_FD_VARIABLE,
    ProtocolError,
    read_message,
    write_message,
)
from flops_utils.user_code import UserCodeError, describe_exception

DEFAULT_START_TIMEOUT_S = 300.0
"""Seconds for the worker to import ``flops_utils`` and answer ``hello`` (imports of large
frameworks on a loaded machine take tens of seconds)."""

STOP_TIMEOUT_S = 10.0
"""Seconds the worker gets to exit after ``stop`` before it is killed."""


class RemoteUserCodeError(Exception):
    """Base of the exceptions that stand for what the user's code raised in the worker.

    Subclasses are made per remote type name, so ``type(exc).__name__`` is the user's
    exception type (``ValueError``) and ``str(exc)`` its message.
    """


class ModelWorkerDataError(FlopsError):
    """``load_dataset()`` in the user's code failed for a reason FLOps reported."""

    code = "model_worker_data_error"


class ModelWorkerDied(UserCodeError):
    """The model worker process ended (crash, ``sys.exit``, killed) during a call.

    ``returncode``: the worker's exit status (negative: the signal that killed it), if known.
    """

    returncode: int | None = None


class ModelWorkerStartError(FlopsError):
    """The model worker could not be started or spoke another protocol version."""

    code = "model_worker_start_error"


class ModelSaveFailed(FlopsError):
    """The worker could not save the final model with the SLA's flavor."""

    code = "model_save_failed"


_REMOTE_TYPES: dict[str, type[RemoteUserCodeError]] = {}


def _remote_error(exc_type: str, message: str) -> RemoteUserCodeError:
    name = exc_type if exc_type.isidentifier() else "Exception"
    cls = _REMOTE_TYPES.get(name)
    if cls is None:
        cls = type(name, (RemoteUserCodeError,), {"__module__": "user_code"})
        _REMOTE_TYPES[name] = cls
    return cls(message)


SERVICE_SECRETS = frozenset(
    {
        env_vars.MQTT_USERNAME,
        env_vars.MQTT_PASSWORD,
        env_vars.TLS_KEY,
        env_vars.FLOWER_TOKEN,
        env_vars.MANAGER_TOKEN,
        env_vars.API_TOKEN,
    }
)
"""Credentials of the learner or aggregator that the repository's code in the worker never
sees: it cannot publish the service's status or join the federation as another client. The
data token stays: ``load_dataset()`` reads the node's data with it."""


class ModelWorker(ModelManagerTemplate):
    """The repository's ``ModelManager`` in a worker process; use as a context manager.

    Args:
        repo_dir: the ML repository root (the worker imports ``model_manager`` from it).
        python: the interpreter of the repository's environment; default
            ``$FLOPS_USER_PYTHON``, else this interpreter.
        env: the worker's environment (default: this process's) without the service's own
            credentials (:data:`SERVICE_SECRETS`); ``FLOPS_DATA_*`` reach ``load_dataset()``
            through it.
        start_timeout_s: seconds for the worker to start and instantiate ``ModelManager``.

    :meth:`start` (called by ``__enter__``) starts the worker and instantiates the user's
    ``ModelManager`` there; raises :class:`ModelWorkerStartError`, or
    :class:`~flops_utils.user_code.UserCodeError` when importing ``model_manager.py`` or the
    constructor raised.
    """

    def __init__(
        self,
        repo_dir: str | os.PathLike[str],
        python: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    ) -> None:
        self.repo_dir = Path(repo_dir)
        self.python = str(python or os.environ.get(env_vars.USER_PYTHON) or sys.executable)
        given = os.environ if env is None else env
        self.env = {k: v for k, v in given.items() if k not in SERVICE_SECRETS}
        self.start_timeout_s = start_timeout_s
        self.facts: dict[str, Any] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None
        self._stream: Any = None
        self._current = "start"

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> ModelWorker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker, check the protocol and instantiate ``ModelManager`` there."""
        if not Path(self.python).exists():
            raise ModelWorkerStartError(
                f"The ML repository's environment has no interpreter where "
                f"{env_vars.USER_PYTHON} points; rebuild the environment (POST the SLA again)."
            )
        ours, theirs = socket.socketpair()
        env = {**self.env, WORKER_FD_VARIABLE: str(theirs.fileno())}
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            self._process = subprocess.Popen(
                [self.python, "-m", "flops_utils.model_worker"],
                cwd=self.repo_dir if self.repo_dir.is_dir() else None,
                env=env,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            raise ModelWorkerStartError(
                f"Cannot start the model worker with {env_vars.USER_PYTHON} ({exc.strerror})."
            ) from exc
        finally:
            theirs.close()
        self._socket = ours
        self._stream = ours.makefile("rwb")
        ours.settimeout(self.start_timeout_s)
        try:
            reply, _ = self._request({"op": "hello"}, what="start")
            self.facts = {"python": reply.get("python"), "versions": reply.get("versions", {})}
            logger.info(
                "model worker %d: Python %s, %s",
                self._process.pid,
                self.facts["python"],
                ", ".join(f"{k} {v}" for k, v in sorted(self.facts["versions"].items())),
            )
            try:
                self._request({"op": "load", "repo_dir": str(self.repo_dir)}, what="ModelManager()")
            except RemoteUserCodeError as exc:
                raise UserCodeError(f"ModelManager() raised {describe_exception(exc)}") from None
        except TimeoutError:
            self.close()
            raise ModelWorkerStartError(
                f"The model worker did not start within {self.start_timeout_s:g} s; the "
                "machine may be overloaded, or importing model_manager.py hangs."
            ) from None
        except ModelWorkerDied as exc:
            self.close()
            if exc.returncode == 1 and self._current == "start":
                raise ModelWorkerStartError(
                    "The model worker exited at start: flops_utils or NumPy is not importable "
                    "in the ML repository's environment (see the log above); rebuild it."
                ) from None
            raise
        except BaseException:
            self.close()
            raise
        ours.settimeout(None)  # training calls last as long as the user's code takes

    def close(self) -> None:
        """Ask the worker to stop, wait up to :data:`STOP_TIMEOUT_S`, then kill it. Idempotent."""
        process, self._process = self._process, None
        if self._stream is not None and process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                if self._socket is not None:
                    self._socket.settimeout(STOP_TIMEOUT_S)
                write_message(self._stream, {"v": PROTOCOL_VERSION, "op": "stop"})
        for closeable in (self._stream, self._socket):
            if closeable is not None:
                with contextlib.suppress(OSError):
                    closeable.close()
        self._stream = self._socket = None
        if process is not None:
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs."""
        return None if self._process is None else self._process.pid

    # -- ModelManagerTemplate -------------------------------------------------------------------
    def set_model_data(self) -> None:
        """Load the node's data in the worker (the user's ``set_model_data``)."""
        self._call("set_model_data")

    def get_model(self) -> Any:
        """Not available across the process boundary: use :meth:`save_model`."""
        raise NotImplementedError("the model lives in the model worker; use save_model()")

    def get_model_parameters(self) -> list[np.ndarray[Any, Any]]:
        """The model's parameters (list of arrays) as the user's code returns them."""
        return self._call("get_model_parameters")[1]

    def set_model_parameters(self, parameters: Any) -> None:
        """Send ``parameters`` (list of numeric arrays) to the user's code."""
        self._call("set_model_parameters", [np.asarray(p) for p in parameters])

    def fit_model(self) -> int:
        """Train one round on the local data; returns the number of training examples."""
        return int(self._call("fit_model")[0]["num_examples"])

    def evaluate_model(self) -> tuple[float, float, int]:
        """``(loss, accuracy, num_examples)`` on the local held-out data."""
        reply = self._call("evaluate_model")[0]
        return float(reply["loss"]), float(reply["accuracy"]), int(reply["num_examples"])

    def save_model(
        self, flavor: str, path: str | os.PathLike[str], parameters: Any
    ) -> dict[str, Any]:
        """Set ``parameters``, then save ``get_model()`` with MLflow's ``flavor`` into ``path``.

        Returns what :func:`flops_utils.model_saving.save_model` reports (e.g. the MLflow
        version that saved it). Raises :class:`ModelSaveFailed` when the model cannot be
        saved, :class:`RemoteUserCodeError` when the user's code raised.
        """
        arrays = [np.asarray(p) for p in parameters]
        reply, _ = self._request(
            {"op": "save_model", "flavor": flavor, "path": str(path)},
            arrays,
            what="ModelManager.get_model",
        )
        return {k: v for k, v in reply.items() if k != "ok"}

    # -- wire -----------------------------------------------------------------------------------
    def _call(
        self, method: str, arrays: list[np.ndarray[Any, Any]] | None = None
    ) -> tuple[dict[str, Any], list[np.ndarray[Any, Any]]]:
        return self._request({"op": "call", "method": method}, arrays, f"ModelManager.{method}")

    def _request(
        self,
        header: dict[str, Any],
        arrays: list[np.ndarray[Any, Any]] | None = None,
        what: str = "",
    ) -> tuple[dict[str, Any], list[np.ndarray[Any, Any]]]:
        if self._stream is None:
            raise ModelWorkerDied(f"The model worker is not running (called: {what}).")
        self._current = what
        try:
            write_message(self._stream, {"v": PROTOCOL_VERSION, **header}, arrays)
            reply, out = read_message(self._stream)
        except TimeoutError:
            raise
        except (OSError, ProtocolError) as exc:
            died = self._died(what)
            self.close()
            raise died from exc
        if reply.get("ok"):
            return reply, out
        kind, message = reply.get("kind"), str(reply.get("message") or "")
        if kind == "user_code":
            raise _remote_error(str(reply.get("exc_type") or "Exception"), message)
        if kind == "data_unavailable":
            raise ModelWorkerDataError(message)
        if kind == "model_saving":
            raise ModelSaveFailed(message)
        raise ModelWorkerStartError(f"The model worker refused {what}: {message}")

    def _died(self, what: str) -> ModelWorkerDied:
        """The error for a worker that stopped answering: waits for it and names its end."""
        process = self._process
        returncode: int | None = None
        if process is not None:
            try:
                returncode = process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                returncode = process.wait(timeout=STOP_TIMEOUT_S)
        if returncode is not None and returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            how = f"was killed by {name}" + (
                " (the kernel's OOM killer sends it when memory runs out)"
                if name == "SIGKILL"
                else ""
            )
        else:
            how = f"exited with code {returncode}"
        error = ModelWorkerDied(
            f"The ML repository's code ended its process during {what or 'a call'}: the "
            f"model worker {how}; its output is in this service's log."
        )
        error.returncode = returncode
        return error
