"""``flops-data-server``: serve one worker node's data over Arrow Flight until SIGTERM/SIGINT.

Usage::

    flops-data-server --data-dir DIR --node-id ID [--host 127.0.0.1] [--port 8815]
        [--cluster local] [--hostname NAME] [--manager-url http://HOST:PORT]
        [--register-interval-s 30] [--advertise-host HOST]

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
from types import FrameType

from data_server.registration import (
    DEFAULT_INTERVAL_S,
    NodeRegistrar,
    nodes_url,
    registration_payload,
)
from data_server.server import WILDCARD_HOSTS, DataServer
from flops_utils import env_vars
from flops_utils.contract.entry import run_command
from flops_utils.contract.exit_codes import Role
from flops_utils.logging import logger

DEFAULT_PORT = 8815
"""The conventional Arrow Flight port."""


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
        help=f"the manager's API token (default: ${env_vars.MANAGER_TOKEN})",
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


def advertised_location(host: str, port: int, advertise_host: str | None) -> str:
    """Return the ``grpc://HOST:PORT`` registered with the manager.

    ``advertise_host`` wins; a wildcard bind address (``0.0.0.0``/``::``) is replaced by
    ``socket.gethostname()``.
    """
    chosen = advertise_host or (socket.gethostname() if host in WILDCARD_HOSTS else host)
    if ":" in chosen and not chosen.startswith("["):
        chosen = f"[{chosen}]"
    return f"grpc://{chosen}:{port}"


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
    server = DataServer(
        args.data_dir,
        args.host,
        args.port,
        on_change=lambda: registrar.trigger() if registrar else None,
    )
    server.start()
    try:
        if args.manager_url:
            location = advertised_location(args.host, server.port, args.advertise_host)
            registrar = NodeRegistrar(
                args.manager_url,
                lambda: registration_payload(
                    args.node_id,
                    location,
                    args.cluster,
                    server.storage.tags(),
                    hostname=args.hostname,
                ),
                interval_s=args.register_interval_s,
                token=args.manager_token,
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
