"""Registering a worker node (its data server and data tags) with the FLOps manager.

The data server POSTs to ``{manager_url}/api/flops/nodes`` the JSON::

    {"node_id": "node-1", "data_server": "grpc+tls://10.0.0.5:8815",
     "architecture": "linux/amd64", "cluster": "local", "hostname": "worker-1",
     "tags": {"mnist": 5000}, "data_server_cert": "-----BEGIN CERTIFICATE-----..."}

(``data_server_cert``: the PEM of a TLS data server's self-signed certificate, which the
manager hands to the node's learners; absent for a plain ``grpc://`` one) at start, every
``interval_s`` seconds after, and soon after its data changed. A failed registration
(manager down, timeout, non-2xx answer) is logged and retried with backoff (1 s doubling up to
``interval_s``); it never stops the data server.

The manager's answer carries ``data_token_public_key``: the PEM of the key that signs the
data tokens the data server accepts (:mod:`data_server.security`); the registrar hands every
answer to its ``on_answer`` callback.

Credential: the node credential the admin issued (``flops token --node ID``; an HS256 JWT with
``iat``/``exp``, registering this node only) or, as before, the admin token. Once half of a
node credential's lifetime has passed, the registrar asks the manager for a fresh one
(``POST {manager_url}/api/flops/nodes/{node_id}/credential``, answer ``{"token",
"expires_at"}``), uses it from then on and keeps it in ``credential_file`` (mode 0600), which
:func:`stored_credential` reads at the next start.
"""

from __future__ import annotations

import logging
import os
import platform
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jwt
import requests

from flops_utils.errors import FlopsError
from flops_utils.logging import logger

NODES_PATH = "/api/flops/nodes"
CREDENTIAL_PATH = NODES_PATH + "/{node_id}/credential"
REFRESH_AFTER_FRACTION = 0.5
"""A node credential is refreshed once this fraction of its lifetime (``exp - iat``) passed."""
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
    cert_pem: str | None = None,
) -> dict[str, Any]:
    """Build the registration JSON body (see the module docstring); ``tags`` is ``{tag: rows}``.

    ``hostname``: the node's name in its Oakestra cluster (the manager uses ``node_id`` when
    it is ``None``). ``cert_pem``: the data server's TLS certificate (``data_server_cert``).
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
    if cert_pem:
        payload["data_server_cert"] = cert_pem
    return payload


def credential_times(token: str) -> tuple[float, float] | None:
    """``(iat, exp)`` of a node credential (read, not verified: the manager checks it), or
    ``None`` for a credential without both (e.g. the admin token)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
        return float(claims["iat"]), float(claims["exp"])
    except (jwt.InvalidTokenError, KeyError, TypeError, ValueError):
        return None


def stored_credential(path: str | Path) -> str | None:
    """The refreshed node credential kept in ``path``, if there is one that has not expired."""
    try:
        token = Path(path).read_text().strip()
    except OSError:
        return None
    times = credential_times(token) if token else None
    return token if times is not None and times[1] > time.time() else None


def _store_credential(path: Path, token: str) -> None:
    """Write ``token`` to ``path`` (mode 0600) atomically."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    os.replace(temp, path)


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
        token: the credential sent to the manager as ``Authorization: Bearer`` (a node
            credential is refreshed, see the module docstring).
        credential_file: where a refreshed node credential is kept (mode 0600); ``None``
            keeps it in memory only.
        on_answer: called with the JSON object of every successful answer (in the
            registrar's thread; exceptions are logged).

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
        credential_file: str | Path | None = None,
        on_answer: Callable[[dict[str, Any]], None] | None = None,
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
        self._token = token
        self._credential_file = Path(credential_file) if credential_file else None
        self._on_answer = on_answer
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def register_once(self) -> bool:
        """POST the current payload once; ``True`` on a 2xx answer. Failures are logged."""
        try:
            body = self.payload()
            response = self._session.post(
                self.url, json=body, timeout=self.timeout_s, headers=self._auth_header()
            )
        except (requests.RequestException, FlopsError, OSError) as exc:
            return self._failed(f"{type(exc).__name__}: {exc}")
        if not response.ok:
            return self._failed(f"HTTP {response.status_code}: {response.text[:200]}")
        self._answered(response)
        try:
            self._refresh_if_due(str(body["node_id"]))
        except (requests.RequestException, OSError, ValueError) as exc:
            logger.warning("could not refresh the node credential (will retry): %s", exc)
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

    def _auth_header(self) -> dict[str, str]:
        """``Authorization: Bearer`` with the current credential (none without one)."""
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _refresh_if_due(self, node_id: str) -> None:
        """Swap a node credential past :data:`REFRESH_AFTER_FRACTION` of its lifetime for a
        fresh one. Raises ``requests.RequestException`` / ``OSError``; a refusal is logged."""
        times = credential_times(self._token) if self._token else None
        if times is None:
            return
        issued, expires = times
        if time.time() < issued + REFRESH_AFTER_FRACTION * (expires - issued):
            return
        url = self.url + CREDENTIAL_PATH.removeprefix(NODES_PATH).format(node_id=node_id)
        response = self._session.post(url, timeout=self.timeout_s, headers=self._auth_header())
        token = response.json().get("token") if response.ok else None
        if not isinstance(token, str) or not token:
            logger.warning(
                "could not refresh node %s's credential (HTTP %s); it expires at %s",
                node_id,
                response.status_code,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires)),
            )
            return
        self._token = token
        if self._credential_file is not None:
            _store_credential(self._credential_file, token)
        logger.info("refreshed node %s's credential with the manager", node_id)

    def _answered(self, response: requests.Response) -> None:
        """Hand the answer's JSON object to ``on_answer`` (errors are logged, not raised)."""
        if self._on_answer is None:
            return
        try:
            answer = response.json()
            if isinstance(answer, dict):
                self._on_answer(answer)
        except Exception:  # a bad answer must not stop the registrar
            logger.exception("could not use the manager's registration answer")

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
