"""Project statuses, component statuses and the aggregator's progress stages."""

from enum import StrEnum

from flops_utils.types import Component, ComponentStatus

__all__ = ["ACTIVE", "TERMINAL", "Component", "ComponentStatus", "ProjectStatus", "Stage"]


class ProjectStatus(StrEnum):
    """Where a project is in its lifecycle; shared by the store, the REST API and the CLI.

    ``pending → building → deploying → training → post_training → completed``, or ``failed``
    / ``cancelled`` from any non-terminal status.
    """

    PENDING = "pending"
    BUILDING = "building"
    DEPLOYING = "deploying"
    TRAINING = "training"
    POST_TRAINING = "post_training"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True for ``completed``, ``failed`` and ``cancelled``."""
        return self in TERMINAL


TERMINAL = frozenset({ProjectStatus.COMPLETED, ProjectStatus.FAILED, ProjectStatus.CANCELLED})
"""Statuses a project never leaves."""

ACTIVE = frozenset({ProjectStatus.DEPLOYING, ProjectStatus.TRAINING, ProjectStatus.POST_TRAINING})
"""Statuses in which a project has services running."""


class Stage(StrEnum):
    """``data["stage"]`` of an aggregator's ``progress`` message."""

    ROUND = "round"
    """Sent after each round with its metrics."""
    TRAINING_DONE = "training_done"
    """Sent once after the last round, before the final model is logged: the manager moves
    the project to ``post_training`` then."""
    STRAGGLER = "straggler"
    """Sent while a round runs, at most every ``straggler_notice_s``, for each learner that
    has not answered the round's instruction yet (not a round's result)."""
    LEARNERS_DROPPED = "learners_dropped"
    """Sent when a round's phase ends without some learners' results (they failed,
    disconnected or exceeded ``round_timeout_s``); names them (not a round's result)."""
