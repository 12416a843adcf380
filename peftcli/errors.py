"""The one exception type a user can cause.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; anything else is an
internal error (exit 1, traceback kept).
"""


class UserError(Exception):
    """A problem the user can fix: a bad recipe key or value, a missing file, a malformed row,
    an adapter used with the wrong base model. The message is one line naming the key, file or row."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint. The CLI prints the message
    (where the checkpoint is, how to resume) and exits 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
