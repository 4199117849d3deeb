"""The learner's Flower adapter: the user's ModelManager as a Flower client.

This is the only learner module that imports ``flwr``. It uses the ``start_client`` gRPC API
(about 0.25 s per round here, against about 16 s for Flower 1.41's SuperNode
engine; measured with this adapter and a tiny model: about 0.01 s of Flower overhead per round
with two learners); swapping the engine means rewriting this module only.

Flower's gRPC-bidi transport does not retry a refused connection (its retry invoker is unused
for that transport), so :func:`run_client` retries by itself until the aggregator is up or
``max_wait_s`` has passed. With a :class:`~flops_utils.flower_security.ClientSecurity` it
connects with TLS and the project's client token
(:func:`~flops_utils.flower_security.secured_flower_client`); a refused certificate or token
ends the attempts at once.
"""

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from flops_utils.contract.training import CLIENT_NAME_PROPERTY
from flops_utils.errors import FlopsError
from flops_utils.flower_security import (
    ClientSecurity,
    credentials_refused,
    secured_flower_client,
)
from flops_utils.logging import logger
from flops_utils.ml_repo_templates import ModelManagerTemplate
from flops_utils.net import wait_for_port
from flops_utils.user_code import UserCodeError, call_user_code

if TYPE_CHECKING:
    from flwr.client import NumPyClient

# Flower reads this at import time; without it every start sends a telemetry event to the
# internet (which this machine does not have).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

RETRY_DELAY_S = 0.5
"""Pause between two connection attempts while the aggregator is not up yet."""

NDArrays = list[NDArray[Any]]
T = TypeVar("T")

FIT_SECONDS_METRIC = "fit_seconds"
"""The fit metric each learner returns: seconds its ``fit`` took (setting the parameters,
``fit_model``, getting the parameters), recorded per learner in the MLflow run."""


AGGREGATOR_UNREACHABLE_CAUSE = "aggregator_unreachable"
"""``data.cause`` of the learner's ``failed`` message when its aggregator went away (or never
answered), so that the manager tells it from a failure of the learner itself."""


class AggregatorUnreachable(FlopsError):
    """The learner could not connect to its aggregator, or lost the connection mid-training.

    ``cause`` is :data:`AGGREGATOR_UNREACHABLE_CAUSE`, except when the aggregator refused the
    learner's credentials (``None``: a configuration problem, not an absent aggregator)."""

    code = "aggregator_unreachable"
    cause: str | None = AGGREGATOR_UNREACHABLE_CAUSE


@dataclass
class ClientStats:
    """What the learner did: counts of fit / evaluate calls and the samples they used."""

    fit_rounds: int = 0
    evaluate_rounds: int = 0
    fit_examples: int = 0
    last_loss: float | None = None
    last_accuracy: float | None = None
    fit_seconds: list[float] = field(default_factory=list)
    instructions: int = 0
    """How many instructions came from the aggregator (0: never connected)."""


class _ModelManagerCalls:
    """Calls into the user's ModelManager, converting values and recording user errors."""

    def __init__(self, model_manager: ModelManagerTemplate) -> None:
        self.model_manager = model_manager
        self.stats = ClientStats()
        self.user_error: UserCodeError | None = None

    def _user_code(self, method: str, call: Callable[[], T]) -> T:
        """``call()`` through :func:`call_user_code`; a :class:`UserCodeError` is logged and
        kept in :attr:`user_error` (Flower may report it as a broken stream) and re-raised."""
        try:
            return call_user_code(f"ModelManager.{method}", call)
        except UserCodeError as exc:
            logger.error("%s", exc.message)
            self.user_error = exc
            raise

    def get_parameters(self) -> NDArrays:
        self.stats.instructions += 1
        return self._parameters()

    def _parameters(self) -> NDArrays:
        return self._user_code(
            "get_model_parameters",
            lambda: [np.asarray(p) for p in self.model_manager.get_model_parameters()],
        )

    def set_parameters(self, parameters: NDArrays) -> None:
        self._user_code(
            "set_model_parameters", lambda: self.model_manager.set_model_parameters(parameters)
        )

    def fit(self, parameters: NDArrays) -> tuple[NDArrays, int]:
        began = time.monotonic()
        self.stats.instructions += 1
        self.set_parameters(parameters)
        num_examples = self._user_code("fit_model", lambda: int(self.model_manager.fit_model()))
        updated = self._parameters()
        self.stats.fit_rounds += 1
        self.stats.fit_examples = num_examples
        self.stats.fit_seconds.append(time.monotonic() - began)
        return updated, num_examples

    def evaluate(self, parameters: NDArrays) -> tuple[float, int, float]:
        self.stats.instructions += 1
        self.set_parameters(parameters)
        result = self._user_code("evaluate_model", self._evaluation)
        self.stats.evaluate_rounds += 1
        self.stats.last_loss, self.stats.last_accuracy = result[0], result[2]
        return result

    def _evaluation(self) -> tuple[float, int, float]:
        loss, accuracy, num_examples = self.model_manager.evaluate_model()
        return float(loss), int(num_examples), float(accuracy)


