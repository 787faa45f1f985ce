"""base: what every layer stands on, without MPI or a model: exit codes and the errors
that map to them, one-write console lines, atomic files, HDF5 opened or explained, CPUs
and BLAS threads, stop signals. Imports nothing else of mpinn."""
