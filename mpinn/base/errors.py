"""mpinn's exit codes, and the exception types that map to them.

Anything a user can get wrong (flags, config keys, data files) raises UsageError
with a message that says what is wrong and what to do. Internal invariants are
asserts; any other exception is a failure while running (exit code 1).
"""

EXIT_OK = 0
EXIT_FAILED = 1  # a failure while running: all ranks end, one message
EXIT_USAGE = 2  # bad usage or input: one message, nothing existing modified
EXIT_INTERRUPTED = 3  # stopped by a signal after writing a checkpoint: continue with --resume
EXIT_SIGINT = 130  # a serial command ended by Ctrl-C (128 + SIGINT), as shells count it


class UsageError(Exception):
    """Bad usage or bad input: reported once, exit code 2, nothing existing modified."""


class CollectiveError(RuntimeError):
    """A failure while running that every rank detected alike (a consistency check,
    divergence, or a write that rank 0 tried and all ranks learned of): reported once
    by rank 0, exit code 1, no abort needed."""


class StorageError(RuntimeError):
    """The file system refused a write (full, over quota, read-only, no permission).

    The message names the file, the reason (with its errno name) and what to do.
    Raised on the rank that wrote; `collectives.root_tries` (rank 0 wrote) and
    `collectives.all_try` (every rank wrote) turn it into a CollectiveError on every
    rank. Exit code 1, never a traceback: it is the environment, not a bug.
    """


class Interrupted(Exception):
    """A stop request (SIGINT, SIGTERM, SIGUSR1) ended training at a step boundary
    after a checkpoint was written: exit code 3, continue with `mpinn train --resume`."""
