"""The gradient sync: in-place Allreduces of all gradients and a few control slots,
started while backward still computes (overlap) or after it (blocking)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from mpinn.comm import collectives
from mpinn.comm.collectives import complete
from mpinn.comm.inflight import PanelRunner
from mpinn.comm.shards import Shards
from mpinn.comm.wire import WireBucket, WireSync
from mpinn.comm.world import Comm
from mpinn.nn import fixed

CONTROL_SLOTS = 3  # loss, stop, bad input: after the gradients, in the same buffer
SYNC_MODES = ("overlap", "blocking")


class GradientSync:
    """The step's sync of all gradients, then a few control slots, in one buffer.

        buffer = [ grads (n_params) | loss | stop | bad input ]

    Before backward each rank writes the summed loss of its rows, whether it was
    asked to stop (a signal), and whether its rows held non-finite input (start()).
    In-place SUMs then give every rank the gradient summed over the global batch,
    the batch's summed loss, and how many ranks want to stop or met bad input:
    the ranks agree on all of it without a second collective, at the same step.
    The model's gradient vector is `grads`, a view (the model stays free of MPI).

    Backward finishes the buffer from its end (the last layer first) and says so
    (ready(), model.BackwardHooks). With overlap, each contiguous slice of at least
    bucket_bytes that is final is sent at once, in its own non-blocking Allreduce (the
    control slots ride with the first); progress(), called between backward's
    panels, tests them, which is what moves them on (MPICH progresses a message only
    inside MPI calls); finish() sends the rest and waits for every bucket. Blocking
    sends the whole buffer in finish(). The bucket boundaries depend on the shapes
    alone, so every rank starts the same Allreduces in the same order.

    With wire (--sync-dtype float16|bfloat16) each bucket goes through wire.py's
    all-to-all, owner's sum and all-gather instead of an Allreduce, and the control
    slots travel on their own, in the model's dtype, after backward.

    With exact (--reproducible: nn/exact.py's model, whose gradients are integers on
    grids, in float64) every sum is exact in any order: the loss travels as integer
    limbs (nn/fixed.py) after the three slots, the model's grid exponents and the
    gradient's are reduced (MAX) in `extremes` after the buckets, and |g|^2 is summed
    on a grid fixed by that maximum: the same bits on any number of ranks.
    """

    LOSS, STOP, BAD_INPUT = range(CONTROL_SLOTS)

    def __init__(self, comm: Comm, n_params: int, dtype: np.dtype | str,
                 mode: str = "overlap", bucket_bytes: int = 1 << 20,
                 test_in_flight: bool = True, wire: str | None = None,
                 shard: bool = False, exact: int = 0) -> None:
        """test_in_flight: progress() tests the buckets. Where every rank shares one
        host the Allreduce is CPU work done inside those tests: they hide nothing and
        slow backward, so the buckets then wait for finish(). wire: float16 or bfloat16
        sends the gradients in half precision with error feedback (wire.py); the control
        slots then travel on their own, in the model's dtype, after backward. exact: the
        number of the model's grid exponents (0: not --reproducible)."""
        assert mode in SYNC_MODES, mode
        assert not (exact and wire), "an exact sync sends float64"
        self.comm = comm
        self.exact = exact > 0
        if exact:
            dtype = np.float64
        # --reproducible: the model's grid exponents, then the gradient's (MAX-reduced)
        self.extremes = np.zeros(exact + 1)
        self._squares = np.zeros(2 * fixed.CHUNK if exact else 0)  # square_parts' scratch
        self.wire = WireSync(n_params, np.dtype(dtype), wire, comm.rank, comm.size) \
            if wire else None
        # (MPI wants every rank to start the collectives of a communicator in the same
        # order: the all-gathers, started as all-to-alls complete, get their own)
        self.gather_comm = comm.Dup() if wire else None
        # --shard-optimizer: each bucket is reduce-scattered onto the owners of its
        # elements (shards.py); this rank's slice of the reduced gradient is `own`
        self.shards = Shards(comm, n_params) if shard else None
        self.own = np.zeros(self.shards.hi - self.shards.lo, dtype) if shard else None
        slots = CONTROL_SLOTS + (fixed.LIMBS if exact else 0)  # exact: the loss's limbs
        self.shard_control = np.zeros(slots + 2, dtype)  # and |g_shard|^2 (exact: 2 parts)
        self.used: list[WireBucket] = []  # the wire buckets of this step, in order
        self.control_request: MPI.Request | None = None
        self.test_in_flight = test_in_flight
        self.buffer = np.zeros(n_params + slots, dtype)
        self.grads = self.buffer[:n_params]
        self.control = self.buffer[n_params:]
        self.overlap = mode == "overlap"
        self.bucket = max(1, bucket_bytes // self.buffer.itemsize)  # in elements
        self.sq_norm = 0.0  # of the reduced gradient sum, set by finite()
        self.top = 0.0  # wire mode: max |reduced gradient sum|, set by finite()
        self.requests: list[MPI.Request] = []
        self.buckets: list[tuple[int, int]] = []  # [lo, hi) of each request, in order
        self.front = self.sent = 0  # buffer[front:] is final, buffer[sent:] is sent
        self.started_at = self.done_at = 0.0  # first send; completion, as first seen
        self.bucket_times: list[list[float]] = []  # [start, completion as first seen]
        self._panels = PanelRunner()  # compute()'s worker thread

    def start(self, loss: float, stop: bool = False, bad_input: bool = False,
              exact_loss: int | None = 0) -> None:
        """A step's sync begins: the control slots are final, no gradient is yet.
        exact_loss (exact mode): the loss as fixed.exact_int() gave it (None: not finite)."""
        self.control[:CONTROL_SLOTS] = (loss, stop, bad_input)
        if self.exact:
            self.control[self.LOSS] = 0.0 if exact_loss is not None else np.nan
            fixed.to_limbs(exact_loss, self.control[CONTROL_SLOTS:])
        self.front = len(self.buffer) - len(self.control)
        apart = self.wire or self.shards  # the control slots go on their own, at the end
        self.sent = self.front if apart else len(self.buffer)
        self.used.clear()
        self.requests.clear()
        self.buckets.clear()
        self.bucket_times.clear()
        self.started_at = self.done_at = 0.0

    def ready(self, start: int, stop: int) -> None:
        """grads[start:stop] is final (backward's hook): it extends the final tail."""
        assert stop == self.front, (start, stop, self.front)
        self.front = start
        if self.overlap and self.sent - self.front >= self.bucket:
            self._send(self.front, self.sent)

    def compute(self, work: Callable[[], None]) -> None:
        """Run a panel of backward (its hook). With buckets in flight over a network, the
        panel runs in a worker thread while this one tests the buckets (inflight.py);
        else here, then one test."""
        if not self.requests or self.done_at or not self.test_in_flight:
            work()
            self.progress()
            return
        self._panels.run(work, self.progress)

    def progress(self) -> bool:
        """Test the buckets in flight (between and during backward's panels); whether
        one sent is still in flight (until backward sends the next, no test is needed)."""
        if not self.requests or self.done_at or not self.test_in_flight:
            return False
        if self.wire:
            self._gather_in_order()
        done = MPI.Request.Testsome(self.requests)  # (completed ones become null requests)
        if done:
            now = time.perf_counter()
            for k in done:
                if not self.wire or self.used[k].stage == 2:
                    self.bucket_times[k][1] = now
        in_flight = not all(t[1] for t in self.bucket_times)
        if done and not in_flight and self.front == 0:
            self.done_at = now
        return in_flight

    def finish(self) -> None:
        """Send what is not sent yet, then wait for every bucket (through the
        communicator's waiting loop, which names the bucket a stalled rank waits in)."""
        assert self.front == 0, "backward has not finished the gradients"
        if self.sent > 0:
            self._send(0, self.sent)
        if self.wire:  # the control slots after backward; every sum and all-gather
            self._start_control(alone=not self.shards)
            self._gather_in_order(wait=True)
        n = len(self.requests)
        for k, request in enumerate(self.requests):
            lo, hi = self.buckets[k]
            complete(self.comm, request, f"the gradient Allreduce (bucket {k + 1} of {n}, "
                                         f"{(hi - lo) * self.buffer.itemsize / 1e6:.2f} MB)")
            if self.wire:
                self.used[k].decode(self.grads, self.wire.scale)
            self.bucket_times[k][1] = self.bucket_times[k][1] or time.perf_counter()
        if self.wire and not self.shards:
            complete(self.comm, self.control_request, "the step's control values")
        if self.exact:
            self._reduce_extremes()
        if self.shards:
            self._reduce_shard_control()
        self.done_at = max(t[1] for t in self.bucket_times)

    def allreduce(self, loss: float, stop: bool = False, bad_input: bool = False) -> None:
        """In place: gradients and control slots <- their sums over all ranks, at once
        (gradients computed without backward's hooks)."""
        self.start(loss, stop, bad_input)
        self.front = 0
        self.finish()

    @property
    def in_flight(self) -> float:
        """Seconds from the first bucket's start to the last one's completion (as the
        first successful test saw it) in the last step."""
        return max(0.0, self.done_at - self.started_at) if self.started_at else 0.0

    def _send(self, lo: int, hi: int) -> None:
        now = time.perf_counter()
        self.started_at = self.started_at or now
        if self.shards and not self.wire:
            self.requests.append(self.shards.reduce_scatter(self.buffer[lo:hi], lo, self.own))
        elif self.wire:
            bucket = self.wire.bucket(lo, hi, self.shards)
            bucket.start(self.comm, self.wire.residual, self.grads, self.wire.scale)
            self.used.append(bucket)
            self.requests.append(bucket.request)
        else:
            self.requests.append(self.comm.Iallreduce(MPI.IN_PLACE, self.buffer[lo:hi],
                                                      op=MPI.SUM))
        self.buckets.append((lo, hi))
        self.bucket_times.append([now, 0.0])
        self.sent = lo

    def _reduce_shard_control(self) -> None:
        """Sharded: the control slots and this slice's |g|^2 summed in one small
        Allreduce after the reduce-scatters: every rank then has the global |g|^2 the
        divergence guard and --clip-norm need, before the update."""
        slots = len(self.control)
        self.shard_control[:slots] = self.control
        if self.exact:
            fixed.square_parts(self.own, self.extremes[-1], len(self.grads), self._squares,
                               self.shard_control[slots:])
        else:
            self.shard_control[slots] = np.dot(self.own, self.own)
        collectives.allreduce_sum(self.comm, self.shard_control, "the step's control values")
        self.control[:] = self.shard_control[:slots]

    def _reduce_extremes(self) -> None:
        """Exact mode: the model's grid exponents (its `seen`, a view of extremes) and
        the reduced gradient's, the largest over all ranks (sharded: each has a slice)."""
        self.extremes[-1] = fixed.exponent(self.update_grads)
        collectives.allreduce_max(self.comm, self.extremes, "the step's grid exponents")

    def full_state(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Collective: the optimizer's state as a checkpoint keeps it, whole (sharded:
        every slice gathered on rank 0; counters, such as Adam's t, as they are)."""
        if not self.shards:
            return state
        return {k: self.shards.gather(v, f"the optimizer's {k}") if v.ndim else v
                for k, v in state.items()}

    def load_full_state(self, state: dict[str, np.ndarray],
                        saved: dict[str, np.ndarray] | None) -> None:
        """Collective: the optimizer's state from a checkpoint's (saved: on rank 0) into
        state: each rank's slice (sharded) or all of it, counters alike everywhere."""
        for k, v in state.items():
            if v.ndim and self.shards:
                self.shards.scatter(saved[k] if saved is not None else None, v,
                                    f"the optimizer's {k}")
                continue
            if saved is not None:
                v[...] = saved[k]
            collectives.broadcast(self.comm, v, what=f"the optimizer's {k}")

    def gather_params(self, params: np.ndarray) -> None:
        """Sharded, after the update: every rank's slice of params to every rank."""
        if self.shards:
            self.shards.all_gather(params, "the all-gather of the updated parameters")

    @property
    def update_grads(self) -> np.ndarray:
        """The reduced gradient the update applies: this rank's slice when sharded."""
        return self.own if self.shards else self.grads

    def _gather_in_order(self, wait: bool = False) -> None:
        """Wire mode: each bucket whose all-to-all is done gets its sum and its all-gather
        started, in bucket order (the first still in flight stops it, unless wait)."""
        n = len(self.used)
        for k, bucket in enumerate(self.used):
            if bucket.stage != 1:
                continue
            if wait:
                complete(self.comm, bucket.request, f"the gradient all-to-all (bucket {k + 1} "
                                                    f"of {n})")
            elif not bucket.request.Test():
                return
            if self.shards:  # the owner's sum into its slice: done, nothing to gather
                bucket.reduce_into(self.own, self.wire.scale)
                continue
            bucket.reduce(self.gather_comm)
            self.requests[k] = bucket.request

    def _start_control(self, alone: bool = True) -> None:
        """Wire mode: the control slots in the model's dtype, after backward (alone: in
        their own Allreduce; sharded, with the slices' |g|^2). A rank whose own gradient
        (with its residual) is not finite sends a NaN loss: divergence, which a wire
        overflow (finite everywhere, out of the wire's range) is not."""
        residual = self.wire.residual
        if not np.isfinite(np.dot(residual, residual)):
            self.control[self.LOSS] = np.nan
        if alone:
            self.control_request = self.comm.Iallreduce(MPI.IN_PLACE, self.control,
                                                        op=MPI.SUM)

    def saved_state(self) -> dict[str, np.ndarray]:
        """Collective: what a checkpoint keeps of a half-precision sync (nothing else):
        the SUM of all ranks' residuals, which is what the reduced gradients still owe,
        and the scale with its halvings. Restored on rank 0 alone (load_state), the same
        sum is owed on any number of ranks."""
        if not self.wire:
            return {}
        total = self.wire.residual.copy()
        collectives.allreduce_sum(self.comm, total, "the residuals of the sync")
        return {"sync_residual": total,
                "sync_scale": np.array([self.wire.scale, self.wire.halvings], np.float64)}

    def load_state(self, state: dict[str, np.ndarray] | None) -> None:
        """Collective: a checkpoint's sync state (saved_state; state given on rank 0): the
        residual sum to rank 0, zeros elsewhere; the scale to all."""
        if not self.wire:
            return
        scale = np.array([1.0, 0.0])
        self.wire.residual[:] = 0
        if self.comm.rank == 0 and state and "sync_residual" in state:
            self.wire.residual[:] = state["sync_residual"]
            scale[:] = state["sync_scale"]
        collectives.broadcast(self.comm, scale, what="the sync's scale")
        self.wire.scale, self.wire.halvings = float(scale[0]), int(scale[1])

    @property
    def overflowed(self) -> bool:
        """Wire mode, after finite(): the reduced gradient left the wire dtype's range
        while every rank's loss and gradient were finite: the step is skipped, not
        divergence."""
        return bool(self.wire and np.isfinite(self.control[self.LOSS])
                    and not self.bad_input and not np.isfinite(self.sq_norm))

    def end_step(self, applied: bool) -> None:
        """After the update or its skip (wire mode: residuals and the next scale)."""
        if self.wire:
            self.wire.end_step(self.used, applied, self.overflowed, self.top)

    @property
    def cast_s(self) -> float:
        """Wire mode: the last step's seconds in conversions and the owners' sums."""
        return sum(b.cast_s for b in self.used)

    @property
    def sent_bytes(self) -> int:
        """What each rank sent per step of gradients (and, sharded, of its updated slice
        to the others): the wire's bytes, or for an Allreduce the 2 (P - 1) / P of the
        buffer that reduce-scatter + all-gather move."""
        p = self.comm.size
        gathered = (p - 1) * len(self.own) * self.buffer.itemsize if self.shards else 0
        if self.wire:
            return self.wire.wire_bytes(self.used) + gathered
        if self.shards:  # the reduce-scatter's (P - 1) / P of the gradients
            return int((p - 1) / p * self.grads.nbytes) + gathered
        return int(2 * (p - 1) / p * self.buffer.nbytes)

    @property
    def stop_requested(self) -> bool:
        return bool(self.control[self.STOP] > 0)

    @property
    def bad_input(self) -> bool:
        return bool(self.control[self.BAD_INPUT] > 0)

    @property
    def loss(self) -> float:
        """The loss summed over the global batch (after the sync; exact mode: exactly,
        from its limbs)."""
        if self.exact and np.isfinite(self.control[self.LOSS]):
            return fixed.from_limbs(self.control[CONTROL_SLOTS:])
        return float(self.control[self.LOSS])

    def finite(self) -> bool:
        """Whether the reduced loss and every reduced gradient are finite.

        A NaN or inf on any rank makes the sums NaN or inf on all ranks, so all
        ranks reach the same verdict. The dot product reads the gradient once and
        allocates nothing (|g|^2 overflows only for gradients beyond ~1e19 in
        float32, ~1e154 in float64: divergence by any measure).
        """
        self.sq_norm = self._square_norm()  # |g|^2, for --clip-norm too
        if self.wire and np.isfinite(self.sq_norm):  # the next scale's input, before the
            self.top = max(float(self.grads.max()), -float(self.grads.min())) \
                if not self.shards else float(np.sqrt(self.sq_norm))  # update (sharded:
            # no rank has the whole sum; |g| >= max |g_i|, the same on every rank)
        return bool(np.isfinite(self.loss) and np.isfinite(self.sq_norm))

    def _square_norm(self) -> float:
        """|g|^2 of the reduced gradient sum (sharded: the reduced slices' sum); exact
        mode: on a grid fixed by its global maximum, the same bits on any P."""
        slots = len(self.control)
        if not self.exact:
            return float(self.shard_control[slots] if self.shards
                         else np.dot(self.grads, self.grads))
        if not self.shards:  # (a non-finite gradient gives non-finite parts)
            fixed.square_parts(self.grads, self.extremes[-1], len(self.grads),
                               self._squares, self.shard_control[slots:])
        return fixed.square_value(self.shard_control[slots:], self.extremes[-1],
                                  len(self.grads))

