#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the tests of jobs/.
#   tests/infra/slurm_cluster.sh start DIR   install if needed, start, wait until usable
#   tests/infra/slurm_cluster.sh stop DIR    stop the daemons started from DIR
# Clients find it with SLURM_CONF=DIR/slurm.conf. Debian's slurmctld, slurmd,
# slurm-client and munge (installed with apt-get when missing: needs root), run
# as root without systemd; state, spool and logs live in DIR. Idempotent.
# Exit status 3: SLURM is not installed and cannot be installed here.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/slurm_common.sh"
action=${1:?usage: slurm_cluster.sh start|stop DIR}
dir=$(mkdir -p "${2:?usage: slurm_cluster.sh start|stop DIR}" && cd "$2" && pwd)
conf=$dir/slurm.conf
export SLURM_CONF=$conf
export PATH=$PATH:/usr/sbin:/sbin  # munged, slurmctld and slurmd live there

stop() {  # and wait until each daemon has exited (it writes state while stopping)
    local name pid
    for name in slurmd slurmctld munged; do
        if [ -f "$dir/$name.pid" ]; then
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            rm -f "$dir/$name.pid"
        fi
    done
}

if [ "$action" = stop ]; then
    stop
    exit 0
fi
[ "$action" = start ] || { echo "unknown action $action" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "SLURM is not installed and cannot be installed here (needs root and apt-get):" >&2
        echo "sudo apt-get install slurmctld slurmd slurm-client munge" >&2
        exit 3
    fi
    echo "installing Debian's slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
        >/dev/null 2>&1 || { apt-get update -qq; apt-get install -y -qq \
        --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
fi
if [ "$(id -u)" != 0 ]; then
    echo "the test cluster runs its daemons as root (SlurmUser=root); run as root" >&2
    exit 3
fi

# Already up (a previous start from DIR)? Then nothing to do.
if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null \
        && scontrol ping 2>/dev/null | grep -q UP; then
    exit 0
fi
stop
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
chmod 0755 "$dir/munge"
[ -f "$dir/munge.key" ] || { head -c 1024 /dev/urandom > "$dir/munge.key"; }
chmod 0400 "$dir/munge.key"
munged --key-file="$dir/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge.seed" \
    --force

node=$(slurmd -C | head -1 | sed -e 's/ UpTime=.*//')   # NodeName=... CPUs=... RealMemory=...
host=$(hostname -s)
# Ports: the first free pair from 16817, so that clusters started from several
# directories (two checkouts testing at once) coexist.
port=16817
while [ -n "$(ss -Hltn "( sport = :$port or sport = :$((port + 1)) )")" ]; do
    port=$((port + 2))
done
cat > "$conf" <<CONF
# mpinn test cluster: one node, everything as root, no accounting, no cgroups
ClusterName=mpinn-test
SlurmctldHost=$host(127.0.0.1)
$(slurm_auth "$dir")
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
$(slurm_plugins "$port")
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -f "$conf"
slurmd -f "$conf"
for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "SLURM test cluster up (port $port): SLURM_CONF=$conf"
        exit 0
    fi
    sleep 0.2
done
echo "SLURM test cluster did not come up; logs in $dir" >&2
tail -5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
exit 1
