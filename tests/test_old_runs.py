"""Runs that mpinn wrote before the package layout (tests/fixtures/preempted-run, made by
mpinn 0.1.0 with the flat tree) resume, and end with the very weights and optimizer
state of the run that was never interrupted (the oracle: that run, kept beside it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np

from conftest import HERE, mpinn, ok

FIXTURE = HERE / "fixtures" / "preempted-run"
DATA = ("--samples", 6000, "--test-samples", 300, "--features", 12, "--classes", 4,
        "--seed", 3)  # the fixture's data file, made anew (synth is a function of these)
# The BLAS the fixture was made with: float64 GEMMs of other kernels may round otherwise
FIXTURE_BLAS = ("SkylakeX", "0.3.31")


def datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by name."""
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[...])
                     if isinstance(obj, h5py.Dataset) else None)
    return found


def same_blas() -> bool:
    """Whether NumPy's BLAS here is the fixture's (threadpoolctl names its kernels)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return True
    return any(i.get("architecture") == FIXTURE_BLAS[0]
               and str(i.get("version", "")).startswith(FIXTURE_BLAS[1])
               for i in threadpool_info() if i.get("internal_api") == "openblas")


def test_a_run_preempted_before_the_package_layout_resumes_bitwise(tmp_path):
    data = tmp_path / "data.h5"
    ok(mpinn(None, "data", "synth", data, *DATA))
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    result = ok(mpinn(2, "train", data, "--out", run, "--resume"))
    assert "epoch 2, step 19 of 900 (global step 919)" in result.stdout, result.stdout

    resumed, reference = (datasets(p / "checkpoint.h5") for p in (run, FIXTURE / "reference"))
    assert sorted(resumed) == sorted(reference)
    assert any(name.startswith("optimizer/") for name in resumed)  # Adam's m, v and t too
    if same_blas():
        for name, value in reference.items():
            np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    else:  # another BLAS: the same trajectory, up to its rounding
        for name, value in reference.items():
            np.testing.assert_allclose(resumed[name], value, rtol=1e-8, atol=1e-12,
                                       err_msg=name)
    with h5py.File(run / "checkpoint.h5", "r") as f:
        assert (f.attrs["epoch"], f.attrs["step"], f.attrs["step_in_epoch"]) == (2, 1800, 0)

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in
                (FIXTURE / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines[0] == json.loads((FIXTURE / "run" / "metrics.jsonl").read_text())
    # epoch 2's scores: the same model, so the same test and validation scores (their
    # losses to rounding: evaluation now sums them exactly, the fixture's in floating
    # point); its running training sums were added in another order across the stop
    # (rank 0 kept them), so those agree to rounding
    for key, value in expected[1].items():
        if key in ("seconds", "samples_per_s"):
            continue
        if key in ("test_loss", "val_loss"):
            assert np.isclose(lines[1][key], value, rtol=1e-13, atol=0), key
        elif key.startswith(("test_", "val_")) and same_blas():
            assert lines[1][key] == value, key
        elif isinstance(value, float):
            assert np.isclose(lines[1][key], value, rtol=1e-9), key
        else:
            assert lines[1][key] == value, key
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 919 and summary["steps"] == 1800
