"""Training across hosts: network namespaces node1..node2 joined by veth links
(tests/infra/netns_cluster.sh), so ranks on different hosts talk TCP, not shared memory.

`make test` starts the cluster and exports MPINN_CLUSTER=DIR; run alone as root, these
tests start one of their own and remove it after. Oracle: the same training on one host.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_parallel import train_args

from conftest import HERE, child_env, load_weights, ok, run, unavailable

SCRIPT = HERE / "infra" / "netns_cluster.sh"
HOSTS = 2


class Cluster:
    """A started netns cluster: its launcher and the root-side veth of each host."""

    def __init__(self, state: Path) -> None:
        self.launcher = state / "mpiexec"
        # DIR/links: "nodeI NAMESPACE ROOT-SIDE-VETH" per host
        self.veths = {host: veth for host, _, veth in
                      (line.split() for line in (state / "links").read_text().splitlines())}

    def mpiexec(self, n: int, *args, ppn: int | None = None, timeout: float = 60
                ) -> subprocess.CompletedProcess:
        """`DIR/mpiexec -n N [-ppn K] python ARGS`: block placement over node1, node2."""
        placement = ["-ppn", str(ppn)] if ppn else []
        return run([self.launcher, "-n", n, *placement, sys.executable, *args], timeout=timeout)

    def bytes_sent_to(self, host: str) -> int:
        """Bytes the bridge has sent to host (tx of the root side of its link)."""
        return int(Path(f"/sys/class/net/{self.veths[host]}/statistics/tx_bytes").read_text())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    if os.environ.get("MPINN_CLUSTER"):  # started (and stopped) by `make test`
        yield Cluster(Path(os.environ["MPINN_CLUSTER"]))
        return
    if os.geteuid() != 0:
        unavailable("a cluster of network namespaces",
                    "run the tests as root (`sudo make test`, or as root: "
                    f"bash {SCRIPT.relative_to(HERE.parent)} start DIR --hosts {HOSTS} "
                    "and MPINN_CLUSTER=DIR)")
    state = tmp_path_factory.mktemp("netns-cluster")
    try:
        started = subprocess.run(["bash", SCRIPT, "start", state, "--hosts", str(HOSTS)],
                                 timeout=60, capture_output=True, text=True)
        if started.returncode != 0:
            pytest.fail(f"{SCRIPT.name} start failed:\n{started.stdout}{started.stderr}")
        yield Cluster(state)
    finally:  # also after a failed start or failed tests
        subprocess.run(["bash", SCRIPT, "stop", state], check=False, timeout=60)


@pytest.fixture(scope="module")
def shared_synth(cluster, tmp_path_factory) -> Path:
    """The synthetic data set, made by a rank on node1: all hosts see the same files."""
    path = tmp_path_factory.mktemp("data") / "synth.h5"
    ok(cluster.mpiexec(1, "-m", "mpinn", "data", "synth", path, "--samples", 600,
                       "--test-samples", 150, "--features", 12, "--classes", 4, "--seed", 3))
    return path


def test_ranks_run_on_their_hosts(cluster):
    """-n 4 places ranks 0, 1 on node1 and 2, 3 on node2; MPI names the host."""
    result = ok(cluster.mpiexec(4, HERE / "mpi" / "processor_name.py"))
    names = dict(line.split() for line in result.stdout.splitlines())
    assert names == {"0": "node1", "1": "node1", "2": "node2", "3": "node2"}, result.stdout


@pytest.mark.parametrize("across, one_host", [((4, None), (1, None)), ((2, None), (2, 2))],
                         ids=["2x2-vs-1", "2x1-vs-2-on-one-host"])
def test_weights_independent_of_hosts(cluster, shared_synth, tmp_path, across, one_host):
    """float64: ranks spread over two hosts end with the weights of the same ranks' work
    on one host, to 1e-12 relative (up to the order of summation)."""
    weights = []
    for name, (n, ppn) in (("across", across), ("one-host", one_host)):
        out = tmp_path / name
        ok(cluster.mpiexec(n, "-m", "mpinn", *train_args(shared_synth, out), ppn=ppn))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["ranks"] == n
        if name == "across":  # mpinn knows where its ranks ran
            assert summary["hosts"] == ["node1", "node2"]
            assert summary["ranks_per_host"] == [n // 2, n // 2]
        weights.append(np.concatenate([w.ravel() for w in load_weights(out / "checkpoint.h5")]))
    spread, reference = weights
    assert np.linalg.norm(spread - reference) / np.linalg.norm(reference) <= 1e-12


def test_reproducible_is_bitwise_across_hosts(cluster, shared_synth, tmp_path):
    """--reproducible: 2 hosts x 2 ranks (sums over TCP) end with the bits of 1 rank."""
    states = []
    for n in (4, 1):
        out = tmp_path / f"p{n}"
        ok(cluster.mpiexec(n, "-m", "mpinn", *train_args(shared_synth, out), "--reproducible",
                           "--optimizer", "adam", "--dropout", "0.2", "--batch-size", "70",
                           "--dtype", "float32"))
        with h5py.File(out / "checkpoint.h5", "r") as f:
            states.append({k: f[g][k][...].tobytes() for g in ("model", "optimizer")
                           for k in f[g]})
    assert states[0] == states[1]


def test_gradients_cross_the_network(cluster, shared_synth, tmp_path):
    """2 hosts x 1 rank: each host receives at least the gradient buffer every step.

    At P = 2 any Allreduce algorithm (ring, recursive doubling, reduce + broadcast)
    delivers B bytes of the other rank's data to each rank: half the buffer in the
    reduce-scatter and half in the allgather for the ring. A model of ~70k parameters
    makes the gradients dwarf Hydra's control traffic on the same links."""
    out = tmp_path / "run"
    before = {host: cluster.bytes_sent_to(host) for host in cluster.veths}
    ok(cluster.mpiexec(2, "-m", "mpinn", *train_args(shared_synth, out),
                       "--hidden", "256,256"))  # the last flag wins
    received = {host: cluster.bytes_sent_to(host) - before[host] for host in before}
    summary = json.loads((out / "summary.json").read_text())
    gradients = summary["steps"] * summary["allreduce_bytes_per_step"]
    assert gradients > 10e6, summary  # the test means something only with a large buffer
    for host, nbytes in received.items():
        assert nbytes >= gradients, (host, nbytes, gradients)


