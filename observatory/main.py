"""``flops-observatory``: run the MLflow tracking server until SIGTERM or Ctrl-C.

Usage: ``flops-observatory [--workdir DIR] [--host 127.0.0.1] [--port 5000] [--insecure]``.
The server runs MLflow's basic-auth app; its admin credential is in ``DIR/basic_auth.ini``
(0600). ``--insecure`` serves everyone without a password (logged as a warning). Exit codes:
0 stopped by a signal; 1 the server did not start (the message quotes its log) or died;
2 bad arguments (argparse).
"""

import argparse
import signal
import sys
import threading
from pathlib import Path

from flops_utils.logging import logger
from observatory.mlflow_server import MlflowServer, MlflowServerError


def main(argv: list[str] | None = None) -> None:
    """Start :class:`MlflowServer` with the given options and block until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="flops-observatory", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".flops" / "mlflow")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--insecure", action="store_true", help="no authentication: anyone may read and write"
    )
    args = parser.parse_args(argv)
    if args.insecure:
        logger.warning("MLflow runs without authentication (--insecure): anyone may read and write")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = MlflowServer(
        args.workdir, host=args.host, port=args.port, authentication=not args.insecure
    )
    try:
        server.start()
    except MlflowServerError as exc:
        logger.error("%s", exc.message)
        sys.exit(1)
    print(f"MLflow tracking server at {server.url} (workdir {args.workdir})", flush=True)
    if server.admin is not None:
        print(f"admin user {server.admin.username}; password in {args.workdir}/basic_auth.ini")
    try:
        while not stop.wait(timeout=1.0):
            if not server.running():
                logger.error("the MLflow server exited; see %s", server.log_path)
                sys.exit(1)
    finally:
        server.stop()
