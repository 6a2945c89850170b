"""The exception type for errors a user can fix (the CLI prints it as one line, no traceback) and
the warning type for what lsdc tolerates in a caller's arguments."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, a folder, a config key); the message names it and the problem."""


class MachineError(UserError):
    """The machine failed, not the data (a full disk, a busy folder, no memory): never recorded
    as a verdict on a file; a rerun, once the machine is fixed, redoes the work."""


class LsdcWarning(UserWarning):
    """Something in the caller's arguments that lsdc tolerates but the caller likely did not mean
    (``warnings.warn``, as scikit-learn warns, so a caller can filter it or make it an error)."""
