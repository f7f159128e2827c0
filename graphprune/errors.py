"""The one exception type users catch, the warning they see, and where it points."""
import sys


class GraphpruneError(Exception):
    """Raised for input graphprune cannot work with.

    The message says what went wrong, where (module path or graph node) and what
    the user can do about it.
    """


class GraphpruneWarning(UserWarning):
    """A result graphprune returns but the user should know about (a latency target near
    the device's floor, where timing noise moves the widths a lot)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or "" (a bare ``assert`` has none: indexing
    ``str(e).splitlines()`` raised IndexError from inside graphprune's own error reporting)."""
    lines = str(e).splitlines()
    return lines[0] if lines else ""


_INSIDE = ("graphprune", "torch", "contextlib", "functools")  # modules a warning's line is never in


def user_level() -> int:
    """The ``stacklevel`` of the first frame outside graphprune (and the torch, contextlib and functools
    frames it runs through) from the caller of ``warnings.warn``: the user's line that called
    compile, however deep inside it the warning is raised and whatever wraps it
    (``verify.retried_on_weight_writes``)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _INSIDE:
        frame, level = frame.f_back, level + 1
    return level
