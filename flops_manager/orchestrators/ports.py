"""Choosing the aggregator's port: free, outside the kernel's ephemeral range, unused by the
orchestrator's other services.

Why not let the kernel pick (bind to port 0)? A port the kernel hands out is from its
ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``), the same range it draws the
source ports of outgoing connections from. Between the moment the manager picks the port and
the moment the aggregator binds it (seconds: the aggregator imports Flower first), any
outgoing connection on the machine (a learner's MQTT client, an HTTP request) may get that
port as its source port, and the aggregator then fails with "address already in use". A port
outside that range is never assigned implicitly, so only an explicit ``bind`` can take it.
"""

from collections.abc import Collection, Iterable

from flops_manager.errors import ServiceUnavailable
from flops_utils.net import (
    SERVICE_PORT_RANGE,
    ephemeral_range,
    is_bindable,
    outside_ephemeral,
    pick_free_port,
    shuffled_service_ports,
)

__all__ = [
    "LOCAL_PORT_RANGE",
    "ephemeral_range",
    "first_free_port",
    "is_bindable",
    "local_aggregator_port",
    "outside_ephemeral",
    "parse_port_range",
]

LOCAL_PORT_RANGE = SERVICE_PORT_RANGE
"""Where the ``local`` backend looks for an aggregator port (minus the ephemeral range)."""


def parse_port_range(text: str) -> tuple[int, int]:
    """``"30000-30999"`` → ``(30000, 30999)``. Raises ``ValueError`` for anything that is not
    two ports ``1..65535`` in ascending order."""
    first, sep, last = text.strip().partition("-")
    try:
        low, high = int(first), int(last if sep else first)
    except ValueError:
        raise ValueError(f"port range {text!r} is not FIRST-LAST, e.g. 30000-30999") from None
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"port range {text!r} must satisfy 1 <= FIRST <= LAST <= 65535")
    return low, high


def first_free_port(
    candidates: Iterable[int], in_use: Collection[int], host: str | None = None
) -> int:
    """The first of ``candidates`` not in ``in_use`` (and, with ``host``, bindable there).

    Raises :class:`~flops_manager.errors.ServiceUnavailable` when none is left.
    """
    ports = list(candidates)
    for port in ports:
        if port not in in_use and (host is None or is_bindable(port, host)):
            return port
    span = f"{ports[0]}-{ports[-1]}" if ports else "(empty)"
    raise ServiceUnavailable(
        f"No free port for the aggregator in {span}: {len(in_use)} in use by other projects' "
        "services. Wait for a project to finish or widen the port range."
    )


def local_aggregator_port(in_use: Collection[int], host: str = "127.0.0.1") -> int:
    """A port for a ``local`` aggregator: in :data:`LOCAL_PORT_RANGE`, outside the kernel's
    ephemeral range, not in ``in_use``, not just handed out to another caller of this process
    and bindable on ``host``. Raises ``ServiceUnavailable`` when none is.

    The search starts at a random candidate, so that two manager processes on one machine
    (e.g. parallel test sessions) rarely try the same port at the same moment.
    """
    candidates = shuffled_service_ports(LOCAL_PORT_RANGE)
    port = pick_free_port(candidates, in_use, host)
    if port is None:
        return first_free_port(candidates, in_use, host)  # raises ServiceUnavailable
    return port
