"""A run's checkpoint history: RUN_DIR/checkpoints/step-NNNNNNNNN.h5, the last few kept,
with RUN_DIR/checkpoint.h5 a hard link to the newest; and the way back to the newest
intact one when checkpoint.h5 is corrupt (its digest does not match: checkpoint.py).
Rank 0 only, no MPI."""

from __future__ import annotations

import contextlib
import os
import re
import sys

from mpinn.base.errors import UsageError
from mpinn.base.files import fsync_directory, storage_error, temp_path, write_atomically
from mpinn.run import checkpoint
from mpinn.run.checkpoint import Checkpoint

STEP_FILE = re.compile(r"step-(\d{9,})\.h5")


class History:
    """The checkpoint files of one run directory (its lock held)."""

    def __init__(self, out: str, folder: str, link: str, keep: int) -> None:
        self.out, self.folder, self.link, self.keep = out, folder, link, keep

    def save(self, step: int, image: bytes) -> str:
        """A new checkpoint file of a step (its bytes: checkpoint.image), checkpoint.h5
        pointed at it, then old ones pruned.

        Pruning comes last and keeps the newest `keep` files up to this step, so the
        checkpoint just written is never removed. Files of later steps are leftovers
        of a run killed between writing a file and pointing checkpoint.h5 at it (the
        run resumed from an earlier one): they go, and this run writes them anew.
        """
        path = os.path.join(self.folder, f"step-{step:09d}.h5")
        write_atomically(path, image, "write checkpoint")
        tmp = temp_path(self.link)
        try:
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.link(path, tmp)
            os.replace(tmp, self.link)
            fsync_directory(self.out)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise storage_error(exc, "update", self.link) from None
        self._prune(step)
        return path

    def load(self) -> Checkpoint:
        """--resume: checkpoint.h5, or, if it cannot be read (corrupt), the newest of
        checkpoints/ that can, with a one-line warning naming both. UsageError naming
        them all if none can."""
        try:
            return checkpoint.load(self.link)
        except UsageError as exc:
            failures = [str(exc)]
        for path in self.files():
            if os.path.exists(self.link) and os.path.samefile(path, self.link):
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

    def files(self) -> list[str]:
        """The kept checkpoint files, newest first."""
        found = self._steps()
        return [os.path.join(self.folder, n) for n in sorted(found, key=found.get,
                                                             reverse=True)]

    def clear(self) -> None:
        """Remove every file of the history (--overwrite)."""
        for name in os.listdir(self.folder):
            os.remove(os.path.join(self.folder, name))

    def _steps(self) -> dict[str, int]:
        return {n: int(m.group(1)) for n in os.listdir(self.folder)
                if (m := STEP_FILE.fullmatch(n))}

    def _prune(self, step: int) -> None:
        """Keep the newest `keep` checkpoint files up to `step`; a file that cannot be
        removed costs disk space, not the run: a warning."""
        found = self._steps()
        kept = sorted((n for n in found if found[n] <= step), key=found.get)[-self.keep:]
        for name in sorted(set(found) - set(kept)):
            try:
                os.remove(os.path.join(self.folder, name))
            except OSError as exc:
                print(f"mpinn: warning: {storage_error(exc, 'remove old checkpoint', name)}",
                      file=sys.stderr, flush=True)
