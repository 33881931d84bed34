"""The one exception type for mistakes a user can fix (bad arguments, config, input files).

The CLI prints a `UserError` as a plain message, without a traceback, and exits with code 2. Anything else
that escapes is a bug in zidong and keeps its traceback.
"""

EXIT_USAGE = 2  # the exit code of a `UserError` (and of argparse's own usage errors)


class UserError(Exception):
    """A mistake in the user's input: the message says what was wrong, where, and how to fix it."""
