"""How firm a scaling report's figures are: what report.py warns about, in report.md
and on the console, and where the projection's links come from. Serial, pure: the
report's rows and the calibration's bench comm in, sentences out.

The warnings:

- one repeat: a point measured once has no spread, so nothing tells its differences
  from noise (the machine here varies 5-10% between identical runs);
- few timed steps: a run's figures are means over its timed steps, all but the first
  (a warm-up, train.timing); under scaling.FEW_STEPS a few slow steps move them;
- a prediction off by more than MAX_PREDICTION_ERROR: the cost model's target on its
  points (docs/costmodel.md), so its projection is no firmer than that;
- a projection from shared memory only: no network was measured, so the links between
  hosts take the figures of one host's memory.
"""

from __future__ import annotations

from mpinn.perf import costmodel
from mpinn.perf.scaling import FEW_STEPS

MAX_PREDICTION_ERROR = 0.15  # |predicted / measured - 1| the cost model aims to stay under
SHM_ONLY = "shared memory only: no network was measured"


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


def report_warnings(rows: list[dict], projection_comm: dict | None) -> list[tuple[str, str]]:
    """(title, text) of each warning the report's rows call for; projection_comm: the
    bench comm the projection rests on (None: no projection)."""
    found = [("1 repeat", single_repeats(rows)), ("few timed steps", few_steps(rows)),
             ("prediction error", poor_predictions(rows))]
    if projection_comm is not None and "net" not in projection_comm["transports"]:
        found.append(("projection", f"{SHM_ONLY}; the projection beyond one host takes the "
                                    f"shared-memory figures for the network. Describe a real "
                                    f"one with mpinn scaling project --alpha --beta"))
    return [(title, text) for title, text in found if text]


def picoseconds(seconds: float) -> str:
    ps = seconds * 1e12
    return f"{ps:.3g} ps/B" if ps < 1000 else f"{ps:,.0f} ps/B"


def figures(link: costmodel.Link) -> str:
    return f"alpha {link.alpha * 1e6:.3g} us, beta {picoseconds(link.beta)}"


def measured_by(comm: dict, kind: str) -> str:
    """Where a transport's alpha and beta come from: bench comm's pair of ranks, or the
    user (mpinn scaling project)."""
    t = comm["transports"][kind]
    if "pair" not in t:
        return t.get("source", "as described")
    hosts = comm.get("hosts") or []
    where = f", across hosts {', '.join(hosts)}" if kind == "net" and hosts else ""
    return f"from bench comm's {kind} link (ranks {t['pair'][0]} and {t['pair'][1]}{where})"


def link_line(comm: dict, machine: costmodel.Machine, kind: str) -> str:
    """'network: alpha .., beta .., from bench comm's net link (..)', and whether beta
    was refitted to the Allreduce bench comm measured over that link."""
    t = comm["transports"][kind]
    link, fit = getattr(machine, kind), t.get("exchange", t)["beta_s_per_byte"]
    refit = (f"; beta refitted to the Allreduce measured over it (the exchange fit: "
             f"{picoseconds(fit)})" if link.beta != fit else "")
    name = "network" if kind == "net" else "shared memory"
    return f"{name}: {figures(link)}, {measured_by(comm, kind)}{refit}"


def link_sources(comm: dict) -> tuple[str, list[str]]:
    """A projection's label (what its links rest on) and a line per link saying where its
    figures come from: measured, described, or borrowed from the other transport."""
    machine, transports = costmodel.machine_from(comm), comm["transports"]
    if "net" not in transports:
        label = SHM_ONLY
        lines = ["network: none measured (bench comm on one host), so the links between "
                 "hosts take the shared-memory figures: what a network as fast as this "
                 "host's memory would give. Project to a real network with mpinn scaling "
                 "project --alpha --beta"]
    else:
        label = f"network {measured_by(comm, 'net')}"
        lines = [link_line(comm, machine, "net")]
    if "shm" in transports:
        lines.append(link_line(comm, machine, "shm"))
    elif "pair" in transports["net"]:
        lines.append("shared memory: none measured (one rank per host), so ranks of one "
                     "host talk at the network's figures")
    else:
        lines.append("shared memory: not described (--shm-alpha, --shm-beta), so ranks of "
                     "one host talk at the network's figures")
    lines.append(f"reduction: gamma {machine.gamma * 1e12:.3g} ps/B")
    return label, lines
