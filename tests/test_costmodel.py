"""The cost model (mpinn/costmodel.py) against closed-form oracles, and `bench comm`
launched for real: the JSON it writes is what the model reads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import expect_error, mpinn, ok
from mpinn.perf import caveats, costmodel, overlap, projection
from mpinn.perf.costmodel import Link, Machine

MACHINE = Machine(shm=Link(2e-6, 1e-10), net=Link(50e-6, 1e-8), gamma=3e-11)


@pytest.mark.fast
def test_fit_recovers_alpha_and_beta_exactly():
    sizes = np.array([8, 512, 32768, 2 << 20, 64 << 20])
    alpha, beta, residuals = costmodel.fit(sizes, 3e-6 + sizes * 2.5e-10)
    assert alpha == pytest.approx(3e-6, rel=1e-9)
    assert beta == pytest.approx(2.5e-10, rel=1e-9)
    assert np.abs(residuals).max() < 1e-9


@pytest.mark.fast
def test_fit_reports_relative_residuals():
    sizes = np.array([1.0, 2.0, 3.0])
    times = np.array([2.0, 3.0, 4.0]) * (1 + np.array([0.0, 0.1, 0.0]))  # one point 10% slow
    _, _, residuals = costmodel.fit(sizes, times)
    assert residuals[1] < 0 and len(residuals) == 3


@pytest.mark.fast
def test_fit_refuses_too_few_points():
    with pytest.raises(ValueError):
        costmodel.fit([8], [1e-6])


@pytest.mark.fast
def test_rabenseifner_and_ring_at_two_ranks():
    """P = 2: one exchange of n/2 in each phase, n/2 added: 2 (alpha + n/2 beta) + n/2 gamma."""
    n = 8e6
    expected = 2 * (2e-6 + n / 2 * 1e-10) + n / 2 * 3e-11
    assert costmodel.rabenseifner(n, 2, MACHINE) == pytest.approx(expected)
    assert costmodel.ring(n, 2, MACHINE) == pytest.approx(expected)


@pytest.mark.fast
def test_recursive_doubling_by_hand():
    """P = 4 on one host: 2 exchanges of n, 2 sums; P = 3 adds the fold 2 (alpha + n beta)
    + n gamma."""
    n = 1000.0
    step = 2e-6 + n * 1e-10 + n * 3e-11
    assert costmodel.recursive_doubling(n, 4, MACHINE) == pytest.approx(2 * step)
    fold = 2 * (2e-6 + n * 1e-10) + n * 3e-11
    assert costmodel.recursive_doubling(n, 3, MACHINE) == pytest.approx(step + fold)


@pytest.mark.fast
def test_two_level_rabenseifner():
    """2 hosts x 2 ranks: the first step (distance 1, n/2) stays on the host, the second
    (distance 2, n/4) crosses the network with 2 flows sharing each host's link."""
    n = 1e6
    shm, net = MACHINE.shm, MACHINE.net
    expected = (2 * (shm.alpha + n / 2 * shm.beta) + n / 2 * MACHINE.gamma
                + 2 * (net.alpha + 2 * n / 4 * net.beta) + n / 4 * MACHINE.gamma)
    assert costmodel.rabenseifner(n, 4, MACHINE, ranks_per_host=2) == pytest.approx(expected)
    assert costmodel.allreduce_time(n, 4, MACHINE, hosts=2, ranks_per_host=2) \
        == pytest.approx(expected)


@pytest.mark.fast
def test_ring_across_hosts_waits_for_the_network():
    n, p = 1e6, 8
    expected = 2 * (p - 1) * (50e-6 + n / p * 1e-8) + (p - 1) / p * n * 3e-11
    assert costmodel.ring(n, p, MACHINE, hosts=2) == pytest.approx(expected)


@pytest.mark.fast
@pytest.mark.parametrize("nbytes, ranks, algorithm", [
    (2048, 2, "recursive_doubling"), (2052, 2, "rabenseifner"), (8 << 20, 4, "rabenseifner"),
    (4096, 2048, "recursive_doubling"), (100, 1, "none")])
def test_mpich_selection(nbytes, ranks, algorithm):
    """MPICH's iallreduce: recursive doubling up to 2048 bytes or count < pof2(P)."""
    assert costmodel.mpich_algorithm(nbytes, ranks) == algorithm


def bench_step_json(c0=1e-3, c1=1e-4, update=2e-3) -> dict:
    # forward + backward at its 512 rows as the fit says: the fit's level is the bench's
    phases = {"data": 0.0, "forward": 0.4 * (c0 + c1 * 512), "backward": 0.6 * (c0 + c1 * 512),
              "allreduce": 0.0, "update": update}
    return {"ranks": 1, "batch_size": 512, "step_time_s": {k: {"mean": v, "max": v}
                                                           for k, v in phases.items()},
            "compute_fit": {"c0_s": c0, "c1_s_per_row": c1, "backward_fraction": 0.6}}


