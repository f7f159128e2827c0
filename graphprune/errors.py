"""The one exception type users catch."""


class GraphpruneError(Exception):
    """Raised for input graphprune cannot work with.

    The message says what went wrong, where (module path or graph node) and what
    the user can do about it.
    """
