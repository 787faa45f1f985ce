"""`mpinn data import` (CSV/TSV, .npy, .npz, HDF5 of any names) and training on what it
writes: labels, the stratified split, standardization and --like checked against the
source values computed here independently; bad input is one message, exit 2, no file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import RANKS, mpinn, ok, probed
from mpinn.data.labels import Moments, StratifiedSplit

fast = pytest.mark.fast
SPECIES = np.array(["virginica", "setosa", "versicolor"])


def table(path, rows=300, features=4, header=True, sep=",", labels=SPECIES, seed=0):
    """A CSV of Gaussian features (offset, scaled) and labels drawn from `labels`;
    returns (x, label texts) as written."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.standard_normal((rows, features)) * 3 + 100, 4)
    y = labels[rng.integers(0, len(labels), rows)]
    with open(path, "w") as f:
        if header:
            f.write(sep.join([f"f{k}" for k in range(features)] + ["species"]) + "\n")
        for row, label in zip(x, y):
            f.write(sep.join([f"{v:.4f}" for v in row] + [str(label)]) + "\n")
    return x, y


def read(path):
    with h5py.File(path, "r") as f:
        return ({s: (f[s]["x"][...], f[s]["y"][...]) for s in ("train", "test") if s in f},
                dict(f.attrs))


@fast
def test_csv_labels_split_and_standardization(cli, tmp_path):
    x, y = table(tmp_path / "d.csv")
    out = tmp_path / "d.h5"
    text = ok(cli("data", "import", out, "--from", tmp_path / "d.csv", "--test-fraction", 0.25,
                  "--standardize", "--seed", 7)).stdout
    assert "3 classes (setosa, versicolor, virginica)" in text
    splits, attrs = read(out)
    names = list(attrs["class_names"].astype(str))
    assert names == sorted(SPECIES)
    codes = np.searchsorted(names, y)
    # stratified: round(F * n) test rows of every class
    for c in range(3):
        assert (splits["test"][1] == c).sum() == round(0.25 * (codes == c).sum())
    # the standardization: the training rows' statistics, undone exactly
    mean, std = attrs["input_mean"], attrs["input_std"]
    train_x = splits["train"][0] * std + mean
    assert np.allclose(splits["train"][0].mean(0), 0, atol=1e-5)
    assert np.allclose(splits["train"][0].std(0), 1, atol=1e-4)
    # every source row once, in order within its split, with its label
    both = np.concatenate([train_x, splits["test"][0] * std + mean])
    assert np.allclose(np.sort(both, axis=0), np.sort(x, axis=0), rtol=1e-6)
    test_mask = np.ones(len(x), bool)
    train_rows = [int(np.flatnonzero((np.abs(x - r) < 1e-3).all(1))[0]) for r in train_x]
    assert train_rows == sorted(train_rows)
    test_mask[train_rows] = False
    assert np.array_equal(splits["train"][1], codes[~test_mask])
    assert np.array_equal(splits["test"][1], codes[test_mask])
    assert "every value checked" in ok(cli("data", "inspect", "--check", out)).stdout


@fast
@pytest.mark.parametrize("labels,names", [
    (np.array(["-1", "1"]), ["-1", "1"]),
    (np.array(["10", "2", "1"]), ["1", "2", "10"]),  # numerically: 2 before 10
])
def test_numeric_labels_sort_numerically_without_header(cli, tmp_path, labels, names):
    _, y = table(tmp_path / "n.csv", header=False, labels=labels)
    ok(cli("data", "import", tmp_path / "n.h5", "--from", tmp_path / "n.csv"))
    splits, attrs = read(tmp_path / "n.h5")
    assert list(attrs["class_names"].astype(str)) == names
    assert splits["train"][0].shape == (300, 4) and "test" not in splits
    assert np.array_equal(np.array(names)[splits["train"][1]], y)


