"""perf: how fast, and why: the benchmarks (bench io, step, comm), the cost model,
scaling studies (a serial driver that launches one MPI job per point and never starts
MPI itself), their reports, projections and plots."""
