"""jobs/train.sbatch on two SLURM nodes: slurmctld on the bridge of a network-namespace
cluster and a slurmd per host (tests/infra/slurm_nodes.sh), so a job's ranks run on
node1 and node2 and talk TCP.

`make test` starts it and exports MPINN_SLURM2_CONF; run alone as root, these tests
start one of their own (and its netns hosts) and remove it after. Oracle for the
preempted job: the same job on the same two nodes, never interrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_slurm import PREEMPT_ARGS, assert_same_weights, job_field, preempt, sbatch, wait_done

from conftest import HERE, child_env, ok, run, unavailable

INFRA = HERE / "infra"
HOSTS = ["node1", "node2"]
TWO_NODES = ("--nodes=2", "--ntasks-per-node=1")


def start(script: str, *args) -> None:
    started = subprocess.run(["bash", INFRA / script, "start", *args], timeout=120,
                             capture_output=True, text=True)
    if started.returncode == 3:  # not root, or no SLURM
        unavailable("a two-node SLURM cluster", started.stderr.strip())
    if started.returncode != 0:
        pytest.fail(f"{script} start failed:\n{started.stdout}{started.stderr}")


@pytest.fixture(scope="module")
def slurm2(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The environment to submit from (sbatch and srun pass it to the ranks): the
    cluster's SLURM_CONF, mpinn's checkout and venv, and MPICH's ofi netmod over TCP on
    eth0 (every host's interface). Not UCX (UCX_TLS=tcp UCX_NET_DEVICES=eth0 works, but
    its larger address exchange goes through srun's PMI in segments of about 1 kB, and
    Slurm 22.05's pmi2 plugin now and then splits such a line: "mpi/pmi2: value not
    properly terminated in client request", MPI_Init fails, or hangs; 2 of ~12 runs)."""
    env = child_env()
    env.update(MPINN_HOME=str(HERE.parent), MPINN_VENV=str(Path(sys.executable).parent.parent),
               MPIR_CVAR_CH4_NETMOD="ofi", FI_PROVIDER="tcp", FI_TCP_IFACE="eth0")
    conf = os.environ.get("MPINN_SLURM2_CONF")
    if conf:  # started (and stopped) by `make test`
        yield dict(env, SLURM_CONF=conf)
        return
    if os.geteuid() != 0:
        unavailable("a two-node SLURM cluster",
                    "run the tests as root (`sudo make test`, or as root: "
                    "bash tests/infra/netns_cluster.sh start NET --hosts 2, "
                    "bash tests/infra/slurm_nodes.sh start DIR --netns NET "
                    "and MPINN_SLURM2_CONF=DIR/slurm.conf)")
    net, state = tmp_path_factory.mktemp("netns"), tmp_path_factory.mktemp("slurm2")
    try:
        start("netns_cluster.sh", net, "--hosts", str(len(HOSTS)))
        start("slurm_nodes.sh", state, "--netns", net)
        yield dict(env, SLURM_CONF=str(state / "slurm.conf"))
    finally:  # also after a failed start or failed tests; the daemons before their hosts
        subprocess.run(["bash", INFRA / "slurm_nodes.sh", "stop", state], timeout=60)
        subprocess.run(["bash", INFRA / "netns_cluster.sh", "stop", net], timeout=60)


def test_srun_places_a_task_on_each_node(slurm2):
    result = ok(run(["srun", "-N", "2", "-n", "2", "hostname"], env=slurm2, timeout=60))
    assert sorted(result.stdout.split()) == HOSTS


def test_train_sbatch_on_two_nodes(slurm2, synth, tmp_path):
    job = sbatch(slurm2, tmp_path, "train.sbatch", *TWO_NODES, MPINN_DATA=synth,
                 MPINN_RUN_DIR=tmp_path / "run", MPINN_TRAIN_ARGS="--epochs 2 --hidden 8")
    log = tmp_path / f"mpinn-train-{job}.out"
    assert wait_done(slurm2, job, timeout=120) == "COMPLETED", log.read_text()
    assert job_field(slurm2, job, "NodeList") == "node[1-2]"
    assert "2 ranks on 2 hosts" in log.read_text()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["hosts"] == HOSTS


def test_preempted_two_node_job_ends_bit_identical(slurm2, synth, tmp_path):
    """USR1, checkpoint, requeue, resume on both nodes: weights as if never stopped."""
    (tmp_path / "preempted").mkdir()
    resumed = preempt(slurm2, tmp_path / "preempted", synth, PREEMPT_ARGS, *TWO_NODES)
    reference = tmp_path / "reference"
    job = sbatch(slurm2, tmp_path, "train.sbatch", *TWO_NODES, MPINN_DATA=synth,
                 MPINN_RUN_DIR=reference, MPINN_TRAIN_ARGS=PREEMPT_ARGS)
    log = tmp_path / f"mpinn-train-{job}.out"
    assert wait_done(slurm2, job, timeout=120) == "COMPLETED", log.read_text()
    assert json.loads((reference / "summary.json").read_text())["hosts"] == HOSTS
    assert_same_weights(reference, resumed)
