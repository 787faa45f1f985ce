# Sourced by the jobs/*.sbatch scripts: the environment every rank runs in.
# Override any of these in the environment you submit from (sbatch exports it):
#   MPINN_HOME      the mpinn checkout (default: the directory sbatch was run from)
#   MPINN_VENV      its virtual environment (default: $MPINN_HOME/.venv; a cluster
#                   build is `make install MPI=system` after loading the MPI module)
#   MPINN_SRUN_MPI  srun's MPI plugin (default pmi2; `srun --mpi=list` shows yours)
#   MPINN_MODULES   modules to load first, e.g. "gcc openmpi hdf5" (default none)
# Anything else the ranks need (UCX_TLS=tcp UCX_NET_DEVICES=eth0 where UCX picks the
# wrong interface, FI_PROVIDER=...): export it before sbatch; sbatch and srun pass the
# submitting environment on to every rank (so never #SBATCH --export=NONE).

MPINN_HOME=${MPINN_HOME:-$SLURM_SUBMIT_DIR}
MPINN_VENV=${MPINN_VENV:-$MPINN_HOME/.venv}
MPINN_SRUN_MPI=${MPINN_SRUN_MPI:-pmi2}
if [ -n "${MPINN_MODULES:-}" ]; then
    # shellcheck disable=SC2086
    module load $MPINN_MODULES
fi
if [ ! -x "$MPINN_VENV/bin/mpinn" ]; then
    echo "$(basename "$0"): no mpinn in $MPINN_VENV (run make install, or set MPINN_VENV)" >&2
    exit 2
fi
# shellcheck disable=SC1091
source "$MPINN_VENV/bin/activate"

# One BLAS thread per core the job gave each task; srun no longer inherits
# --cpus-per-task from the allocation (Slurm >= 22.05), so pass it on.
threads=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
export SRUN_CPUS_PER_TASK=$threads

# Launch mpinn on N tasks of this allocation: mpinn_srun N ARGS... (its status: mpinn's)
# --kill-on-bad-exit: a rank that dies (killed, out of memory) ends the whole step
# instead of leaving the others spinning in a collective until the time limit.
# Status 3 (every rank checkpointed and stopped on a signal) is no failure, but the
# ranks do not exit together (on several nodes, milliseconds apart) and the first 3
# would get the others killed mid-exit, so that srun's status is no longer 3. Each task
# therefore turns 3 into 0 and leaves a flag file (next to the job's log, on a file
# system every node sees); the flag makes mpinn_srun return 3. The task's shell traps
# USR1 and TERM (signals reach every process of a step) and leaves them to mpinn.
mpinn_srun() {
    local ntasks=$1 flag status=0
    shift
    flag=$SLURM_SUBMIT_DIR/.mpinn-stopped-$SLURM_JOB_ID
    rm -f "$flag"
    # shellcheck disable=SC2016
    MPINN_STOPPED_FLAG=$flag srun --mpi="$MPINN_SRUN_MPI" --ntasks="$ntasks" \
        --cpus-per-task="$threads" --kill-on-bad-exit=1 bash -c \
        'trap : USR1 TERM; mpinn "$@" && exit 0 || s=$?
         if [ "$s" -eq 3 ]; then : > "$MPINN_STOPPED_FLAG"; exit 0; fi; exit "$s"' \
        mpinn "$@" || status=$?
    if [ -e "$flag" ]; then
        rm -f "$flag"
        [ "$status" -ne 0 ] || status=3
    fi
    return "$status"
}
