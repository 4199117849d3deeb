"""TLS and client authentication of FLOps' Flower connections (learner or cluster aggregator →
aggregator), shared by the learner and the aggregator.

The manager issues per project (``flops_manager.pki``): a certificate authority's PEM
(:data:`~flops_utils.env_vars.TLS_CA_CERT`), the aggregators' certificate and key
(:data:`~flops_utils.env_vars.TLS_CERT`, :data:`~flops_utils.env_vars.TLS_KEY`) whose only
name is :func:`flower_server_name` of the project, and a random client token
(:data:`~flops_utils.env_vars.FLOWER_TOKEN`).

- The aggregator (:class:`ServerSecurity`) serves TLS with its certificate, and refuses every
  RPC whose metadata lacks the token (:func:`token_interceptor`, status ``UNAUTHENTICATED``)
  before Flower's servicer sees it: such a client never joins the client manager, never
  receives parameters and never contributes to an aggregate.
- A client (:class:`ClientSecurity`) verifies the aggregator's certificate against the CA and
  the project's fixed name (``grpc.ssl_target_name_override``: the aggregator's address is an
  IP and port chosen at deploy time, its certificate names the project), and sends the token
  as the metadata entry :data:`TOKEN_METADATA_KEY` of every call.

Each variable is optional: without them the connection is plain gRPC without authentication,
as before. Flower 1.41's gRPC-bidi client (``start_client``) opens its channel with
``flwr.compat.client.grpc_client.connection.create_channel``, which takes neither channel
options nor interceptors; :func:`secured_flower_client` substitutes that module global for
the duration of a connection (see there). ``grpc`` and ``flwr`` are imported inside the
functions: they are present wherever ``flwr`` is.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from flops_utils import env_vars
from flops_utils.logging import logger

TOKEN_METADATA_KEY = "x-flops-flower-token"
"""The gRPC metadata key carrying :data:`~flops_utils.env_vars.FLOWER_TOKEN` (gRPC metadata
keys are lower case)."""

SERVER_NAME_SUFFIX = "flops"
"""Last label of :func:`flower_server_name`: a name no public DNS resolves."""

_HANDSHAKE_MARKERS = (
    "handshake failed",
    "certificate_verify_failed",
    "verification check failed",
    "peer name",
)
"""Lower-case fragments of the gRPC status details of a refused TLS connection (grpcio 1.85:
``Tls handshake failed ... CERTIFICATE_VERIFY_FAILED`` for another CA or a plain server,
``Hostname Verification Check failed`` for another project's name)."""

_CERTIFICATE = "-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = "PRIVATE KEY-----"


class SecurityConfigError(ValueError):
    """A TLS or token variable is malformed or incomplete; the message names it."""


def flower_server_name(project_id: str) -> str:
    """The DNS name the project's aggregator certificates carry and clients expect:
    ``aggregator.<project_id>.flops``. Raises :class:`SecurityConfigError` when
    ``project_id`` is not one DNS label (letters, digits, hyphens; at most 63)."""
    label = project_id.strip().lower()
    if not label or len(label) > 63 or not all(c.isalnum() or c == "-" for c in label):
        raise SecurityConfigError(
            f"project id {project_id!r} cannot name a certificate (one DNS label needed)."
        )
    return f"aggregator.{label}.{SERVER_NAME_SUFFIX}"


def _pem(env: Mapping[str, str], name: str, marker: str) -> bytes | None:
    """``env[name]`` as PEM bytes, ``None`` when unset or blank; raises
    :class:`SecurityConfigError` when it lacks ``marker`` (e.g. ``BEGIN CERTIFICATE``)."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    if marker not in raw:  # the value is not echoed: it may be a secret
        raise SecurityConfigError(f"{name} does not hold PEM ({marker} is missing).")
    return raw.encode() + b"\n"


def _load_certificate(pem: bytes, name: str) -> Any:
    """``pem`` as a ``cryptography`` certificate; raises :class:`SecurityConfigError`."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise SecurityConfigError(f"{name} is not a readable PEM certificate.") from None


def _check_server_pems(ca: bytes, cert: bytes, key: bytes) -> None:
    """Raise :class:`SecurityConfigError` unless ``ca`` and ``cert`` are certificates and
    ``key`` is the private key of ``cert`` (so that a mistake surfaces as a configuration
    error, not as a failure to bind)."""
    from cryptography.hazmat.primitives import serialization

    _load_certificate(ca, env_vars.TLS_CA_CERT)
    certificate = _load_certificate(cert, env_vars.TLS_CERT)
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise SecurityConfigError(f"{env_vars.TLS_KEY} is not a readable PEM key.") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if private_key.public_key().public_bytes(encoding, public) != (
        certificate.public_key().public_bytes(encoding, public)
    ):
        raise SecurityConfigError(f"{env_vars.TLS_KEY} is not the key of {env_vars.TLS_CERT}.")


def _token(env: Mapping[str, str]) -> str | None:
    raw = (env.get(env_vars.FLOWER_TOKEN) or "").strip()
    if not all(" " <= c <= "~" for c in raw):  # a gRPC metadata value: printable ASCII
        raise SecurityConfigError(f"{env_vars.FLOWER_TOKEN} must be printable ASCII.")
    return raw or None


@dataclass(frozen=True)
class ServerSecurity:
    """The aggregator's side: its certificate chain and key (both or neither), the CA, and the
    clients' token. Secrets are left out of ``repr``."""

    ca_pem: bytes | None = field(default=None, repr=False)
    cert_pem: bytes | None = field(default=None, repr=False)
    key_pem: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServerSecurity:
        """Read :data:`~flops_utils.env_vars.TLS_CA_CERT`, ``TLS_CERT``, ``TLS_KEY`` and
        ``FLOWER_TOKEN``. Raises :class:`SecurityConfigError` when only one of the
        certificate and the key is set, the certificate comes without the CA, or a value is
        not PEM."""
        cert = _pem(env, env_vars.TLS_CERT, _CERTIFICATE)
        key = _pem(env, env_vars.TLS_KEY, _PRIVATE_KEY)
        ca = _pem(env, env_vars.TLS_CA_CERT, _CERTIFICATE)
        if (cert is None) != (key is None):
            raise SecurityConfigError(
                f"{env_vars.TLS_CERT} and {env_vars.TLS_KEY} must be set together."
            )
        if cert is not None and ca is None:
            raise SecurityConfigError(f"{env_vars.TLS_CERT} needs {env_vars.TLS_CA_CERT}.")
        if cert is not None and key is not None and ca is not None:
            _check_server_pems(ca, cert, key)
        return cls(ca_pem=ca, cert_pem=cert, key_pem=key, token=_token(env))

    @property
    def tls(self) -> bool:
        """Whether the server serves TLS."""
        return self.cert_pem is not None

    def certificates(self) -> tuple[bytes, bytes, bytes] | None:
        """Flower's ``certificates`` argument ``(ca, cert, key)``, ``None`` without TLS."""
        if self.ca_pem is None or self.cert_pem is None or self.key_pem is None:
            return None
        return self.ca_pem, self.cert_pem, self.key_pem

    def interceptors(self) -> list[Any]:
        """The gRPC server interceptors: :func:`token_interceptor` when a token is set."""
        return [] if self.token is None else [token_interceptor(self.token)]

    def describe(self) -> str:
        """E.g. ``"TLS, client token"`` or ``"plain gRPC, no client authentication"``."""
        transport = "TLS" if self.tls else "plain gRPC"
        auth = "client token" if self.token else "no client authentication"
        return f"{transport}, {auth}"


@dataclass(frozen=True)
class ClientSecurity:
    """A Flower client's side: the CA its aggregator's certificate must chain to, the name it
    must carry (:func:`flower_server_name`), and the token to send. Secrets are left out of
    ``repr``."""

    server_name: str = ""
    ca_pem: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str], project_id: str) -> ClientSecurity:
        """Read :data:`~flops_utils.env_vars.TLS_CA_CERT` and ``FLOWER_TOKEN`` for the
        project ``project_id``. Raises :class:`SecurityConfigError` for a malformed value."""
        ca = _pem(env, env_vars.TLS_CA_CERT, _CERTIFICATE)
        if ca is not None:
            _load_certificate(ca, env_vars.TLS_CA_CERT)
        token = _token(env)
        name = flower_server_name(project_id) if ca is not None else ""
        return cls(server_name=name, ca_pem=ca, token=token)

    @property
    def enabled(self) -> bool:
        """Whether anything differs from a plain, unauthenticated connection."""
        return self.ca_pem is not None or self.token is not None

    def describe(self) -> str:
        """E.g. ``"TLS (aggregator.p1.flops), client token"``."""
        transport = f"TLS ({self.server_name})" if self.ca_pem is not None else "plain gRPC"
        return f"{transport}, {'client token' if self.token else 'no client token'}"


