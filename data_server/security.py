"""TLS and token authentication of a data server (docs/security.md, "Arrow Flight").

Trust model:

- The data server creates at first start, in ``<data_dir>/.security/`` (directory 0700, files
  0600): a self-signed TLS certificate and its key (ECDSA P-256; subject alternative names =
  its advertised host, ``localhost`` and ``127.0.0.1``) and the node owner's credential (a
  random 256-bit token). They are reused after restarts; the certificate is made again when
  a name is missing from it or it expires within :data:`CERT_RENEW_BEFORE_S`.
- It registers the certificate's PEM with the manager; learners get it from the manager and
  trust only it for the TLS connection.
- The registration answer carries the manager's Ed25519 public key; the data server accepts
  JWTs signed with it (``alg`` ``EdDSA``, ``iss`` :data:`TOKEN_ISSUER`, ``aud``
  :data:`TOKEN_AUDIENCE`, ``exp`` required, ``node`` = this node):

  - ``scope`` ``read`` (a learner of project ``project``): ``list_flights``,
    ``get_flight_info``, ``get_schema``, ``do_get`` and the ``tags`` action, only for the
    tags in its ``tags`` claim;
  - ``scope`` ``write`` (the manager's own pushes, e.g. ``POST /mocks``): everything.

- The owner credential may do everything (``do_put``, ``drop``, reads).

Every call carries ``authorization: Bearer <credential>``; :class:`AuthMiddlewareFactory`
refuses a call without a valid one (``FlightUnauthenticatedError``), and the server's
handlers refuse what the credential does not allow (``FlightUnauthorizedError``).
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pyarrow.flight as flight
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flops_utils.logging import logger

SECURITY_DIR = ".security"
"""Subdirectory of the data directory holding the key, the certificate and the owner token."""

CERT_FILE = "tls-cert.pem"
KEY_FILE = "tls-key.pem"
OWNER_TOKEN_FILE = "owner-token"

CERT_VALIDITY_DAYS = 825
"""Lifetime of the self-signed certificate (the CA/Browser Forum's former maximum for server
certificates)."""

CERT_RENEW_BEFORE_S = 30 * 24 * 3600.0
"""A certificate expiring within this many seconds is replaced at start."""

LOCAL_NAMES = ("localhost", "127.0.0.1")
"""Names every certificate carries, so the node's owner can reach the server on the node."""

TOKEN_ISSUER = "flops-manager"
TOKEN_AUDIENCE = "flops-data-server"
TOKEN_ALGORITHM = "EdDSA"
"""JWT ``alg`` of the manager's data tokens (Ed25519, RFC 8037)."""

READ_SCOPE = "read"
WRITE_SCOPE = "write"

CLOCK_LEEWAY_S = 30.0
"""Seconds of clock difference between the manager and a node tolerated for ``exp``/``iat``."""

MIDDLEWARE_KEY = "flops-auth"
"""Name under which :class:`AuthMiddlewareFactory` is installed on the Flight server."""

AUTHORIZATION_HEADER = "authorization"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) atomically: a temporary file, then a rename."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def security_dir(data_dir: str | Path) -> Path:
    """``<data_dir>/.security``, created with mode 0700 (an existing one is set to 0700)."""
    path = Path(data_dir) / SECURITY_DIR
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def load_or_create_owner_token(data_dir: str | Path) -> str:
    """The node owner's credential in ``<data_dir>/.security/owner-token`` (created if missing:
    256 random bits, URL-safe base64, mode 0600)."""
    path = security_dir(data_dir) / OWNER_TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    _write_private(path, (token + "\n").encode())
    return token


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def cert_names(hosts: Iterable[str]) -> list[str]:
    """The names a certificate for ``hosts`` carries: ``hosts`` (brackets of IPv6 literals
    removed, wildcard bind addresses dropped) plus :data:`LOCAL_NAMES`, without duplicates."""
    names: list[str] = []
    for host in [*hosts, *LOCAL_NAMES]:
        name = host.strip().strip("[]")
        if name and name not in ("0.0.0.0", "::") and name not in names:
            names.append(name)
    return names


