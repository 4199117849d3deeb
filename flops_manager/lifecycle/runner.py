"""Runs the reducer: one serialized event queue per project, one timer thread, persisting.

Every input of the lifecycle goes through :meth:`LifecycleRunner.post`: the event is queued
for its project; a worker thread per project with pending events takes them in order, loads
the record, applies :func:`~flops_manager.lifecycle.reducer.transition`, persists the change
in one atomic store update, and only then executes the actions and acknowledges the event
(``ack``, e.g. the MQTT message's). Two events of one project never run at once; events of
different projects do. There is no global lock.

Timers (:meth:`LifecycleRunner.schedule`) are kept in one heap served by one thread, which
posts the timer's event to its project's queue when it is due.
"""

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from flops_manager.lifecycle import actions as act
from flops_manager.lifecycle import events as ev
from flops_manager.lifecycle.changes import ProjectChanges
from flops_manager.lifecycle.reducer import transition
from flops_manager.records import ProjectRecord
from flops_manager.store import ProjectStore
from flops_utils.logging import logger

Ack = Callable[[], None]
"""Acknowledges an event to its source (e.g. the MQTT broker); called once it is persisted."""

Executor = Callable[[ProjectRecord, list[act.Action]], None]
"""Executes the actions of one transition, given the persisted new record; must not raise."""

APPEND_FIELDS = ("events", "rounds", "service_reports", "service_handles")
"""List fields that transitions only append to: persisted with ``$push`` when one item is new."""

ATTEMPTS = 3
"""How often an event whose application raises is tried before it is dropped (logged and
acknowledged, so that a poison message cannot block its project's queue)."""

RETRY_DELAY_S = 0.2
"""Delay before the second attempt; doubled for each further one."""

ALWAYS_APPLIED = frozenset({ev.EventKind.CANCEL_REQUESTED, ev.EventKind.MANAGER_STOPPING})
"""Event kinds applied after :meth:`LifecycleRunner.close` too; other events are dropped
then without being acknowledged (the broker delivers MQTT messages again to the next
manager process)."""


@dataclass
class Recovery:
    """What a restart found for one re-attached project: services ``running``, services
    ``gone`` (name → last log line) and failure reasons held back (``failures``)."""

    running: list[str]
    gone: dict[str, str]
    failures: list[str] = field(default_factory=list)


@dataclass
class _Item:
    event: ev.LifecycleEvent
    ack: Ack | None
    future: "Future[ProjectRecord | None]"


class Scheduler:
    """One thread running delayed callbacks in due order (a heap)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="lifecycle-timers", daemon=True)
        self._thread.start()

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` in the scheduler's thread after ``delay_s`` seconds (dropped when
        the scheduler is closed first)."""
        due = time.monotonic() + max(0.0, delay_s)
        with self._condition:
            heapq.heappush(self._heap, (due, next(self._counter), callback))
            self._condition.notify()

    def close(self) -> None:
        """Drop pending callbacks and stop the thread."""
        with self._condition:
            self._closed = True
            self._heap.clear()
            self._condition.notify()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while True:
            with self._condition:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._condition.wait(timeout)
                if self._closed:
                    return
                _, _, callback = heapq.heappop(self._heap)
            try:
                callback()
            except Exception:
                logger.exception("a lifecycle timer failed")


