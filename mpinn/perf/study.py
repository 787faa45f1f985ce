"""What a scaling study ran: its finished trainings (Run), and the report's lines on
the set-up (data, model, optimizer with the rate each point trained with, the sweeps)
and on the environment (MPI and its transports, BLAS, hosts, software), from the
manifests and the runs' summaries. Serial, no MPI.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpinn import __version__
from mpinn.perf.scaling import MODES


@dataclass
class Run:
    """One finished training of a sweep."""

    mode: str
    ranks: int
    repeat: int
    path: str
    summary: dict
    sweep: str


def setup_lines(manifests: list[dict], runs: list[Run]) -> list[str]:
    """What was trained: data, model, optimizer, how the sweeps launched."""
    first = manifests[0]
    data, cfg = first["dataset"], first["train_config"]
    params = runs[0].summary["params"]
    layers = "-".join(map(str, [data["features"], *cfg["hidden"], data["outputs"] or "?"]))
    lines = [f"- **data**: `{data['path']}`: {data['train_rows']} training rows x "
             f"{data['features']} features, {data['outputs']} "
             f"{'classes' if data['task'] == 'classification' else 'targets'}; "
             f"{data['test_rows']} test rows",
             f"- **model**: {layers} ({cfg['activation']}, {cfg['dtype']}, {params} "
             f"parameters, {cfg['loss']}); Allreduce of "
             f"{runs[0].summary['allreduce_bytes_per_step']} bytes per step",
             f"- **optimizer**: {cfg['optimizer']}, {learning_rates(manifests, runs)}"
             + (f", momentum {cfg['momentum']:g}" if cfg["optimizer"] == "momentum" else "")
             + f", {cfg['epochs']} epoch{'s' if cfg['epochs'] != 1 else ''} per run, "
             f"shuffle {cfg['shuffle']}, io {cfg['io']}"]
    for m in manifests:
        lines.append(f"- **sweep** `{m['directory']}`: {', '.join(m['modes'])}; ranks "
                     f"{', '.join(map(str, m['ranks']))}; {m['repeats']} repeat"
                     f"{'s' if m['repeats'] > 1 else ''}; launcher `{m['launcher']}`; "
                     f"driver on {m['driver_host']}; mpinn {m['mpinn_version']}")
    return lines


def learning_rates(manifests: list[dict], runs: list[Run]) -> str:
    """The rate each point trained with (its runs' summaries): 'lr 0.01', or where weak
    scaling scales it, 'lr: strong 0.01; weak 0.01 at 1, 0.02 at 2 ranks (linear
    scaling: 0.01 x global batch / 30)'."""
    base = manifests[0]["train_config"]["lr"]
    used: dict[str, dict[int, float]] = {}
    for r in sorted(runs, key=lambda r: (MODES.index(r.mode), r.ranks)):
        used.setdefault(r.mode, {})[r.ranks] = r.summary.get("lr", base)
    if all(lr == base for rates in used.values() for lr in rates.values()):
        return f"lr {base:g}"
    told = [f"{mode} {rates[min(rates)]:g}" if len(set(rates.values())) == 1 else
            f"{mode} " + ", ".join(f"{lr:g} at {p}" for p, lr in rates.items()) + " ranks"
            for mode, rates in used.items()]
    rules = {p["base_batch"] for m in manifests for p in m["points"]
             if p.get("lr_scaling") == "linear"}
    rule = f" (linear scaling: {base:g} x global batch / {rules.pop()})" if len(rules) == 1 else ""
    return "lr: " + "; ".join(told) + rule


def environment_lines(runs: list[Run]) -> list[str]:
    """The software and hardware the runs report (distinct values over all runs)."""
    def distinct(values) -> str:
        return "; ".join(dict.fromkeys(str(v) for v in values))
    envs = [r.summary.get("environment", {}) for r in runs]
    device = [line.split(":", 1)[1].strip() for e in envs
              for line in e.get("mpi_version", "").splitlines() if line.startswith("MPICH Device")]
    variables = {k: v for e in envs for k, v in e.get("variables", {}).items()}
    hosts = sorted({h for r in runs for h in r.summary["hosts"]})
    return [f"- **MPI**: {distinct(r.summary['mpi'] for r in runs)}"
            + (f" (device {distinct(device)})" if device else ""),
            "- **transport**: shared memory between ranks of one host"
            + ("; between hosts, the network" if any(len(r.summary["hosts"]) > 1 for r in runs)
               else " (every run on one host)")
            + (", chosen by " + ", ".join(f"`{k}={v}`" for k, v in variables.items())
               if variables else ", with the MPI library's defaults"),
            f"- **BLAS**: {distinct(e.get('blas', '?') for e in envs)}, "
            f"{distinct(e.get('blas_threads', '?') for e in envs)} thread(s) per rank",
            f"- **hosts**: {', '.join(hosts)}",
            f"- **software**: mpinn "
            f"{distinct(r.summary.get('mpinn_version', __version__) for r in runs)}, Python "
            f"{distinct(e.get('python', '?') for e in envs)}, NumPy "
            f"{distinct(e.get('numpy', '?') for e in envs)}"]
