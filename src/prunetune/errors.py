"""User-facing errors.

Anything a user can cause (bad path, malformed spec, NaN weights...) raises `PrunetuneError`.
The CLI prints its message as one line and exits non-zero; nothing else is caught, so real bugs
keep their traceback.
"""


class PrunetuneError(Exception):
    """An error caused by the user's input, reported as one clear line."""

    exit_code = 2
