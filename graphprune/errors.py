"""The one exception type users catch."""


class GraphpruneError(Exception):
    """Raised for input graphprune cannot work with.

    The message says what went wrong, where (module path or graph node) and what
    the user can do about it.
    """


class GraphpruneWarning(UserWarning):
    """A result graphprune returns but the user should know about (a latency target near
    the device's floor, where timing noise moves the widths a lot)."""
