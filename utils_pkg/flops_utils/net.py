"""Small networking helpers shared by the runtime roles, the manager and the tests.

Why ports are not left to the kernel (bind to port 0): a port the kernel hands out comes from
its ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``, Linux's default 32768-60999),
the range it also draws the source ports of outgoing connections from. Between the moment a
port is chosen and the moment the server binds it (seconds for MLflow, which imports a lot
first), any outgoing connection on the machine may take it as its source port, and the server
then fails with "address already in use". A port outside that range is never assigned
implicitly, so only an explicit ``bind`` can take it.

Outside that range a port can still be taken between the pick and the bind (by another program
binding it explicitly), so a server started on a picked port retries with a new pick when its
bind fails (:data:`PORT_PICK_ATTEMPTS`, :func:`address_in_use`); a port that was given (a
setting, or a port services already use) is never replaced that way.
"""

import random
import socket
import threading
import time
from collections.abc import Collection, Iterable
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_RANGE = (32768, 60999)
"""Linux's default ephemeral range (``ip(7)``), used when :data:`EPHEMERAL_RANGE_FILE` is
unreadable."""

SERVICE_PORT_RANGE = (20000, 32767)
"""Where :func:`find_free_port` looks (minus the ephemeral range): below Linux's default
ephemeral range and above the ports well-known services register."""

RECENT_PORT_HOLD_S = 30.0
"""Seconds a port handed out by :func:`find_free_port` is not handed out again by this
process, so that two callers picking ports before either binds get different ones."""

PORT_PICK_ATTEMPTS = 5
"""How many picked ports a server tries before giving up, when each bind fails because
another program took the port between the pick and the bind."""

ADDRESS_IN_USE_TEXT = "address already in use"
"""``strerror(EADDRINUSE)`` on Linux (lower case), as servers print it when ``bind`` fails."""

_recent_lock = threading.Lock()
_recent: dict[int, float] = {}


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range ``(first, last)``, inclusive; Linux's default when
    ``path`` cannot be read."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_RANGE
    return low, high


def outside_ephemeral(candidates: Iterable[int], ephemeral: tuple[int, int]) -> list[int]:
    """``candidates`` without the ports of the ``ephemeral`` range."""
    return [port for port in candidates if not ephemeral[0] <= port <= ephemeral[1]]


def is_bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP socket can bind ``host:port`` right now (nothing listens or lingers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_port(
    candidates: Iterable[int], in_use: Collection[int] = (), host: str | None = None
) -> int | None:
    """The first of ``candidates`` not in ``in_use``, not recently handed out by this process
    and (with ``host``) bindable there; ``None`` when there is none. The port is remembered
    for :data:`RECENT_PORT_HOLD_S` seconds."""
    now = time.monotonic()
    with _recent_lock:
        for port, since in list(_recent.items()):
            if now - since > RECENT_PORT_HOLD_S:
                del _recent[port]
        for port in candidates:
            if port in in_use or port in _recent:
                continue
            if host is None or is_bindable(port, host):
                _recent[port] = now
                return port
    return None


def shuffled_service_ports(port_range: tuple[int, int] = SERVICE_PORT_RANGE) -> list[int]:
    """The ports of ``port_range`` outside the kernel's ephemeral range, rotated to start at
    a random one (two processes on one machine then rarely try the same port at once)."""
    low, high = port_range
    candidates = outside_ephemeral(range(low, high + 1), ephemeral_range())
    start = random.randrange(len(candidates)) if candidates else 0
    return candidates[start:] + candidates[:start]


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that can be bound on ``host`` now, from :data:`SERVICE_PORT_RANGE` and
    outside the kernel's ephemeral range (see the module docstring for why).

    Falls back to a kernel-chosen port only when that range has no free port left.
    """
    port = pick_free_port(shuffled_service_ports(), host=host)
    if port is not None:
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    """Poll until a TCP connection to ``host:port`` succeeds; ``False`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def port_answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether one TCP connection to ``host:port`` succeeds within ``timeout_s`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def address_in_use(text: str) -> bool:
    """Whether a server's output ``text`` reports a failed bind: "Address already in use"
    (Mosquitto, Python's ``OSError``, uvicorn's "[Errno 98] ... address already in use")."""
    return ADDRESS_IN_USE_TEXT in text.lower()
