"""Who is calling the API: bearer tokens checked by one of two authenticators.

- :class:`ApiTokenAuth` (embedded default): one API token, created at the manager's first start
  in ``$FLOPS_HOME/api-token`` (file mode 0600). Its holder is the admin.
- :class:`OakestraJwtAuth`: the caller's Oakestra access token (an RS256 JWT signed by the
  Oakestra root orchestrator, whose public key is configured). ``sub`` is the customer; a
  ``roles`` claim containing ``ADMIN`` (case-insensitive) grants admin rights.

A customer sees only their own projects; the admin sees all and may register nodes, push mock
data and wipe the database. Either way, a worker node's data server may hold a *node
credential* (:class:`NodeCredentials`) instead of an admin token: it registers and refreshes
that one node and does nothing else.
"""

import hmac
import os
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flops_utils.errors import FlopsError

ADMIN_ROLES = frozenset({"admin", "administrator"})
TOKEN_FILE = "api-token"
TIME_CLAIMS = ("exp", "nbf", "iat")
NODE_KEY_FILE = "node-credential.key"
NODE_CREDENTIAL_TTL_S = 7 * 24 * 3600.0
"""Lifetime of a node credential (seconds); a data server refreshes its own after half of it."""
NODE_CREDENTIAL_ISSUER = "flops-manager"


class Unauthorized(FlopsError):
    """The request carries no bearer token, or one that is invalid or expired."""

    code = "unauthorized"


