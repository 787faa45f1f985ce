#!/usr/bin/env bash
# A SLURM cluster over the hosts of a network-namespace cluster (netns_cluster.sh):
# slurmctld and munged in the root namespace, one slurmd per host under its own node
# name, so that `sbatch -N 2` and `srun -N 2 --mpi=pmi2` place tasks on node1, node2.
#   tests/infra/slurm_nodes.sh start DIR --netns NETNS_DIR   (root; NETNS_DIR started)
#   tests/infra/slurm_nodes.sh stop DIR
# Clients find it with SLURM_CONF=DIR/slurm.conf. MPI tasks across the hosts need
# UCX_TLS=tcp UCX_NET_DEVICES=eth0 in their environment (otherwise UCX picks lo).
# The slurmctld port is the first free one from 16827 (slurm_cluster.sh uses 16817), so
# this cluster and a one-node test cluster coexist. start is idempotent; stop removes
# every daemon and job step it started, and is safe twice and after a failed start.
# Exit status 3: not root, or SLURM not installed (slurm_cluster.sh installs it).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/slurm_common.sh"
usage="usage: slurm_nodes.sh start DIR --netns NETNS_DIR | stop DIR"
action=${1:?$usage}
dir=$(mkdir -p "${2:?$usage}" && cd "$2" && pwd)
shift 2
conf=$dir/slurm.conf
export SLURM_CONF=$conf
export PATH=$PATH:/usr/sbin:/sbin  # munged, slurmctld, slurmd, ip

# Kill a daemon by its pid file and wait until it has exited (it writes state on exit).
kill_pidfile() {
    local pid
    [ -f "$1" ] || return 0
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$1"
}

stop() {
    local ns pidfile
    # job steps outlive slurmd: end the jobs, then whatever slurmstepd is left in our hosts
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
    fi
    for pidfile in "$dir"/slurmd-*.pid; do
        [ -e "$pidfile" ] && kill_pidfile "$pidfile"
    done
    for ns in $(cut -d' ' -f2 "$dir/nodes" 2>/dev/null || true); do
        [ -e "/run/netns/$ns" ] || continue
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            case $(cat "/proc/$pid/comm" 2>/dev/null) in
                slurmstepd|slurmd) kill -9 "$pid" 2>/dev/null || true;;
            esac
        done
    done
    kill_pidfile "$dir/slurmctld.pid"
    kill_pidfile "$dir/munged.pid"
    rm -rf "$dir/state" "$dir"/spool-* "$dir/munge" "$dir/nodes"
}

if [ "$action" = stop ]; then
    stop
    exit 0
fi
[ "$action" = start ] || { echo "unknown action $action; $usage" >&2; exit 2; }

netns=
while [ $# -gt 0 ]; do
    case $1 in
        --netns) netns=$(cd "${2:?--netns NETNS_DIR}" && pwd); shift 2;;
        *) echo "unknown option $1; $usage" >&2; exit 2;;
    esac
done
[ -n "$netns" ] || { echo "$usage" >&2; exit 2; }
if [ "$(id -u)" != 0 ]; then
    echo "the daemons run as root in network namespaces: run as root (sudo)" >&2
    exit 3
fi
for daemon in slurmctld slurmd munged sbatch nsenter; do
    command -v "$daemon" >/dev/null || {
        echo "$daemon not found: apt-get install slurmctld slurmd slurm-client munge" \
             "(or start tests/infra/slurm_cluster.sh once, which installs them)" >&2; exit 3; }
done
[ -s "$netns/links" ] && [ -s "$netns/hosts" ] || {
    echo "$netns is not a started netns cluster (no links, hosts): start it with" \
         "tests/infra/netns_cluster.sh start $netns --hosts N" >&2; exit 2; }

# DIR/nodes: "nodeI NAMESPACE ADDRESS" per host, from the netns cluster's state
host=$(hostname -s)
ctld_addr=$(awk -v h="$(hostname)" '$2 == h {print $1}' "$netns/hosts")
[ -n "$ctld_addr" ] || { echo "no address of $(hostname) in $netns/hosts" >&2; exit 2; }
nodes=$(while read -r name ns _; do
            echo "$name $ns $(awk -v h="$name" '$2 == h {print $1}' "$netns/hosts")"
        done < "$netns/links")

# Already up over the same hosts? Then nothing to do; otherwise start afresh.
if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null \
        && [ "$(cat "$dir/nodes" 2>/dev/null)" = "$nodes" ] \
        && [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" \
             = "$(wc -l <<< "$nodes")" ]; then
    echo "SLURM cluster on the netns hosts already up: SLURM_CONF=$conf"
    exit 0
fi
stop
started=
trap '[ -n "$started" ] || { echo "slurm_nodes: start failed; stopping what it started" >&2; stop; }' EXIT
echo "$nodes" > "$dir/nodes"

port=16827  # the first free even port from here: slurmctld's (slurmd's are per namespace)
while [ -n "$(ss -Hltn "sport = :$port")" ]; do port=$((port + 2)); done

mkdir -p "$dir/state" "$dir/munge"
chmod 0755 "$dir/munge"  # munged refuses a socket directory others cannot enter
[ -f "$dir/munge.key" ] || head -c 1024 /dev/urandom > "$dir/munge.key"
chmod 0400 "$dir/munge.key"
# one munged: its socket is a file, reachable from every network namespace
munged --key-file="$dir/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge.seed" \
    --force

hardware=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ UpTime=.*//')
cat > "$conf" <<CONF
# mpinn test cluster: slurmctld on the bridge of a netns cluster, a slurmd per host
ClusterName=mpinn-test2
SlurmctldHost=$host($ctld_addr)
$(slurm_auth "$dir")
# %n: each node's slurmd has its own spool, pid file and log
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
$(slurm_plugins "$port")
$(while read -r name _ addr; do
      echo "NodeName=$name NodeAddr=$addr $hardware State=UNKNOWN"
  done <<< "$nodes")
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -f "$conf"
# nsenter, not `ip netns exec`: that remounts /sys and slurmd then finds no cgroup fs
while read -r name ns _; do
    mkdir -p "$dir/spool-$name"
    nsenter --net="/run/netns/$ns" unshare --uts \
        sh -c 'hostname "$1" && exec slurmd -f "$2" -N "$1"' sh "$name" "$conf"
done <<< "$nodes"
want=$(wc -l <<< "$nodes")
for _ in $(seq 100); do
    if [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" = "$want" ]
    then
        started=yes
        echo "SLURM cluster on the netns hosts up ($want nodes, slurmctld port $port):" \
             "SLURM_CONF=$conf"
        exit 0
    fi
    sleep 0.2
done
echo "SLURM cluster on the netns hosts did not come up; logs in $dir" >&2
sinfo -N >&2 || true
tail -n 5 "$dir/slurmctld.log" "$dir"/slurmd-*.log >&2 || true
exit 1
