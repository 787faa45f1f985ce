"""The schedule of the overlapped gradient sync, for the cost model: which buckets
`--sync overlap` sends (as comm/gradsync.py makes them of backward's final slices), when
backward has produced each, and how long the step then waits after backward for a
link that reduces them one after another."""

from __future__ import annotations

from collections.abc import Callable

from mpinn.nn.model import Architecture


def bucket_schedule(sizes: list[int], itemsize: int, bucket_bytes: float
                    ) -> list[tuple[float, float]]:
    """(bytes, ready) of each bucket of `--sync overlap`, in the order they go out: the
    buckets GradientSync makes of backward's final slices (the control slots with the
    first), and when backward has produced each, as a fraction of backward's time
    (its products' arithmetic done so far: each layer's dW panels, then its delta)."""
    arch = Architecture(tuple(sizes))
    layers = list(zip(sizes[:-1], sizes[1:]))
    work = [fi * fo * (2 if i else 1) for i, (fi, fo) in enumerate(layers)]  # dW (+ delta)
    total, done = float(sum(work)), 0.0
    buckets, pending = [], 3  # elements final and not sent: the control slots
    threshold = max(1, int(bucket_bytes // itemsize))
    for i in range(len(layers) - 1, -1, -1):
        fi, fo = layers[i]
        # the bias, then the weight rows panel by panel, each made final in its turn
        for elements, cost in ((fo, 0), *(((hi - lo) * fo, (hi - lo) * fo)
                                          for lo, hi in reversed(arch.panels(i)))):
            pending += elements
            done += cost
            if pending >= threshold:
                buckets.append((pending * itemsize, done / total))
                pending = 0
        done += work[i] - fi * fo  # the delta passed down
    if pending:
        buckets.append((pending * itemsize, 1.0))
    return buckets


def exposed_sync(backward: float, buckets: list[tuple[float, float]],
                 allreduce: Callable[[float], float]) -> float:
    """Seconds the step waits after backward for buckets sent as they are ready and
    reduced one after another over the link (allreduce(bytes): one bucket's time)."""
    free = 0.0
    for nbytes, ready in buckets:
        free = max(free, ready * backward) + allreduce(nbytes)
    return max(0.0, free - backward)
