"""The one exception type users catch."""


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
