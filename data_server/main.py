"""``flops-data-server``: serve one worker node's data over Arrow Flight until SIGTERM/SIGINT.

Usage::

    flops-data-server --data-dir DIR --node-id ID [--host 127.0.0.1] [--port 8815]
        [--cluster local] [--hostname NAME] [--manager-url http://HOST:PORT]
        [--register-interval-s 30] [--advertise-host HOST] [--insecure]

Secure by default (:mod:`data_server.security`): TLS with a self-signed certificate and
token authentication; the certificate, its key and the node owner's credential are kept in
``<data-dir>/.security/`` (0700/0600) and reused after restarts. ``--insecure`` (or
``FLOPS_INSECURE`` listing ``data``) serves plain gRPC to anyone, as before.

With ``--manager-url`` the node registers with the manager at start, every
``--register-interval-s`` seconds and shortly after its data changed (see
:mod:`data_server.registration`); registration failures are logged and retried.

Exit codes (:class:`~flops_utils.contract.exit_codes.ExitCode`): 0 stopped by SIGTERM or
SIGINT, 2 invalid arguments or an unusable ``--data-dir`` / ``--manager-url`` (fix them), 10
cannot listen on ``--host``/``--port`` (choose a free port), 5 an internal error.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from data_server.registration import (
    DEFAULT_INTERVAL_S,
    NodeRegistrar,
    credential_times,
    nodes_url,
    registration_payload,
    stored_credential,
)
from data_server.security import SECURITY_DIR, DataServerSecurity
from data_server.server import WILDCARD_HOSTS, DataServer
from data_server.storage import StorageError
from flops_utils import env_vars
from flops_utils.contract.entry import run_command
from flops_utils.contract.exit_codes import Role
from flops_utils.logging import logger

DEFAULT_PORT = 8815
"""The conventional Arrow Flight port."""

INSECURE_ENV = "FLOPS_INSECURE"
"""Comma-separated security controls turned off; ``data`` here is ``--insecure``."""

MANAGER_CREDENTIAL_FILE = "manager-credential"
"""File in ``<data-dir>/.security/`` keeping the latest refreshed node credential."""

PUBLIC_KEY_FIELD = "data_token_public_key"
"""Field of the manager's registration answer holding its data token key (PEM)."""


def insecure_from_env() -> bool:
    """Whether ``$FLOPS_INSECURE`` lists ``data``."""
    listed = os.environ.get(INSECURE_ENV, "").split(",")
    return "data" in (item.strip() for item in listed)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of ``flops-data-server``."""
    parser = argparse.ArgumentParser(
        prog="flops-data-server",
        description="Serve this worker node's datasets (Parquet per data tag) over Arrow Flight.",
    )
    parser.add_argument("--data-dir", required=True, help="directory holding <tag>.parquet")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="TCP port; 0 picks a free one (default 8815)"
    )
    parser.add_argument("--node-id", required=True, help="this worker node's id")
    parser.add_argument("--cluster", default="local", help="cluster of the node (default local)")
    parser.add_argument(
        "--hostname",
        help="the node's worker hostname in its Oakestra cluster (default: the node id)",
    )
    parser.add_argument("--manager-url", help="register with the manager at http://HOST:PORT")
    parser.add_argument(
        "--manager-token",
        default=os.environ.get(env_vars.MANAGER_TOKEN),
        help="the node credential to register with, from 'flops token --node ID' (default: "
        f"${env_vars.MANAGER_TOKEN}); refreshed ones are kept in <data-dir>/.security/",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=insecure_from_env(),
        help="serve plain gRPC without authentication (default: off, unless "
        f"${INSECURE_ENV} lists 'data')",
    )
    parser.add_argument(
        "--register-interval-s",
        type=float,
        default=DEFAULT_INTERVAL_S,
        help="seconds between registrations (default 30)",
    )
    parser.add_argument(
        "--advertise-host",
        help="host learners use to reach this server (default: --host, or this machine's "
        "hostname when --host binds every interface)",
    )
    return parser


def advertised_host(host: str, advertise_host: str | None) -> str:
    """The host learners reach this server at: ``advertise_host``, else ``host``, where a
    wildcard bind address (``0.0.0.0``/``::``) is replaced by ``socket.gethostname()``."""
    return advertise_host or (socket.gethostname() if host in WILDCARD_HOSTS else host)


def advertised_location(
    host: str, port: int, advertise_host: str | None, scheme: str = "grpc"
) -> str:
    """Return the ``SCHEME://HOST:PORT`` registered with the manager (see
    :func:`advertised_host`; ``scheme`` is ``grpc`` or ``grpc+tls``)."""
    chosen = advertised_host(host, advertise_host)
    if ":" in chosen and not chosen.startswith("["):
        chosen = f"[{chosen}]"
    return f"{scheme}://{chosen}:{port}"


def _security(args: argparse.Namespace) -> DataServerSecurity | None:
    """The server's TLS material and credentials (``None`` with ``--insecure``)."""
    if args.insecure:
        logger.warning(
            "data server security is off (--insecure / FLOPS_INSECURE=data): plain gRPC, "
            "anyone who reaches %s:%s may read, write and drop data",
            args.host,
            args.port,
        )
        return None
    hosts = [advertised_host(args.host, args.advertise_host)]
    if args.host not in WILDCARD_HOSTS:
        hosts.append(args.host)
    try:
        return DataServerSecurity.load(args.data_dir, args.node_id, hosts)
    except OSError as exc:
        raise StorageError(
            f"The data server cannot keep its TLS key and credentials in {args.data_dir} "
            f"({exc.strerror}). Check the permissions of --data-dir."
        ) from exc


