"""One run per directory: an exclusive lock that rank 0 holds for the life of a run.

Two ways, chosen automatically:

- `flock`: an exclusive, non-blocking flock(2) on RUN_DIR/.lock. The kernel
  drops it when the holder dies, however it dies (kill -9 included), so a lock
  is never stale. The holder writes its host, PID and start time into the file,
  so a refused run can name it.
- `file`: where the file system refuses flock (Lustre mounted without `flock`,
  some NFS set-ups: ENOLCK, EOPNOTSUPP, ENOSYS), a lock file RUN_DIR/.lock.pid
  created with O_EXCL that names the same holder. It is stale when it names this
  host and that process is gone (or is another process with the same PID); then
  it is replaced. A holder on another host cannot be checked from here: the
  message says so and how to remove the file. Set MPINN_LOCK=file to use this
  way on file systems where flock succeeds but only locks within one node
  (NFS with local_lock=flock, Lustre with localflock): a run on another node
  would not see such a lock.

The lock files stay in the directory after the run (removing a flock file
while another process opens it would let two runs lock two different files);
`.lock.pid` is removed by its holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time

from .errors import UsageError

FLOCK_NAME, PID_NAME = ".lock", ".lock.pid"
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def holder_text() -> str:
    """Who holds a lock: this host, process and its start time (PID reuse shows in it)."""
    return f"host={socket.gethostname()} pid={os.getpid()} start={process_start(os.getpid())} " \
           f"since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n"


def process_start(pid: int) -> str:
    """The start time of a process in clock ticks since boot ('' if it does not exist)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def describe(text: str) -> str:
    fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
    if not fields:
        return "another run (it has not written its name yet)"
    return f"the run of PID {fields.get('pid', '?')} on host {fields.get('host', '?')} " \
           f"(since {fields.get('since', '?')})"


class RunLock:
    """Held from acquire() until release() or the process's end."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.method = ""
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise UsageError naming the run that holds it."""
        method = os.environ.get("MPINN_LOCK", "auto")
        if method not in ("auto", "flock", "file"):
            raise UsageError(f"MPINN_LOCK must be auto, flock or file, not {method!r}")
        if method != "file":
            try:
                return self._flock()
            except OSError as exc:
                if method == "flock" or exc.errno not in NO_FLOCK:
                    raise
        return self._pid_file()

    def release(self) -> None:
        if self._fd is None:
            return
        if self.method == "file":
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.directory, PID_NAME))
        os.close(self._fd)  # also drops a flock
        self._fd = None

    def _flock(self) -> RunLock:
        path = os.path.join(self.directory, FLOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise UsageError(self._refusal(describe(holder))) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder_text().encode(), 0)
        self._fd, self.method = fd, "flock"
        return self

    def _pid_file(self) -> RunLock:
        path = os.path.join(self.directory, PID_NAME)
        for _ in range(2):  # a stale file is replaced once
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(path)
                if not stale(holder):
                    raise UsageError(self._refusal(describe(holder)) + (
                        f"; if no run is using the directory, remove {path}"
                        if "host=" + socket.gethostname() + " " not in holder else "")) from None
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            os.write(fd, holder_text().encode())
            os.fsync(fd)
            self._fd, self.method = fd, "file"
            return self
        raise UsageError(self._refusal("another run that is starting at the same moment"))

    def _refusal(self, who: str) -> str:
        return (f"run directory {self.directory} is in use by {who}: one run per directory; "
                f"wait for it to end, or choose another --out")


def stale(holder: str) -> bool:
    """Whether a lock file names a process of this host that no longer runs."""
    fields = dict(item.split("=", 1) for item in holder.split() if "=" in item)
    if fields.get("host") != socket.gethostname() or not fields.get("pid", "").isdigit():
        return False
    return process_start(int(fields["pid"])) != fields.get("start")


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