def _cert_covers(cert: x509.Certificate, names: list[str]) -> bool:
    """Whether ``cert`` names every one of ``names`` and is not about to expire."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    present = set(san)
    remaining_s = (cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).total_seconds()
    return remaining_s > CERT_RENEW_BEFORE_S and all(_san_entry(n) in present for n in names)


def _self_signed(names: list[str]) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key and a self-signed certificate for ``names``: (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"flops-data-server {names[0]}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def load_or_create_tls(data_dir: str | Path, hosts: Iterable[str]) -> tuple[str, str]:
    """The data server's TLS certificate and key, ``(cert PEM, key PEM)``.

    Reuses ``<data_dir>/.security/tls-cert.pem`` and ``tls-key.pem`` when the certificate names
    every one of :func:`cert_names` ``(hosts)`` and is valid for more than
    :data:`CERT_RENEW_BEFORE_S`; otherwise makes a new self-signed pair (files 0600).
    """
    directory = security_dir(data_dir)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    names = cert_names(hosts)
    if cert_path.exists() and key_path.exists():
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        try:
            if _cert_covers(x509.load_pem_x509_certificate(cert_pem), names):
                return cert_pem.decode(), key_pem.decode()
        except ValueError:
            logger.warning("data server: unreadable %s; making a new certificate", cert_path)
    cert_pem, key_pem = _self_signed(names)
    _write_private(key_path, key_pem)
    _write_private(cert_path, cert_pem)
    logger.info("data server: new self-signed TLS certificate for %s", ", ".join(names))
    return cert_pem.decode(), key_pem.decode()


@dataclass(frozen=True)
class Caller:
    """Who makes a Flight call, as far as the data server is concerned.

    ``kind``: ``owner`` (the node owner's credential), ``write`` (a manager write token) or
    ``read`` (a learner's read token, for ``tags`` of ``project``).
    """

    kind: str
    tags: frozenset[str] = frozenset()
    project: str | None = None

    @property
    def may_write(self) -> bool:
        """Whether the caller may ``do_put`` and ``drop``."""
        return self.kind in ("owner", WRITE_SCOPE)

    def may_read(self, tag: str) -> bool:
        """Whether the caller may read the table and description of ``tag``."""
        return self.kind != READ_SCOPE or tag in self.tags


def unauthenticated(reason: str) -> flight.FlightUnauthenticatedError:
    """A refusal for a call without a valid credential (the message names the fix)."""
    return flight.FlightUnauthenticatedError(f"data server: {reason}")


def unauthorized(reason: str) -> flight.FlightUnauthorizedError:
    """A refusal for a credential that does not allow this call (the message names the fix)."""
    return flight.FlightUnauthorizedError(f"data server: {reason}")


@dataclass
class DataServerSecurity:
    """TLS material and credentials of a secure data server.

    Args:
        node_id: this node's id (a token's ``node`` claim must equal it).
        cert_pem / key_pem: the TLS certificate (registered with the manager) and its key.
        owner_token: the node owner's credential.
        manager_key_pem: the manager's Ed25519 public key (PEM) that signs data tokens;
            ``None`` until the first registration answers (tokens are refused until then).

    Build one with :meth:`load`. :meth:`set_manager_key` is thread-safe.
    """

    node_id: str
    cert_pem: str
    key_pem: str = field(repr=False)
    owner_token: str = field(repr=False)
    manager_key_pem: str | None = None
    _manager_key: Ed25519PublicKey | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.manager_key_pem:
            self.set_manager_key(self.manager_key_pem)

    @classmethod
    def load(
        cls,
        data_dir: str | Path,
        node_id: str,
        hosts: Iterable[str],
        manager_key_pem: str | None = None,
    ) -> DataServerSecurity:
        """Load (or create at first start) the TLS pair for ``hosts`` and the owner token kept
        in ``<data_dir>/.security``. Raises ``OSError`` when the directory is unusable."""
        cert_pem, key_pem = load_or_create_tls(data_dir, hosts)
        owner = load_or_create_owner_token(data_dir)
        return cls(node_id, cert_pem, key_pem, owner, manager_key_pem)

    def set_manager_key(self, pem: str) -> None:
        """Trust data tokens signed by the Ed25519 public key ``pem`` (replacing the previous
        key). Raises ``ValueError`` for a PEM that is not an Ed25519 public key."""
        key = serialization.load_pem_public_key(pem.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the manager's data token key is not an Ed25519 public key")
        with self._lock:
            if self.manager_key_pem != pem:
                logger.info("data server: trusting the manager's data token key")
            self._manager_key, self.manager_key_pem = key, pem

    def authenticate(self, credential: str) -> Caller:
        """The caller holding ``credential`` (the owner token or a manager-signed JWT).

        Raises ``FlightUnauthenticatedError`` for an unknown, forged or expired credential, and
        ``FlightUnauthorizedError`` for a token of another node or with an unknown scope.
        """
        if hmac.compare_digest(credential.encode(), self.owner_token.encode()):
            return Caller("owner")
        with self._lock:
            key = self._manager_key
        if key is None:
            raise unauthenticated(
                "this node has not received the manager's token key yet (it arrives with a "
                "successful registration), so no data token can be checked. Retry later or use "
                "the node owner's credential."
            )
        claims = self._decode(credential, key)
        if claims.get("node") != self.node_id:
            raise unauthorized(
                f"the token is for node {claims.get('node')!r}, this is node {self.node_id!r}. "
                "Ask the manager for a token of this node."
            )
        scope = claims.get("scope")
        if scope == WRITE_SCOPE:
            return Caller(WRITE_SCOPE)
        tags = claims.get("tags")
        if scope != READ_SCOPE or not isinstance(tags, list):
            raise unauthorized("the token has no read or write scope. Use a data token.")
        return Caller(READ_SCOPE, frozenset(str(t) for t in tags), str(claims.get("project")))

    @staticmethod
    def _decode(credential: str, key: Ed25519PublicKey) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                credential,
                key,
                algorithms=[TOKEN_ALGORITHM],
                audience=TOKEN_AUDIENCE,
                issuer=TOKEN_ISSUER,
                leeway=CLOCK_LEEWAY_S,
                options={"require": ["exp", "iat", "aud", "iss", "node", "scope"]},
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated(
                "the data token has expired. Ask the manager for a new one (redeploy the "
                "project's learner)."
            ) from None
        except jwt.InvalidTokenError as exc:
            raise unauthenticated(
                f"the credential is neither the node owner's nor a valid manager data token "
                f"({type(exc).__name__}). Use the token the manager issued."
            ) from None
        return claims


def bearer(headers: Mapping[str, Any]) -> str | None:
    """The credential of an ``authorization: Bearer <credential>`` header, or ``None``."""
    values = headers.get(AUTHORIZATION_HEADER) or []
    for value in values if isinstance(values, list) else [values]:
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        scheme, _, credential = text.partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return credential.strip()
    return None


class AuthMiddleware(flight.ServerMiddleware):  # type: ignore[misc]
    """Carries the authenticated :class:`Caller` of one call (``caller``)."""

    def __init__(self, caller: Caller) -> None:
        super().__init__()
        self.caller = caller


class AuthMiddlewareFactory(flight.ServerMiddlewareFactory):  # type: ignore[misc]
    """Authenticates every Flight call with ``security`` (see the module docstring)."""

    def __init__(self, security: DataServerSecurity) -> None:
        super().__init__()
        self.security = security

    def start_call(self, info: Any, headers: Mapping[str, Any]) -> AuthMiddleware:
        """Return the call's :class:`AuthMiddleware`; raises a Flight refusal (see
        :meth:`DataServerSecurity.authenticate`) without a valid credential."""
        credential = bearer(headers)
        if credential is None:
            raise unauthenticated(
                "this data server needs 'authorization: Bearer <token>' (a data token from "
                "the manager, or the node owner's credential)."
            )
        return AuthMiddleware(self.security.authenticate(credential))


def owner_credentials(data_dir: str | Path) -> tuple[str, str]:
    """``(owner token, certificate PEM)`` of the data server serving ``data_dir``, read from
    ``<data_dir>/.security`` on the node, for the node owner's own client, e.g.
    ``DataClient(location, token=token, tls_root_certs=cert)``. Raises ``OSError`` when the
    data server has not created them yet (it does at its first secure start)."""
    directory = Path(data_dir) / SECURITY_DIR
    token = (directory / OWNER_TOKEN_FILE).read_text().strip()
    return token, (directory / CERT_FILE).read_text()
