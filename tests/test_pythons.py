"""mpinn under each Python that `make test` built a venv for (tests/infra/pythons.sh: the
oldest that setup.cfg declares and the newest on the machine). The fast tier ran there
in-process; here real jobs run under that interpreter: data, a 2-rank training, its
resume (the TOML it reads back) and a scaling sweep (its manifest)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import child_env, ok, run, unavailable

ROOT = Path(__file__).resolve().parent.parent
VENVS = sorted(ROOT.glob(".venv-py3*/.mpinn-installed-pip"))


def declared_oldest() -> str:
    match = re.search(r"python_requires\s*=\s*>=\s*(3\.\d+)", (ROOT / "setup.cfg").read_text())
    assert match, "setup.cfg declares python_requires = >=3.X"
    return match.group(1)


def test_the_oldest_declared_python_has_a_venv():
    oldest = declared_oldest()
    if not (ROOT / f".venv-py{oldest.replace('.', '')}" / ".mpinn-installed-pip").exists():
        unavailable(f"a venv of Python {oldest}", "run `make test-pythons` (builds "
                    f".venv-py{oldest.replace('.', '')} with a Python {oldest} on this machine)")


@pytest.mark.parametrize("venv", [s.parent for s in VENVS], ids=lambda v: v.name)
def test_jobs_run_under_the_venvs_python(venv, tmp_path):
    bin_ = venv / "bin"
    version = run([bin_ / "python", "-c", "import sys; print('%d%d' % sys.version_info[:2])"])
    assert venv.name == f".venv-py{version.stdout.strip()}", version.stdout
    env = child_env()
    env.pop("MPINN_MPIEXEC", None)
    data, out = tmp_path / "d.h5", tmp_path / "run"
    ok(run([bin_ / "mpinn", "data", "synth", data, "--samples", 400, "--features", 6,
            "--classes", 3], env=env))
    train = [bin_ / "mpiexec", "-n", 2, bin_ / "mpinn", "train", "--out", out]
    ok(run([*train[:-2], data, "--out", out, "--hidden", 8, "--epochs", 1], env=env))
    resumed = ok(run([*train, "--resume", "--epochs", 2], env=env))
    assert "epoch 2/2" in resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["resumed_from_step"] > 0, summary
    sweep = tmp_path / "sweep"
    ok(run([bin_ / "mpinn", "scaling", "run", data, "--out", sweep, "--ranks", "1,2",
            "--mode", "strong", "--epochs", 1, "--hidden", 8, "--no-calibrate",
            "--progress", "off"], env=env, timeout=180))
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert [p["state"] for p in manifest["points"]] == ["done", "done"]
    assert manifest["updated"].endswith("+00:00")  # timezone-aware, on every Python



@pytest.mark.parametrize("venv", [s.parent for s in VENVS], ids=lambda v: v.name)
def test_a_venv_is_never_reused_by_another_interpreter(venv):
    """`make install PYTHON=<this venv's interpreter> VENV=<a venv of another>` stops,
    says why, and leaves that venv as it was."""
    base = run([venv / "bin" / "python", "-c", "import sys; print(sys._base_executable)"])
    other = next((v.parent for v in VENVS if v.parent != venv), ROOT / ".venv")
    stamp = other / ".mpinn-installed-pip"
    before = stamp.stat().st_mtime_ns
    result = run(["make", "--no-print-directory", "-C", ROOT, "install",
                  f"PYTHON={base.stdout.strip()}", f"VENV={other.name}"])
    assert result.returncode == 2, result
    assert f"{other.name} was built with Python" in result.stderr, result.stderr
    assert "choose another VENV=" in result.stderr
    assert stamp.stat().st_mtime_ns == before
