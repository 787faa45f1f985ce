"""`mpinn export`: a trained model in a format serving stacks read.

    mpinn export runs/a model.onnx                 # ONNX (pip install 'mpinn[onnx]')
    mpinn export runs/a model.npz --format npz     # plain arrays + their JSON description

The model is a run directory's best.h5 if early stopping kept one, else its
checkpoint.h5, or a checkpoint file as given. Where the training file was
standardized by `mpinn data import --standardize` (its input_mean and input_std
attributes), the exported model takes raw inputs: the standardization is folded
into the first layer,

    ((x - m) / s) W0 + b0 = x (W0 / s[:, None]) + (b0 - (m / s) W0),

so nothing but matrix products runs before it. A classifier ends in a softmax
(probabilities); a regression model's outputs stay linear. The ONNX graph takes
float32 rows (a float64 model casts them) and names its output `probabilities` or
`outputs`; it carries the class names as metadata.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from mpinn.base.errors import UsageError
from mpinn.base.files import check_writable, write_atomically
from mpinn.base.hdf5 import hdf5_errors, open_hdf5
from mpinn.data import probe
from mpinn.data.layout import names_text
from mpinn.run import checkpoint
from mpinn.run.resolve import tomllib
from mpinn.train.predict import load_checkpoint

FORMATS = ("onnx", "npz")
OPSET = 13
ONNX_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


def preprocessing(ckpt: checkpoint.Checkpoint, data: str | None) -> dict:
    """The training file's class names and standardization (none if it has neither):
    from `data`, else from the file the run's configuration names."""
    if data is None:
        try:
            data = tomllib.loads(ckpt.config).get("data") if ckpt.config else None
        except tomllib.TOMLDecodeError:
            data = None
    if data is None:
        return {"data": None}
    if not os.path.exists(data):
        raise UsageError(f"the training file {data} is gone: give its copy with --data FILE "
                         f"(its class names and standardization go into the export)")
    probe.check(data)
    with open_hdf5(data) as f, hdf5_errors(data, "its attributes"):
        names, mean, std = (f.attrs.get(k) for k in ("class_names", "input_mean", "input_std"))
    found = {"data": data}
    if names is not None:
        found["class_names"] = names_text(names)
    if mean is not None and std is not None:
        mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        if mean.shape != (ckpt.arch.sizes[0],) or std.shape != mean.shape or not (std > 0).all():
            raise UsageError(f"{data}: input_mean/input_std do not fit the model's "
                             f"{ckpt.arch.sizes[0]} inputs")
        found["input_mean"], found["input_std"] = mean, std
    return found


def folded(ckpt: checkpoint.Checkpoint, prep: dict) -> list[np.ndarray]:
    """W0, b0, W1, b1, ... with the standardization folded into W0 and b0 (float64)."""
    weights = [np.asarray(w, np.float64) for w in ckpt.weights]
    if "input_mean" in prep:
        m, s = prep["input_mean"], prep["input_std"]
        w0 = weights[0]
        weights[0], weights[1] = w0 / s[:, None], weights[1] - (m / s) @ w0
    return weights


def export(path: str, out: str, fmt: str = "onnx", data: str | None = None) -> str:
    """Write the model of path (run directory or checkpoint) to out; a line saying what."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: choose from {', '.join(FORMATS)}")
    check_writable(out)
    ckpt, which = load_checkpoint(path, best=True)
    prep = preprocessing(ckpt, data)
    payload = onnx_bytes(ckpt, prep) if fmt == "onnx" else npz_bytes(ckpt, prep)
    write_atomically(out, payload)
    arch = ckpt.arch
    return (f"wrote {out}: {'-'.join(map(str, arch.sizes))} {arch.activation} "
            f"({arch.dtype}) from {ckpt.path or path} ({which} model, epoch {ckpt.epoch})"
            + ("; standardization folded into the first layer" if "input_mean" in prep else "")
            + ("; softmax outputs" if arch.loss == "cross-entropy" else "; linear outputs"))


def description(ckpt: checkpoint.Checkpoint, prep: dict) -> dict:
    arch = ckpt.arch
    return {"format": "mpinn-mlp", "sizes": list(arch.sizes), "activation": arch.activation,
            "loss": arch.loss, "dtype": arch.dtype,
            "output": "softmax" if arch.loss == "cross-entropy" else "linear",
            "class_names": prep.get("class_names"),
            "standardize": "input_mean" in prep, "epoch": ckpt.epoch, "step": ckpt.step,
            "layers": "h = activation(h @ W{i} + b{i}) for every layer but the last; "
                      "with standardize, h0 = (x - input_mean) / input_std"}


def npz_bytes(ckpt: checkpoint.Checkpoint, prep: dict) -> bytes:
    """The weights as they are (W{i}, b{i}), the standardization, and `architecture`: a
    JSON text (np.load reads it without pickles)."""
    arrays = {f"{k}{i // 2}": w for i, (k, w) in
              enumerate(zip(["W", "b"] * len(ckpt.weights), ckpt.weights))}
    for key in ("input_mean", "input_std"):
        if key in prep:
            arrays[key] = prep[key]
    arrays["architecture"] = np.array(json.dumps(description(ckpt, prep)))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def onnx_bytes(ckpt: checkpoint.Checkpoint, prep: dict) -> bytes:
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise UsageError("ONNX export needs the onnx package: pip install 'mpinn[onnx]' (or "
                         "--format npz)") from None
    arch = ckpt.arch
    dtype = np.float64 if arch.dtype == "float64" else np.float32
    weights = [w.astype(dtype) for w in folded(ckpt, prep)]
    nodes, h = [], "x"
    if dtype == np.float64:
        nodes.append(helper.make_node("Cast", ["x"], ["x64"], to=TensorProto.DOUBLE))
        h = "x64"
    inits = []
    layers = len(weights) // 2
    for i in range(layers):
        inits += [numpy_helper.from_array(weights[2 * i], f"W{i}"),
                  numpy_helper.from_array(weights[2 * i + 1], f"b{i}")]
        nodes.append(helper.make_node("Gemm", [h, f"W{i}", f"b{i}"], [f"z{i}"]))
        h = f"z{i}"
        if i < layers - 1:
            nodes.append(helper.make_node(ONNX_ACTIVATIONS[arch.activation], [h], [f"h{i}"]))
            h = f"h{i}"
    output = "outputs"
    if arch.loss == "cross-entropy":
        output = "probabilities"
        nodes.append(helper.make_node("Softmax", [h], [output], axis=-1))
    else:
        nodes.append(helper.make_node("Identity", [h], [output]))
    elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "mpinn_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                           ["N", arch.sizes[0]])],
        [helper.make_tensor_value_info(output, elem, ["N", arch.sizes[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="mpinn")
    model.ir_version = min(model.ir_version, 8)  # readable by older runtimes too
    meta = {"mpinn": json.dumps(description(ckpt, prep))}
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model.SerializeToString()

