"""User-facing errors: the CLI prints them as one line and exits with code 2, no traceback."""


class UserError(Exception):
    """A mistake in the user's input or environment (bad flag, missing file, no network...)."""


class Interrupted(Exception):
    """Ctrl-C in a long command: the message says what is safe on disk; the CLI exits 130."""
