"""Publishing the Flower server's learner events (:mod:`aggregator.flower_server`'s
:class:`~aggregator.flower_server.Straggler` and
:class:`~aggregator.flower_server.LearnersDropped`) as ``progress`` status messages.

Texts (``X``: the learner's name, ``R``: the round, ``N``: whole seconds waited):

- a straggler: ``learner X has not answered round R for N s``; data
  :class:`~flops_utils.contract.messages.Straggler` (``stage`` ``straggler``, ``learner``,
  ``round``, ``phase``, ``waited_s``, ``round_timeout_s``);
- dropped learners: ``round R training: dropped learner(s) X, Y (no answer within
  round_timeout_s 8s); going on with 2 (the SLA needs 2)`` (or ``(failed or disconnected)``,
  and ``...; 1 left, the SLA needs 2`` when training cannot go on); data
  :class:`~flops_utils.contract.messages.LearnersDropped`.

A cluster aggregator adds its ``cycle`` and ``cluster`` to the data.
"""

from collections.abc import Callable
from typing import Any

from aggregator.flower_server import LearnerEvent, LearnersDropped, OnLearners, Straggler
from flops_utils.contract import messages
from flops_utils.contract.lifecycle import Stage
from flops_utils.notifications import StatusNotifier
from flops_utils.types import ComponentStatus

__all__ = ["describe_event", "learner_event_publisher"]


def describe_event(
    event: LearnerEvent, clients_name: str, timeout_name: str, round_timeout_s: float
) -> tuple[str, messages.MessageData]:
    """The ``(message, data)`` of ``event``, the clients called ``clients_name`` and the
    timeout ``timeout_name`` of ``round_timeout_s`` seconds (see the module docstring)."""
    if isinstance(event, Straggler):
        text = (
            f"{clients_name} {event.learner} has not answered round {event.round} for "
            f"{event.waited_s:.0f} s"
        )
        return text, messages.Straggler(
            stage=Stage.STRAGGLER,
            learner=event.learner,
            round=event.round,
            phase=event.phase,
            waited_s=event.waited_s,
            round_timeout_s=round_timeout_s,
        )
    return _dropped_text(event, clients_name, timeout_name, round_timeout_s), (
        messages.LearnersDropped(
            stage=Stage.LEARNERS_DROPPED,
            round=event.round,
            phase=event.phase,
            learners=list(event.learners),
            timed_out=event.timed_out,
            remaining=event.remaining,
            needed=event.needed,
            going_on=event.going_on,
        )
    )


def _dropped_text(
    event: LearnersDropped, clients_name: str, timeout_name: str, round_timeout_s: float
) -> str:
    why = (
        f"no answer within {timeout_name} {round_timeout_s:g}s"
        if event.timed_out
        else "failed or disconnected"
    )
    names = ", ".join(event.learners) or "unknown"
    text = f"round {event.round} {event.phase}: dropped {clients_name}(s) {names} ({why}); "
    if event.going_on:
        return text + f"going on with {event.remaining} (the SLA needs {event.needed})"
    return text + f"{event.remaining} left, the SLA needs {event.needed}"


def learner_event_publisher(
    notifier: StatusNotifier,
    clients_name: str,
    timeout_name: str,
    round_timeout_s: float,
    extra: Callable[[], dict[str, Any]] | None = None,
) -> OnLearners:
    """An ``on_learners`` callback publishing each event as a ``progress`` message of
    ``notifier`` (:func:`describe_event`), its data updated with ``extra()`` (a cluster
    aggregator's ``cycle`` and ``cluster``)."""

    def publish(event: LearnerEvent) -> None:
        text, data = describe_event(event, clients_name, timeout_name, round_timeout_s)
        if extra is not None:
            data = data.model_copy(update=extra())
        notifier.notify(ComponentStatus.PROGRESS, text, data)

    return publish
