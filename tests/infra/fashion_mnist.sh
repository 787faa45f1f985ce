#!/usr/bin/env bash
# Put the four Fashion-MNIST idx files (Debian package dataset-fashion-mnist, MIT
# licence) into DIR. Idempotent. Uses the installed package if present, else
# downloads the .deb with apt-get (no root needed once apt's lists know the
# package; as root, refreshes them) and unpacks it with dpkg-deb.
#   tests/infra/fashion_mnist.sh DIR
# Exit status 3: not available on this machine (not Debian-like, or unknown package).
set -euo pipefail
dir=${1:?usage: fashion_mnist.sh DIR}
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz
       t10k-labels-idx1-ubyte.gz)
have() { for f in "${files[@]}"; do [ -s "$1/$f" ] || return 1; done; }

have "$dir" && exit 0
mkdir -p "$dir"
installed=/usr/share/datasets/fashion-mnist
if have "$installed"; then
    for f in "${files[@]}"; do cp "$installed/$f" "$dir/"; done
    exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "Fashion-MNIST: no apt-get/dpkg-deb here; put the four idx .gz files in $dir" >&2
    exit 3
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && apt-get download dataset-fashion-mnist >/dev/null 2>&1); then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        (cd "$work" && apt-get download dataset-fashion-mnist >/dev/null)
    else
        echo "Fashion-MNIST: apt-get cannot download dataset-fashion-mnist (run 'sudo apt-get update'," >&2
        echo "or put the four idx .gz files in $dir)" >&2
        exit 3
    fi
fi
dpkg-deb -x "$work"/dataset-fashion-mnist_*.deb "$work/root"
for f in "${files[@]}"; do cp "$work/root$installed/$f" "$dir/"; done
have "$dir"