def test_scaling_sweep_over_the_hosts(cluster, shared_synth, tmp_path):
    """`mpinn scaling run --launcher '$LAB/mpiexec -n {n} -ppn 1'`: one rank per host, so
    P = 2 runs on node1 and node2, and the report says so."""
    sweep, out = tmp_path / "sweep", tmp_path / "report"
    env = dict(child_env(), MPINN_TEST_LAB=str(cluster.launcher.parent))
    ok(run([sys.executable, "-m", "mpinn", "scaling", "run", shared_synth, "--out", sweep,
            "--ranks", "1,2", "--mode", "strong", "--launcher",
            "$MPINN_TEST_LAB/mpiexec -n {n} -ppn 1", "--hidden", "8", "--batch-size", "30",
            "--epochs", "1", "--progress", "off"], env=env, timeout=180))
    summary = json.loads((sweep / "strong" / "p2-r0" / "summary.json").read_text())
    assert summary["hosts"] == ["node1", "node2"] and not summary["oversubscribed"]
    ok(run([sys.executable, "-m", "mpinn", "scaling", "report", sweep, "--out", out]))
    with open(out / "points.csv", newline="") as f:
        rows = {r["ranks"]: r for r in csv.DictReader(f)}
    assert (rows["2"]["hosts"], rows["2"]["ranks_per_host"]) == ("2", "1")
    assert (rows["1"]["hosts"], rows["1"]["ranks_per_host"]) == ("1", "1")
    text = (out / "report.md").read_text()
    assert "between hosts, the network" in text and "node1, node2" in text
    # the calibration ran through the same launcher: its bench comm crossed the hosts
    comm = json.loads((sweep / "calibration" / "comm.json").read_text())
    assert list(comm["transports"]) == ["net"] and comm["hosts"] == ["node1", "node2"]
    assert all(r["predicted_step_s"] and r["prediction_error"] for r in rows.values())


def test_bench_comm_across_hosts(cluster, tmp_path):
    """2 hosts x 1 rank: bench comm finds one transport, `net` (TCP between the hosts),
    and fits it; 2 hosts x 2 ranks finds both."""
    for n, kinds in ((2, ["net"]), (4, ["net", "shm"])):
        out = tmp_path / f"comm{n}.json"
        ok(cluster.mpiexec(n, "-m", "mpinn", "bench", "comm", "--max-bytes", 1 << 20,
                           "--budget", 0.02, "--json", out, ppn=n // 2, timeout=120))
        r = json.loads(out.read_text())
        assert r["hosts"] == ["node1", "node2"] and r["ranks_per_host"] == [n // 2] * 2
        assert sorted(r["transports"]) == kinds
        net = r["transports"]["net"]
        assert net["pair"] == [0, n // 2] and net["alpha_s"] > 0 and net["beta_s_per_byte"] > 0