@fast
def test_tsv_label_by_name_and_columns(cli, tmp_path):
    x, y = table(tmp_path / "t.tsv", sep="\t", features=5)
    ok(cli("data", "import", tmp_path / "t.h5", "--from", tmp_path / "t.tsv",
           "--label", "species", "--columns", "f3,1"))
    splits, attrs = read(tmp_path / "t.h5")
    assert np.allclose(splits["train"][0], x[:, [3, 1]].astype(np.float32))
    assert list(attrs["feature_names"].astype(str)) == ["f3", "f1"]


@fast
def test_regression_targets(cli, tmp_path):
    rows = np.random.default_rng(1).standard_normal((50, 3))
    np.savetxt(tmp_path / "r.csv", rows, delimiter=",", header="a,b,target", comments="")
    ok(cli("data", "import", tmp_path / "r.h5", "--from", tmp_path / "r.csv", "--regression"))
    splits, attrs = read(tmp_path / "r.h5")
    assert splits["train"][1].shape == (50, 1) and splits["train"][1].dtype == np.float32
    assert np.allclose(splits["train"][1][:, 0], rows[:, 2], atol=1e-6)
    assert "class_names" not in attrs


BAD = {  # line, cell -> the words the one message must hold
    "ragged": ("1,2,a\n3,4\n", ["line 3", "2 fields", "3"]),
    "not a number": ("1,2,a\n3,x,b\n", ["line 3", "'f1'", "'x' is not a number"]),
    "nan": ("1,2,a\n3,nan,b\n", ["line 3", "'f1'", "not finite"]),
    "empty cell": ("1,2,a\n3,,b\n", ["line 3", "'f1'", "empty cell"]),
    "empty label": ("1,2,a\n3,4,\n", ["line 3", "'label'", "empty label"]),
}


@fast
@pytest.mark.parametrize("case", list(BAD))
def test_bad_csv_is_one_message_and_no_file(cli, tmp_path, case):
    body, words = BAD[case]
    (tmp_path / "b.csv").write_text("f0,f1,label\n" + body)
    result = cli("data", "import", tmp_path / "b.h5", "--from", tmp_path / "b.csv")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("mpinn: error:") == 1 and "b.csv" in result.stderr
    for word in words:
        assert word in result.stderr
    assert not (tmp_path / "b.h5").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "b.csv"]  # no temporary file left


@fast
@pytest.mark.parametrize("args,words", [
    (["--label", "nope"], ["--label nope", "no such column", "f0, f1, label"]),
    (["--regression"], ["'a' is not a number", "'label'"]),
    (["--test-fraction", "1.5"], ["--test-fraction must be in [0, 1)"]),
])
def test_bad_options(cli, tmp_path, args, words):
    (tmp_path / "b.csv").write_text("f0,f1,label\n1,2,a\n3,4,b\n")
    result = cli("data", "import", tmp_path / "b.h5", "--from", tmp_path / "b.csv", *args)
    assert result.returncode == 2
    assert all(w in result.stderr for w in words), result.stderr
    assert not (tmp_path / "b.h5").exists()


@fast
def test_like_applies_the_training_statistics_and_names(cli, tmp_path):
    table(tmp_path / "train.csv", seed=1)
    x_new, y_new = table(tmp_path / "new.csv", rows=40, seed=2, labels=SPECIES[:2])
    ok(cli("data", "import", tmp_path / "train.h5", "--from", tmp_path / "train.csv",
           "--standardize"))
    ok(cli("data", "import", tmp_path / "new.h5", "--from", tmp_path / "new.csv",
           "--like", tmp_path / "train.h5"))
    (_, attrs), (new, new_attrs) = read(tmp_path / "train.h5"), read(tmp_path / "new.h5")
    assert "train" not in new  # new rows: the test split, to evaluate or predict
    assert np.allclose(new["test"][0], (x_new - attrs["input_mean"]) / attrs["input_std"],
                       atol=1e-5)
    names = list(attrs["class_names"].astype(str))
    assert list(new_attrs["class_names"].astype(str)) == names  # all three, though 2 appear
    assert np.array_equal(new["test"][1], np.searchsorted(names, y_new))
    (tmp_path / "odd.csv").write_text("f0,f1,f2,f3,species\n1,2,3,4,dahlia\n")
    result = cli("data", "import", tmp_path / "odd.h5", "--from", tmp_path / "odd.csv",
                 "--like", tmp_path / "train.h5")
    assert result.returncode == 2 and "line 2" in result.stderr and "'dahlia'" in result.stderr