COMM = {"gamma_s_per_byte": 3e-11, "transports": {
    "shm": {"alpha_s": 2e-6, "beta_s_per_byte": 1e-10},
    "net": {"alpha_s": 50e-6, "beta_s_per_byte": 1e-8}}}


@pytest.mark.fast
def test_predict_step_adds_the_phases():
    n = 7_454_772
    got = costmodel.predict_step(bench_step_json(), COMM, 512, 2, 2, 1, n)
    compute = 1e-3 + 1e-4 * 256
    allreduce = 2 * (50e-6 + n / 2 * 1e-8) + n / 2 * 3e-11
    assert got["phases"]["allreduce"] == pytest.approx(allreduce)
    assert got["step_s"] == pytest.approx(compute + 2e-3 + allreduce)
    assert got["step_overlap_s"] == pytest.approx(0.4 * compute + max(0.6 * compute, allreduce)
                                                  + 2e-3)


@pytest.mark.fast
def test_the_buckets_go_out_as_backward_makes_them():
    """784-1024-1024-10 in 1 MB buckets, as GradientSync makes them (tests/test_guards.py
    checks those): they tile the buffer, the first holds the last layer and the control
    slots, the ready times rise to 1 (the first layer's last panel ends backward)."""
    sizes = [784, 1024, 1024, 10]
    buckets = overlap.bucket_schedule(sizes, 4, 1e6)
    n = sum(fi * fo + fo for fi, fo in zip(sizes[:-1], sizes[1:])) + 3
    assert sum(b for b, _ in buckets) == n * 4
    assert all(b >= 1e6 for b, _ in buckets[:-1])
    ready = [r for _, r in buckets]
    assert ready == sorted(ready) and ready[-1] == 1.0 and 0 < ready[0] < 0.2
    assert overlap.bucket_schedule(sizes, 4, 1e9) == [(n * 4, 1.0)]  # one bucket


@pytest.mark.fast
def test_the_exposed_sync_follows_the_schedule():
    """Two buckets of 1 s each, ready at 0.25 and 1.0 of a 4 s backward: the first ends
    at 2 s, the second starts when backward ends and waits 1 s; a slow link queues."""
    one_second = lambda nbytes: 1.0  # noqa: E731
    assert overlap.exposed_sync(4.0, [(1, 0.25), (1, 1.0)], one_second) == 1.0
    assert overlap.exposed_sync(1.0, [(1, 0.25), (1, 1.0)], one_second) == pytest.approx(
        1.25)  # the second waits for the link until 2.25 s
    assert overlap.exposed_sync(4.0, [], one_second) == 0.0


@pytest.mark.fast
def test_one_host_overlaps_nothing_and_the_schedule_hides_some_across_hosts():
    step = {**bench_step_json(), "model": [784, 1024, 1024, 10], "dtype": "float32",
            "bucket_mb": 1.0}
    n = 7_454_772
    one_host = costmodel.predict_step(step, COMM, 512, 2, 1, 2, n)
    assert one_host["step_overlap_s"] == one_host["step_s"]
    two_hosts = costmodel.predict_step(step, COMM, 512, 2, 2, 1, n)
    hidden = two_hosts["step_s"] - two_hosts["step_overlap_s"]
    assert 0 < hidden < min(two_hosts["phases"]["allreduce"], two_hosts["phases"]["backward"])


@pytest.mark.fast
@pytest.mark.parametrize("mode", ["strong", "weak"])
def test_projection(mode):
    rows = costmodel.project(bench_step_json(), COMM, 512, 7_454_772, ranks_per_host=4,
                             max_ranks=4096, mode=mode)
    # strong scaling stops at the batch's 512 rows: more ranks would have none
    assert [r["ranks"] for r in rows] == [2 ** k for k in range(13 if mode == "weak" else 10)]
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    for a, b in zip(rows, rows[1:]):
        if mode == "strong":
            assert b["efficiency"] <= a["efficiency"] + 1e-12
        assert b["hosts"] == math.ceil(b["ranks"] / 4)
    for r in rows:
        assert r["step_overlap_s"] <= r["step_s"] + 1e-15
        assert r["samples_per_s_overlap"] >= r["samples_per_s"] - 1e-9


