"""Using a trained model: distributed evaluation of a checkpoint, and prediction.

    mpiexec -n 2 mpinn evaluate runs/a data.h5          # a run directory: its checkpoint.h5
    mpiexec -n 2 mpinn evaluate runs/a data.h5 --json scores.json   # also as JSON
    mpinn predict runs/a/checkpoint.h5 inputs.h5 predictions.h5

Rank 0 reads the checkpoint and broadcasts it (one small pickle for the
metadata, one buffer Bcast for the flat weights), so a thousand ranks do not
all open the same file.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from mpinn.base import files
from mpinn.base.errors import UsageError
from mpinn.base.files import check_writable
from mpinn.base.hdf5 import hdf5_errors, open_hdf5
from mpinn.base.reserved import allocated, new_hdf5
from mpinn.comm import collectives, console
from mpinn.comm.world import Comm
from mpinn.data import probe
from mpinn.data.layout import Problem, check_data
from mpinn.data.readers import DataFile, resolve_io
from mpinn.nn import metrics
from mpinn.nn.model import MLP
from mpinn.run import checkpoint
from mpinn.run.rundir import HISTORY, checkpoint_path
from mpinn.train.step import evaluate

EVAL_ROWS = 4096  # rows per forward pass when evaluating or predicting


def load_checkpoint(path: str) -> checkpoint.Checkpoint:
    """The checkpoint of a file or run directory; a corrupt one of a run directory is
    refused with a pointer to the run's older checkpoints."""
    try:
        return checkpoint.load(checkpoint_file(path))
    except checkpoint.CorruptCheckpoint as exc:
        if not os.path.isdir(path):
            raise
        raise checkpoint.CorruptCheckpoint(f"{exc}; the run's older checkpoints are in "
                                           f"{os.path.join(path, HISTORY)}") from None


def checkpoint_file(path: str) -> str:
    """A checkpoint file, or a run directory meaning its checkpoint.h5."""
    if not os.path.isdir(path):
        return path
    if not os.path.exists(checkpoint_path(path)):
        raise UsageError(f"{path} is a directory without a checkpoint.h5 (give a checkpoint "
                         f"file, or a run directory)")
    return checkpoint_path(path)


def load_model(comm: Comm, path: str) -> tuple[MLP, str]:
    """Collective: the checkpoint's model on every rank, and its task."""
    ckpt = collectives.root_tries(comm, lambda: load_checkpoint(path))
    arch, task = collectives.broadcast_object(comm, (ckpt.arch, ckpt.task) if ckpt else None)
    model = MLP(arch, EVAL_ROWS)
    if ckpt is not None:
        ckpt.restore(model)
    collectives.broadcast(comm, model.params)
    return model, task


def run_evaluate(comm: Comm, ckpt_path: str, data_path: str, split: str,
                 io: str = "auto", json_path: str | None = None) -> dict:
    """Collective: loss and accuracy (classification: also macro precision, recall, F1
    and the confusion matrix) of a checkpoint on a split, printed by rank 0 and, with
    json_path, written there by rank 0 (atomically, strict JSON; "-": to standard output,
    the text then to standard error)."""
    io = resolve_io(io)
    if json_path not in (None, files.STDOUT):
        collectives.root_tries(comm, lambda: check_writable(json_path))
    model, task = load_model(comm, ckpt_path)
    problem: Problem = check_data(comm, data_path, model.arch.loss,
                                  features=model.arch.sizes[0], outputs=model.arch.sizes[-1])
    if problem.info.task != task:
        raise UsageError(f"{data_path} is a {problem.info.task} dataset but the checkpoint "
                         f"was trained for {task}")
    with DataFile(data_path, io, comm) as datafile:
        result = evaluate(comm, model, datafile.reader(split, model.max_rows), problem)
    result = {"split": split, "ranks": comm.size, **result}
    if json_path is not None:
        collectives.root_tries(comm, lambda: files.write_json(json_path, result))
    console.print0(comm, evaluation_text(result, data_path, json_path),
                   file=files.text_stream(json_path))
    return result


def evaluation_text(result: dict, data_path: str, json_path: str | None) -> str:
    """What `mpinn evaluate` prints."""
    split = result["split"]
    if result["loss"] is None:
        return f"{split}: no rows in {data_path}, nothing to evaluate"
    text = f"{split}: {result['rows']} rows, loss {result['loss']:.6f}"
    where = "standard output" if json_path == files.STDOUT else json_path
    if result["accuracy"] is not None:
        text += f", accuracy {result['accuracy']:.4f}\n" + metrics.format_report(result)
        if json_path is not None:
            text = text.replace("(write it with --json FILE)", f"(it is in {where})")
    if json_path is not None and json_path != files.STDOUT:
        text += f"\nwritten to {json_path}"
    return text


def predict(ckpt_path: str, input_path: str, out_path: str, dataset: str | None) -> int:
    """Serial: write the model's outputs (and class predictions) for every input row."""
    ckpt = load_checkpoint(ckpt_path)
    model = MLP(ckpt.arch, EVAL_ROWS)
    ckpt.restore(model)
    probe.check(input_path)
    with open_hdf5(input_path) as src, hdf5_errors(input_path, "its input rows"):
        candidates = [dataset] if dataset else ["x", "test/x"]
        name = next((c for c in candidates if isinstance(src.get(c), h5py.Dataset)), None)
        if name is None:
            raise UsageError(f"{input_path}: no input dataset {' or '.join(candidates)} "
                             f"(choose one with --dataset)")
        x = src[name]
        if x.ndim != 2 or x.shape[1] != ckpt.arch.sizes[0]:
            raise UsageError(f"{input_path}:/{name} has shape {x.shape} but the model expects "
                             f"rows of {ckpt.arch.sizes[0]} features")
        n, k = x.shape[0], ckpt.arch.sizes[-1]
        classes = ckpt.task == "classification"

        def layout(out: h5py.File) -> None:
            allocated(out, "outputs", (n, k), ckpt.arch.dtype)
            if classes:
                allocated(out, "predictions", (n,), "int64")
            out.attrs.update(checkpoint=ckpt_path, input=f"{input_path}:/{name}",
                             outputs="class probabilities" if classes else "targets")
        check_writable(out_path)
        with new_hdf5(out_path, layout) as out:
            for first in range(0, n, EVAL_ROWS):
                with hdf5_errors(input_path, "its input rows"):  # not out_path's failure
                    rows = x[first:first + EVAL_ROWS]
                logits = model.forward(rows)
                if classes:
                    out["predictions"][first:first + len(logits)] = logits.argmax(axis=1)
                    logits = softmax(logits)
                out["outputs"][first:first + len(logits)] = logits
    return n


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
