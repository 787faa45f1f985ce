"""Classification metrics from a confusion matrix: pure NumPy, no MPI.

Each rank counts the confusion of its own rows (C x C counts: row = true class,
column = predicted class); the counts are integers, so their SUM over ranks is
exactly the confusion of all rows, and every metric derived from it equals the
metric of the gathered predictions. Counting is one bincount per batch.

    precision_c = M[c, c] / sum_t M[t, c]   (0 if class c is never predicted)
    recall_c    = M[c, c] / sum_p M[c, p]   (0 if class c has no members)
    f1_c        = 2 P_c R_c / (P_c + R_c)   (0 if both are 0)
    macro       = unweighted mean over the C classes
    accuracy    = trace(M) / sum(M)
"""

from __future__ import annotations

import numpy as np

MAX_PRINTED_CLASSES = 20  # a larger confusion matrix goes to the JSON file only


def count_confusion(counts: np.ndarray, y: np.ndarray, predicted: np.ndarray) -> None:
    """Add the confusion of one batch to counts (the flattened C x C matrix, in place).

    One bincount of true * C + predicted; counts may be float64 (exact to 2^53)
    so that it travels in the same reduction as the loss sums.
    """
    classes = int(round(np.sqrt(counts.size)))
    if len(y):
        counts += np.bincount(y.astype(np.int64) * classes + predicted, minlength=counts.size)


def scores(confusion: np.ndarray) -> dict:
    """Accuracy, per-class and macro precision, recall and F1 of a C x C confusion matrix."""
    m = np.asarray(confusion, dtype=np.float64)
    tp, predicted, members = np.diag(m), m.sum(axis=0), m.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, members, out=np.zeros_like(tp), where=members > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    total = m.sum()
    return {"accuracy": float(tp.sum() / total) if total else None,
            "precision": per_class_and_macro(precision),
            "recall": per_class_and_macro(recall),
            "f1": per_class_and_macro(f1),
            "confusion": m.astype(np.int64).tolist()}


def per_class_and_macro(values: np.ndarray) -> dict:
    return {"per_class": [float(v) for v in values], "macro": float(values.mean())}


def macro_record(prefix: str, result: dict) -> dict:
    """The epoch record's keys of one split: {prefix}_precision, _recall, _f1 (macro)."""
    return {f"{prefix}_{name}": (result[name]["macro"] if result.get(name) else None)
            for name in ("precision", "recall", "f1")}


def format_confusion(confusion: list[list[int]]) -> str:
    """The matrix as aligned text: rows true class, columns predicted class."""
    classes = len(confusion)
    width = max(len(str(classes - 1)), *(len(str(v)) for row in confusion for v in row))
    label = len("true\\pred")
    lines = ["true\\pred".rjust(label) + " " + " ".join(str(c).rjust(width)
                                                         for c in range(classes))]
    for c, row in enumerate(confusion):
        lines.append(str(c).rjust(label) + " " + " ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """Macro precision, recall and F1, and the confusion matrix (if it is small enough)."""
    text = (f"macro precision {result['precision']['macro']:.4f}, "
            f"recall {result['recall']['macro']:.4f}, f1 {result['f1']['macro']:.4f}")
    classes = len(result["confusion"])
    if classes > MAX_PRINTED_CLASSES:
        return text + (f"\nconfusion matrix: {classes} classes, too many to print "
                       f"(write it with --json FILE)")
    return text + "\nconfusion matrix (rows: true class, columns: predicted)\n" \
        + format_confusion(result["confusion"])
