"""``flops-manager``: run the FLOps manager (and, by default, its embedded suite) until stopped.

Usage: ``flops-manager [--stop-projects]``. Configuration comes from ``FLOPS_*`` environment
variables (see :class:`ManagerConfig`).

On SIGTERM or SIGINT the manager stops but leaves running projects' learners and aggregators
running, and with them the embedded Mosquitto and MLflow they report to; the next start on the
same ``FLOPS_HOME`` re-attaches them and applies the status messages queued meanwhile (see
``ManagerSuite.stop``). With ``--stop-projects`` it stops them too and marks their projects
``failed``.

Exit codes: 0 stopped by SIGTERM/SIGINT; 1 a component could not start, or another manager
uses the same ``FLOPS_HOME`` (the message says which and how to fix it); 2 bad arguments.
"""

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from flops_manager.config import ManagerConfig
from flops_manager.suite import ManagerSuite
from flops_utils.errors import FlopsError
from flops_utils.logging import logger


def main(argv: Sequence[str] | None = None) -> None:
    """Start the suite, print the API's URL, serve until SIGTERM or SIGINT.

    ``argv``: the command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="flops-manager", description="Run the FLOps manager until SIGTERM or Ctrl-C."
    )
    parser.add_argument(
        "--stop-projects",
        action="store_true",
        help="on exit, also stop running projects' services (their projects fail) instead of "
        "leaving them for the next start to re-attach",
    )
    args = parser.parse_args(argv)
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        suite = ManagerSuite(ManagerConfig.from_env()).start()
    except FlopsError as exc:
        logger.error("%s", exc.message)
        sys.exit(1)
    print(f"FLOps manager: {suite.url}/api/flops  (MLflow GUI: {suite.tracking_url})", flush=True)
    try:
        while not stop.wait(timeout=1.0):
            pass
    finally:
        suite.stop(keep_running=not args.stop_projects)


if __name__ == "__main__":
    main()
