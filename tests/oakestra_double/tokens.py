"""RS256 access and refresh tokens as the system manager issues them (flask-jwt-extended).

Claims: ``sub`` (username), ``user``, ``roles``, ``organization``, ``type`` (``access`` or
``refresh``), ``jti``, ``iat``, ``nbf``, ``exp``; ``fresh`` on access tokens. The key pair is
made when the double starts (and again by :meth:`TokenIssuer.rotate`, a root restart), so
tokens of an earlier double never verify: 422 ``{"msg": "Signature verification failed"}``
(a malformed token: ``Invalid header string: ...``).
"""

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


class TokenRejected(Exception):
    """A token that does not authorise the request; ``status`` and ``body`` are what
    flask-jwt-extended answers (401 expired or revoked, 422 malformed or wrong type)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


@dataclass
class TokenIssuer:
    """Issues and verifies tokens; lifetimes in seconds (Oakestra: 10 min and 30 days)."""

    access_lifetime_s: float = 600.0
    refresh_lifetime_s: float = 30 * 24 * 3600.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._revoked_before: dict[str, float] = {"access": 0.0, "refresh": 0.0}
        self.rotate()

    def rotate(self) -> None:
        """A new key pair, as the jwt-generator makes at every start of the Oakestra root:
        tokens signed before no longer verify (422 ``Signature verification failed``)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        with self._lock:
            self._private, self._public = private, public

    def issue(self, username: str, kind: str, claims: dict[str, Any]) -> str:
        """A signed token of ``kind`` (``access`` or ``refresh``) for ``username``."""
        now = time.time()
        lifetime = self.access_lifetime_s if kind == "access" else self.refresh_lifetime_s
        payload = {
            **claims,
            "sub": username,
            "type": kind,
            "jti": secrets.token_hex(16),
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
        }
        if kind == "access":
            payload["fresh"] = False
        with self._lock:
            private = self._private
        return jwt.encode(payload, private, algorithm="RS256")

    def revoke(self, kind: str) -> None:
        """Reject every ``kind`` token issued until now (a test hook; Oakestra has none)."""
        with self._lock:
            self._revoked_before[kind] = time.time()

    def verify(self, header: str | None, kind: str) -> dict[str, Any]:
        """The claims of the ``Bearer`` token in ``header``; raises :class:`TokenRejected`."""
        if not header:
            raise TokenRejected(401, {"msg": "Missing Authorization Header"})
        scheme, _, token = header.partition(" ")
        if scheme != "Bearer" or not token:
            raise TokenRejected(422, {"msg": "Bad Authorization header. Expected 'Bearer <JWT>'"})
        with self._lock:
            public = self._public
        try:
            claims: dict[str, Any] = jwt.decode(token, public, algorithms=["RS256"])
        except jwt.ExpiredSignatureError:
            raise TokenRejected(401, {"msg": "Token has expired"}) from None
        except jwt.InvalidTokenError as exc:
            raise TokenRejected(422, {"msg": str(exc)}) from None
        if claims.get("type") != kind:
            wanted = "refresh" if kind == "refresh" else "non-refresh"
            raise TokenRejected(422, {"msg": f"Only {wanted} tokens are allowed"})
        with self._lock:
            if claims["iat"] <= self._revoked_before[kind]:
                raise TokenRejected(401, {"msg": "Token has been revoked"})
        return claims
