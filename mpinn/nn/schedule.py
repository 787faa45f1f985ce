"""Learning-rate schedules: the rate of every global step, as pure functions (no MPI).

With base rate r (after --lr-scaling linear: r = lr x batch_size / base_batch),
warmup W steps, T total steps (epochs x steps per epoch) and step s counted
from 0:

    warmup (s < W):   r (s + 1) / W           linear from 0; step W-1 has r
    constant:         r
    step:             r gamma^floor((s - W) / every)
    cosine:           m + (r - m) (1 + cos(pi (s - W) / (T - 1 - W))) / 2
                      so step W has r and the last step T - 1 has m = lr_min

A resume with a different T (more --epochs) stretches cosine from where it
was: an anchor (a, r_a) -- the resumed step and the rate it had under the old
schedule -- replaces (W, r), and the rate decays from r_a at step a to m at the
new last step. The anchor lives in the checkpoint (lr_anchor_step, lr_anchor_rate),
so a later resume continues the stretched schedule exactly. (Steps before the
anchor are never asked for again: their rates are in metrics.jsonl.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LR_SCHEDULES = ("constant", "step", "cosine")
LR_SCALINGS = ("none", "linear")


@dataclass(frozen=True)
class Schedule:
    rate: float  # the base rate r (scaled)
    kind: str = "constant"  # constant | step | cosine
    total: int = 1  # T: steps of the whole run
    warmup: int = 0
    every: int = 0  # step: decay period
    gamma: float = 0.1
    lr_min: float = 0.0
    anchor: tuple[int, float] | None = None  # cosine stretched at (step, rate)

    def __call__(self, step: int) -> float:
        if self.anchor is not None and step >= self.anchor[0]:
            return cosine(step - self.anchor[0], self.total - 1 - self.anchor[0],
                          self.anchor[1], self.lr_min)
        if step < self.warmup:
            return self.rate * (step + 1) / self.warmup
        if self.kind == "step":
            return self.rate * self.gamma ** ((step - self.warmup) // self.every)
        if self.kind == "cosine":
            return cosine(step - self.warmup, self.total - 1 - self.warmup, self.rate,
                          self.lr_min)
        return self.rate

    def stretched(self, step: int, total: int) -> Schedule:
        """This schedule continued at `step` over a new total: cosine keeps its rate at
        `step` and decays to lr_min at the new end (warmup steps are not stretched)."""
        if self.kind != "cosine" or total == self.total:
            return self
        if step <= self.warmup and self.anchor is None:
            return Schedule(**{**self.__dict__, "total": total})
        return Schedule(**{**self.__dict__, "total": total, "anchor": (step, self(step))})

    def describe(self) -> str:
        text = {"constant": "constant", "cosine": f"cosine to {self.lr_min:g} at step "
                f"{self.total}", "step": f"x{self.gamma:g} every {self.every} steps"}[self.kind]
        if self.warmup:
            text = f"linear warmup over {self.warmup} steps, then {text}"
        if self.anchor is not None:
            text += (f" (stretched at resume: from {self.anchor[1]:.6g} at step "
                     f"{self.anchor[0] + 1})")
        return text


def cosine(done: int, span: int, start: float, end: float) -> float:
    """start at done = 0, end at done = span (and after), half a cosine between."""
    if span <= 0 or done >= span:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * done / span))


def scaled_rate(lr: float, scaling: str, batch_size: int, base_batch: int) -> float:
    """--lr-scaling linear: lr x batch_size / base_batch (Goyal et al. 2017)."""
    return lr * batch_size / base_batch if scaling == "linear" else lr