def test_bench_comm_json(tmp_path):
    """2 ranks on this host: one transport, shm, with a fit and its residuals."""
    out = tmp_path / "comm.json"
    result = ok(mpinn(2, "bench", "comm", "--max-bytes", 1 << 16, "--budget", 0.02,
                      "--json", out, timeout=120))
    assert "shm" in result.stdout
    r = json.loads(out.read_text())
    assert r["ranks"] == 2 and r["ranks_per_host"] == [2] and len(r["hosts"]) == 1
    assert r["mpi"]  # the MPI library's version line
    assert list(r["transports"]) == ["shm"]
    for f in (r["transports"]["shm"], r["transports"]["shm"]["exchange"]):
        assert f["alpha_s"] > 0 and f["beta_s_per_byte"] > 0
        assert len(f["points"]) == len(r["sizes"]) == 8  # 8 B .. 32 KB (x4), then 64 KB
        assert all("residual" in p for p in f["points"])
    assert r["gamma_s_per_byte"] > 0
    points = r["allreduce"]["points"]
    assert [p["bytes"] for p in points] == r["sizes"]
    assert all(p["time_s"] > 0 and "residual" in p and "algorithm" in p for p in points)
    costmodel.machine_from(r)  # the model reads it


@pytest.mark.parametrize("args, words", [
    (("--max-bytes", "4"), ["--max-bytes"]),
    (("--sizes", "8,abc"), ["--sizes"]),
    (("--sizes", "64"), ["--sizes"]),
    (("--repeats", "0"), ["--repeats"]),
])
def test_bench_comm_bad_input(args, words):
    expect_error(mpinn(2, "bench", "comm", *args, timeout=60), 2, *words)


@pytest.mark.fast
def test_bench_comm_needs_two_ranks(cli):
    expect_error(cli("bench", "comm"), 2, "mpiexec -n 2")


@pytest.mark.fast
def test_bench_step_local_batches_bad_input(cli):
    expect_error(cli("bench", "step", "--local-batches", "64"), 2, "--local-batches")


@pytest.mark.fast
@pytest.mark.parametrize("ranks,hosts,per_host,kind", [(2, 2, 1, "net"), (4, 1, 4, "shm")])
def test_the_measured_allreduce_refits_beta_of_its_link(ranks, hosts, per_host, kind):
    """Allreduce times made by Rabenseifner's closed form with 3x the exchange's beta (and
    an 8 KB point run by it too): machine_from recovers that beta, keeps alpha, and
    leaves the other link alone; at 2 hosts x 2 ranks (two links at once) it refits none."""
    truth = Link(COMM["transports"][kind]["alpha_s"],
                 3 * COMM["transports"][kind]["beta_s_per_byte"])
    made = Machine(shm=truth, net=truth, gamma=3e-11)
    sizes = [8, 8192, 1 << 16, 1 << 20, 1 << 22]
    points = [{"bytes": n, "time_s": costmodel.rabenseifner(n, ranks, made)} for n in sizes]
    comm = dict(COMM, allreduce={"ranks": ranks, "hosts": hosts, "ranks_per_host": per_host,
                                 "points": points})
    machine = costmodel.machine_from(comm)
    refit = getattr(machine, kind)
    assert refit.alpha == truth.alpha and refit.beta == pytest.approx(truth.beta, rel=1e-9)
    other = "shm" if kind == "net" else "net"
    assert getattr(machine, other) == Link(COMM["transports"][other]["alpha_s"],
                                           COMM["transports"][other]["beta_s_per_byte"])
    mixed = dict(comm, allreduce=dict(comm["allreduce"], hosts=2, ranks_per_host=2, ranks=4))
    assert costmodel.machine_from(mixed) == costmodel.machine_from(COMM)


@pytest.mark.fast
def test_fit_never_goes_negative():
    """Times that fall with size (noise) fit a constant, not a negative beta; times
    through zero fit alpha 0."""
    alpha, beta, _ = costmodel.fit([1, 2, 4], [3.0, 2.9, 2.8])
    assert beta == 0 and alpha == pytest.approx(2.9, rel=0.01)
    alpha, beta, _ = costmodel.fit([10, 20, 40], [0.5, 2.0, 4.0])
    assert alpha == 0 and beta > 0


@pytest.mark.fast
def test_steps_cross_hosts_unless_the_host_holds_both_partners():
    """Block placement, K = 6: only the step of mask 1 stays on every host (6 = 2 x 3);
    K = 4: masks 1 and 2 stay, mask 4 crosses."""
    kinds = lambda k: [link for link, _ in costmodel.step_links(16, k, MACHINE)]  # noqa: E731
    assert kinds(6) == [MACHINE.shm, MACHINE.net, MACHINE.net, MACHINE.net]
    assert kinds(4) == [MACHINE.shm, MACHINE.shm, MACHINE.net, MACHINE.net]
    assert costmodel.allreduce_time(7.45e6, 64, MACHINE, hosts=2, ranks_per_host=48) > \
        costmodel.allreduce_time(7.45e6, 64, MACHINE, hosts=1, ranks_per_host=64) * 10


