"""The run directory: its files, named once here, and the run that holds it. Rank 0 only,
no MPI.

    RUN_DIR/config.toml           the resolved configuration
    RUN_DIR/metrics.jsonl         one JSON object per epoch
    RUN_DIR/summary.json          written at the end
    RUN_DIR/checkpoints/step-NNNNNNNNN.h5   the last `keep_checkpoints` checkpoints
    RUN_DIR/checkpoint.h5         a hard link to the newest of them (history.py)
    RUN_DIR/best.h5               --val-fraction: the checkpoint of the best epoch
    RUN_DIR/.lock                 held by the run using the directory (lock.py)

Every file is replaced atomically (files.write_atomically; the link too: a new link
under a temporary name, renamed over the old one), so a reader or a crash sees the old
version or the new one. Before anything is written the run takes the directory's lock,
removes temporary files of killed runs and checks that it can write both directories,
so a refused write shows at the start, not an epoch later. The session (train/) calls
these on rank 0 through collectives.root_tries, so all ranks learn of a failure alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable

from mpinn.base.errors import UsageError
from mpinn.base.files import remove_orphans, storage_error, strict_json, temp_path, write_atomically
from mpinn.run.config import TrainConfig
from mpinn.run.history import History
from mpinn.run.lock import FLOCK_NAME, RunLock

CONFIG, METRICS, SUMMARY = "config.toml", "metrics.jsonl", "summary.json"
CHECKPOINT, BEST, HISTORY = "checkpoint.h5", "best.h5", "checkpoints"
OLD_RUN_FILES = (CHECKPOINT, SUMMARY, METRICS, CONFIG, BEST)
WRITE_PROBE = "write-probe"
# temporary files of this module's writers (files.temp_path; `checkpoint.h5.tmp-PID`
# without the dot from earlier versions), and nothing else: other programs may share
# the directory
TEMP_FILES = re.compile(r"\.{0,2}(" + "|".join(map(re.escape, (*OLD_RUN_FILES, WRITE_PROBE)))
                        + r"|step-\d+\.h5)\.tmp-\d+")


def checkpoint_path(out: str) -> str:
    return os.path.join(out, CHECKPOINT)


def attempt(action: str, path: str, operation: Callable[..., object], *args, **kwargs) -> None:
    """operation(*args, **kwargs), with a refused write turned into a StorageError."""
    try:
        operation(*args, **kwargs)
    except OSError as exc:
        raise storage_error(exc, action, path) from None


def tidy(directory: str) -> None:
    """Remove temporary files of killed runs, then prove that a file can be created."""
    remove_orphans(directory, TEMP_FILES)
    probe = temp_path(os.path.join(directory, "." + WRITE_PROBE))
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    os.remove(probe)


class RunDir:
    """The files of one run directory, for the run that holds its lock."""

    def __init__(self, out: str, keep_checkpoints: int) -> None:
        self.out = out
        self.history = History(out, os.path.join(out, HISTORY), checkpoint_path(out),
                               keep_checkpoints)
        self.metrics: list[str] = []  # metrics.jsonl's lines, rewritten whole each epoch
        self.lock = RunLock(out)
        self.created: list[str] = []  # folders taking the directory created (see abandon)
        self.created_lock = False  # and whether it created the lock file
        self.old_run = False  # --overwrite of a run, not yet removed (remove_old_run)

    @classmethod
    def open(cls, cfg: TrainConfig) -> RunDir:
        """Create or reuse cfg.out for this run: lock it, tidy it, check it is writable.

        UsageError (nothing modified) if another run holds it, if it holds a run
        and neither --resume nor --overwrite was given, or if --resume finds no
        checkpoint; StorageError if the file system refuses.
        """
        run = cls(cfg.out, cfg.keep_checkpoints)
        if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
            raise UsageError(f"--out {cfg.out} exists and is not a directory")
        run.created = [p for p in (cfg.out, run.history.folder) if not os.path.exists(p)]
        run.created_lock = not os.path.exists(os.path.join(cfg.out, FLOCK_NAME))
        try:
            attempt("create run directory", cfg.out, os.makedirs, run.history.folder,
                    exist_ok=True)
            attempt("write in run directory", cfg.out, run.lock.acquire)
            exists = os.path.exists(checkpoint_path(cfg.out))
            if cfg.resume and not exists:
                raise UsageError(f"--resume: {cfg.out} holds no {CHECKPOINT} to resume from")
            if exists and not (cfg.resume or cfg.overwrite):
                raise UsageError(f"{cfg.out} already holds a run ({CHECKPOINT}); continue it "
                                 f"with --resume, replace it with --overwrite, or choose "
                                 f"another --out")
            for directory in (run.out, run.history.folder):
                attempt("write in", directory, tidy, directory)
            run.old_run = exists and cfg.overwrite
        except BaseException:
            run.abandon()
            raise
        return run

    def remove_old_run(self) -> None:
        """--overwrite: remove the old run's files, once nothing can refuse the new run
        any more (a refused --overwrite keeps the old run)."""
        if self.old_run:
            attempt("remove the old run in", self.out, self._remove_old_run)
            self.old_run = False

    def abandon(self) -> None:
        """Release the directory of a run refused before it wrote anything, and remove
        what taking it created (the lock file, then an empty checkpoints/ and run
        directory): a refused command leaves the file system as it found it."""
        self.lock.release(remove=self.created_lock)
        for path in reversed(self.created):  # innermost first
            with contextlib.suppress(OSError):  # a folder someone else filled meanwhile stays
                os.rmdir(path)
        self.created, self.created_lock = [], False

    def _remove_old_run(self) -> None:
        """--overwrite: nothing of the old run may mix with the new."""
        self.history.clear()
        for name in OLD_RUN_FILES:
            if os.path.exists(os.path.join(self.out, name)):
                os.remove(os.path.join(self.out, name))

    def close(self) -> None:
        self.lock.release()

    def write_config(self, text: str) -> None:
        write_atomically(os.path.join(self.out, CONFIG), text.encode(), "write")

    def keep_metrics(self, completed_epochs: int) -> None:
        """On resume: metrics.jsonl's lines of the epochs the checkpoint holds (a crash
        may have left a later epoch's line, or a cut one: they are dropped)."""
        path = os.path.join(self.out, METRICS)
        if not os.path.exists(path):
            return
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    if json.loads(line)["epoch"] <= completed_epochs:
                        self.metrics.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue

    def append_metrics(self, record: dict) -> None:
        """Add an epoch's line; the file is replaced whole, so every line is always valid."""
        self.metrics.append(strict_json(record) + "\n")
        write_atomically(os.path.join(self.out, METRICS), "".join(self.metrics).encode(),
                         "write")

    def write_summary(self, summary: dict) -> None:
        write_atomically(os.path.join(self.out, SUMMARY),
                         (strict_json(summary, indent=2) + "\n").encode(), "write")

    def save_best(self, image: bytes) -> str:
        """best.h5: a checkpoint (its bytes: checkpoint.image) of the best epoch so far."""
        path = os.path.join(self.out, BEST)
        write_atomically(path, image, "write checkpoint")
        return path


def holds_run(out: str) -> bool:
    """Whether the directory out holds a run that --resume can continue."""
    history = os.path.join(out, HISTORY)
    return (os.path.exists(os.path.join(out, CONFIG)) or os.path.exists(checkpoint_path(out))
            or (os.path.isdir(history) and any(os.scandir(history))))
