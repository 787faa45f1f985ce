"""A run's learning curves as a PNG: loss, accuracy and macro F1 per epoch for the
training, validation (`val_*` keys, when the run has them) and test splits, from the run
directory's metrics.jsonl. Serial, no MPI.

    mpinn plot runs/a                     # writes runs/a/metrics.png
    mpinn plot runs/a --out curves.png

matplotlib is an optional extra (`pip install 'mpinn[plot]'`); it draws with the Agg
backend, so no display is needed.
"""

from __future__ import annotations

import io
import json
import os

from .errors import UsageError
from .fileio import check_writable, read_bytes, write_atomically

SPLITS = ("train", "val", "test")
PANELS = (("loss", "loss"), ("accuracy", "accuracy"), ("f1", "macro F1"))


def read_metrics(run_dir: str) -> list[dict]:
    """The epoch records of a run directory's metrics.jsonl (UsageError naming a bad line)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir} is not a run directory")
    records = []
    for number, line in enumerate(read_bytes(path, "metrics file").decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise UsageError(f"{path}, line {number}: not an epoch record")
        records.append(record)
    if not records:
        raise UsageError(f"{path} holds no epochs yet: nothing to plot")
    return records


def load_pyplot():
    """matplotlib's pyplot on the Agg backend, or a UsageError saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError(f"mpinn plot needs matplotlib, which cannot be imported here ({exc}): "
                         f"install it with pip install 'mpinn[plot]' (or pip install "
                         f"matplotlib)") from None
    return plt


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Write the run's curves to out (default RUN_DIR/metrics.png); returns the path."""
    records = read_metrics(run_dir)
    out = out or os.path.join(run_dir, "metrics.png")
    check_writable(out)
    plt = load_pyplot()
    panels = [(key, title) for key, title in PANELS
              if any(r.get(f"{split}_{key}") is not None for r in records for split in SPLITS)]
    if not panels:
        raise UsageError(f"{run_dir}: its epochs hold no scores to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for split in SPLITS:
            points = [(r["epoch"], r[f"{split}_{key}"]) for r in records
                      if r.get(f"{split}_{key}") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    write_atomically(out, image.getbuffer(), "write")
    return out
