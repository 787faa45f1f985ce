#!/usr/bin/env bash
# Several MPI hosts on one machine: network namespaces node1..nodeN on a private bridge.
#   tests/infra/netns_cluster.sh start DIR --hosts N [--rate RATE]   (root)
#   tests/infra/netns_cluster.sh stop DIR
# start gives each host a namespace, an interface named eth0 on a private /24 (the
# root namespace gets .254 on the bridge, for Hydra's control port) and, with
# --rate (1gbit, 10gbit, 500mbit), a tbf on both ends of its veth link (tbf shapes
# egress only). It writes
#   DIR/mpiexec     mpiexec -n P [-ppn K] PROGRAM...: Hydra over the hosts, block
#                   placement (K per host; default ceil(P/N)), UCX over TCP on eth0
#   DIR/hosts       the names of the hosts (also in /etc/netns/NS/hosts; /etc/hosts is
#                   never touched: the launcher bind-mounts DIR/hosts in its own mount
#                   namespace)
#   DIR/links       "nodeI NAMESPACE ROOT-SIDE-VETH" per host (traffic counters)
#   DIR/created     every namespace, link and file made, recorded before it is made
# stop removes all of it (kills what still runs inside the namespaces first); it is
# safe after a crash, after a half-failed start, and twice. start is idempotent.
# Exit status 3: not root (namespaces need it).
set -euo pipefail
usage="usage: netns_cluster.sh start DIR --hosts N [--rate RATE] | stop DIR"
action=${1:?$usage}
dir=$(mkdir -p "${2:?$usage}" && cd "$2" && pwd)
shift 2
export PATH=$PATH:/usr/sbin:/sbin  # ip, tc

# Names derive from DIR, so that two clusters (a lab and a test run) do not collide,
# and so that stop finds everything even when DIR/created is gone. Interface names
# have at most 15 characters.
id=$(printf %s "$dir" | md5sum | cut -c1-5)
prefix=mpinn$id          # namespaces mpinnXXXXX-node1 ...
bridge=mpb$id
veth() { echo "mpv$id-$1"; }  # root side of host I's link

stop() {
    local ns link
    # namespaces: those recorded plus any with our prefix (a start killed midway)
    for ns in $( { grep -s '^netns ' "$dir/created" | cut -d' ' -f2;
                   ip netns list | cut -d' ' -f1 | grep "^$prefix-" || true; } | sort -u); do
        if [ -e "/run/netns/$ns" ]; then
            # ranks or proxies left behind by a killed job keep the namespace alive
            ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
            ip netns del "$ns" 2>/dev/null || true
        fi
        rm -rf "/etc/netns/$ns"
    done
    # links: deleting the root side of a veth deletes its peer
    for link in $( { grep -s '^link ' "$dir/created" | cut -d' ' -f2;
                     ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 \
                         | grep -E "^(mpv$id-|$bridge\$)" || true; } | sort -u); do
        ip link del "$link" 2>/dev/null || true
    done
    # an empty /etc/netns does nothing; one in use by others is not empty and stays
    rmdir /etc/netns 2>/dev/null || true
    rm -f "$dir/mpiexec" "$dir/netns-exec" "$dir/hosts" "$dir/hosts.tmp" "$dir/links" \
        "$dir/shape" "$dir/created"
}

if [ "$action" = stop ]; then
    stop
    exit 0
fi
[ "$action" = start ] || { echo "unknown action $action; $usage" >&2; exit 2; }

hosts=0 rate=
while [ $# -gt 0 ]; do
    case $1 in
        --hosts) hosts=$2; shift 2;;
        --rate) rate=$2; shift 2;;
        *) echo "unknown option $1; $usage" >&2; exit 2;;
    esac
done
[[ $hosts =~ ^[1-9][0-9]?$ && $hosts -le 50 ]] || { echo "--hosts N: 1..50, not '$hosts'" >&2; exit 2; }
if [ -n "$rate" ] && ! [[ $rate =~ ^[0-9]+[kmg]bit$ ]]; then
    echo "--rate: a number and kbit, mbit or gbit (1gbit), not '$rate'" >&2; exit 2
fi
if [ "$(id -u)" != 0 ]; then
    echo "network namespaces need root: run as root (sudo)" >&2
    exit 3
fi

# Already up with the same shape? Then nothing to do; otherwise start afresh.
want="hosts=$hosts rate=${rate:-none}"
if [ -x "$dir/mpiexec" ] && [ "$(cat "$dir/shape" 2>/dev/null)" = "$want" ] \
        && ip link show "$bridge" >/dev/null 2>&1 \
        && [ "$(ip netns list | grep -c "^$prefix-")" = "$hosts" ]; then
    echo "netns cluster already up in $dir ($want)"
    exit 0
fi
stop
started=
trap '[ -n "$started" ] || { echo "netns cluster: start failed; removing what it made" >&2; stop; }' EXIT
record() { echo "$*" >> "$dir/created"; }

# A free /24: 10.213.X.0 with X from the id, the next one if that is routed already.
x=$(( 0x$id % 250 ))
while [ -n "$(ip -4 route show "10.213.$x.0/24")" ]; do x=$(( (x + 1) % 250 )); done
net=10.213.$x
root_addr=$net.254

record "link $bridge"
ip link add "$bridge" type bridge
ip addr add "$root_addr/24" dev "$bridge"
ip link set "$bridge" up