def persisted_change(
    old: ProjectRecord, new: ProjectRecord
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The store update that turns ``old`` into ``new``: ``(fields to set, values to push)``.

    A list of :data:`APPEND_FIELDS` that grew by one item is pushed; any other changed
    top-level field is set whole. ``updated_at`` is left to the store.
    """
    before, after = old.document(), new.document()
    fields: dict[str, Any] = {}
    push: dict[str, Any] = {}
    for key, value in after.items():
        if key == "updated_at" or before.get(key) == value:
            continue
        previous = before.get(key)
        if (
            key in APPEND_FIELDS
            and isinstance(previous, list)
            and len(value) == len(previous) + 1
            and value[:-1] == previous
        ):
            push[key] = value[-1]
        else:
            fields[key] = value
    return fields, push


class LifecycleRunner:
    """Applies events to projects, one at a time per project.

    Args:
        store: where the records are loaded from and persisted to.
        execute: runs a transition's actions (see :data:`Executor`); :class:`~.actions.Hold`
            is handled here and never passed on.
        clock: seconds since the epoch, the reducer's ``now_s``.
    """

    def __init__(
        self, store: ProjectStore, execute: Executor, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.execute = execute
        self.clock = clock
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queues: dict[str, deque[_Item]] = {}
        self._active: set[str] = set()
        self._recovering: dict[str, Recovery] = {}
        self._closing = threading.Event()
        self._scheduler = Scheduler()
        self.changes = ProjectChanges()

    # -- inputs ---------------------------------------------------------------------------
    def post(
        self, project_id: str, event: ev.LifecycleEvent, ack: Ack | None = None
    ) -> "Future[ProjectRecord | None]":
        """Queue ``event`` for ``project_id``; returns a future of the record after it (``None``
        for an unknown project or a dropped event). ``ack`` is called once the change is
        persisted and its actions ran (or once the event was dropped as poison)."""
        item = _Item(event, ack, Future())
        with self._lock:
            self._queues.setdefault(project_id, deque()).append(item)
            if project_id in self._active:
                return item.future
            self._active.add(project_id)
        worker = threading.Thread(
            target=self._work, args=(project_id,), name=f"project-{project_id}", daemon=True
        )
        worker.start()
        return item.future

    def apply(
        self, project_id: str, event: ev.LifecycleEvent, timeout_s: float | None = None
    ) -> ProjectRecord | None:
        """:meth:`post` and wait up to ``timeout_s`` seconds (``None``: no limit) for the
        result; raises the store's error when the event could not be applied. Never call it
        from an action executed for the same project (it would wait for itself)."""
        return self.post(project_id, event).result(timeout_s)

    def schedule(
        self,
        delay_s: float,
        project_id: str,
        event: ev.LifecycleEvent,
        hold: Callable[[], bool] | None = None,
    ) -> None:
        """Post ``event`` for ``project_id`` after ``delay_s`` seconds; while ``hold()`` is
        true then, wait another ``delay_s`` seconds and ask again."""

        def post() -> None:
            if hold is not None and hold():
                self._scheduler.call_later(delay_s, post)
            else:
                self.post(project_id, event)

        self._scheduler.call_later(delay_s, post)

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued event is applied; ``False`` after ``timeout_s`` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._active, timeout_s)

    # -- restart recovery ------------------------------------------------------------------
    def begin_recovery(self, project_id: str, running: list[str], gone: dict[str, str]) -> None:
        """Hold back the project's failure reports and service exits until
        :meth:`end_recovery` (see :class:`~.actions.Hold`). Called again for a project,
        replaces ``running`` and adds ``gone`` to what was held meanwhile."""
        with self._lock:
            held = self._recovering.setdefault(project_id, Recovery([], {}))
            held.running = list(running)
            held.gone = {**held.gone, **gone}

    def end_recovery_of(self, project_id: str) -> None:
        """Stop holding back the events of one project (it ended during recovery)."""
        with self._lock:
            self._recovering.pop(project_id, None)

    def end_recovery(self) -> dict[str, Recovery]:
        """Stop holding back; returns what was found and held per project id."""
        with self._lock:
            found, self._recovering = self._recovering, {}
        return found

    def close(self) -> None:
        """Drop pending timers; from now on only :data:`ALWAYS_APPLIED` events are applied."""
        self._closing.set()
        self._scheduler.close()

    # -- the workers -------------------------------------------------------------------------
    def _work(self, project_id: str) -> None:
        while True:
            with self._lock:
                queue = self._queues.get(project_id)
                if not queue:
                    self._queues.pop(project_id, None)
                    self._active.discard(project_id)
                    self._idle.notify_all()
                    return
                item = queue.popleft()
            self._handle(project_id, item)

    def _handle(self, project_id: str, item: _Item) -> None:
        if self._closing.is_set() and item.event.kind not in ALWAYS_APPLIED:
            logger.debug("project %s: manager stopping, %s dropped", project_id, item.event.kind)
            item.future.set_result(None)
            return
        for attempt in range(1, ATTEMPTS + 1):
            try:
                record, actions = self._apply(project_id, item.event)
                break
            except Exception as exc:
                if attempt == ATTEMPTS:
                    logger.exception(
                        "project %s: %s dropped after %d attempts",
                        project_id,
                        item.event.kind.value,
                        ATTEMPTS,
                    )
                    item.future.set_exception(exc)
                    self._ack(item)
                    return
                logger.warning(
                    "project %s: applying %s failed (%s); retrying",
                    project_id,
                    item.event.kind.value,
                    exc,
                )
                time.sleep(RETRY_DELAY_S * 2 ** (attempt - 1))
        if record is not None:
            self._run_actions(project_id, record, actions)
        item.future.set_result(record)
        self._ack(item)

    def _apply(
        self, project_id: str, event: ev.LifecycleEvent
    ) -> tuple[ProjectRecord | None, list[act.Action]]:
        old = self.store.get_project(project_id)
        if old is None:
            return None, []
        with self._lock:
            recovering = project_id in self._recovering
        new, actions = transition(old, event, self.clock(), recovering=recovering)
        fields, push = persisted_change(old, new)
        if fields or push:
            self.store.update_project(project_id, fields, push=push)
            self.changes.changed(project_id)
        return new, actions

    def _run_actions(
        self, project_id: str, record: ProjectRecord, actions: list[act.Action]
    ) -> None:
        rest = []
        for action in actions:
            if isinstance(action, act.Hold):
                self._hold(project_id, action)
            else:
                rest.append(action)
        if rest:
            self.execute(record, rest)

    def _hold(self, project_id: str, action: act.Hold) -> None:
        with self._lock:
            held = self._recovering.get(project_id)
            if held is None:
                return
            if action.service is not None:
                held.gone[action.service] = action.last_line
            if action.failure is not None:
                held.failures.append(action.failure)

    @staticmethod
    def _ack(item: _Item) -> None:
        if item.ack is None:
            return
        try:
            item.ack()
        except Exception:
            logger.exception("acknowledging %s failed", item.event.kind.value)
