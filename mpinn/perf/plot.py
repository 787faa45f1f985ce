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

from mpinn.base.errors import UsageError
from mpinn.base.files import check_writable, read_bytes, write_atomically
from mpinn.run.rundir import METRICS

SPLITS = ("train", "val", "test")
PANELS = (("loss", "loss"), ("accuracy", "accuracy"), ("f1", "macro F1"))


def read_metrics(run_dir: str) -> list[dict]:
    """The epoch records of a run directory's metrics.jsonl (UsageError naming a bad line)."""
    path = os.path.join(run_dir, METRICS)
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


def load_pyplot(what: str = "mpinn plot"):
    """matplotlib's pyplot on the Agg backend, or a UsageError saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError(f"{what}: matplotlib cannot be imported here ({exc}): install it "
                         f"with pip install 'mpinn[plot]' (or pip install "
                         f"matplotlib)") from None
    return plt


def save_figure(plt, fig, path: str) -> str:
    """Write fig as a PNG to path atomically, and close it."""
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    write_atomically(path, image.getbuffer(), "write")
    return path


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
    return save_figure(plt, fig, out)


def plot_scaling(rows: list[dict], projection: list[dict] | None, out_dir: str,
                 phases: tuple[str, ...], projection_label: str | None = None) -> list[str]:
    """The scaling report's pictures from its points (report.py): throughput.png,
    efficiency.png and phases.png in out_dir, with the cost model's prediction.png and
    projection.png where the sweep was calibrated (titled with projection_label, what
    its links rest on, if given); returns their paths."""
    plt = load_pyplot("the scaling plots")
    figures = [("throughput", (draw_throughput,), rows),
               ("efficiency", (draw_efficiency,), rows),
               ("phases", (draw_phases,), (rows, phases))]
    if any("predicted" in r for r in rows):
        figures.append(("prediction", (draw_prediction,), rows))
    if projection:
        figures.append(("projection", (draw_projection, draw_projected_rate),
                        (projection, rows)))
    written = []
    for name, draws, data in figures:
        fig, axes = plt.subplots(1, len(draws), figsize=(6.4 * len(draws), 4.2),
                                 squeeze=False)
        for ax, draw in zip(axes[0], draws):
            draw(ax, data)
        if name == "projection" and projection_label:
            fig.suptitle(f"projection: {projection_label}")
        written.append(save_figure(plt, fig, os.path.join(out_dir, f"{name}.png")))
    return written


def by_mode(rows: list[dict]) -> dict[str, list[dict]]:
    modes: dict[str, list[dict]] = {}
    for row in rows:
        modes.setdefault(row["mode"], []).append(row)
    return modes


def rank_axis(ax, rows: list[dict]) -> None:
    """Rank counts on a log2 axis, labelled with the counts themselves."""
    ranks = sorted({r["ranks"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(n) for n in ranks])
    ax.minorticks_off()
    ax.set_xlabel("ranks")
    ax.grid(alpha=0.3)


def mark_oversubscribed(ax, group: list[dict], key: str) -> None:
    crowded = [r for r in group if r["oversubscribed"]]
    if crowded:
        ax.scatter([r["ranks"] for r in crowded], [r[key] for r in crowded], s=120,
                   facecolors="none", edgecolors="red", zorder=3, label="oversubscribed")


def draw_throughput(ax, rows: list[dict]) -> None:
    """samples/s against ranks (min-max over repeats as error bars, none for a point run
    once: one run has no spread), with the ideal: the fewest ranks' throughput times the
    rank ratio."""
    for mode, group in by_mode(rows).items():
        x = [r["ranks"] for r in group]
        y = [r["samples_per_s"] for r in group]
        err = [[r["samples_per_s"] - r["samples_per_s_min"] if r["repeats"] > 1 else float("nan")
                for r in group],
               [r["samples_per_s_max"] - r["samples_per_s"] if r["repeats"] > 1 else float("nan")
                for r in group]]
        line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{mode}")
        base = group[0]
        ax.plot(x, [base["samples_per_s"] * n / base["ranks"] for n in x], linestyle="--",
                color=line[0].get_color(), alpha=0.6, label=f"{mode}, ideal")
        mark_oversubscribed(ax, group, "samples_per_s")
    rank_axis(ax, rows)
    ax.set_yscale("log")
    ax.set_ylabel("samples/s")
    ax.set_title("throughput")
    ax.legend()


def draw_efficiency(ax, rows: list[dict]) -> None:
    """Parallel efficiency S(P)/P against ranks; 1 is ideal."""
    for mode, group in by_mode(rows).items():
        ax.plot([r["ranks"] for r in group], [r["efficiency"] for r in group], marker="o",
                label=mode)
        mark_oversubscribed(ax, group, "efficiency")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    rank_axis(ax, rows)
    ax.set_ylim(0, max(1.1, max(r["efficiency"] for r in rows) * 1.05))
    ax.set_ylabel("parallel efficiency")
    ax.set_title("efficiency (strong: speedup / ranks; weak: scaled)")
    ax.legend()


def draw_phases(ax, data: tuple[list[dict], tuple[str, ...]]) -> None:
    """A stacked bar per point: the step's phases (mean over ranks), and hatched on
    top the cross-rank imbalance (mean over phases of slowest minus mean)."""
    rows, phases = data
    labels = [f"{r['mode'][0]}{r['ranks']}" + ("*" if r["oversubscribed"] else "")
              for r in rows]
    bottom = [0.0] * len(rows)
    for phase in phases:
        heights = [r[f"{phase}_s"] * 1e3 for r in rows]
        ax.bar(labels, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.bar(labels, [r["imbalance_s"] * 1e3 for r in rows], bottom=bottom, fill=False,
           hatch="//", edgecolor="gray", label="imbalance")
    ax.set_ylabel("ms per step")
    ax.set_xlabel("s: strong, w: weak; ranks" + ("; *: oversubscribed"
                                                 if any(r["oversubscribed"] for r in rows)
                                                 else ""))
    ax.set_title("time per step by phase")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")


def draw_prediction(ax, rows: list[dict]) -> None:
    """Measured and predicted step per point, the error written above each pair."""
    shown = [r for r in rows if "predicted" in r]
    labels = [f"{r['mode'][0]}{r['ranks']}" for r in shown]
    x = range(len(shown))
    ax.bar([i - 0.2 for i in x], [r["step_s"] * 1e3 for r in shown], width=0.4,
           label="measured")
    ax.bar([i + 0.2 for i in x], [r["predicted_step_s"] * 1e3 for r in shown], width=0.4,
           label="predicted")
    for i, r in zip(x, shown):
        top = max(r["step_s"], r["predicted_step_s"]) * 1e3
        ax.annotate(f"{100 * r['prediction_error']:+.0f}%", (i, top), ha="center",
                    va="bottom", fontsize="small")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("s: strong, w: weak; ranks")
    ax.set_ylabel("ms per step")
    ax.set_title("cost model: predicted against measured step")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()


def draw_projection(ax, data: tuple[list[dict], list[dict]]) -> None:
    """Projected efficiency against ranks (solid), with the overlap bound (dashed) and
    the measured points (markers)."""
    projection, measured = data
    for mode in ("strong", "weak"):
        curve = [r for r in projection if r["mode"] == mode]
        if not curve:
            continue
        line = ax.plot([r["ranks"] for r in curve], [r["efficiency"] for r in curve],
                       label=f"{mode}, projected")[0]
        ax.plot([r["ranks"] for r in curve], [r["efficiency_overlap"] for r in curve],
                linestyle="--", color=line.get_color(), alpha=0.7,
                label=f"{mode}, overlap bound")
        points = [r for r in measured if r["mode"] == mode]
        ax.scatter([r["ranks"] for r in points], [r["efficiency"] for r in points],
                   color=line.get_color(), zorder=3, label=f"{mode}, measured")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, max([1.1] + [r["efficiency"] * 1.05 for r in measured]))
    ax.set_xlabel("ranks")
    ax.set_ylabel("parallel efficiency")
    ax.set_title("projection")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_projection(rows: list[dict], out_dir: str) -> str:
    """projection.png of `mpinn scaling project` (no measured points)."""
    plt = load_pyplot("the projection plot")
    fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.2))
    draw_projection(axes[0], (rows, []))
    draw_projected_rate(axes[1], (rows, []))
    return save_figure(plt, fig, os.path.join(out_dir, "projection.png"))


def draw_projected_rate(ax, data: tuple[list[dict], list[dict]]) -> None:
    """Projected samples/s against ranks, log-log, with the overlap bound and the
    measured points."""
    projection, measured = data
    for mode in ("strong", "weak"):
        curve = [r for r in projection if r["mode"] == mode]
        if not curve:
            continue
        x = [r["ranks"] for r in curve]
        line = ax.plot(x, [r["samples_per_s"] for r in curve], label=f"{mode}, projected")[0]
        ax.plot(x, [r["samples_per_s_overlap"] for r in curve], linestyle="--",
                color=line.get_color(), alpha=0.7, label=f"{mode}, overlap bound")
        points = [r for r in measured if r["mode"] == mode]
        ax.scatter([r["ranks"] for r in points], [r["samples_per_s"] for r in points],
                   color=line.get_color(), zorder=3, label=f"{mode}, measured")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks")
    ax.set_ylabel("samples/s")
    ax.set_title("projected throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
