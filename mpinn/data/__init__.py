"""data: dataset files: their layout and checks, the structure probe, which rows each
rank reads at each step (sampler, held-out rows), the readers, the prefetching feed and
block shuffle's windows, and the writers (serial, and from every rank at once)."""
