"""The manager's small certificate authority for Flower: per-project TLS certificates and
client tokens for the aggregators and learners.

One CA per manager, kept in ``$FLOPS_HOME/pki/flower-ca.pem`` (its EC P-256 key and its
self-signed certificate in one file, mode 0600, directory 0700), created at first use and
reused after restarts. Its certificate is name-constrained to ``*.flops``: whatever it signs
is valid only for the names :func:`~flops_utils.flower_security.flower_server_name` makes.

Per project, :meth:`ProjectCA.issue_flower_credentials` returns
:class:`FlowerCredentials`: the CA's certificate, a server certificate and key for the
project's aggregators (classic, root and cluster alike) whose only name is
``aggregator.<project_id>.flops`` (so a learner of project B refuses an aggregator of project
A, though both chain to the same CA), valid :data:`SERVER_CERT_VALIDITY`, and a random client
token. Nothing per project is stored: the credentials live in the services' environments and
end with them (the certificate also expires).
"""

import datetime
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flops_utils import env_vars
from flops_utils.flower_security import SERVER_NAME_SUFFIX, flower_server_name
from flops_utils.logging import logger

PKI_DIR = "pki"
"""Directory under ``$FLOPS_HOME`` holding the CA (mode 0700)."""

CA_FILE = "flower-ca.pem"
"""The CA's private key and certificate, PEM, one file (mode 0600)."""

CA_VALIDITY = datetime.timedelta(days=3650)
"""How long the CA's certificate is valid; it is replaced once it would expire within
:data:`SERVER_CERT_VALIDITY`."""

SERVER_CERT_VALIDITY = datetime.timedelta(days=7)
"""How long an aggregator certificate is valid: longer than a project's training, short
enough that a leaked key soon stops working. Clients check it only when they connect."""

CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Certificates are valid from this long before their issue, for hosts whose clocks lag."""

TOKEN_BYTES = 32
"""Random bytes of a client token (256 bits, ``secrets.token_urlsafe``)."""


@dataclass(frozen=True)
class FlowerCredentials:
    """One project's Flower credentials (PEM strings); secrets are left out of ``repr``.

    Give :meth:`aggregator_env` to every aggregator of the project (classic, root and
    cluster: a cluster aggregator serves its learners and is a client of the root) and
    :meth:`learner_env` to every learner.
    """

    project_id: str
    server_name: str
    ca_cert_pem: str
    server_cert_pem: str
    not_after: datetime.datetime
    server_key_pem: str = field(repr=False)
    token: str = field(repr=False)

    def aggregator_env(self) -> dict[str, str]:
        """``FLOPS_TLS_CA_CERT``, ``FLOPS_TLS_CERT``, ``FLOPS_TLS_KEY``,
        ``FLOPS_FLOWER_TOKEN``."""
        return {
            env_vars.TLS_CA_CERT: self.ca_cert_pem,
            env_vars.TLS_CERT: self.server_cert_pem,
            env_vars.TLS_KEY: self.server_key_pem,
            env_vars.FLOWER_TOKEN: self.token,
        }

    def learner_env(self) -> dict[str, str]:
        """``FLOPS_TLS_CA_CERT``, ``FLOPS_FLOWER_TOKEN``."""
        return {env_vars.TLS_CA_CERT: self.ca_cert_pem, env_vars.FLOWER_TOKEN: self.token}


@dataclass(frozen=True)
class _Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


class ProjectCA:
    """The manager's Flower CA in ``home/pki``; the files are made or read at first use.

    Args:
        home: the manager's ``$FLOPS_HOME``.

    Thread-safe; several managers sharing ``home`` agree on one CA (it is created with an
    atomic link).
    """

    def __init__(self, home: Path) -> None:
        self.path = home / PKI_DIR / CA_FILE
        self._lock = threading.Lock()
        self._authority: _Authority | None = None

    @property
    def ca_cert_pem(self) -> str:
        """The CA's certificate (PEM), created if missing."""
        return self._load().cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue_flower_credentials(
        self, project_id: str, validity: datetime.timedelta = SERVER_CERT_VALIDITY
    ) -> FlowerCredentials:
        """New credentials for ``project_id``'s aggregators and learners: a fresh EC P-256
        server key, its certificate for ``aggregator.<project_id>.flops`` valid ``validity``
        from now, and a fresh token. Raises ``ValueError`` when the project id cannot name a
        certificate, ``OSError`` when the CA file can't be read or written."""
        authority = self._load()
        server_name = flower_server_name(project_id)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        not_after = min(now + validity, authority.cert.not_valid_after_utc)
        cert = (
            _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
            .issuer_name(authority.cert.subject)
            .public_key(key.public_key())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(_key_usage(cert_sign=False), True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
                False,
            )
            .sign(authority.key, hashes.SHA256())
        )
        return FlowerCredentials(
            project_id=project_id,
            server_name=server_name,
            ca_cert_pem=authority.cert.public_bytes(serialization.Encoding.PEM).decode(),
            server_cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            not_after=not_after,
            server_key_pem=_private_pem(key).decode(),
            token=secrets.token_urlsafe(TOKEN_BYTES),
        )

    def _load(self) -> _Authority:
        with self._lock:
            if self._authority is None or _expiring(self._authority.cert):
                self._authority = _load_or_create(self.path)
            return self._authority