# -- the server side ---------------------------------------------------------------------------


def token_interceptor(token: str) -> Any:
    """A ``grpc.ServerInterceptor`` that lets through only calls whose metadata holds
    ``token`` under :data:`TOKEN_METADATA_KEY` (compared in constant time, ``hmac``); any
    other call ends with ``UNAUTHENTICATED`` before the service's handler runs."""
    import grpc

    expected = token.encode()

    def refuse(request: Any, context: Any) -> Any:
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "this Flower server accepts only the project's clients; the client token is "
            "missing or wrong",
        )

    def refused_handler(handler: Any) -> Any:
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)

    class _TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
        def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
            presented = b""
            for key, value in handler_call_details.invocation_metadata or ():
                if key == TOKEN_METADATA_KEY:
                    presented = value.encode() if isinstance(value, str) else bytes(value)
            handler = continuation(handler_call_details)
            if handler is None or hmac.compare_digest(presented, expected):
                return handler
            logger.warning(
                "refused a Flower call (%s) without the project's client token",
                handler_call_details.method,
            )
            return refused_handler(handler)

    return _TokenInterceptor()


# -- the client side ---------------------------------------------------------------------------


def _metadata_interceptor(token: str) -> Any:
    """A client interceptor adding the token to every call's metadata (all four arities)."""
    import grpc

    class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
        def __init__(self, details: Any, metadata: list[tuple[str, str]]) -> None:
            self.method = details.method
            self.timeout = details.timeout
            self.metadata = metadata
            self.credentials = details.credentials
            self.wait_for_ready = getattr(details, "wait_for_ready", None)
            self.compression = getattr(details, "compression", None)

    class _TokenMetadata(
        grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
        grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
        grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
        grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
    ):
        def _details(self, details: Any) -> Any:
            metadata = [*(details.metadata or ()), (TOKEN_METADATA_KEY, token)]
            return _Details(details, metadata)

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(self._details(details), request)

        def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(self._details(details), request)

        def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
            return continuation(self._details(details), requests)

        def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
            return continuation(self._details(details), requests)

    return _TokenMetadata()


