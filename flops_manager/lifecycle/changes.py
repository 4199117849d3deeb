"""Change notices for projects: the event stream waits on them instead of polling the store.

The lifecycle runner calls :meth:`ProjectChanges.changed` after it persisted a change of a
project; a follower of that project's events (``GET /projects/{id}/events?follow=1``) sleeps
in :meth:`ProjectChanges.wait` until then, so an idle follower costs no store reads.
"""

import threading


class ProjectChanges:
    """A change counter per project with a condition to wait on. Thread-safe."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._versions: dict[str, int] = {}

    def version(self, project_id: str) -> int:
        """How often ``project_id`` changed since this object was made."""
        with self._changed:
            return self._versions.get(project_id, 0)

    def changed(self, project_id: str) -> None:
        """Note a persisted change of ``project_id`` and wake its waiters."""
        with self._changed:
            self._versions[project_id] = self._versions.get(project_id, 0) + 1
            self._changed.notify_all()

    def wait(self, project_id: str, seen: int, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` seconds for ``project_id``'s version to differ from
        ``seen``; returns the version then (``seen`` after a timeout)."""
        with self._changed:
            self._changed.wait_for(lambda: self._versions.get(project_id, 0) != seen, timeout_s)
            return self._versions.get(project_id, 0)
