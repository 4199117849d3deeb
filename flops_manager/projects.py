"""Compatibility names: the project lifecycle lives in :mod:`flops_manager.lifecycle`."""

from flops_manager.lifecycle import (
    AGGREGATOR_EXIT_GRACE_S,
    NODE_TTL_S,
    ProjectLifecycle,
    UnsupportedSla,
    eligible_nodes,
)
from flops_utils.contract.lifecycle import ACTIVE, TERMINAL, ProjectStatus

__all__ = [
    "ACTIVE",
    "AGGREGATOR_EXIT_GRACE_S",
    "NODE_TTL_S",
    "TERMINAL",
    "ProjectLifecycle",
    "ProjectStatus",
    "UnsupportedSla",
    "eligible_nodes",
]
