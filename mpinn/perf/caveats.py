"""How firm a scaling report's figures are: what report.py warns about, in report.md
and on the console. Serial, pure: the report's rows in, sentences out.

The warnings:

- one repeat: a point measured once has no spread, so nothing tells its differences
  from noise (the machine here varies 5-10% between identical runs);
- few timed steps: a run's figures are means over its timed steps, all but the first
  (a warm-up, train.timing); under scaling.FEW_STEPS a few slow steps move them;
- a prediction off by more than MAX_PREDICTION_ERROR: the cost model's target on its
  points (docs/costmodel.md), so its projection is no firmer than that.
"""

from __future__ import annotations

from mpinn.perf.scaling import FEW_STEPS

MAX_PREDICTION_ERROR = 0.15  # |predicted / measured - 1| the cost model aims to stay under


def timed_steps(summary: dict) -> int:
    """The steps a run's timings are the mean of: those it trained (this run, older
    summaries: all) but the first, a warm-up left out of every figure."""
    return summary.get("steps_this_run", summary["steps"]) - 1


def point_name(row: dict) -> str:
    """'strong, 2 ranks' (with its hosts when there are several)."""
    hosts = f" on {row['hosts']} hosts" if row["hosts"] > 1 else ""
    return f"{row['mode']}, {row['ranks']} rank{'s' if row['ranks'] > 1 else ''}{hosts}"


def single_repeats(rows: list[dict]) -> str | None:
    once = [point_name(r) for r in rows if r["repeats"] == 1]
    if not once:
        return None
    which = "every point" if len(once) == len(rows) else "; ".join(once)
    return (f"{which} ran once: no spread (min-max) to tell a difference from "
            f"noise. Run the same `mpinn scaling run` command with --repeats 3: it keeps the "
            f"finished runs and adds two of each point")


def few_steps(rows: list[dict]) -> str | None:
    few = [f"{point_name(r)} ({r['steps_timed']})" for r in rows
           if r["steps_timed"] < FEW_STEPS]
    if not few:
        return None
    return (f"{'; '.join(few)}: fewer than {FEW_STEPS} steps timed per run (a run's first "
            f"step is a warm-up, left out), so a few slow steps move the figures. Give the "
            f"sweep more --epochs (in a new --out: other settings are another sweep)")


def poor_predictions(rows: list[dict]) -> str | None:
    off = [f"{point_name(r)} ({100 * r['prediction_error']:+.1f}%: "
           f"{r['predicted_step_s'] * 1e3:.3g} ms predicted, {r['step_s'] * 1e3:.3g} ms "
           f"measured)" for r in rows
           if "predicted" in r and abs(r["prediction_error"]) > MAX_PREDICTION_ERROR]
    if not off:
        return None
    return (f"{'; '.join(off)}: the cost model misses by more than "
            f"{100 * MAX_PREDICTION_ERROR:.0f}%, and the projection rests on the same model: "
            f"read it with that error")


def report_warnings(rows: list[dict]) -> list[tuple[str, str]]:
    """(title, text) of each warning the report's rows call for."""
    found = [("1 repeat", single_repeats(rows)), ("few timed steps", few_steps(rows)),
             ("prediction error", poor_predictions(rows))]
    return [(title, text) for title, text in found if text]
