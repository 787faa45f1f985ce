"""Validation: which training rows are held out, and early stopping on their loss.

--val-fraction F holds out sampler.holdout(seed, n, F) of the n training rows
(a function of those three only, the same set for any P); the epochs train on
the others, and every epoch ends with the held-out rows evaluated like the test
split (step.evaluate over their list). A strictly lower loss than the best so
far is a new best (the session saves it as RUN_DIR/best.h5, a checkpoint file
like the others) and resets the count of stale epochs; with --early-stopping
PATIENCE, that many stale epochs in a row end the run normally (exit 0). The
best loss, its epoch and the count live in every checkpoint, so a resume counts
on exactly where the run stood. All ranks decide alike: the loss
they compare is the reduced one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpinn.base.errors import UsageError
from mpinn.data.sampler import holdout


def held_out_rows(seed: int, n: int, fraction: float, shuffle: str = "global") -> np.ndarray:
    """The validation rows (sorted file rows of the train split; with --shuffle feistel
    from its own permutation: sampler.holdout); UsageError if a non-zero fraction leaves
    no validation rows or no training rows."""
    held = holdout(seed, n, fraction, shuffle)
    if fraction and len(held) == 0:
        raise UsageError(f"--val-fraction (val_fraction) {fraction} of {n} training rows "
                         f"holds out no row (round({fraction} x {n}) = 0); give a larger "
                         f"fraction")
    if fraction and len(held) == n:
        raise UsageError(f"--val-fraction (val_fraction) {fraction} of {n} training rows "
                         f"holds out every row and leaves none to train on; give a smaller "
                         f"fraction")
    return held


@dataclass(kw_only=True)
class EarlyStopping:
    """The best validation loss so far, its epoch and the stale epochs since."""

    patience: int  # stale epochs that end the run; 0: never (the best is still tracked)
    best_loss: float = float("inf")
    best_epoch: int = 0  # 1-based; 0: no validation loss seen yet
    stale: int = 0

    def observe(self, loss: float | None, epoch: int) -> bool:
        """After epoch `epoch` (1-based) with validation loss `loss` (None: no rows):
        True if it is a new best, strictly lower than every earlier one."""
        if loss is None:
            return False
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.stale = loss, epoch, 0
            return True
        self.stale += 1
        return False

    @property
    def exhausted(self) -> bool:
        """PATIENCE epochs in a row without a new best: the run ends here."""
        return bool(self.patience) and self.stale >= self.patience

    def summary(self, val_rows: int, epoch: int) -> dict:
        """summary.json's validation entries (after `epoch` completed epochs)."""
        return {"val_rows": val_rows, "stopped_early": self.exhausted,
                "stopped_epoch": epoch if self.exhausted else None,
                "best_epoch": self.best_epoch or None,
                "best_val_loss": self.best_loss if self.best_epoch else None}
