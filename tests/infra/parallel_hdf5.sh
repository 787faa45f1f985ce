#!/usr/bin/env bash
# Build a virtual environment whose mpi4py and h5py use ONE MPI and a parallel
# HDF5 (h5py's `mpio` driver), with mpinn installed in it. Idempotent: pip's
# wheel cache keeps the two compiled packages, so a second build takes seconds.
#
#   tests/infra/parallel_hdf5.sh VENV
#
# Where the MPI and HDF5 come from:
#   HDF5_DIR set      a site's parallel HDF5 (e.g. `module load hdf5-parallel`,
#                     HDF5_DIR=$HDF5_ROOT) and the MPI whose compiler wrapper is
#                     $MPICC (default mpicc) and launcher $MPIEXEC (default mpiexec)
#   otherwise         Debian/Ubuntu's MPICH and libhdf5-mpich-dev, installed with
#                     apt-get when missing (needs root)
# Exit status 3: the system packages are missing and cannot be installed here.
set -euo pipefail

venv=${1:?usage: parallel_hdf5.sh VENV}
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
stamp=$venv/.mpinn-parallel-hdf5
# Up to date: built after the last change of the package metadata and of this script.
if [ -f "$stamp" ] && [ "$stamp" -nt "$here/../../setup.cfg" ] && [ "$stamp" -nt "$0" ]; then
    exit 0
fi

if [ -z "${HDF5_DIR:-}" ]; then
    multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
    HDF5_DIR=/usr/lib/$multiarch/hdf5/mpich
    MPICC=${MPICC:-mpicc.mpich}
    MPIEXEC=${MPIEXEC:-mpiexec.mpich}
    if [ ! -e "$HDF5_DIR/libhdf5.so" ] || ! command -v "$MPICC" >/dev/null \
            || ! command -v "$MPIEXEC" >/dev/null; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            echo "parallel HDF5 is not installed and cannot be installed here (needs root and apt-get)." >&2
            echo "To enable it: sudo apt-get install mpich libmpich-dev libhdf5-mpich-dev," >&2
            echo "or point HDF5_DIR (and MPICC, MPIEXEC) at a site's parallel HDF5 and MPI." >&2
            exit 3
        fi
        echo "installing Debian's MPICH and parallel HDF5 (mpich libmpich-dev libhdf5-mpich-dev)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends mpich libmpich-dev libhdf5-mpich-dev >/dev/null
    fi
else
    MPICC=${MPICC:-mpicc}
    MPIEXEC=${MPIEXEC:-mpiexec}
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
# Build tools first, then compile mpi4py and h5py against the chosen MPI and HDF5.
# Never let pip build h5py in an isolated environment: it would pin an mpi4py
# that has no wheel and compile it for a quarter of an hour.
"${pip[@]}" numpy "Cython>=3,<4" pkgconfig "setuptools>=77" packaging wheel
MPICC=$MPICC "${pip[@]}" --no-binary=mpi4py mpi4py
CC=$MPICC HDF5_MPI=ON HDF5_DIR=$HDF5_DIR "${pip[@]}" --no-binary=h5py --no-build-isolation h5py
"${pip[@]}" -e '.[test]'
# The venv's mpiexec starts this MPI's launcher (a wrapper, not a link: Hydra finds
# its proxy next to the path it was started as).
launcher=$(readlink -f "$(command -v "$MPIEXEC")")
rm -f "$venv/bin/mpiexec"  # never write through an old link into the MPI's own launcher
printf '#!/bin/sh\nexec %s "$@"\n' "$launcher" > "$venv/bin/mpiexec.tmp"
chmod +x "$venv/bin/mpiexec.tmp"
mv "$venv/bin/mpiexec.tmp" "$venv/bin/mpiexec"

# One process, one MPI: the launcher must start a 2-rank world that h5py can use.
check=$(mktemp)
trap 'rm -f "$check"' EXIT
cat > "$check" <<'PY'
import h5py
from mpi4py import MPI
comm = MPI.COMM_WORLD
assert h5py.get_config().mpi, "h5py was built without MPI"
assert comm.size == 2, f"launcher and mpi4py use different MPIs (world size {comm.size}, expected 2)"
if comm.rank == 0:
    print(f"parallel HDF5 ready: h5py {h5py.version.version} (HDF5 {h5py.version.hdf5_version}, "
          f"mpi), {MPI.Get_library_version().splitlines()[0].strip()}")
PY
timeout 60 "$venv/bin/mpiexec" -n 2 "$venv/bin/python" "$check"
touch "$stamp"
