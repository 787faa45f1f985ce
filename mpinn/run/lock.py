"""One run per directory: an exclusive lock that rank 0 holds for the life of a run.

Two ways:

- `flock` (the default): an exclusive, non-blocking flock(2) on RUN_DIR/.lock.
  The kernel drops it when the holder dies, however it dies (kill -9 included),
  so it is never stale. The holder writes its host, PID and start time into
  the file, so that a refused run can name it.
- `file`: a lock file RUN_DIR/.lock.pid created with O_EXCL, naming the same
  holder (and its SLURM job). Used where the file system refuses flock (Lustre
  mounted without `flock`, some NFS set-ups: ENOLCK, EOPNOTSUPP, ENOSYS), and
  wherever MPINN_LOCK=file asks for it: on file systems where flock succeeds
  but only locks within one node (NFS with local_lock=flock, Lustre with
  localflock), a run on another node would not see a flock. In this mode the
  flock is taken too where it works, and a flock run refuses to start beside a
  live lock file: runs using either way exclude each other, except a flock run
  beside a lock-file run on a node where flock fails (the same file system
  mounted differently on different nodes: set MPINN_LOCK=file everywhere then).

A lock file is stale, and replaced, when its holder is a process of this host
that is gone (or a new process that reuses its PID), a run killed between
creating the file and writing its name (an empty file, a minute old), or an
earlier incarnation of this SLURM job (a lower SLURM_RESTART_COUNT: a requeued
job may start on another node, and SLURM ends the old one first). A holder on
another host cannot be checked from here: the refusal says how to remove the
file. Breaking a stale lock happens under a second, short-lived lock (a
directory made with mkdir), so two runs that both find it stale cannot both
take it.

The .lock file stays in the directory after the run; .lock.pid is removed by its
holder. A run refused before it wrote anything removes the .lock it created, while
still holding it (release(remove=True)); a run that takes the flock checks that the
file it locked is still the one named .lock, and locks anew if it was removed
meanwhile: two runs never hold locks on two different files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time

from mpinn.base.errors import UsageError

FLOCK_NAME, PID_NAME = ".lock", ".lock.pid"
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
BREAK_SECONDS = 30  # a break lock older than this was left by a killed run
UNNAMED_SECONDS = 60  # an empty lock file older than this was left by a killed run


def same_file(path: str, fd: int) -> bool:
    """Whether path still names the file open as fd."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def slurm_incarnation() -> tuple[str, int] | None:
    """(job id, restart count) of the SLURM job this process runs in, or None."""
    job = os.environ.get("SLURM_JOB_ID")
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return (job, int(restarts) if restarts.isdigit() else 0) if job else None


def holder_text() -> str:
    """Who holds a lock: host, process, its start time (PID reuse shows in it), job."""
    pid = os.getpid()
    job = slurm_incarnation()
    return (f"host={socket.gethostname()} pid={pid} start={process_start(pid)} "
            f"job={f'{job[0]}.{job[1]}' if job else '-'} "
            f"since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n")


