"""Using a trained model: distributed evaluation of a checkpoint, and prediction.

    mpiexec -n 2 mpinn evaluate runs/a data.h5     # a run directory: its best.h5, if it
                                                   # kept one, else its checkpoint.h5
    mpiexec -n 2 mpinn evaluate runs/a data.h5 --split val   # the rows the run held out
    mpiexec -n 2 mpinn evaluate runs/a data.h5 --json scores.json   # also as JSON
    mpiexec -n 2 mpinn evaluate runs/a data.h5 --json - | jq .f1    # JSON alone on stdout
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
from mpinn.data.holdout import held_out_rows
from mpinn.data.layout import Problem, check_data, class_names, names_text
from mpinn.data.readers import DataFile, resolve_io
from mpinn.nn import metrics
from mpinn.nn.model import MLP
from mpinn.run import checkpoint
from mpinn.run.resolve import tomllib
from mpinn.run.rundir import BEST, HISTORY, checkpoint_path
from mpinn.train.step import evaluate

EVAL_ROWS = 4096  # rows per forward pass when evaluating or predicting
# which model of a run `mpinn evaluate` scored: a file as given, a run directory's
# best.h5 (the lowest validation loss), or its checkpoint.h5 (the newest)
GIVEN, BEST_MODEL, NEWEST = "given", "best", "newest"


def model_file(path: str, best: bool = False) -> tuple[str, str]:
    """The checkpoint file path means, and which model that is: a file as given (GIVEN);
    a run directory's checkpoint.h5 (NEWEST) or, with best, its best.h5 (BEST_MODEL: the
    epoch of the lowest validation loss) if the run kept one."""
    if not os.path.isdir(path):
        return path, GIVEN
    if best and os.path.exists(os.path.join(path, BEST)):
        return os.path.join(path, BEST), BEST_MODEL
    if not os.path.exists(checkpoint_path(path)):
        raise UsageError(f"{path} is a directory without a checkpoint.h5 (give a checkpoint "
                         f"file, or a run directory)")
    return checkpoint_path(path), NEWEST


def load_checkpoint(path: str, best: bool = False) -> tuple[checkpoint.Checkpoint, str]:
    """The checkpoint of a file or run directory (model_file), and which model it is; a
    corrupt one of a run directory is refused with a pointer to the run's others."""
    file, which = model_file(path, best)
    try:
        return checkpoint.load(file), which
    except checkpoint.CorruptCheckpoint as exc:
        if which == GIVEN:
            raise
        others = (f"its newest checkpoint is {checkpoint_path(path)}" if which == BEST_MODEL
                  else f"the run's older checkpoints are in {os.path.join(path, HISTORY)}")
        raise checkpoint.CorruptCheckpoint(f"{exc}; {others}") from None


def load_model(comm: Comm, path: str, best: bool = False
               ) -> tuple[MLP, checkpoint.Checkpoint, str]:
    """Collective: the checkpoint's model on every rank, its metadata (no arrays) and
    which model it is (load_checkpoint)."""
    loaded = collectives.root_tries(comm, lambda: load_checkpoint(path, best))
    meta, which = collectives.broadcast_object(
        comm, (loaded[0].metadata(), loaded[1]) if loaded else None)
    model = MLP(meta.arch, EVAL_ROWS)
    if loaded is not None:
        loaded[0].restore(model)
    collectives.broadcast(comm, model.params)
    return model, meta, which


def validation_rows(meta: checkpoint.Checkpoint, n_train: int, data_path: str
                    ) -> tuple[np.ndarray, dict]:
    """The train-split rows the checkpoint's run held out with --val-fraction: the rows
    it scored as val_* (data/holdout.py: a function of its seed, its fraction and the
    rows of the train split), and what the results say of them. UsageError if the run
    held out none, if the checkpoint does not record its run's settings, or if
    data_path's train split is not the size of the one the run split."""
    try:
        saved = tomllib.loads(meta.config)
    except tomllib.TOMLDecodeError:
        saved = {}
    if "val_fraction" not in saved or "seed" not in saved:
        raise UsageError(f"--split val: {meta.path} does not record which rows its run held "
                         f"out (no val_fraction and seed in its configuration; written by "
                         f"mpinn {meta.version}); evaluate --split test or train")
    fraction, seed = float(saved["val_fraction"]), int(saved["seed"])
    if not fraction:
        raise UsageError(f"--split val: the run of {meta.path} held out no validation rows "
                         f"(it trained without --val-fraction); evaluate --split test, or "
                         f"train with --val-fraction F")
    if n_train != meta.data_shape[0]:
        raise UsageError(f"--split val: {data_path} has {n_train} training rows, but the run "
                         f"of {meta.path} held out its validation rows of {meta.data_shape[0]}"
                         f"; give the data file it trained on ({saved.get('data', '?')})")
    return (held_out_rows(seed, n_train, fraction, str(saved.get("shuffle", "global"))),
            {"val_fraction": fraction, "seed": seed})


