"""The manager's data token key: read tokens for learners, write tokens for its own pushes.

Data servers (:mod:`data_server.security`) accept JWTs signed by the manager's Ed25519 key
(``alg`` ``EdDSA``, RFC 8037), whose public half they receive in the answer to their node
registration. The key pair lives in ``$FLOPS_HOME/data-token-key.pem`` (mode 0600), created at
first use and reused after restarts.

Claims of every token: ``iss`` ``flops-manager``, ``aud`` ``flops-data-server``, ``iat``,
``exp``, ``jti``, ``node`` (the only node whose data server accepts it) and ``scope``:

- ``read`` (:meth:`DataAccess.issue_read_token`), with ``project`` and ``tags`` (the SLA's
  data tags): the learner of that project on that node may list and read those tags only;
- ``write`` (:meth:`DataAccess.issue_write_token`): the manager may store and drop data on
  that node (``POST /mocks``).

Wiring (see docs/security.md): ``DataAccess(home)`` once per manager, given to the API app
(node registration answers with :meth:`DataAccess.public_key_pem`, ``POST /mocks`` pushes with
a write token) and to the deployment (:meth:`DataAccess.learner_env` gives a learner's env
vars).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from data_server.security import (
    READ_SCOPE,
    TOKEN_ALGORITHM,
    TOKEN_AUDIENCE,
    TOKEN_ISSUER,
    WRITE_SCOPE,
)
from flops_utils import env_vars

KEY_FILE = "data-token-key.pem"
"""File under ``$FLOPS_HOME`` holding the Ed25519 private key (PKCS#8 PEM, mode 0600)."""

DEFAULT_READ_TTL_S = 24 * 3600.0
"""Lifetime of a learner's read token: long enough for a training run that waits for its
image and its peers; the token is bound to one project, node and set of tags."""

DEFAULT_WRITE_TTL_S = 300.0
"""Lifetime of a manager write token (used right away, for one push)."""

NODE_CERT_FIELD = "data_server_cert"
"""Node document field holding the certificate PEM the node's data server registered."""


def _load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key in ``path``; created (mode 0600, via ``O_EXCL``) when missing."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            pass
        else:
            with os.fdopen(fd, "wb") as file:
                file.write(pem)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path.name} under FLOPS_HOME does not hold an Ed25519 private key")
    return key


class DataAccess:
    """Issues the data tokens of one manager (see the module docstring).

    Args:
        home: the manager's ``$FLOPS_HOME``; the key is ``home/data-token-key.pem``.

    Raises ``OSError`` when the key cannot be read or written and ``ValueError`` when the
    file holds another kind of key.
    """

    def __init__(self, home: Path) -> None:
        self.key_path = Path(home) / KEY_FILE
        self._key = _load_or_create_key(self.key_path)
        self._public_pem = (
            self._key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def public_key_pem(self) -> str:
        """The public key (SubjectPublicKeyInfo PEM) data servers verify tokens with."""
        return self._public_pem

    def _issue(self, node_id: str, scope: str, ttl_s: float, **claims: Any) -> str:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        now = int(time.time())
        payload = {
            "iss": TOKEN_ISSUER,
            "aud": TOKEN_AUDIENCE,
            "iat": now,
            "exp": now + int(ttl_s),
            "jti": secrets.token_hex(8),
            "node": node_id,
            "scope": scope,
            **claims,
        }
        return jwt.encode(payload, self._key, algorithm=TOKEN_ALGORITHM)

    def issue_read_token(
        self,
        project_id: str,
        node_id: str,
        tags: Sequence[str],
        ttl_s: float = DEFAULT_READ_TTL_S,
    ) -> str:
        """A read token: project ``project_id``'s learner may read ``tags`` on ``node_id``'s data
        server for ``ttl_s`` seconds. Returns the JWT (compact form)."""
        return self._issue(
            node_id, READ_SCOPE, ttl_s, project=project_id, tags=[str(t) for t in tags]
        )

    def issue_write_token(self, node_id: str, ttl_s: float = DEFAULT_WRITE_TTL_S) -> str:
        """A write token for the manager's own pushes to ``node_id``'s data server (store and
        drop any tag) valid ``ttl_s`` seconds. Returns the JWT."""
        return self._issue(node_id, WRITE_SCOPE, ttl_s)

    def learner_env(
        self,
        project_id: str,
        node: dict[str, Any],
        tags: Sequence[str],
        ttl_s: float = DEFAULT_READ_TTL_S,
    ) -> dict[str, str]:
        """The env vars giving project ``project_id``'s learner on ``node`` (a stored node
        document) access to ``tags``: ``{FLOPS_DATA_TOKEN: <read token>,
        FLOPS_DATA_SERVER_CERT: <the node's registered certificate PEM>}``.

        ``{}`` for a node whose data server registered no certificate (it runs with
        ``FLOPS_INSECURE=data``: plain gRPC, no tokens).
        """
        cert = node.get(NODE_CERT_FIELD)
        if not cert:
            return {}
        token = self.issue_read_token(project_id, str(node["node_id"]), tags, ttl_s)
        return {env_vars.DATA_TOKEN: token, env_vars.DATA_SERVER_CERT: str(cert)}

    def write_credentials(self, node: dict[str, Any]) -> tuple[str, str]:
        """``(token, certificate PEM)`` with which the manager writes to ``node`` (a stored node
        document): a fresh write token and the node's registered certificate; ``("", "")`` for
        a node without a certificate (plain gRPC, no tokens)."""
        cert = node.get(NODE_CERT_FIELD)
        if not cert:
            return "", ""
        return self.issue_write_token(str(node["node_id"])), str(cert)
