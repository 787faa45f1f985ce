"""`mpinn export`: the ONNX graph (run by onnxruntime) and the npz arrays give what
`mpinn predict` gives, on raw inputs where the training file was standardized."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from test_import import table

from conftest import mpinn, ok

# the onnx extra and onnxruntime (`make install` has them); under CI=true a skip fails
onnx = pytest.importorskip("onnx", reason="pip install 'mpinn[onnx,test]' (make install)")
onnxruntime = pytest.importorskip("onnxruntime",
                                  reason="pip install 'mpinn[onnx,test]' (make install)")
fast = pytest.mark.fast


def onnx_run(path, x: np.ndarray) -> tuple[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.get_outputs()[0].name, session.run(None, {"x": x.astype(np.float32)})[0]


def predicted(cli, run, data, tmp_path) -> np.ndarray:
    ok(cli("predict", run, data, tmp_path / "p.h5"))
    with h5py.File(tmp_path / "p.h5", "r") as f:
        return f["outputs"][...]


def test_csv_to_onnx_round_trip(cli, tmp_path):
    """CSV with a header and string labels -> import -> 2 ranks train -> export ->
    onnxruntime on the raw CSV rows agrees with predict on the imported ones."""
    x, _ = table(tmp_path / "d.csv", rows=400, features=5)
    ok(cli("data", "import", tmp_path / "d.h5", "--from", tmp_path / "d.csv",
           "--test-fraction", 0.25, "--standardize"))
    ok(mpinn(2, "train", tmp_path / "d.h5", "--out", tmp_path / "run", "--hidden", "16,8",
             "--epochs", 3, "--activation", "tanh", timeout=180))
    text = ok(cli("export", tmp_path / "run", tmp_path / "m.onnx")).stdout
    assert "standardization folded" in text and "softmax" in text
    ok(cli("data", "import", tmp_path / "all.h5", "--from", tmp_path / "d.csv", "--like",
           tmp_path / "d.h5"))  # every row, standardized as in training
    name, probabilities = onnx_run(tmp_path / "m.onnx", x)
    assert name == "probabilities"
    assert np.allclose(probabilities, predicted(cli, tmp_path / "run", tmp_path / "all.h5",
                                                tmp_path), atol=1e-5)
    assert np.allclose(probabilities.sum(1), 1, atol=1e-6)
    model = onnx.load(tmp_path / "m.onnx")
    assert model.opset_import[0].version >= 13
    meta = json.loads({p.key: p.value for p in model.metadata_props}["mpinn"])
    assert meta["class_names"] == ["setosa", "versicolor", "virginica"]


@fast
def test_float64_regression_stays_linear(cli, tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 3)) * 50 + 1000
    rows = np.column_stack([x, x @ [0.01, -0.02, 0.03]])
    np.savetxt(tmp_path / "r.csv", rows, delimiter=",", header="a,b,c,t", comments="")
    ok(cli("data", "import", tmp_path / "r.h5", "--from", tmp_path / "r.csv", "--regression",
           "--standardize", "--test-fraction", 0.2))
    ok(cli("train", tmp_path / "r.h5", "--out", tmp_path / "run", "--loss", "mse", "--dtype",
           "float64", "--hidden", 8, "--epochs", 2))
    ok(cli("export", tmp_path / "run", tmp_path / "r.onnx"))
    ok(cli("data", "import", tmp_path / "all.h5", "--from", tmp_path / "r.csv",
           "--regression", "--like", tmp_path / "r.h5"))
    name, outputs = onnx_run(tmp_path / "r.onnx", x)
    assert name == "outputs" and outputs.dtype == np.float64  # the input cast, not the output
    expected = predicted(cli, tmp_path / "run", tmp_path / "all.h5", tmp_path)
    assert np.allclose(outputs, expected, rtol=1e-5, atol=1e-5)


@fast
def test_npz_arrays_and_their_description(cli, tmp_path, synth):
    ok(cli("train", synth, "--out", tmp_path / "run", "--hidden", "8,6", "--epochs", 1,
           "--activation", "sigmoid"))
    ok(cli("export", tmp_path / "run", tmp_path / "m.npz", "--format", "npz"))
    z = np.load(tmp_path / "m.npz", allow_pickle=False)
    arch = json.loads(str(z["architecture"]))
    assert arch["sizes"] == [12, 8, 6, 4] and arch["output"] == "softmax"
    assert not arch["standardize"] and "input_mean" not in z
    with h5py.File(synth, "r") as f:
        h = f["test/x"][...].astype(np.float64)
    for i in range(3):  # the forward pass the description states, written here
        h = h @ z[f"W{i}"] + z[f"b{i}"]
        if i < 2:
            h = 1 / (1 + np.exp(-h))
    h = np.exp(h - h.max(1, keepdims=True))
    assert np.allclose(h / h.sum(1, keepdims=True), predicted(cli, tmp_path / "run", synth,
                                                              tmp_path), atol=1e-6)


@fast
def test_export_refuses_what_it_cannot_do(cli, tmp_path, synth):
    result = cli("export", tmp_path / "nothing", tmp_path / "m.onnx")
    assert result.returncode == 2 and "nothing" in result.stderr
    ok(cli("train", synth, "--out", tmp_path / "run", "--hidden", 4, "--epochs", 0))
    result = cli("export", tmp_path / "run", tmp_path / "m.onnx", "--data",
                 tmp_path / "gone.h5")
    assert result.returncode == 2 and "gone.h5" in result.stderr
    assert not (tmp_path / "m.onnx").exists()
