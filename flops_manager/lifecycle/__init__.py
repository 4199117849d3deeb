"""The project lifecycle as a per-project event reducer.

Inputs (pipeline results, MQTT status messages, service exits, timers, user and manager
actions, restart findings) are typed events (:mod:`.events`) on one serialized queue per
project (:mod:`.runner`); the pure :func:`.reducer.transition` turns a record and an event
into the new record and the actions (:mod:`.actions`) to execute once it is persisted.
:mod:`.admission` accepts SLAs, :mod:`.pipeline` builds and deploys, :mod:`.post_training`
runs the post-training steps, :mod:`.recovery` reconciles after a restart, and
:class:`.control.ProjectLifecycle` ties them together.
"""

from flops_manager.lifecycle.admission import NODE_TTL_S, UnsupportedSla, eligible_nodes
from flops_manager.lifecycle.control import AGGREGATOR_EXIT_GRACE_S, ProjectLifecycle

__all__ = [
    "AGGREGATOR_EXIT_GRACE_S",
    "NODE_TTL_S",
    "ProjectLifecycle",
    "UnsupportedSla",
    "eligible_nodes",
]