def issue_flower_credentials(home: Path, project_id: str) -> FlowerCredentials:
    """``ProjectCA(home).issue_flower_credentials(project_id)`` (see there); a long-lived
    caller keeps one :class:`ProjectCA` instead, which reads the CA file once."""
    return ProjectCA(home).issue_flower_credentials(project_id)


def _builder(subject: x509.Name) -> x509.CertificateBuilder:
    serial = x509.random_serial_number()
    return x509.CertificateBuilder().subject_name(subject).serial_number(serial)


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _expiring(cert: x509.Certificate) -> bool:
    """Whether ``cert`` expires within :data:`SERVER_CERT_VALIDITY`."""
    now = datetime.datetime.now(datetime.UTC)
    return cert.not_valid_after_utc < now + SERVER_CERT_VALIDITY


def _new_authority() -> _Authority:
    """A new self-signed CA, EC P-256, name-constrained to ``*.flops``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FLOps"),
            x509.NameAttribute(NameOID.COMMON_NAME, "FLOps Flower CA"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(SERVER_NAME_SUFFIX)], excluded_subtrees=None
    )
    cert = (
        _builder(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(_key_usage(cert_sign=True), True)
        .add_extension(constraints, True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return _Authority(key=key, cert=cert)


def _load_or_create(path: Path) -> _Authority:
    """The CA in ``path``; a new one when the file is missing or its certificate expires
    soon. The directory is made (or narrowed to) 0700, the file 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _narrow(path.parent, 0o700)
    if path.exists():
        _narrow(path, 0o600)
        authority = _read(path)
        if not _expiring(authority.cert):
            return authority
        logger.warning("the Flower CA in %s expires soon; replacing it", path)
        path.unlink()
    authority = _new_authority()
    data = _private_pem(authority.key) + authority.cert.public_bytes(serialization.Encoding.PEM)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.link(temporary, path)  # fails if another process created the CA meanwhile
    except FileExistsError:
        return _read(path)
    finally:
        temporary.unlink(missing_ok=True)
    logger.info("created the Flower CA in %s", path)
    return authority


def _read(path: Path) -> _Authority:
    data = path.read_bytes()
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} holds no EC private key; remove it to make a new CA.")
    return _Authority(key=key, cert=x509.load_pem_x509_certificate(data))


def _narrow(path: Path, mode: int) -> None:
    """Remove permission bits beyond ``mode`` from ``path`` (which this process owns)."""
    current = path.stat().st_mode & 0o777
    if current & ~mode:
        logger.warning("%s was mode %o; narrowing it to %o", path, current, mode)
        path.chmod(current & mode)
