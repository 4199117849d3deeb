"""Calling into an ML repository's code from the FL actors, and reporting what it raised.

Shared by the learner and the aggregator: whatever the user's ``ModelManager`` raises becomes
a :class:`UserCodeError` whose message names the method and the exception on one line.
"""

from collections.abc import Callable
from typing import TypeVar

from flops_utils.errors import FlopsError

T = TypeVar("T")

MAX_MESSAGE_CHARS = 500


class UserCodeError(FlopsError):
    """The ML repository's code raised; ``__cause__`` holds the original exception."""

    code = "user_code_error"


def one_line(text: str, limit: int = 1000) -> str:
    """``text`` with every run of whitespace (newlines included) made one space, cut at
    ``limit`` characters."""
    return " ".join(text.split())[:limit]


def describe_exception(exc: BaseException) -> str:
    """``"<Type>: <message>"`` on one line, at most ``MAX_MESSAGE_CHARS`` characters."""
    return one_line(f"{type(exc).__name__}: {str(exc) or '(no message)'}", MAX_MESSAGE_CHARS)


def call_user_code(what: str, call: Callable[[], T]) -> T:
    """Return ``call()``; anything it raises becomes ``UserCodeError("<what> raised <Type>:
    <message>")`` with the original as ``__cause__`` (a ``UserCodeError`` passes unchanged:
    it names its method already)."""
    try:
        return call()
    except UserCodeError:
        raise
    except Exception as exc:
        raise UserCodeError(f"{what} raised {describe_exception(exc)}") from exc
