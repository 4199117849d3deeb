"""``flops-observatory``: run the MLflow tracking server until SIGTERM or Ctrl-C.

Usage: ``flops-observatory [--workdir DIR] [--host 127.0.0.1] [--port 5000] [--insecure]``
(every option also has a ``FLOPS_OBSERVATORY_*`` environment variable, see ``--help`` and
:mod:`flops_utils.role_cli`). The server runs MLflow's basic-auth app; its admin credential is
in ``DIR/basic_auth.ini`` (0600). ``--insecure`` (or ``FLOPS_INSECURE`` listing ``mlflow``, the
manager's control of the same name) serves everyone without a password (logged as a warning).
Exit codes: 0 stopped by a signal; 1 the server did not start (the message quotes its log) or
died; 2 bad arguments (one line).
"""

import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from flops_utils.logging import logger
from flops_utils.role_cli import EnvVar, RoleApp, VersionOption
from observatory.mlflow_server import MlflowServer, MlflowServerError

INSECURE_ENV = "FLOPS_INSECURE"
"""Comma-separated security controls turned off; ``mlflow`` here is ``--insecure``."""

DEFAULT_WORKDIR = Path.home() / ".flops" / "mlflow"

EXIT_STOPPED = 0
EXIT_FAILED = 1

app = RoleApp(
    "flops-observatory",
    "Run the MLflow tracking server (with its basic-auth app) until SIGTERM or Ctrl-C.",
    env_only=[EnvVar(INSECURE_ENV, "listing mlflow: as --insecure")],
)


@app.main_command()
def _observatory(
    workdir: Annotated[
        Path | None,
        typer.Option(
            envvar="FLOPS_OBSERVATORY_DIR",
            metavar="DIR",
            help="The server's store, artifacts, log and basic_auth.ini.",
            show_default="~/.flops/mlflow",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(envvar="FLOPS_OBSERVATORY_HOST", help="Address to bind.")
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(envvar="FLOPS_OBSERVATORY_PORT", min=0, max=65535, help="TCP port."),
    ] = 5000,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="No authentication: anyone may read and write (also when "
            f"{INSECURE_ENV} lists mlflow).",
        ),
    ] = False,
    version: VersionOption = False,
) -> int:
    """Start :class:`MlflowServer` and block until SIGTERM/SIGINT; returns the exit code."""
    workdir = workdir or DEFAULT_WORKDIR
    insecure = insecure or "mlflow" in (
        item.strip() for item in os.environ.get(INSECURE_ENV, "").split(",")
    )
    if insecure:
        logger.warning("MLflow runs without authentication (--insecure): anyone may read and write")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = MlflowServer(workdir, host=host, port=port, authentication=not insecure)
    try:
        server.start()
    except MlflowServerError as exc:
        logger.error("%s", exc.message)
        return EXIT_FAILED
    print(f"MLflow tracking server at {server.url} (workdir {workdir})", flush=True)
    if server.admin is not None:
        print(f"admin user {server.admin.username}; password in {workdir}/basic_auth.ini")
    try:
        while not stop.wait(timeout=1.0):
            if not server.running():
                logger.error("the MLflow server exited; see %s", server.log_path)
                return EXIT_FAILED
    finally:
        server.stop()
    return EXIT_STOPPED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``flops-observatory``: run it with ``argv`` (default ``sys.argv[1:]``)
    and return the exit code (see the module docstring)."""
    return app.run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
