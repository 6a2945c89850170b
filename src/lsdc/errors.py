"""The one exception type for errors a user can fix; the CLI prints it as one line, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, a folder, a config key); the message names it and the problem."""
