"""``flops-manager``: run the FLOps manager (and, by default, its embedded suite) until stopped.

Configuration comes from ``FLOPS_*`` environment variables (see :class:`ManagerConfig`).
Exit codes: 0 stopped by SIGTERM/SIGINT; 1 a component could not start (the message says which
and how to fix it).
"""

import signal
import sys
import threading
from types import FrameType

from flops_manager.config import ManagerConfig
from flops_manager.suite import ManagerSuite
from flops_utils.errors import FlopsError
from flops_utils.logging import logger


def main() -> None:
    """Start the suite, print the API's URL, serve until SIGTERM or SIGINT."""
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
    print(f"FLOps manager: {suite.url}/api/flops  (MLflow GUI: {suite.mlflow_url})", flush=True)
    try:
        stop.wait()
    finally:
        suite.stop()


if __name__ == "__main__":
    main()