@fast
def test_hdf5_of_other_names_imports_and_trains(cli, tmp_path):
    rng = np.random.default_rng(3)
    with h5py.File(tmp_path / "theirs.h5", "w") as f:
        f["features"] = rng.standard_normal((200, 6))
        f["labels"] = rng.integers(1, 4, 200)  # 1..3
        f["holdout/features"] = rng.standard_normal((50, 6))
        f["holdout/labels"] = rng.integers(1, 4, 50)
    probed(tmp_path / "theirs.h5")
    refused = cli("train", tmp_path / "theirs.h5", "--out", tmp_path / "r0")
    assert refused.returncode == 2 and "mpinn data import" in refused.stderr
    ok(cli("data", "import", tmp_path / "d.h5", "--from", tmp_path / "theirs.h5", "--x",
           "/features", "--y", "/labels", "--test-x", "holdout/features", "--test-y",
           "holdout/labels"))
    splits, attrs = read(tmp_path / "d.h5")
    with h5py.File(tmp_path / "theirs.h5", "r") as f:
        assert np.array_equal(splits["test"][1], f["holdout/labels"][...] - 1)
        assert np.allclose(splits["train"][0], f["features"][...].astype(np.float32))
    ok(cli("train", tmp_path / "d.h5", "--out", tmp_path / "r", "--epochs", 1, "--hidden", 8))


@fast
def test_npz_keys(cli, tmp_path):
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((30, 2, 3)), np.array(["b", "a"] * 15)
    np.savez_compressed(tmp_path / "a.npz", inputs=x, target=y)
    ok(cli("data", "import", tmp_path / "a.h5", "--from", tmp_path / "a.npz", "--x",
           "inputs", "--y", "target"))
    splits, _ = read(tmp_path / "a.h5")
    assert np.allclose(splits["train"][0], x.reshape(30, 6).astype(np.float32))
    assert np.array_equal(splits["train"][1], (y == "b").astype(int))
    result = cli("data", "import", tmp_path / "b.h5", "--from", tmp_path / "a.npz")
    assert result.returncode == 2 and "no array 'x'" in result.stderr


@fast
def test_training_without_test_split_says_so(cli, tmp_path):
    table(tmp_path / "d.csv")
    ok(cli("data", "import", tmp_path / "d.h5", "--from", tmp_path / "d.csv"))
    text = ok(cli("train", tmp_path / "d.h5", "--out", tmp_path / "r", "--epochs", 1)).stdout
    assert "no test rows" in text and "--val-fraction" in text and "--test-fraction" in text
    import json
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["test_loss"] is None


@fast
def test_split_does_not_depend_on_blocks():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 4, 1000)
    counts = np.bincount(codes)
    whole = StratifiedSplit(counts, 0.3, 1).test_mask(codes)
    pieces = StratifiedSplit(counts, 0.3, 1)
    cut = np.concatenate([pieces.test_mask(codes[a:a + 77]) for a in range(0, 1000, 77)])
    assert np.array_equal(whole, cut)
    assert [int(whole[codes == c].sum()) for c in range(4)] == [round(0.3 * n) for n in counts]


@fast
def test_moments_merge_exactly_where_sums_cancel():
    x = 1e6 + np.random.default_rng(6).standard_normal((10000, 2))
    m = Moments()
    for lo in range(0, len(x), 999):
        m.add(x[lo:lo + 999])
    scale = m.standardizer()
    assert np.allclose(scale.mean, x.mean(0), rtol=1e-13, atol=0)
    assert np.allclose(scale.std, x.std(0), rtol=1e-10)