# tbf: a burst of about 1 ms at the rate (at least 64 kB: 1 Gbit/s measured ~108 MB/s)
shape() {  # shape DEV [NAMESPACE]
    local n=${rate%%[kmg]bit} burst
    case $rate in *kbit) burst=$(( n * 125 / 1000 ));; *mbit) burst=$(( n * 125 ));;
                  *gbit) burst=$(( n * 125000 ));; esac
    (( burst < 65536 )) && burst=65536
    tc ${2:+-n "$2"} qdisc replace dev "$1" root tbf rate "$rate" burst "$burst" latency 400ms
}

{ echo "127.0.0.1 localhost"; echo "$root_addr $(hostname)"; } > "$dir/hosts.tmp"
for i in $(seq "$hosts"); do echo "$net.$i node$i"; done >> "$dir/hosts.tmp"
record "file $dir/hosts"
mv "$dir/hosts.tmp" "$dir/hosts"
: > "$dir/links"
for i in $(seq "$hosts"); do
    ns=$prefix-node$i
    record "netns $ns"
    ip netns add "$ns"
    mkdir -p "/etc/netns/$ns"
    cp "$dir/hosts" "/etc/netns/$ns/hosts"   # `ip netns exec` bind-mounts it on /etc/hosts
    record "link $(veth "$i")"
    ip link add "$(veth "$i")" type veth peer name eth0 netns "$ns"
    ip link set "$(veth "$i")" master "$bridge" up
    # every host's interface is eth0: UCX_NET_DEVICES=eth0 then holds on all of them
    ip -n "$ns" addr add "$net.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    if [ -n "$rate" ]; then
        shape "$(veth "$i")"
        shape eth0 "$ns"
    fi
    echo "node$i $ns $(veth "$i")" >> "$dir/links"
done

# Hydra's ssh launcher runs `SCRIPT [ssh options] HOST COMMAND`: run COMMAND in
# HOST's namespace under its own hostname (MPI_Get_processor_name reports it).
record "file $dir/netns-exec"
cat > "$dir/netns-exec" <<EOF
#!/usr/bin/env bash
# Generated by netns_cluster.sh: an ssh stand-in for Hydra (-launcher-exec).
set -euo pipefail
while [ \$# -gt 0 ] && [[ \$1 == -* ]]; do
    case \$1 in -o|-p|-l|-i) shift 2;; *) shift;; esac   # ssh options: ignored
done
host=\${1:?no host}; shift
[[ \$host =~ ^node[0-9]+\$ ]] && [ -e "/run/netns/$prefix-\$host" ] \\
    || { echo "netns-exec: no host \$host in this cluster" >&2; exit 255; }
exec ip netns exec "$prefix-\$host" unshare --uts sh -c 'hostname "\$0" && exec sh -c "\$1"' "\$host" "\$*"
EOF
chmod +x "$dir/netns-exec"

# The launcher. Its mpiexec: \$MPINN_MPIEXEC when set at launch, else the one found now.
default_mpiexec=${MPINN_MPIEXEC:-$(command -v "$(dirname "$(command -v python3)")/mpiexec" \
    || command -v mpiexec || echo mpiexec)}
case $default_mpiexec in */*) default_mpiexec=$(realpath -m "$default_mpiexec");; esac  # the
# Makefile's is relative to the checkout; the launcher runs from anywhere
record "file $dir/mpiexec"
cat > "$dir/mpiexec" <<EOF
#!/usr/bin/env bash
# Generated by netns_cluster.sh: mpiexec -n P [-ppn K] [HYDRA OPTIONS] PROGRAM ARGS...
# over node1..node$hosts, K ranks per host in order (default ceil(P/$hosts)).
set -euo pipefail
np=1 ppn=
while [ \$# -gt 0 ]; do
    case \$1 in
        -n|-np) np=\$2; shift 2;;
        -ppn) ppn=\$2; shift 2;;
        *) break;;
    esac
done
ppn=\${ppn:-\$(( (np + $hosts - 1) / $hosts ))}
used=\$(( (np + ppn - 1) / ppn ))
if [ "\$used" -gt $hosts ]; then
    echo "mpiexec: -n \$np at -ppn \$ppn needs \$used hosts; this cluster has $hosts" >&2
    exit 2
fi
hostlist=\$(for i in \$(seq "\$used"); do printf 'node%d:%d,' "\$i" "\$ppn"; done)
# UCX would use shared memory between namespaces (one kernel): force TCP on eth0.
# The host names resolve through $dir/hosts, bind-mounted on /etc/hosts
# in a mount namespace of this launcher only.
exec unshare --mount --propagation private sh -c 'mount --bind "\$0" /etc/hosts && exec "\$@"' \\
    "$dir/hosts" "\${MPINN_MPIEXEC:-$default_mpiexec}" \\
    -launcher ssh -launcher-exec "$dir/netns-exec" -iface $bridge \\
    -hosts "\${hostlist%,}" -n "\$np" \\
    -genvall -genv UCX_TLS tcp -genv UCX_NET_DEVICES eth0 "\$@"
EOF
chmod +x "$dir/mpiexec"
echo "$want" > "$dir/shape"
record "file $dir/shape"
started=yes
echo "netns cluster up: $hosts hosts on $net.0/24 (bridge $bridge), rate ${rate:-unshaped}"
echo "launch with $dir/mpiexec -n P [-ppn K] PROGRAM..."
