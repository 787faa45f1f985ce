"""Atomic file replacement: a reader sees the old file or the new one, never half.

Write to a temporary file in the destination's directory (same file system, so
the rename is atomic), flush and fsync it, rename it over the destination, and
fsync the directory so the rename itself survives a crash. On any error the
temporary file is removed and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces `path` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_directory(directory)


def check_writable(path: str) -> None:
    """UsageError unless a file can be created at path (its directory exists, is writable)."""
    from .errors import UsageError
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a file name")
    if not os.path.isdir(directory):
        raise UsageError(f"{path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"{path}: directory {directory} is not writable")


def fsync_directory(directory: str) -> None:
    """Make renames and links in directory durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
