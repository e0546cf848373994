"""User-facing errors.

Everything a user can get wrong (a flag, a path, a model the tool does not support) raises
:class:`PrunekitError` with one line that names the problem and the fix. The command line prints
that line and exits non-zero; library callers can catch it like any exception.
"""


class PrunekitError(Exception):
    """A problem with the user's input, explained in one line (problem, then fix)."""