@pytest.mark.fast
def test_the_bench_steps_own_level_scales_the_compute_fit():
    """The fit's shape, the level of the bench's training steps: measured 10% above the
    fit at its 512 rows, so every b is predicted 10% above the fit."""
    step = bench_step_json()
    for phase in ("forward", "backward"):
        step["step_time_s"][phase] = {k: 1.1 * v for k, v in step["step_time_s"][phase].items()}
    work = costmodel.Compute.from_bench(step)
    for rows in (1, 64, 512, 4096):
        assert work.time(rows) == pytest.approx(1.1 * (1e-3 + 1e-4 * rows), rel=1e-12)


@pytest.mark.fast
def test_a_projection_names_where_each_link_comes_from():
    """Measured by bench comm (its pairs; beta refitted where it timed the Allreduce over
    one link), described to `scaling project`, or borrowed: one host knows no network."""
    pairs = {"shm": [0, 1], "net": [0, 2]}
    measured = {"hosts": ["a", "b"], "gamma_s_per_byte": 3e-11,
                "transports": {k: dict(t, pair=pairs[k]) for k, t in COMM["transports"].items()}}
    label, lines = caveats.link_sources(measured)
    assert label == "network from bench comm's net link (ranks 0 and 2, across hosts a, b)"
    assert lines == [
        "network: alpha 50 us, beta 10,000 ps/B, from bench comm's net link (ranks 0 and 2, "
        "across hosts a, b)",
        "shared memory: alpha 2 us, beta 100 ps/B, from bench comm's shm link (ranks 0 and 1)",
        "reduction: gamma 30 ps/B"]
    made = Machine(shm=Link(2e-6, 3e-10), net=Link(2e-6, 3e-10), gamma=3e-11)
    points = [{"bytes": n, "time_s": costmodel.rabenseifner(n, 2, made)}
              for n in (1 << 16, 1 << 20, 1 << 22)]
    one_host = {"hosts": ["a"], "gamma_s_per_byte": 3e-11,
                "transports": {"shm": measured["transports"]["shm"]},
                "allreduce": {"ranks": 2, "hosts": 1, "ranks_per_host": 2, "points": points}}
    label, lines = caveats.link_sources(one_host)
    assert label == caveats.SHM_ONLY == "shared memory only: no network was measured"
    assert lines[0].startswith("network: none measured (bench comm on one host)")
    assert lines[1] == ("shared memory: alpha 2 us, beta 300 ps/B, from bench comm's shm link "
                        "(ranks 0 and 1); beta refitted to the Allreduce measured over it (the "
                        "exchange fit: 100 ps/B)")
    label, lines = caveats.link_sources(projection.described_comm(25e-6, 8e-10, 3e-11, None))
    assert label == "network as described to mpinn scaling project"
    assert lines[:2] == ["network: alpha 25 us, beta 800 ps/B, as described to mpinn scaling "
                         "project", "shared memory: not described (--shm-alpha, --shm-beta), "
                         "so ranks of one host talk at the network's figures"]


@pytest.mark.fast
def test_a_half_precision_sync_is_predicted_from_its_messages():
    """--sync-dtype float16 in the bench: an all-to-all and an all-gather of P chunks of
    half the bytes, each P - 1 messages (over the network between hosts of one rank
    each), the owner's sum, and the casts on backward's critical path."""
    n, ranks = 7_454_772, 4
    bench = {**bench_step_json(), "sync_dtype": "float16", "cast_s": 3e-3}
    got = costmodel.predict_step(bench, COMM, 512, ranks, ranks, 1, n)
    chunk = n / 4 / ranks * 2  # bytes: n / 4 float32 elements in P chunks, 2 bytes each
    expected = 2 * (ranks - 1) * (50e-6 + chunk * 1e-8) + 3e-11 * ranks * chunk
    assert got["phases"]["allreduce"] == pytest.approx(expected, rel=1e-12)
    plain = costmodel.predict_step(bench_step_json(), COMM, 512, ranks, ranks, 1, n)
    assert got["phases"]["backward"] == pytest.approx(plain["phases"]["backward"] + 3e-3)
    assert got["phases"]["forward"] == pytest.approx(plain["phases"]["forward"])
    assert got["phases"]["allreduce"] < 0.6 * plain["phases"]["allreduce"]
    # two ranks per host: the chunks cross the network unreduced, no gain over MPICH's
    # two-level Allreduce; within one host, shared-memory messages only
    two = costmodel.predict_step(bench, COMM, 512, ranks, 2, 2, n)["phases"]["allreduce"]
    assert two > 0.9 * costmodel.predict_step(bench_step_json(), COMM, 512, ranks, 2, 2,
                                              n)["phases"]["allreduce"]
    one = costmodel.predict_step(bench, COMM, 512, ranks, 1, 4, n)["phases"]["allreduce"]
    assert one == pytest.approx(2 * 3 * (2e-6 + chunk * 1e-10) + 3e-11 * ranks * chunk)
