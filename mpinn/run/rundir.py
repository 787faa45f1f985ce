"""The run directory: its lock, its files, its checkpoint history. Rank 0 only, no MPI.

    RUN_DIR/config.toml           the resolved configuration
    RUN_DIR/metrics.jsonl         one JSON object per epoch
    RUN_DIR/summary.json          written at the end
    RUN_DIR/checkpoints/step-NNNNNNNNN.h5   the last `keep_checkpoints` checkpoints
    RUN_DIR/checkpoint.h5         a hard link to the newest of them
    RUN_DIR/best.h5               --val-fraction: the checkpoint of the best epoch
    RUN_DIR/.lock                 held by the run using the directory (lock.py)

Every file is replaced atomically (fileio.write_atomically; the link too: a
new link under a temporary name, renamed over the old one), so a reader or a
crash sees the old version or the new one. Before anything is written the
run takes the directory's lock, removes temporary files of killed runs and
checks that it can write both directories, so a refused write shows at the
start, not an epoch later. A resumed run whose checkpoint.h5 is corrupt (its
digest does not match: checkpoint.py) continues from the newest intact file of
checkpoints/, and says so. The session (session.py) calls these on rank 0
through dist.root_tries, so all ranks learn of a failure alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable

from mpinn.base.errors import UsageError
from mpinn.base.files import (
    fsync_directory,
    remove_orphans,
    storage_error,
    strict_json,
    temp_path,
    write_atomically,
)
from mpinn.run import checkpoint
from mpinn.run.checkpoint import Checkpoint
from mpinn.run.config import TrainConfig
from mpinn.run.lock import RunLock

OLD_RUN_FILES = ("checkpoint.h5", "summary.json", "metrics.jsonl", "config.toml", "best.h5")
# temporary files of this module's writers (fileio.temp_path; `checkpoint.h5.tmp-PID`
# without the dot from earlier versions), and nothing else: other programs may share
# the directory
STEP_FILE = re.compile(r"step-(\d{9,})\.h5")
TEMP_FILES = re.compile(r"\.{0,2}(config\.toml|metrics\.jsonl|summary\.json|checkpoint\.h5|"
                        r"best\.h5|step-\d+\.h5|write-probe)\.tmp-\d+")


def checkpoint_path(out: str) -> str:
    return os.path.join(out, "checkpoint.h5")


def attempt(action: str, path: str, operation: Callable[..., object], *args, **kwargs) -> None:
    """operation(*args, **kwargs), with a refused write turned into a StorageError."""
    try:
        operation(*args, **kwargs)
    except OSError as exc:
        raise storage_error(exc, action, path) from None


def tidy(directory: str) -> None:
    """Remove temporary files of killed runs, then prove that a file can be created."""
    remove_orphans(directory, TEMP_FILES)
    probe = temp_path(os.path.join(directory, ".write-probe"))
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    os.remove(probe)


class RunDir:
    """The files of one run directory, for the run that holds its lock."""

    def __init__(self, out: str, keep_checkpoints: int) -> None:
        self.out = out
        self.history = os.path.join(out, "checkpoints")
        self.keep = keep_checkpoints
        self.metrics: list[str] = []  # metrics.jsonl's lines, rewritten whole each epoch
        self.lock = RunLock(out)

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
        attempt("create run directory", cfg.out, os.makedirs, run.history, exist_ok=True)
        attempt("write in run directory", cfg.out, run.lock.acquire)
        try:
            exists = os.path.exists(checkpoint_path(cfg.out))
            if cfg.resume and not exists:
                raise UsageError(f"--resume: {cfg.out} holds no checkpoint.h5 to resume from")
            if exists and not (cfg.resume or cfg.overwrite):
                raise UsageError(f"{cfg.out} already holds a run (checkpoint.h5); continue it "
                                 f"with --resume, replace it with --overwrite, or choose "
                                 f"another --out")
            for directory in (run.out, run.history):
                attempt("write in", directory, tidy, directory)
            if exists and cfg.overwrite:
                attempt("remove the old run in", cfg.out, run._remove_old_run)
        except BaseException:
            run.close()
            raise
        return run

    def load_checkpoint(self) -> Checkpoint:
        """--resume: checkpoint.h5, or, if it cannot be read (corrupt), the newest of
        checkpoints/ that can, with a one-line warning naming both. UsageError naming
        them all if none can."""
        link = checkpoint_path(self.out)
        try:
            return checkpoint.load(link)
        except UsageError as exc:
            failures = [str(exc)]
        for path in self.history_files():
            if os.path.exists(link) and os.path.samefile(path, link):
                continue  # checkpoint.h5 is a link to it: the same bytes
            try:
                ckpt = checkpoint.load(path)
            except UsageError as exc:
                failures.append(str(exc))
                continue
            print(f"mpinn: warning: {failures[0]}; resuming from {path} (step {ckpt.step}), "
                  f"the newest intact checkpoint of the run", file=sys.stderr, flush=True)
            return ckpt
        raise UsageError(f"--resume: no checkpoint of {self.out} can be read: "
                         + "; ".join(failures) + "; start the run anew (--overwrite)")

    def history_files(self) -> list[str]:
        """The kept checkpoint files, newest first."""
        found = {n: int(m.group(1)) for n in os.listdir(self.history)
                 if (m := STEP_FILE.fullmatch(n))}
        return [os.path.join(self.history, n) for n in sorted(found, key=found.get,
                                                              reverse=True)]

    def _remove_old_run(self) -> None:
        """--overwrite: nothing of the old run may mix with the new."""
        for name in os.listdir(self.history):
            os.remove(os.path.join(self.history, name))
        for name in OLD_RUN_FILES:
            if os.path.exists(os.path.join(self.out, name)):
                os.remove(os.path.join(self.out, name))

    def close(self) -> None:
        self.lock.release()

    def write_config(self, text: str) -> None:
        write_atomically(os.path.join(self.out, "config.toml"), text.encode(), "write")

    def keep_metrics(self, completed_epochs: int) -> None:
        """On resume: metrics.jsonl's lines of the epochs the checkpoint holds (a crash
        may have left a later epoch's line, or a cut one: they are dropped)."""
        path = os.path.join(self.out, "metrics.jsonl")
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
        write_atomically(os.path.join(self.out, "metrics.jsonl"),
                         "".join(self.metrics).encode(), "write")

    def write_summary(self, summary: dict) -> None:
        write_atomically(os.path.join(self.out, "summary.json"),
                         (strict_json(summary, indent=2) + "\n").encode(), "write")

    def save_best(self, image: bytes) -> str:
        """best.h5: a checkpoint (its bytes: checkpoint.image) of the best epoch so far."""
        path = os.path.join(self.out, "best.h5")
        write_atomically(path, image, "write checkpoint")
        return path

    def save_checkpoint(self, step: int, image: bytes) -> str:
        """A new checkpoint file of a step (its bytes: checkpoint.image), checkpoint.h5
        pointed at it, then old ones pruned.

        Pruning comes last and keeps the newest `keep` files up to this step, so the
        checkpoint just written is never removed. Files of later steps are leftovers
        of a run killed between writing a file and pointing checkpoint.h5 at it (the
        run resumed from an earlier one): they go, and this run writes them anew.
        """
        path = os.path.join(self.history, f"step-{step:09d}.h5")
        write_atomically(path, image, "write checkpoint")
        link = checkpoint_path(self.out)
        tmp = temp_path(link)
        try:
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.link(path, tmp)
            os.replace(tmp, link)
            fsync_directory(self.out)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise storage_error(exc, "update", link) from None
        self._prune(step)
        return path

    def _prune(self, step: int) -> None:
        """Keep the newest `keep` checkpoint files up to `step`; a file that cannot be
        removed costs disk space, not the run: a warning."""
        found = {n: int(m.group(1)) for n in os.listdir(self.history)
                 if (m := STEP_FILE.fullmatch(n))}
        kept = sorted((n for n in found if found[n] <= step), key=found.get)[-self.keep:]
        for name in sorted(set(found) - set(kept)):
            try:
                os.remove(os.path.join(self.history, name))
            except OSError as exc:
                print(f"mpinn: warning: {storage_error(exc, 'remove old checkpoint', name)}",
                      file=sys.stderr, flush=True)
