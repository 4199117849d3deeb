"""Stopping an aggregator on SIGTERM (an orchestrator stopping the project)."""

import os
import signal
from types import FrameType

from aggregator.tracking import MlflowTracker
from flops_utils.contract.exit_codes import ExitCode
from flops_utils.contract.messages import Failed
from flops_utils.logging import logger
from flops_utils.notifications import StatusNotifier
from flops_utils.types import ComponentStatus

SIGTERM_DRAIN_TIMEOUT_S = 5.0
"""Seconds the ``failed`` message of a stop waits for an unreachable broker (instead of
``FLOPS_MQTT_DRAIN_TIMEOUT_S``): the orchestrators kill a service 10 s after SIGTERM."""


def stop_cleanly_on_sigterm(
    tracker: MlflowTracker, notifier: StatusNotifier, name: str = "aggregator"
) -> None:
    """On SIGTERM: mark the MLflow run of ``tracker`` ``KILLED`` (if one was started),
    publish ``failed`` and exit with :attr:`ExitCode.TERMINATED` at once.

    Exiting from the handler (instead of raising into Flower's blocked thread pool) keeps
    a stop from waiting for the clients' current round. ``name`` names the process in the
    message (``aggregator``, ``cluster aggregator``).
    """

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        logger.warning("SIGTERM: stopping the %s", name)
        tracker.end_run("KILLED")
        notifier.drain_timeout_s = min(notifier.drain_timeout_s, SIGTERM_DRAIN_TIMEOUT_S)
        notifier.notify(
            ComponentStatus.FAILED,
            f"The {name} was stopped by SIGTERM (the project was cancelled or stopped).",
            Failed(error="terminated", exit_code=int(ExitCode.TERMINATED)),
        )
        notifier.close()
        os._exit(ExitCode.TERMINATED)

    signal.signal(signal.SIGTERM, on_sigterm)
