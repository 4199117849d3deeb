"""``flops-data-server``: serve one worker node's data over Arrow Flight until SIGTERM/SIGINT.

Usage (every option also has a ``FLOPS_*`` environment variable, see ``--help`` and
:mod:`flops_utils.role_cli`)::

    flops-data-server --data-dir DIR --node-id ID [--host 127.0.0.1] [--port 8815]
        [--cluster local] [--hostname NAME] [--manager-url http://HOST:PORT]
        [--api-token TOKEN] [--register-interval-s 30] [--advertise-host HOST] [--insecure]

Secure by default (:mod:`data_server.security`): TLS with a self-signed certificate and
token authentication; the certificate, its key and the node owner's credential are kept in
``<data-dir>/.security/`` (0700/0600) and reused after restarts. ``--insecure`` (or
``FLOPS_INSECURE`` listing ``data``) serves plain gRPC to anyone, as before.

With ``--manager-url`` the node registers with the manager at start, every
``--register-interval-s`` seconds and shortly after its data changed (see
:mod:`data_server.registration`); registration failures are logged and retried. It registers
with ``--api-token`` (``FLOPS_API_TOKEN``, the CLI's variable; the deprecated
``FLOPS_MANAGER_TOKEN`` still works, with a warning).

Exit codes (:class:`~flops_utils.contract.exit_codes.ExitCode`): 0 stopped by SIGTERM or
SIGINT, 2 invalid arguments (one line) or an unusable ``--data-dir`` / ``--manager-url`` (fix
them), 10 cannot listen on ``--host``/``--port`` (choose a free port), 5 an internal error.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

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
from flops_utils.role_cli import EnvVar, RoleApp, VersionOption, deprecated_alias

DEFAULT_PORT = 8815
"""The conventional Arrow Flight port."""

INSECURE_ENV = "FLOPS_INSECURE"
"""Comma-separated security controls turned off; ``data`` here is ``--insecure``."""

API_TOKEN_ENV = env_vars.API_TOKEN
"""The token the node registers with (``--api-token``); the CLI's variable."""

MANAGER_CREDENTIAL_FILE = "manager-credential"
"""File in ``<data-dir>/.security/`` keeping the latest refreshed node credential."""

PUBLIC_KEY_FIELD = "data_token_public_key"
"""Field of the manager's registration answer holding its data token key (PEM)."""


def insecure_from_env() -> bool:
    """Whether ``$FLOPS_INSECURE`` lists ``data``."""
    listed = os.environ.get(INSECURE_ENV, "").split(",")
    return "data" in (item.strip() for item in listed)


@dataclass(frozen=True)
class ServerOptions:
    """The checked command line of ``flops-data-server`` (see ``--help``); ``api_token``:
    ``None`` when none is given."""

    data_dir: str
    node_id: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    cluster: str = "local"
    hostname: str | None = None
    manager_url: str | None = None
    api_token: str | None = None
    insecure: bool = False
    register_interval_s: float = DEFAULT_INTERVAL_S
    advertise_host: str | None = None


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


def _security(args: ServerOptions) -> DataServerSecurity | None:
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


app = RoleApp(
    "flops-data-server",
    "Serve this worker node's datasets (Parquet per data tag) over Arrow Flight and register "
    "them with the manager, until SIGTERM or Ctrl-C.",
    env_only=[EnvVar(INSECURE_ENV, "listing data: as --insecure")],
)


@app.main_command()
def _data_server(
    data_dir: Annotated[
        str,
        typer.Option(
            envvar="FLOPS_DATA_DIR", metavar="DIR", help="Directory holding <tag>.parquet."
        ),
    ],
    node_id: Annotated[
        str, typer.Option(envvar="FLOPS_NODE_ID", metavar="ID", help="This worker node's id.")
    ],
    host: Annotated[
        str, typer.Option(envvar="FLOPS_DATA_SERVER_HOST", help="Address to bind.")
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            envvar="FLOPS_DATA_SERVER_PORT", min=0, max=65535, help="TCP port; 0 picks a free one."
        ),
    ] = DEFAULT_PORT,
    cluster: Annotated[
        str, typer.Option(envvar=env_vars.CLUSTER, help="Cluster of the node.")
    ] = "local",
    hostname: Annotated[
        str | None,
        typer.Option(
            envvar="FLOPS_NODE_HOSTNAME",
            help="The node's worker hostname in its Oakestra cluster.",
            show_default="the node id",
        ),
    ] = None,
    manager_url: Annotated[
        str | None,
        typer.Option(
            envvar="FLOPS_MANAGER_URL",
            metavar="URL",
            help="Register with the manager at http://HOST:PORT.",
            show_default=False,
        ),
    ] = None,
    api_token: Annotated[
        str | None,
        typer.Option(
            "--api-token",
            "--manager-token",
            envvar=API_TOKEN_ENV,
            metavar="TOKEN",
            help="The node credential to register with, from 'flops token --node ID'; "
            "refreshed ones are kept in <data-dir>/.security/ (deprecated: "
            f"{env_vars.MANAGER_TOKEN}).",
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help=f"Serve plain gRPC without authentication (also when {INSECURE_ENV} lists data).",
        ),
    ] = False,
    register_interval_s: Annotated[
        float,
        typer.Option(
            envvar="FLOPS_REGISTER_INTERVAL_S",
            metavar="SECONDS",
            help="Seconds between registrations.",
        ),
    ] = DEFAULT_INTERVAL_S,
    advertise_host: Annotated[
        str | None,
        typer.Option(
            envvar="FLOPS_ADVERTISE_HOST",
            help="Host learners use to reach this server.",
            show_default="--host, or this machine's hostname when --host binds every interface",
        ),
    ] = None,
    version: VersionOption = False,
) -> int:
    """The data server's command: check the options, then :func:`_serve` until a signal."""
    if register_interval_s <= 0:
        raise typer.BadParameter("must be positive", param_hint="--register-interval-s")
    options = ServerOptions(
        data_dir=data_dir,
        node_id=node_id,
        host=host,
        port=port,
        cluster=cluster,
        hostname=hostname,
        manager_url=manager_url,
        api_token=deprecated_alias(api_token, API_TOKEN_ENV, env_vars.MANAGER_TOKEN, os.environ)
        or None,
        insecure=insecure or insecure_from_env(),
        register_interval_s=register_interval_s,
        advertise_host=advertise_host,
    )
    return run_command(Role.DATA_SERVER, lambda: _checked(options), _serve)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the data server until SIGTERM/SIGINT; return an exit code (see the module
    docstring). ``argv``: the command line (default ``sys.argv[1:]``)."""
    return app.run(argv)


def _checked(options: ServerOptions) -> ServerOptions:
    """``options`` once the manager URL is checked; raises ``InvalidManagerUrl``."""
    if options.manager_url:
        nodes_url(options.manager_url)  # fail fast on a malformed URL
    return options


def _serve(args: ServerOptions) -> None:
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
                token=newest_credential(stored_credential(credential_file), args.api_token),
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
