"""One exception type for mistakes a user can fix; the CLI prints it without a traceback."""


class UserError(Exception):
    """Bad input, a missing file or an option that does not fit; the message says which and how to fix it."""


class Notice(UserWarning):
    """Something a user should know that does not stop the job (a fallback taken, input cut); the CLI prints it
    as one `warning: ...` line without a source location."""
