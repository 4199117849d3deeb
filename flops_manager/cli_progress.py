"""Progress of the CLI's long waits (``flops demo``, ``flops submit``, ``flops status -f``).

On a terminal, what the CLI waits for is one spinner line with the elapsed time under the
printed lines (rich's ``Progress``, erased when the wait ends). Written to a file or a pipe,
the output is plain lines only (no control codes, no wrapping): the wait's text when it
starts, ``done`` with its duration, and a ``still ...`` line after every ``QUIET_S`` seconds
without output, so that logs and tests stay readable.
"""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from flops_manager.client import ManagerClient
from flops_utils.contract.services import AGGREGATOR_SERVICE

QUIET_S = 30.0
"""Seconds without output after which plain output says what it still waits for."""

PHASE_TEXT = {
    "pending": "waiting to start",
    "building": "building the environment",
    "deploying": "deploying the aggregator and the learners",
    "training": "waiting for the aggregator to start",
    "post_training": "post-training steps",
}
"""What a project in each (non-terminal) status waits for."""

STATUS_COLOUR = {
    "failed": "red",
    "completed": "green",
    "cancelled": "yellow",
    "progress": "cyan",
    "straggler": "yellow",
}


class Activity:
    """What the CLI waits for now (see the module docstring); a context manager.

    Args:
        console: where to print; a terminal gets the spinner, anything else plain lines.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal and not console.is_dumb_terminal
        self._lock = threading.Lock()
        self._text = ""
        self._since = self._last_output = time.monotonic()
        self._stop = threading.Event()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> "Activity":
        if self.live:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
        else:
            self._ticker = threading.Thread(target=self._tick, daemon=True, name="progress")
            self._ticker.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._progress is not None:
            self._progress.stop()
        if self._ticker is not None:
            self._ticker.join(timeout=2)

    def show(self, text: str, announce: bool = True) -> None:
        """Wait for ``text`` now (rich markup); its elapsed time starts at 0. Plain output
        prints it as a line when ``announce`` (``False``: the line just printed said it)."""
        with self._lock:
            changed = text != self._text
            self._text, self._since = text, time.monotonic()
        if not changed:
            return
        if self._progress is None:
            if announce:
                self.print(f"... {text}")
        elif self._task is None:
            self._task = self._progress.add_task(text)
        else:
            self._progress.reset(self._task, description=text)

    def print(self, line: str) -> None:
        """Print ``line`` (rich markup) above the spinner, or as a plain line."""
        with self._lock:
            self._last_output = time.monotonic()
        self.console.print(line, highlight=False, soft_wrap=not self.live)

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        """Show ``text`` while the block runs, then print it with its duration; nothing
        more when the block raises (the caller reports the error)."""
        started = time.monotonic()
        self.show(text)
        yield
        done = "[green]✓[/]" if self.live else "done:"
        self.print(f"{done} {text} ({time.monotonic() - started:.1f} s)")

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                now = time.monotonic()
                quiet = now - self._last_output >= QUIET_S and self._text
                text, waited_s = self._text, now - self._since
            if quiet:
                self.print(f"... still {text} ({waited_s:.0f} s)")


def event_line(event: dict[str, Any], message: str | None = None) -> str:
    """One event as a line of rich markup: clock time, status, component, message."""
    stamp = datetime.fromtimestamp(event["timestamp"]).strftime("%H:%M:%S")
    status = str(event["status"])
    colour = STATUS_COLOUR.get(status)
    padded = escape(f"{status:<13}")
    shown = f"[{colour}]{padded}[/]" if colour else padded
    text = message or str(event["message"])
    component = event.get("component")
    who = f"{component}: " if component and not text.startswith(component) else ""
    return f"{stamp}  {shown} {escape(who + text)}"


class ProjectProgress:
    """Shows a followed project: each event as a line, and what the project waits for now
    (its phase; in training the round ``R/N`` with the latest accuracy) on the activity.

    Args:
        activity: where to show it.
        client: the manager's client, to read the project's rounds when a round ends.
        project: the project's document when following started (its SLA gives ``N``).
    """

    def __init__(self, activity: Activity, client: ManagerClient, project: dict[str, Any]) -> None:
        self.activity = activity
        self.client = client
        self.project_id = str(project["project_id"])
        training = (project.get("sla") or {}).get("training_configuration") or {}
        self.hierarchical = training.get("mode") == "hierarchical"
        self.unit = "cycle" if self.hierarchical else "round"
        total = training.get("training_cycles" if self.hierarchical else "training_rounds")
        self.total = int(total) if total else None
        self._rounds: list[dict[str, Any]] = list(project.get("rounds") or [])
        self._rounds_shown = 0

    def on_event(self, event: dict[str, Any]) -> None:
        """Print ``event`` and update the activity."""
        kind, status = event.get("type"), str(event.get("status"))
        if kind == "round" and event.get("component") == AGGREGATOR_SERVICE:
            self._on_round(event)
            return
        self.activity.print(event_line(event))
        if kind == "status" and status in PHASE_TEXT:
            self.activity.show(PHASE_TEXT[status], announce=False)
        elif (
            kind == "component"
            and status == "started"
            and event.get("component") == AGGREGATOR_SERVICE
        ):
            self.activity.show(f"training: {self.unit} 0/{self.total or '?'}", announce=False)
        elif kind == "post_training":
            self.activity.show(f"post-training: {escape(event['message'])}", announce=False)

    def _on_round(self, event: dict[str, Any]) -> None:
        """A round (cycle) of the (root) aggregator ended: its line says ``R/N``. The k-th
        such event is the project's k-th entry of ``rounds`` (the manager logs one event
        per new round, in order); the project is read again only when it is not known yet."""
        self._rounds_shown += 1
        if len(self._rounds) < self._rounds_shown:
            self._rounds = list(self.client.project(self.project_id).get("rounds") or [])
        entry = (
            self._rounds[self._rounds_shown - 1] if len(self._rounds) >= self._rounds_shown else {}
        )
        number = entry.get("round") or self._rounds_shown
        of = f"{number}/{self.total}" if self.total else str(number)
        accuracy = entry.get("accuracy")
        loss = entry.get("loss")
        measured = ", ".join(
            f"{name} {value:.4f}"
            for name, value in (("loss", loss), ("accuracy", accuracy))
            if isinstance(value, float)
        )
        self.activity.print(event_line(event, f"{self.unit} {of}: {measured or 'no metrics'}"))
        suffix = f" (accuracy {accuracy:.4f})" if isinstance(accuracy, float) else ""
        self.activity.show(f"training: {self.unit} {of} done{suffix}", announce=False)


def follow_project(
    activity: Activity, client: ManagerClient, project_id: str, timeout_s: float
) -> dict[str, Any]:
    """Show the project's events from the first (see :class:`ProjectProgress`) until it
    ends; returns its final document. Raises what
    :meth:`~flops_manager.client.ManagerClient.follow_events` raises."""
    view = ProjectProgress(activity, client, client.project(project_id))
    for event in client.follow_events(project_id, timeout_s=timeout_s):
        view.on_event(event)
    return client.project(project_id)
