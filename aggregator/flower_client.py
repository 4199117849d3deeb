"""The cluster aggregator's Flower client adapter: its connection to the root aggregator.

With :mod:`aggregator.flower_server`, the only aggregator modules that import ``flwr``. It
uses the ``start_client`` gRPC-bidi API like the learner (``learner.flower_client``, which the
aggregator does not import). Flower's gRPC-bidi transport does not retry a refused connection,
so :func:`run_root_client` retries by itself until the root listens or ``max_wait_s`` has
passed. With a :class:`~flops_utils.flower_security.ClientSecurity` it connects with TLS and
the project's client token (:func:`~flops_utils.flower_security.secured_flower_client`); a
refused certificate or token ends the attempts at once.
"""

import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from numpy.typing import NDArray

from aggregator.flower_server import TrainingFailed
from flops_utils.contract.training import CLIENT_NAME_PROPERTY
from flops_utils.flower_security import (
    ClientSecurity,
    credentials_refused,
    secured_flower_client,
)
from flops_utils.net import wait_for_port

# Flower reads this at import time; without it every start sends a telemetry event to the
# internet (which this machine does not have).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

RETRY_DELAY_S = 0.5
"""Pause between two connection attempts while the root aggregator is not up yet."""

NDArrays = list[NDArray[Any]]


class RootUnreachable(TrainingFailed):
    """The cluster aggregator could not reach the root aggregator, or lost the connection
    before the root ended training (exits as training failed)."""

    code = "root_aggregator_unreachable"
    cause: str | None = "aggregator_unreachable"
    """``data.cause`` of its ``failed`` message: the same as a learner's that lost its
    aggregator (``None`` when the root refused the credentials)."""


class RootTask(Protocol):
    """What the root asks of a cluster aggregator (Flower's NumPyClient ``fit``/``evaluate``
    with the root's config)."""

    def fit(
        self, parameters: NDArrays, config: dict[str, Any]
    ) -> tuple[NDArrays, int, dict[str, Any]]:
        """Train from ``parameters``; ``(parameters, num_examples, metrics)``."""
        ...

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """Evaluate ``parameters``; ``(loss, num_examples, metrics)``."""
        ...


def run_root_client(
    task: RootTask,
    root_address: str,
    max_wait_s: float,
    security: ClientSecurity | None = None,
    name: str = "",
) -> int:
    """Serve ``task`` to the root aggregator at ``root_address`` until the root ends training.

    Args:
        task: answers the root's fit and evaluate instructions.
        root_address: ``HOST:PORT`` of the root's Flower server.
        max_wait_s: seconds to keep retrying while the root refuses connections.
        security: the project's CA and client token (default: plain gRPC, no token).
        name: what the root calls this client in its messages (the cluster), returned from
            ``get_properties`` as ``CLIENT_NAME_PROPERTY``.

    Returns the number of instructions served. Raises what ``task`` raised, and
    :class:`RootUnreachable` when no connection was made within ``max_wait_s``, the root
    refused the credentials, or the connection broke before the root ended training.
    """
    from flwr.client import NumPyClient

    served = 0

    class _ClusterClient(NumPyClient):
        def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
            return {CLIENT_NAME_PROPERTY: name} if name else {}

        def get_parameters(self, config: dict[str, Any]) -> NDArrays:
            return []  # the root starts from the user's model, never from a cluster's

        def fit(
            self, parameters: NDArrays, config: dict[str, Any]
        ) -> tuple[NDArrays, int, dict[str, Any]]:
            nonlocal served
            served += 1
            return task.fit(parameters, config)

        def evaluate(
            self, parameters: NDArrays, config: dict[str, Any]
        ) -> tuple[float, int, dict[str, Any]]:
            nonlocal served
            served += 1
            return task.evaluate(parameters, config)

    client = _ClusterClient().to_client()
    with secured_flower_client(security or ClientSecurity()):
        _connect(client, root_address, max_wait_s, lambda: served)
    return served


def _connect(client: Any, root_address: str, max_wait_s: float, served: Callable[[], int]) -> None:
    """``start_client`` with retries while the root is not up; ``served()`` tells how many
    instructions came so far. Raises :class:`RootUnreachable` (see :func:`run_root_client`)."""
    import grpc
    from flwr.client import start_client

    deadline = time.monotonic() + max_wait_s
    host, _, port = root_address.rpartition(":")
    attempts = 0
    while True:
        attempts += 1
        wait_for_port(host.strip("[]"), int(port), max(deadline - time.monotonic(), 0.1))
        try:
            start_client(server_address=root_address, client=client)
            return
        except grpc.RpcError as exc:
            status = exc.code() if isinstance(exc, grpc.Call) else None
            refused = credentials_refused(exc)
            if served() == 0 and refused is not None:
                error = RootUnreachable(
                    f"The secured connection to the root aggregator at {root_address} was "
                    f"refused: {refused}; the cluster's and the root's project credentials "
                    "(issued by the manager) do not match."
                )
                error.cause = None
                raise error from exc
            if served() == 0 and status == grpc.StatusCode.UNAVAILABLE:
                if time.monotonic() < deadline:
                    time.sleep(RETRY_DELAY_S)
                    continue
                raise RootUnreachable(
                    f"Could not reach the root aggregator at {root_address} within "
                    f"{max_wait_s:g}s ({attempts} attempts, last: {status}); check that it "
                    "runs and that FLOPS_ROOT_AGGREGATOR_ADDRESS is right."
                ) from exc
            raise RootUnreachable(
                f"Lost the connection to the root aggregator at {root_address} after "
                f"{served()} instructions ({status}); the root stopped or failed, see its "
                "status messages."
            ) from exc