class Forbidden(FlopsError):
    """The caller is known but may not do this (e.g. a non-admin wiping the database)."""

    code = "forbidden"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: ``customer`` (matches an SLA's ``customerID``) and ``admin``."""

    customer: str
    admin: bool = False
    node: str | None = None
    """Set for a worker node's data server holding a node credential (:class:`NodeCredentials`):
    it may register and refresh that node only."""

    def require_admin(self, action: str) -> None:
        """Raise :class:`Forbidden` naming ``action`` unless the caller is the admin."""
        if not self.admin:
            raise Forbidden(f"Only the admin may {action}; use an admin token.")

    def require_node(self, node_id: str, action: str) -> None:
        """Raise :class:`Forbidden` naming ``action`` unless the caller is the admin or holds
        the node credential of ``node_id``."""
        if not self.admin and self.node != node_id:
            raise Forbidden(
                f"Only the admin or node {node_id!r}'s own credential may {action}; issue one "
                f"with 'flops token --node {node_id}' (or POST /api/flops/nodes/{node_id}/"
                "credential as the admin)."
            )

    def may_see(self, customer_id: str) -> bool:
        """Whether the caller may see a project of ``customer_id``."""
        return self.admin or customer_id == self.customer


class Authenticator(ABC):
    """Turns the bearer token of a request into a :class:`Principal`."""

    @abstractmethod
    def authenticate(self, token: str) -> Principal:
        """Return the caller for ``token``; raises :class:`Unauthorized` when it is not valid."""


class ApiTokenAuth(Authenticator):
    """One shared API token whose holder is the admin (customer ``Admin``, the SLA default).

    Args:
        token: the secret; compared in constant time.
    """

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def authenticate(self, token: str) -> Principal:
        if not hmac.compare_digest(token.encode(), self._token):
            raise Unauthorized(
                "The API token is wrong. Use the token in $FLOPS_HOME/api-token "
                "(the CLI reads it for you)."
            )
        return Principal(customer="Admin", admin=True)


class _NotAnAccessToken(Exception):
    """A valid Oakestra token of another ``type`` than ``access`` (a refresh token)."""


class OakestraJwtAuth(Authenticator):
    """Oakestra access tokens: RS256 JWTs verified with the root orchestrator's public key.

    Args:
        public_key_pem: the PEM-encoded RSA public key of the Oakestra root orchestrator.
        clock: the current time in seconds since the epoch (tests pass a fake one to expire
            tokens without waiting).
        leeway_s: how far, in seconds, the clocks of Oakestra and the manager may disagree.

    Oakestra access tokens last 10 minutes; an expired one gets 401 with a hint to refresh it
    (``POST /api/auth/refresh`` at Oakestra). Only access tokens are accepted: Oakestra signs
    access and refresh tokens with the same key and tells them apart by the ``type`` claim
    (flask-jwt-extended's ``access`` / ``refresh``); a refresh token is refused like Oakestra's
    own application routes refuse it.
    """

    def __init__(
        self, public_key_pem: str, clock: Callable[[], float] = time.time, leeway_s: float = 0
    ) -> None:
        self._key = public_key_pem
        self._clock = clock
        self._leeway_s = leeway_s

    def authenticate(self, token: str) -> Principal:
        import jwt

        try:
            # the signature and the claims' presence here, their times against self._clock
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["RS256"],
                options={
                    "require": ["sub", "exp"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
            self._check_times(claims)
            if claims.get("type") != "access":
                raise _NotAnAccessToken()
        except _NotAnAccessToken:
            raise Unauthorized(
                "The bearer token is not an Oakestra access token (a refresh token?); send "
                "the access_token of Oakestra's POST /api/auth/login or /api/auth/refresh."
            ) from None
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized(
                "The Oakestra token has expired; refresh it (POST /api/auth/refresh at the "
                "Oakestra root orchestrator) and retry."
            ) from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(
                "The bearer token is not a valid Oakestra access token; log in to Oakestra "
                "(POST /api/auth/login) and send its token."
            ) from exc
        roles = claims.get("roles") or []
        if isinstance(roles, str):
            roles = [roles]
        admin = any(str(role).lower() in ADMIN_ROLES for role in roles)
        return Principal(customer=str(claims["sub"]), admin=admin)

    def _check_times(self, claims: dict[str, object]) -> None:
        """Raise ``jwt.ExpiredSignatureError`` when ``exp`` has passed by the clock, or
        ``jwt.InvalidTokenError`` when a time claim is not a number or is in the future."""
        import jwt

        now = self._clock()
        times: dict[str, float] = {}
        for claim in TIME_CLAIMS:
            value = claims.get(claim)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise jwt.InvalidTokenError(f"the {claim} claim is not a number")
            times[claim] = value
        if times["exp"] <= now - self._leeway_s:
            raise jwt.ExpiredSignatureError("the token has expired")
        if any(times.get(claim, now) > now + self._leeway_s for claim in ("nbf", "iat")):
            raise jwt.ImmatureSignatureError("the token is not valid yet")


def load_or_create_api_token(home: Path) -> str:
    """The API token in ``home/api-token``, created (random, 256 bits, mode 0600) if missing."""
    path = home / TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


def read_api_token(home: Path) -> str | None:
    """The API token in ``home/api-token``, or ``None`` when there is none (yet)."""
    try:
        return (home / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header.

    Raises :class:`Unauthorized` when the header is missing or of another scheme.
    """
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "This endpoint needs 'Authorization: Bearer <token>'; the embedded manager's token "
            "is in $FLOPS_HOME/api-token."
        )
    return token.strip()


@dataclass(frozen=True)
class NodeCredential:
    """A node credential: the bearer ``token`` and when it expires (seconds since the epoch)."""

    node_id: str
    token: str
    expires_at: float


class NodeCredentials:
    """Issues and checks node credentials: HS256 JWTs (``sub`` the node id, ``scope``
    ``node``) signed with a 256-bit key kept in ``home/node-credential.key`` (mode 0600,
    created at first use).

    Args:
        home: the manager's ``FLOPS_HOME``.
        clock: the current time in seconds since the epoch.
    """

    def __init__(self, home: Path, clock: Callable[[], float] = time.time) -> None:
        self._key = _load_or_create_secret(home / NODE_KEY_FILE)
        self._clock = clock

    def issue(self, node_id: str, ttl_s: float = NODE_CREDENTIAL_TTL_S) -> NodeCredential:
        """A fresh credential for ``node_id`` valid for ``ttl_s`` seconds."""
        import jwt

        now = self._clock()
        claims = {
            "iss": NODE_CREDENTIAL_ISSUER,
            "sub": node_id,
            "scope": "node",
            "iat": int(now),
            "exp": int(now + ttl_s),
        }
        return NodeCredential(node_id, jwt.encode(claims, self._key, "HS256"), int(now + ttl_s))

    def principal(self, token: str) -> Principal | None:
        """The node principal of a node credential; ``None`` when ``token`` is not one
        (not signed with this manager's node key). Raises :class:`Unauthorized` for one that
        has expired."""
        import jwt

        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                issuer=NODE_CREDENTIAL_ISSUER,
                options={"require": ["sub", "exp", "scope"], "verify_exp": False},
            )
        except jwt.InvalidTokenError:
            return None
        if claims.get("scope") != "node" or not isinstance(claims.get("exp"), int | float):
            return None
        if claims["exp"] <= self._clock():
            raise Unauthorized(
                "The node credential has expired; issue a new one with 'flops token --node "
                f"{claims['sub']}' and restart the data server with it."
            )
        node_id = str(claims["sub"])
        return Principal(customer=f"node:{node_id}", node=node_id)


class WithNodeCredentials(Authenticator):
    """``inner`` (admin and customer tokens) plus node credentials checked first."""

    def __init__(self, inner: Authenticator, credentials: NodeCredentials) -> None:
        self.inner = inner
        self.credentials = credentials

    def authenticate(self, token: str) -> Principal:
        return self.credentials.principal(token) or self.inner.authenticate(token)


def _load_or_create_secret(path: Path) -> bytes:
    """32 random bytes kept (hex) in ``path``, mode 0600, created if missing."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as file:
        file.write(secret.hex() + "\n")
    return secret
