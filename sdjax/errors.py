"""User-facing errors: bad input is reported as one line `error: ...` and exit status 2."""


class UserError(Exception):
    """Bad input from a user (a path, a flag, a checkpoint); the message names the problem."""


class InputWarning(UserWarning):
    """Input the run goes on with but that will not be read as written (a word the model
    does not know, a prompt cut to fit); the command line prints it as `warning: ...`."""