def _numpy_client(calls: _ModelManagerCalls, name: str = "") -> "NumPyClient":
    """Wrap ``calls`` in a Flower NumPyClient (imports flwr lazily) that tells the aggregator
    ``name`` when it asks for its properties."""
    from flwr.client import NumPyClient

    class ModelManagerClient(NumPyClient):
        """Flower's view of the ModelManager: parameters are lists of NumPy arrays."""

        def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
            return {CLIENT_NAME_PROPERTY: name} if name else {}

        def get_parameters(self, config: dict[str, Any]) -> NDArrays:
            return calls.get_parameters()

        def fit(
            self, parameters: NDArrays, config: dict[str, Any]
        ) -> tuple[NDArrays, int, dict[str, Any]]:
            updated, num_examples = calls.fit(parameters)
            return updated, num_examples, {FIT_SECONDS_METRIC: calls.stats.fit_seconds[-1]}

        def evaluate(
            self, parameters: NDArrays, config: dict[str, Any]
        ) -> tuple[float, int, dict[str, Any]]:
            loss, num_examples, accuracy = calls.evaluate(parameters)
            return loss, num_examples, {"accuracy": accuracy}

    return ModelManagerClient()


def preload() -> threading.Thread:
    """Import Flower and gRPC in a daemon thread and return it (started).

    The learner calls it before it starts the model worker: the two imports (about 1.5 s of
    Flower here, about as much for the repository's libraries in the worker) then overlap
    instead of following each other; :func:`run_client` later finds the modules imported (or
    waits on Python's import lock for the thread to finish them). An import error surfaces
    there, not here.
    """

    def load() -> None:
        with contextlib.suppress(Exception):
            import grpc  # noqa: F401
            from flwr.client import start_client  # noqa: F401

    thread = threading.Thread(target=load, name="flower-preload", daemon=True)
    thread.start()
    return thread


def run_client(
    model_manager: ModelManagerTemplate,
    aggregator_address: str,
    max_wait_s: float = 60.0,
    security: ClientSecurity | None = None,
    name: str = "",
) -> ClientStats:
    """Train ``model_manager`` with the aggregator at ``aggregator_address`` until it says stop.

    Args:
        model_manager: the user's ModelManager, with its data already loaded.
        aggregator_address: ``HOST:PORT`` of the aggregator's Flower server.
        max_wait_s: seconds to keep retrying while the aggregator refuses connections.
        security: the project's CA and client token (default: plain gRPC, no token).
        name: the learner's name, which the aggregator uses in its messages (stragglers).

    Returns the :class:`ClientStats` of the session. Raises :class:`UserCodeError` when a
    ModelManager method raised, :class:`AggregatorUnreachable` when no connection was made
    within ``max_wait_s``, the aggregator refused the credentials (at once, without
    retrying) or the connection broke before the aggregator ended training, and
    ``ValueError`` when the address has no numeric port.
    """
    calls = _ModelManagerCalls(model_manager)
    client = _numpy_client(calls, name).to_client()
    with secured_flower_client(security or ClientSecurity()):
        _connect(client, calls, aggregator_address, max_wait_s)
    return calls.stats


def _connect(
    client: Any, calls: _ModelManagerCalls, aggregator_address: str, max_wait_s: float
) -> None:
    """``start_client`` with retries while the aggregator is not up; raises as
    :func:`run_client` says."""
    import grpc
    from flwr.client import start_client

    deadline = time.monotonic() + max_wait_s
    host, _, port = aggregator_address.rpartition(":")
    attempts = 0
    while True:
        attempts += 1
        # Wait for the port first: a refused gRPC stream leaves a noisy traceback behind.
        wait_for_port(host.strip("[]"), int(port), max(deadline - time.monotonic(), 0.1))
        try:
            start_client(server_address=aggregator_address, client=client)
            return
        except Exception as exc:
            # Flower's gRPC-bidi client re-raises whatever the client raised; a user error may
            # also surface as the broken stream it caused.
            if calls.user_error is not None:
                raise calls.user_error from calls.user_error.__cause__
            if not isinstance(exc, grpc.RpcError):
                raise
            status = exc.code() if isinstance(exc, grpc.Call) else None
            never_connected = calls.stats.instructions == 0
            refused = credentials_refused(exc) if never_connected else None
            if refused is not None:
                error = AggregatorUnreachable(
                    f"The secured connection to the aggregator at {aggregator_address} was "
                    f"refused: {refused}; the learner's and the aggregator's project "
                    "credentials (issued by the manager) do not match."
                )
                error.cause = None
                raise error from exc
            if (
                never_connected
                and status == grpc.StatusCode.UNAVAILABLE
                and time.monotonic() < deadline
            ):
                time.sleep(RETRY_DELAY_S)
                continue
            if never_connected:
                raise AggregatorUnreachable(
                    f"Could not reach the aggregator at {aggregator_address} within "
                    f"{max_wait_s:g}s ({attempts} attempts, last: {status}); check that the "
                    f"aggregator runs and that FLOPS_AGGREGATOR_ADDRESS is right."
                ) from exc
            raise AggregatorUnreachable(
                f"Lost the connection to the aggregator at {aggregator_address} after "
                f"{calls.stats.fit_rounds} training rounds ({status}); the aggregator stopped "
                f"or failed, see its status messages."
            ) from exc