def newest_credential(stored: str | None, given: str | None) -> str | None:
    """The credential to register with: the refreshed one kept on the node (``stored``) unless
    ``given`` (``--manager-token``) was issued later, e.g. by a new manager, or is no node
    credential at all while nothing is stored."""
    if stored is None:
        return given
    stored_times = credential_times(stored)
    given_times = credential_times(given) if given else None
    if given_times is not None and stored_times is not None and given_times[0] > stored_times[0]:
        return given
    return stored


def _trust_manager(security: DataServerSecurity | None, answer: dict[str, object]) -> None:
    """Take the manager's data token key from its registration ``answer``."""
    pem = answer.get(PUBLIC_KEY_FIELD)
    if security is not None and isinstance(pem, str) and pem:
        security.set_manager_key(pem)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the data server until SIGTERM/SIGINT; return an exit code (see the module
    docstring)."""
    return run_command(Role.DATA_SERVER, lambda: _parse(argv), _serve)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The checked arguments; ``argparse`` exits with code 2 for invalid ones."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536 or args.register_interval_s <= 0:
        parser.error("--port must be 0-65535 and --register-interval-s positive")
    if args.manager_url:
        nodes_url(args.manager_url)  # fail fast on a malformed URL
    return args


def _serve(args: argparse.Namespace) -> None:
    """Serve (and register) until SIGTERM/SIGINT. Raises ``DataServerStartError`` when the
    address cannot be bound, ``StorageError`` for an unusable ``--data-dir``."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    registrar: NodeRegistrar | None = None
    security = _security(args)
    credential_file = Path(args.data_dir) / SECURITY_DIR / MANAGER_CREDENTIAL_FILE
    server = DataServer(
        args.data_dir,
        args.host,
        args.port,
        on_change=lambda: registrar.trigger() if registrar else None,
        security=security,
    )
    server.start()
    try:
        if args.manager_url:
            location = advertised_location(
                args.host, server.port, args.advertise_host, server.scheme
            )
            registrar = NodeRegistrar(
                args.manager_url,
                lambda: registration_payload(
                    args.node_id,
                    location,
                    args.cluster,
                    server.storage.tags(),
                    hostname=args.hostname,
                    cert_pem=security.cert_pem if security else None,
                ),
                interval_s=args.register_interval_s,
                token=newest_credential(stored_credential(credential_file), args.manager_token),
                credential_file=credential_file,
                on_answer=(lambda answer: _trust_manager(security, answer)) if security else None,
            )
            registrar.start()
        logger.info(
            "flops-data-server for node %s ready on %s (tags %s)",
            args.node_id,
            server.location,
            server.storage.tags(),
        )
        while not stop.wait(0.5):
            pass
    finally:
        if registrar is not None:
            registrar.stop()
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
