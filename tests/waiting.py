"""Waiting on conditions in tests, instead of sleeping for a guessed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout_s: float = 10,
    message: str | Callable[[], str] = "the condition did not become true",
    interval_s: float = 0.05,
) -> T:
    """Call ``predicate`` every ``interval_s`` until it returns something truthy; return that.

    Args:
        predicate: the condition; may return the thing waited for (a list, a response).
        timeout_s: how long to wait, in seconds.
        message: what was awaited, or a function giving it (called once, on timeout, so it
            can show the state at that moment).
        interval_s: the pause between two calls, in seconds.

    Raises:
        AssertionError: ``message`` and the last value, after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (after {timeout_s:g} s; last value {value!r})")
        time.sleep(interval_s)


def answers_200(url: str, timeout_s: float = 2) -> bool:
    """Whether ``GET url`` answers 200 now (``False`` on any connection error)."""
    import requests

    try:
        return requests.get(url, timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False
