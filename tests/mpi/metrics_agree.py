"""Run under mpiexec -n P: step.evaluate's metrics equal those of all predictions gathered.

A linear model of 5 outputs on 4-class data: output 4 copies output 0's weights with a
slightly larger bias, so class 0 (which has rows) is never predicted and class 4 (which
is predicted) has no rows. Rank 0 computes the confusion matrix, accuracy and per-class
and macro precision, recall and F1 from the gathered predictions with plain loops (the
oracle), and compares every number with the distributed evaluation. Small reads (7 rows)
make every rank read several times, the last maybe empty.
Usage: metrics_agree.py DATA.h5
"""

import dataclasses
import sys

import h5py
import numpy as np

from mpinn.comm import collectives, world
from mpinn.data.layout import check_data
from mpinn.data.readers import DataFile
from mpinn.data.sampler import share
from mpinn.nn.model import MLP, Architecture
from mpinn.train.step import evaluate

CLASSES = 5


def oracle(y: np.ndarray, predicted: np.ndarray) -> dict:
    confusion = [[0] * CLASSES for _ in range(CLASSES)]
    for t, p in zip(y, predicted):
        confusion[int(t)][int(p)] += 1
    precision, recall, f1 = [], [], []
    for c in range(CLASSES):
        tp = confusion[c][c]
        predicted_c = sum(confusion[t][c] for t in range(CLASSES))
        members_c = sum(confusion[c])
        p = tp / predicted_c if predicted_c else 0.0
        r = tp / members_c if members_c else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return {"rows": len(y), "accuracy": float(np.mean(y == predicted)), "confusion": confusion,
            "precision": {"per_class": precision, "macro": sum(precision) / CLASSES},
            "recall": {"per_class": recall, "macro": sum(recall) / CLASSES},
            "f1": {"per_class": f1, "macro": sum(f1) / CLASSES}}


def main() -> int:
    comm = world.start()
    path = sys.argv[1]
    problem = dataclasses.replace(check_data(comm, path, "cross-entropy"), outputs=CLASSES)
    arch = Architecture((problem.info.features, CLASSES), "relu", "cross-entropy", "float64")
    model = MLP(arch, 7)
    model.init(np.random.default_rng(11))
    model.W[0][:, 4] = model.W[0][:, 0]
    model.b[0][4] = model.b[0][0] + 1e-3  # output 4 always beats output 0
    with DataFile(path, "independent", comm) as datafile:
        got = evaluate(comm, model, datafile.reader("test", model.max_rows), problem)
    with h5py.File(path, "r") as f:
        start, stop = share(len(f["test/y"]), comm.rank, comm.size)
        x, y = f["test/x"][start:stop], f["test/y"][start:stop]
    mine = MLP(arch, max(1, len(x)))
    mine.params[:] = model.params
    predicted = mine.forward(x).argmax(axis=1) if len(x) else np.zeros(0, int)
    parts = collectives.gather_objects(comm, (y, predicted))
    if comm.rank == 0:
        y_all = np.concatenate([p[0] for p in parts])
        predicted_all = np.concatenate([p[1] for p in parts])
        want = oracle(y_all, predicted_all)
        column_sums = np.sum(want["confusion"], axis=0)
        assert column_sums[0] == 0 and column_sums[4] > 0, column_sums  # 0 never predicted
        assert sum(want["confusion"][4]) == 0 and sum(want["confusion"][0]) > 0  # 4: no rows
        assert got["confusion"] == want["confusion"], (got["confusion"], want["confusion"])
        assert got["rows"] == want["rows"] == int(np.sum(got["confusion"]))
        assert abs(got["accuracy"] - want["accuracy"]) < 1e-12
        for name in ("precision", "recall", "f1"):
            assert np.allclose(got[name]["per_class"], want[name]["per_class"],
                               rtol=1e-12, atol=0), (name, got[name], want[name])
            assert abs(got[name]["macro"] - want[name]["macro"]) < 1e-12, name
        print(f"metrics agree at {comm.size} ranks: {want['rows']} rows, "
              f"macro f1 {want['f1']['macro']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