def run_evaluate(comm: Comm, ckpt_path: str, data_path: str, split: str,
                 io: str = "auto", json_path: str | None = None) -> dict:
    """Collective: loss and accuracy (classification: also macro precision, recall, F1
    and the confusion matrix) of a checkpoint (a run directory: its best.h5 if it has
    one, else its checkpoint.h5) on a split (val: the rows its run held out), printed by
    rank 0 and, with json_path, written there by rank 0 (atomically, strict JSON; "-":
    to standard output, the text then to standard error)."""
    io = resolve_io(io)
    if json_path not in (None, files.STDOUT):
        collectives.root_tries(comm, lambda: check_writable(json_path))
    model, meta, which = load_model(comm, ckpt_path, best=True)
    problem: Problem = check_data(comm, data_path, model.arch.loss,
                                  features=model.arch.sizes[0], outputs=model.arch.sizes[-1],
                                  split="train" if split == "val" else split, empty=True)
    if problem.info.task != meta.task:
        raise UsageError(f"{data_path} is a {problem.info.task} dataset but the checkpoint "
                         f"was trained for {meta.task}")
    rows, held = None, {}
    if split == "val":
        rows, held = validation_rows(meta, problem.info.n_train, data_path)
    with DataFile(data_path, io, comm) as datafile:
        reader = datafile.reader("train" if split == "val" else split, model.max_rows)
        result = evaluate(comm, model, reader, problem, rows=rows)
    names = collectives.broadcast_object(comm, collectives.root_tries(
        comm, lambda: class_names(data_path)))
    result = {"split": split, "ranks": comm.size, **held, "checkpoint": meta.path,
              "model": which, "checkpoint_epoch": meta.epoch, "checkpoint_step": meta.step,
              **result, **({"class_names": names} if names else {})}
    if json_path is not None:
        collectives.root_tries(comm, lambda: files.write_json(json_path, result))
    console.print0(comm, evaluation_text(result, data_path, json_path),
                   file=files.text_stream(json_path))
    return result


def model_line(result: dict) -> str:
    """Which model `mpinn evaluate` scored (the first line it prints)."""
    path = result["checkpoint"]
    why = {BEST_MODEL: f"the run's lowest validation loss; its newest model is "
                       f"{checkpoint_path(os.path.dirname(path))}",
           NEWEST: "the run's newest checkpoint",
           GIVEN: "the checkpoint file given"}[result["model"]]
    return (f"model: {path} (epoch {result['checkpoint_epoch']}, step "
            f"{result['checkpoint_step']}: {why})")


def evaluation_text(result: dict, data_path: str, json_path: str | None) -> str:
    """What `mpinn evaluate` prints: the model, then its scores."""
    split = result["split"]
    if result["loss"] is None:
        return f"{model_line(result)}\n{split}: no rows in {data_path}, nothing to evaluate"
    held = (f" held out by the run (val_fraction {result['val_fraction']:g}, seed "
            f"{result['seed']})" if split == "val" else "")
    text = f"{model_line(result)}\n{split}: {result['rows']} rows{held}, loss {result['loss']:.6f}"
    where = "standard output" if json_path == files.STDOUT else json_path
    if result["accuracy"] is not None:
        text += f", accuracy {result['accuracy']:.4f}\n" + metrics.format_report(result)
        if result.get("class_names"):
            text += "\nclasses: " + ", ".join(f"{k} {name}" for k, name
                                              in enumerate(result["class_names"]))
        if json_path is not None:
            text = text.replace("(write it with --json FILE)", f"(it is in {where})")
    if json_path is not None and json_path != files.STDOUT:
        text += f"\nwritten to {json_path}"
    return text


def predict(ckpt_path: str, input_path: str, out_path: str, dataset: str | None
            ) -> tuple[int, list[str] | None, str]:
    """Serial: write the model's outputs (and class predictions) for every input row;
    how many, the class names the input file carries (kept in the output too) and the
    checkpoint file used (a run directory: its best.h5 if it kept one)."""
    ckpt, _ = load_checkpoint(ckpt_path, best=True)  # a run directory: as evaluate reads it
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
        names = names_text(src.attrs.get("class_names"))
        names = names if names is not None and len(names) == k else None

        def layout(out: h5py.File) -> None:
            allocated(out, "outputs", (n, k), ckpt.arch.dtype)
            if classes:
                allocated(out, "predictions", (n,), "int64")
            out.attrs.update(checkpoint=ckpt.path or ckpt_path, input=f"{input_path}:/{name}",
                             outputs="class probabilities" if classes else "targets")
            if classes and names:
                out.attrs["class_names"] = np.array(names, dtype=h5py.string_dtype())
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
    return n, names, ckpt.path


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
