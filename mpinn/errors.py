"""The one exception type for bad usage or bad input (exit code 2).

Anything a user can get wrong (flags, config keys, data files) raises UsageError
with a message that says what is wrong and what to do. Internal invariants are
asserts; any other exception is a failure while running (exit code 1).
"""


class UsageError(Exception):
    """Bad usage or bad input: reported once, exit code 2."""


class CollectiveError(RuntimeError):
    """A failure while running that every rank detected alike (e.g. after a
    consistency check): reported once by rank 0, exit code 1, no abort needed."""


class Interrupted(Exception):
    """A signal (SIGTERM, SIGUSR1) stopped training at a step boundary after a
    checkpoint was written: exit code 3, continue with `mpinn train --resume`."""
