"""User-facing errors: bad input is reported as one line `error: ...` and exit status 2."""


class UserError(Exception):
    """Bad input from a user (a path, a flag, a checkpoint); the message names the problem."""
