# mpinn: `make demo` trains on real data with 2 ranks; `make test` runs the suite.
# Both create the virtual environment first (no root needed).
#
#   make install              venv + mpinn + MPI from PyPI (the `mpich` wheel)
#   make install MPI=system   venv + mpinn + mpi4py compiled against the MPI whose
#                             `mpicc` is on PATH (clusters: load your MPI module first;
#                             MPICC=... names another compiler wrapper)
#   make demo [NP=2]          digits data set -> HDF5, train with NP ranks, evaluate
#   make test                 the whole suite (tests launch mpiexec with 1..4 ranks)
#   make clean                remove the venv and the demo's data/ and runs/

PYTHON ?= python3
VENV   ?= .venv
MPI    ?= pip
MPICC  ?= mpicc
NP     ?= 2
PYTEST_ARGS ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.mpinn-installed-$(MPI)
# The launcher that belongs to the MPI mpi4py uses: the wheel's, or the site's.
MPIEXEC ?= $(if $(filter pip,$(MPI)),$(BIN)/mpiexec,mpiexec)
export MPINN_MPIEXEC := $(MPIEXEC)

.PHONY: install demo test clean

install: $(STAMP)

# A real file target: repeated `make` calls reuse the venv until setup.cfg changes.
$(STAMP): setup.cfg pyproject.toml
	@case "$(MPI)" in pip|system) ;; *) echo "MPI must be pip or system, not '$(MPI)'" >&2; exit 2;; esac
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.mpinn-installed-*
ifeq ($(MPI),system)
	$(BIN)/python -m pip uninstall -q -y mpich 2>/dev/null || true
	env MPICC=$(MPICC) $(BIN)/python -m pip install --no-binary=mpi4py --force-reinstall --no-deps mpi4py
	$(BIN)/python -m pip install -e '.[digits,test]'
else
	$(BIN)/python -m pip install -e '.[mpich,digits,test]'
endif
	touch $@

demo: install
	mkdir -p data runs
	$(BIN)/mpinn data digits data/digits.h5
	$(MPIEXEC) -n $(NP) $(BIN)/mpinn train data/digits.h5 --config jobs/digits.toml \
		--out runs/digits --overwrite
	$(MPIEXEC) -n $(NP) $(BIN)/mpinn evaluate runs/digits/checkpoint.h5 data/digits.h5

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data runs *.egg-info
