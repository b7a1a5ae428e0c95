"""The one exception type for problems with the user's data."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data (not a bug in mics).

    The message names the offending file, pair, class or manifest row and says what to do about it,
    so the command line can print it as is, without a traceback.
    """