def fields(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def process_start(pid: int) -> str:
    """The start time of a process in clock ticks since boot ('' if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def describe(holder: dict[str, str]) -> str:
    if "pid" not in holder:
        return "another run (it has not written its name yet)"
    return (f"the run of PID {holder['pid']} on host {holder.get('host', '?')} "
            f"(since {holder.get('since', '?')})")


def stale(holder: dict[str, str]) -> bool:
    """Whether a lock file's holder is certainly gone (see the module docstring)."""
    job, (held_id, _, held_restarts) = slurm_incarnation(), holder.get("job", "").partition(".")
    if job and held_id == job[0] and held_restarts.isdigit() and int(held_restarts) < job[1]:
        return True  # an earlier incarnation of this requeued job: SLURM ended it
    if holder.get("host") != socket.gethostname() or not holder.get("pid", "").isdigit():
        return False
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    current = process_start(pid)
    return bool(current) and current != holder.get("start")  # the PID was reused


class RunLock:
    """Held from acquire() until release() or the process's end."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.method = ""
        self._flock_fd: int | None = None
        self._pid_fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise UsageError naming the run that holds it."""
        method = os.environ.get("MPINN_LOCK", "auto")
        if method not in ("auto", "file"):
            raise UsageError(f"MPINN_LOCK must be auto or file, not {method!r}")
        try:
            flocked = self._flock()
            if method == "file" or not flocked:
                self._pid_file()
            else:
                self._no_live_pid_file()
        except BaseException:
            self.release()
            raise
        self.method = "flock" if method == "auto" and flocked else "file"
        return self

    def release(self, remove: bool = False) -> None:
        """Release the lock; remove: also remove the .lock file, while still holding it
        (a run refused before it wrote anything, which created the file)."""
        if remove and self._flock_fd is not None and same_file(
                os.path.join(self.directory, FLOCK_NAME), self._flock_fd):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.directory, FLOCK_NAME))
        if self._pid_fd is not None:
            path = os.path.join(self.directory, PID_NAME)
            with contextlib.suppress(OSError):  # only our own file, not a successor's
                if os.stat(path).st_ino == os.fstat(self._pid_fd).st_ino:
                    os.remove(path)
            os.close(self._pid_fd)
            self._pid_fd = None
        if self._flock_fd is not None:
            os.close(self._flock_fd)  # drops the flock
            self._flock_fd = None

    def _flock(self) -> bool:
        """Take the flock: False if the file system refuses flock, UsageError if another
        run holds it."""
        path = os.path.join(self.directory, FLOCK_NAME)
        for _ in range(50):  # the file was removed between our open and our lock: anew
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                raise UsageError(self._refusal(describe(fields(holder)))) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in NO_FLOCK:
                    return False
                raise
            if same_file(path, fd):
                self._flock_fd = fd
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder_text().encode(), 0)
                return True
            os.close(fd)
        raise UsageError(self._refusal("other runs starting at the same moment"))

    def _pid_file(self) -> None:
        path = os.path.join(self.directory, PID_NAME)
        for _ in range(50):  # a stale file is broken, then created anew
            try:
                self._pid_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._refuse_live(path)
                continue
            os.write(self._pid_fd, holder_text().encode())
            os.fsync(self._pid_fd)
            return
        raise UsageError(self._refusal("other runs starting at the same moment"))

    def _no_live_pid_file(self) -> None:
        """Holding the flock: refuse if a live lock-file run (where flock fails) holds it."""
        path = os.path.join(self.directory, PID_NAME)
        if os.path.exists(path):
            self._refuse_live(path)

    def _refuse_live(self, path: str) -> None:
        """UsageError if the lock file names a live holder; break it if it is stale."""
        try:
            text, age = read_text(path), time.time() - os.stat(path).st_mtime
        except FileNotFoundError:  # released meanwhile
            return
        holder = fields(text)
        if stale(holder) or (not text.strip() and age > UNNAMED_SECONDS):
            break_stale(path, text)
            return
        raise UsageError(self._refusal(describe(holder)) + (
            "" if holder.get("host") == socket.gethostname() else
            f"; if no run is using the directory, remove {path}"))

    def _refusal(self, who: str) -> str:
        return (f"run directory {self.directory} is in use by {who}: one run per directory; "
                f"wait for it to end, or choose another --out")


def break_stale(path: str, seen: str) -> None:
    """Remove a stale lock file, if it still holds what was judged stale.

    Under a break lock (mkdir is atomic), so that of two runs which both judged
    the file stale, the second re-reads it, finds the first one's new holder
    and leaves it alone. A break lock left by a killed run expires.
    """
    guard = path + ".break"
    try:
        os.mkdir(guard)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - os.stat(guard).st_mtime > BREAK_SECONDS:
                # renamed first: of several that find it expired, one removes it
                expired = f"{guard}.expired-{os.getpid()}"
                os.rename(guard, expired)
                os.rmdir(expired)
        time.sleep(0.05)
        return
    try:
        if read_text(path) == seen:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(guard)


def read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""