def create_secured_channel(
    security: ClientSecurity, server_address: str, max_message_length: int
) -> Any:
    """A ``grpc.Channel`` to ``server_address`` as ``security`` says: TLS verified against
    ``ca_pem`` and ``server_name`` when a CA is set (else plain), with the token interceptor
    when a token is set; ``max_message_length`` bytes each way (as Flower's own channel)."""
    import grpc

    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_length),
        ("grpc.max_receive_message_length", max_message_length),
    ]
    if security.ca_pem is not None:
        options.append(("grpc.ssl_target_name_override", security.server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=security.ca_pem)
        channel = grpc.secure_channel(server_address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(server_address, options=options)
    if security.token is not None:
        channel = grpc.intercept_channel(channel, _metadata_interceptor(security.token))
    return channel


class _ChannelSubstitution:
    """The substitution of Flower's ``create_channel`` (see :func:`secured_flower_client`):
    installed while at least one connection in the process uses it, dispatching per thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.original: Any = None
        self.local = threading.local()

    def enter(self, security: ClientSecurity) -> None:
        module = flower_connection_module()
        with self.lock:
            if self.users == 0:
                self.original = module.create_channel
                module.create_channel = self.create_channel
            self.users += 1
        self.local.security = security
        self.local.used = False

    def exit(self) -> bool:
        """Ends this thread's use; returns whether its connections used the substitute."""
        used = bool(getattr(self.local, "used", False))
        self.local.security = None
        module = flower_connection_module()
        with self.lock:
            self.users -= 1
            if self.users == 0:  # ``original`` stays: a thread may still be in the dispatcher
                module.create_channel = self.original
        return used

    def create_channel(
        self,
        server_address: str,
        insecure: bool,
        root_certificates: bytes | None = None,
        max_message_length: int = 536_870_912,
        interceptors: Any = None,
    ) -> Any:
        """Flower's ``create_channel`` signature; this thread's :class:`ClientSecurity`
        decides, other threads get Flower's own channel."""
        security: ClientSecurity | None = getattr(self.local, "security", None)
        if security is None:
            return self.original(
                server_address=server_address,
                insecure=insecure,
                root_certificates=root_certificates,
                max_message_length=max_message_length,
                interceptors=interceptors,
            )
        self.local.used = True
        return create_secured_channel(security, server_address, max_message_length)


_SUBSTITUTION = _ChannelSubstitution()


def flower_connection_module() -> Any:
    """Flower's gRPC-bidi connection module, checked to open its channel through its module
    global ``create_channel`` (what :func:`secured_flower_client` substitutes). Raises
    ``RuntimeError`` when a Flower upgrade changed that: the connection would otherwise go
    out without TLS or token."""
    from flwr.compat.client.grpc_client import connection

    function = getattr(connection.grpc_connection, "__wrapped__", connection.grpc_connection)
    if "create_channel" not in function.__code__.co_names or not callable(
        getattr(connection, "create_channel", None)
    ):
        raise RuntimeError(
            "flwr's grpc_connection no longer calls its module's create_channel; FLOps cannot "
            "secure the Flower client (update flops_utils.flower_security)."
        )
    return connection


@contextlib.contextmanager
def secured_flower_client(security: ClientSecurity) -> Iterator[None]:
    """Within the block, Flower connections this thread opens (``start_client``) use
    :func:`create_secured_channel` with ``security``; other threads keep Flower's channel.

    Flower 1.41's ``grpc_connection`` builds its channel with the module global
    ``create_channel`` and passes neither channel options (the TLS name override) nor
    interceptors (the token); the substitute replaces that global while any thread is inside
    this block and restores it when the last one leaves. Without ``security.enabled`` the
    block changes nothing. Raises ``RuntimeError`` when Flower does not use the substitute
    (a Flower upgrade changed the connection code) instead of connecting unsecured.
    """
    if not security.enabled:
        yield
        return
    _SUBSTITUTION.enter(security)
    used = False
    try:
        yield
    finally:
        used = _SUBSTITUTION.exit()
    if not used:
        raise RuntimeError(
            "flwr opened its connection without FLOps' secured channel; update "
            "flops_utils.flower_security for this flwr version."
        )


def credentials_refused(exc: BaseException) -> str | None:
    """Why the aggregator refused this client, for a ``grpc.RpcError`` ``exc``: the token
    (``UNAUTHENTICATED``) or TLS (the handshake failed: the aggregator's certificate is not
    from the project's CA or names another project, or one side speaks plain gRPC); ``None``
    for any other error."""
    import grpc

    if not isinstance(exc, grpc.Call):
        return None
    code = exc.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"the aggregator refused the client token ({env_vars.FLOWER_TOKEN})"
    details = str(exc.details() or "").lower()
    if code == grpc.StatusCode.UNAVAILABLE and any(m in details for m in _HANDSHAKE_MARKERS):
        return (
            "the TLS handshake with the aggregator failed: its certificate is not from the "
            f"project's CA ({env_vars.TLS_CA_CERT}) or names another project, or only one side "
            "uses TLS"
        )
    return None