@pytest.mark.parametrize("n", RANKS[1:])
def test_arrays_written_by_any_number_of_ranks_are_the_same(tmp_path, n):
    rng = np.random.default_rng(7)
    np.save(tmp_path / "X.npy", rng.standard_normal((5000, 7)).astype(np.float32))
    np.save(tmp_path / "Y.npy", rng.choice(np.array(["p", "q", "r"]), 5000))
    args = ["data", "import", None, "--x", tmp_path / "X.npy", "--y", tmp_path / "Y.npy",
            "--test-fraction", 0.2, "--standardize"]
    ok(mpinn(None, *[a if a is not None else tmp_path / "one.h5" for a in args]))
    ok(mpinn(n, *[a if a is not None else tmp_path / "many.h5" for a in args]))
    (one, a1), (many, a2) = read(tmp_path / "one.h5"), read(tmp_path / "many.h5")
    for split in ("train", "test"):
        for k in (0, 1):
            assert np.array_equal(one[split][k], many[split][k])
    assert np.array_equal(a1["input_mean"], a2["input_mean"])


def test_bad_row_in_parallel_is_one_message(tmp_path):
    x = np.ones((3000, 4))
    x[2345, 1] = np.nan
    np.save(tmp_path / "X.npy", x)
    np.save(tmp_path / "Y.npy", np.arange(3000) % 2)
    result = mpinn(3, "data", "import", tmp_path / "o.h5", "--x", tmp_path / "X.npy",
                   "--y", tmp_path / "Y.npy", timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("mpinn: error:") == 1 and "row 2345 is not finite" in result.stderr
    assert not (tmp_path / "o.h5").exists()


@fast
def test_evaluate_and_predict_name_the_classes_of_new_rows(cli, tmp_path):
    table(tmp_path / "train.csv", seed=1)
    table(tmp_path / "new.csv", rows=40, seed=2)
    ok(cli("data", "import", tmp_path / "train.h5", "--from", tmp_path / "train.csv",
           "--standardize"))
    ok(cli("data", "import", tmp_path / "new.h5", "--from", tmp_path / "new.csv",
           "--like", tmp_path / "train.h5"))
    ok(cli("train", tmp_path / "train.h5", "--out", tmp_path / "run", "--epochs", 1))
    text = ok(cli("evaluate", tmp_path / "run", tmp_path / "new.h5")).stdout  # /test only
    assert "test: 40 rows" in text
    assert "classes: 0 setosa, 1 versicolor, 2 virginica" in text
    text = ok(cli("predict", tmp_path / "run", tmp_path / "new.h5", tmp_path / "p.h5")).stdout
    assert "classes: 0 setosa, 1 versicolor, 2 virginica" in text
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert list(f.attrs["class_names"].astype(str)) == sorted(SPECIES)
    refused = cli("evaluate", tmp_path / "run", tmp_path / "new.h5", "--split", "train")
    assert refused.returncode == 2 and "missing group '/train'" in refused.stderr


@fast
def test_like_a_file_without_class_names_keeps_its_label_numbers(cli, tmp_path, synth):
    """synth's labels are 0..3 without names: new labels 3 and 1 stay 3 and 1 (not the
    codes of the classes the new rows happen to have), and 7 is refused."""
    header = ",".join(f"x{k}" for k in range(12)) + ",y\n"
    (tmp_path / "n.csv").write_text(header + "0," * 12 + "3\n" + "0," * 12 + "1\n")
    ok(cli("data", "import", tmp_path / "n.h5", "--from", tmp_path / "n.csv", "--like", synth))
    new, attrs = read(tmp_path / "n.h5")
    assert list(new["test"][1]) == [3, 1]
    assert list(attrs["class_names"].astype(str)) == ["0", "1", "2", "3"]
    (tmp_path / "m.csv").write_text(header + "0," * 12 + "7\n")
    refused = cli("data", "import", tmp_path / "m.h5", "--from", tmp_path / "m.csv",
                  "--like", synth)
    assert refused.returncode == 2 and "label '7' is not one of the classes" in refused.stderr
