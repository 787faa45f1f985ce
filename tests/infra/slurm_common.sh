# slurm.conf settings that both test clusters share (sourced by slurm_cluster.sh and
# slurm_nodes.sh; they differ in the controller's host, the nodes and the file names).

# slurm_auth DIR: everything as root, one munged whose socket lives in DIR
slurm_auth() {
    cat <<CONF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job may start again after 10 s (default 120)
AuthInfo=socket=$1/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$1/state
CONF
}

# slurm_plugins PORT: the ports (PORT, PORT + 1), no cgroups, no accounting, pmi2
slurm_plugins() {
    cat <<CONF
SlurmctldPort=$1
SlurmdPort=$(($1 + 1))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true
ReturnToService=2
# job ids, hence the names of MPICH's shared-memory segments under pmi2, differ from
# one cluster start to the next: a segment left in /dev/shm by a rank killed in an
# earlier start must not meet a new job of the same id ("Out of memory" at MPI_Init)
FirstJobId=$((RANDOM * 1000 + 1))
CONF
}
