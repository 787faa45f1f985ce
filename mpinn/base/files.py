"""Files: atomic replacement, refused writes explained, small files read (JSON too), and
the JSON results of a command (`--json FILE`, `-` meaning standard output).

Atomic replacement: write to a temporary file in the destination's directory
(same file system, so the rename is atomic), fsync it, rename it over the
destination, and fsync the directory so the rename itself survives a crash. A
reader sees the old file or the new one, never half of one. On any error the
temporary file is removed and the destination is untouched.

Temporary files are named `.NAME.tmp-PID`; a job killed while writing leaves
one behind, which `remove_orphans` deletes at the start of the next run.

A write the file system refuses (ENOSPC, EDQUOT, EROFS, EACCES, ...) becomes a
StorageError naming the file, the errno and what to do: a message, not a
traceback (and never a crash inside HDF5: see write_atomically).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import sys
from typing import Any, TextIO

from mpinn.base.console import say
from mpinn.base.errors import StorageError, UsageError

TEMP_MARK = ".tmp-"
STDOUT = "-"  # `--json -`: the JSON goes to standard output
ADVICE = {
    errno.ENOSPC: "free space on that file system",
    errno.EDQUOT: "free space within your quota (or raise it)",
    errno.EROFS: "the file system is mounted read-only: write the run elsewhere",
    errno.EACCES: "you may not write there: fix the permissions or write the run elsewhere",
    errno.EPERM: "you may not write there: fix the permissions or write the run elsewhere",
}


def temp_path(path: str) -> str:
    """The temporary name under which `path` is written before it is renamed into place."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}{TEMP_MARK}{os.getpid()}")


def remove_orphans(directory: str, names: re.Pattern[str]) -> list[str]:
    """Delete the temporary files (names matching `names`) of writers that were killed;
    returns their names.

    Only call it while holding the directory (rundir's lock), and only for files
    that nothing but the lock's holder writes: a live writer's temporary file
    looks the same.
    """
    removed = []
    for name in os.listdir(directory):
        if names.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))
                removed.append(name)
    return removed


def storage_error(exc: OSError, action: str, path: str, needed: int = 0) -> StorageError:
    """A StorageError for a refused write: '<action> <path>: <reason> (ENAME); <advice>'
    (with the bytes `needed`, if known, and those free, when space ran out)."""
    name = errno.errorcode.get(exc.errno or 0, "")
    reason = exc.strerror or str(exc)
    advice = ADVICE.get(exc.errno or 0)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
            need = f"it needs {needed / 1e6:.1f} MB, " if needed else ""
            advice += f" ({need}{stat.f_bavail * stat.f_frsize / 1e6:.1f} MB free there now)"
    return StorageError(f"cannot {action} {path}: {reason}" + (f" ({name})" if name else "")
                        + (f"; {advice}" if advice else ""))


def write_atomically(path: str, data: bytes | memoryview, what: str = "write") -> None:
    """Replace path with data atomically; StorageError if the file system refuses.

    The file's full size is reserved first (posix_fallocate), so a full disk or
    quota is reported before a byte is written, and the write itself goes
    through os.write: nothing (HDF5 included) can crash on a short write.
    """
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            reserve_fd(fd, len(data))
            view = memoryview(data)
            while len(view):
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise storage_error(exc, what, path) from None


def reserve_fd(fd: int, size: int) -> None:
    """Allocate the first `size` bytes of the open file fd on disk now (posix_fallocate),
    so that a full disk or quota is an error here, not in a later write; where the file
    system cannot reserve space (EOPNOTSUPP), writes find out instead."""
    if size > 0:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def reserve(tmp: str, path: str) -> None:
    """Reserve the whole current size of the file tmp (a sparse file, such as an HDF5
    file whose datasets are allocated but not yet written), which will become path."""
    size = 0
    try:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            size = os.fstat(fd).st_size
            reserve_fd(fd, size)
        finally:
            os.close(fd)
    except OSError as exc:
        remove_quietly(tmp)  # first: the free space reported is then the real one
        raise storage_error(exc, "write", path, size) from None


def commit(tmp: str, path: str) -> None:
    """Make the finished file tmp the file at path: fsync, rename, fsync the directory."""
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        raise storage_error(exc, "write", path) from None


def remove_quietly(path: str) -> None:
    """Remove a temporary file if it is there (on an error path: never raises)."""
    with contextlib.suppress(OSError):
        os.remove(path)


def check_writable(path: str) -> None:
    """Refuse early a file that cannot be created at path: UsageError if its directory is
    missing or path is a directory; StorageError if the directory is on a read-only file
    system or not writable by us (what the write itself would meet: EROFS, EACCES)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a file name")
    if not os.path.isdir(directory):
        raise UsageError(f"{path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        read_only = os.statvfs(directory).f_flag & os.ST_RDONLY
        code = errno.EROFS if read_only else errno.EACCES
        raise storage_error(OSError(code, os.strerror(code)), "write", path)


def fsync_directory(directory: str) -> None:
    """Make renames and links in directory durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bytes(path: str, what: str = "file") -> bytes:
    """The whole file at path; UsageError if it is missing, a directory or unreadable."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not {what}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def strict_json(obj: Any, indent: int | None = None) -> str:
    """JSON that every parser accepts: NaN and infinities become null."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def read_json(path: str, what: str = "file") -> Any:
    """The JSON document at path; UsageError if it is missing, unreadable or not JSON."""
    try:
        return json.loads(read_bytes(path, what))
    except ValueError:
        raise UsageError(f"{path} is not JSON") from None


def write_json(path: str, obj: Any, indent: int | None = None) -> None:
    """obj as strict JSON to the file at path (replaced atomically), or to standard output
    if path is "-" (one JSON document, nothing else: see text_stream). Every command's
    --json goes through here, so `-` means the same for all of them."""
    text = strict_json(obj, indent)
    if path == STDOUT:
        say(text, sys.stdout)
    else:
        write_atomically(path, (text + "\n").encode(), "write")


def text_stream(json_path: str | None) -> TextIO:
    """Where a command with a --json option writes its human-readable text: standard
    output, or standard error when `--json -` takes standard output for the JSON."""
    return sys.stderr if json_path == STDOUT else sys.stdout
