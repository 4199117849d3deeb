"""Registering a worker node (its data server and data tags) with the FLOps manager.

The data server POSTs to ``{manager_url}/api/flops/nodes`` the JSON::

    {"node_id": "node-1", "data_server": "grpc://10.0.0.5:8815",
     "architecture": "linux/amd64", "cluster": "local", "hostname": "worker-1",
     "tags": {"mnist": 5000}}

at start, every ``interval_s`` seconds after, and soon after its data changed. A failed
registration (manager down, timeout, non-2xx answer) is logged and retried with backoff
(1 s doubling up to ``interval_s``); it never stops the data server.
"""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import requests

from flops_utils.errors import FlopsError
from flops_utils.logging import logger

NODES_PATH = "/api/flops/nodes"
DEFAULT_INTERVAL_S = 30.0
REQUEST_TIMEOUT_S = 5.0
RETRY_MIN_S = 1.0

ARCHITECTURES = {
    "x86_64": "linux/amd64",
    "amd64": "linux/amd64",
    "aarch64": "linux/arm64",
    "arm64": "linux/arm64",
}
"""``platform.machine()`` → OCI platform name (as in the SLA's ``supported_platforms``)."""


class InvalidManagerUrl(FlopsError):
    """The manager URL is not ``http(s)://HOST[:PORT]``."""

    code = "invalid_manager_url"


def node_architecture(machine: str | None = None) -> str:
    """Return this node's platform as ``linux/amd64`` or ``linux/arm64``.

    ``machine`` defaults to ``platform.machine()``; an unknown machine gives
    ``linux/<machine lowercased>``.
    """
    name = (machine if machine is not None else platform.machine()).lower()
    return ARCHITECTURES.get(name, f"linux/{name or 'unknown'}")


def registration_payload(
    node_id: str,
    data_server: str,
    cluster: str,
    tags: dict[str, int],
    architecture: str | None = None,
    hostname: str | None = None,
) -> dict[str, Any]:
    """Build the registration JSON body (see the module docstring); ``tags`` is ``{tag: rows}``.

    ``hostname``: the node's name in its Oakestra cluster (the manager uses ``node_id`` when
    it is ``None``).
    """
    payload = {
        "node_id": node_id,
        "data_server": data_server,
        "architecture": architecture or node_architecture(),
        "cluster": cluster,
        "tags": dict(tags),
    }
    if hostname:
        payload["hostname"] = hostname
    return payload


def nodes_url(manager_url: str) -> str:
    """Return ``{manager_url}/api/flops/nodes``; raises :class:`InvalidManagerUrl`."""
    parsed = urlparse(manager_url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidManagerUrl(
            f"Manager URL {manager_url!r} is not of the form http://HOST:PORT. "
            "Pass the manager's base URL, e.g. --manager-url http://127.0.0.1:8080."
        )
    return manager_url.strip().rstrip("/") + NODES_PATH


class NodeRegistrar:
    """Keeps a node registered with the manager from a background thread.

    Args:
        manager_url: ``http(s)://HOST:PORT`` of the manager.
        payload: returns the current registration body (called before every POST, so the
            tags are fresh).
        interval_s: seconds between registrations. Defaults to 30.
        timeout_s: seconds one POST may take. Defaults to 5.
        session: the HTTP session to use (one is created if omitted).
        token: the manager's API token, sent as ``Authorization: Bearer``.

    Raises :class:`InvalidManagerUrl`. :meth:`register_once` never raises.
    """

    def __init__(
        self,
        manager_url: str,
        payload: Callable[[], dict[str, Any]],
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = REQUEST_TIMEOUT_S,
        session: requests.Session | None = None,
        token: str | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.url = nodes_url(manager_url)
        self.payload = payload
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.successes = 0
        self.failures = 0
        self.last_error: str | None = None
        self._last_body: dict[str, Any] | None = None
        self._session = session or requests.Session()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def register_once(self) -> bool:
        """POST the current payload once; ``True`` on a 2xx answer. Failures are logged."""
        try:
            body = self.payload()
            response = self._session.post(self.url, json=body, timeout=self.timeout_s)
        except (requests.RequestException, FlopsError, OSError) as exc:
            return self._failed(f"{type(exc).__name__}: {exc}")
        if not response.ok:
            return self._failed(f"HTTP {response.status_code}: {response.text[:200]}")
        self.successes += 1
        self.last_error = None
        changed = body != self._last_body
        self._last_body = body
        logger.log(
            logging.INFO if changed else logging.DEBUG,
            "registered node %s with %s (tags %s)",
            body["node_id"],
            self.url,
            body["tags"],
        )
        return True

    def _failed(self, reason: str) -> bool:
        self.failures += 1
        self.last_error = reason
        logger.warning("node registration at %s failed (will retry): %s", self.url, reason)
        return False

    def _run(self) -> None:
        retry_s = RETRY_MIN_S
        while not self._stop.is_set():
            if self.register_once():
                wait_s, retry_s = self.interval_s, RETRY_MIN_S
            else:
                wait_s, retry_s = retry_s, min(retry_s * 2, self.interval_s)
            self._wake.wait(wait_s)
            self._wake.clear()

    def start(self) -> None:
        """Register now and then periodically, in a daemon thread. Idempotent."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="node-registrar", daemon=True)
        self._thread.start()

    def trigger(self) -> None:
        """Register again soon (e.g. because the stored tags changed)."""
        self._wake.set()

    def stop(self, timeout_s: float = REQUEST_TIMEOUT_S + 1) -> None:
        """Stop the thread, waiting at most ``timeout_s`` seconds. Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._session.close()
