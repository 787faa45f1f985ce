"""The import of arrays (.npy pairs, .npz members, HDF5 datasets): every rank reads the
labels (the same classes and split everywhere), then writes its share of the rows in
parallel (pwrite.py), so the file does not depend on the number of ranks."""

from __future__ import annotations

import os

import numpy as np

from mpinn.base.errors import UsageError
from mpinn.comm import collectives
from mpinn.comm.world import Comm
from mpinn.data import arrays, probe
from mpinn.data.importplan import ImportSpec, Like, Plan, attributes, summary_line
from mpinn.data.labels import Classes, Moments
from mpinn.data.pwrite import write_parallel
from mpinn.data.sampler import ceil_div, share


def import_arrays(comm: Comm, spec: ImportSpec, like: Like | None) -> str:
    """Collective: arrays (.npy, .npz, HDF5) written in parallel by every rank."""
    if spec.source is not None and not spec.source.lower().endswith(".npz"):
        collectives.root_tries(comm, lambda: probe.check(spec.source))  # before any opens it
    sources = collectives.all_try(comm, open_arrays, spec)
    try:
        return write_arrays(comm, spec, like, sources)
    finally:
        for array in sources:
            array.close()


def open_arrays(spec: ImportSpec) -> list[arrays.RowArray]:
    """[x, y] or [x, y, test x, test y], each checked against the others."""
    if spec.source is None:
        found = [arrays.npy(k) for k in (spec.x, spec.y, spec.test_x, spec.test_y) if k]
    else:
        keys = [k for k in (spec.x or "x", spec.y or "y", spec.test_x, spec.test_y) if k]
        npz = spec.source.lower().endswith(".npz")
        found = [arrays.npz(spec.source, k) if npz else arrays.hdf5(spec.source, k)
                 for k in keys]
    for x, y in zip(found[::2], found[1::2]):
        if len(x) != len(y):
            raise UsageError(f"{x.name} has {len(x)} rows but {y.name} has {len(y)}")
        if x.dtype.kind not in "biuf" or len(x.shape) < 2:
            raise UsageError(f"{x.name}: inputs must be numbers, N x features (or N x ...), "
                             f"got shape {x.shape} of {x.dtype}")
        if y.dtype.kind not in "biuf" and spec.regression:
            raise UsageError(f"{y.name}: --regression needs numeric targets, got {y.dtype}")
        if len(y.shape) > (2 if spec.regression else 1):
            raise UsageError(f"{y.name}: {'targets' if spec.regression else 'labels'} must be "
                             f"N{' or N x K' if spec.regression else ''}, got shape {y.shape}")
    if len(found) == 4 and found[0].shape[1:] != found[2].shape[1:]:
        raise UsageError(f"{found[0].name} and {found[2].name} differ in shape")
    return found


def write_arrays(comm: Comm, spec: ImportSpec, like: Like | None,
                 sources: list[arrays.RowArray]) -> str:
    x = sources[0]
    features = int(np.prod(x.shape[1:]))
    if like is not None and like.features != features:
        raise UsageError(f"{x.name} has {features} features but --like {spec.like} has "
                         f"{like.features}")
    classes = Classes()
    if not spec.regression:  # every rank reads every label: the same classes everywhere
        for labels in sources[1::2]:
            for _, block in labels.spans():
                classes.collect(block)
    plan = Plan.make(spec, like, classes, len(x), len(sources[2]) if len(sources) == 4 else 0)
    picks = selection(plan, sources)
    scale = like.scale if like else None
    if spec.standardize:
        scale = training_moments(comm, picks["train"], features).standardizer()
    block_rows = max(1, (16 << 20) // (8 * features))
    specs = plan.specs(features)

    def produce(split: str, block: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys, rows = picks[split]
        chosen = rows[block * block_rows:block * block_rows + n] if rows is not None \
            else np.arange(block * block_rows, block * block_rows + n)
        xb = finite_rows(xs, xs.take(chosen).reshape(n, features), chosen)
        yb = plan.targets(ys.take(chosen), lambda r: f"{ys.name} row {chosen[r]}")
        if yb.dtype.kind == "f":
            finite_rows(ys, yb, chosen)
        return (scale(xb) if scale is not None else xb.astype(np.float32)), yb

    name = os.path.basename(spec.source) if spec.source else os.path.basename(spec.x)
    write_parallel(comm, spec.out, spec.io, specs, attributes(spec, name, plan.names, scale,
                                                              None), produce, block_rows)
    return summary_line(spec, plan, scale)


def selection(plan: Plan, sources: list[arrays.RowArray]) -> dict:
    """split -> (x array, y array, its ascending rows, or None for all of them)."""
    x, y = sources[0], sources[1]
    if len(sources) == 4:
        return {"train": (x, y, None), "test": (sources[2], sources[3], None)}
    if plan.split is None:
        return {("test" if plan.all_test else "train"): (x, y, None)}
    mask = np.zeros(len(y), bool)
    for lo, labels in y.spans():
        codes = plan.targets(labels, lambda r, lo=lo: f"{y.name} row {lo + r}")
        mask[lo:lo + len(labels)] = plan.test_mask(codes)
    return {"train": (x, y, np.flatnonzero(~mask)), "test": (x, y, np.flatnonzero(mask))}


def training_moments(comm: Comm, pick: tuple, features: int) -> Moments:
    """Collective: the moments of the training rows. They are taken in fixed blocks of
    rows, each rank its share of the blocks, and merged in block order: the same bits
    whatever the number of ranks."""
    xs, _, rows = pick
    n = len(xs) if rows is None else len(rows)
    step = max(1, arrays.SPAN_BYTES // (8 * features))
    first, last = share(ceil_div(n, step), comm.rank, comm.size)

    def read() -> list[Moments]:  # a bad row is one rank's finding: all_try tells all
        mine = []
        for block in range(first, last):
            chosen = np.arange(block * step, min(n, (block + 1) * step))
            chosen = chosen if rows is None else rows[chosen]
            mine.append(Moments())
            mine[-1].add(finite_rows(xs, xs.take(chosen).reshape(len(chosen), features),
                                     chosen))
        return mine
    mine = collectives.all_try(comm, read)
    merged = Moments()
    for blocks in collectives.gather_objects(comm, mine, "the inputs' statistics"):
        for block in blocks:
            merged.merge(block)
    return merged


def finite_rows(array: arrays.RowArray, values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values (rows `rows` of array), or a UsageError naming the first non-finite one."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0])
        raise UsageError(f"{array.name} row {rows[bad]} is not finite (NaN or infinity): fix "
                         f"or drop that row")
    return values
