"""run: a run on disk: its configuration (every setting defined once) resolved from TOML
and flags, the run directory with its lock and checkpoint history, the checkpoint file.
Rank 0 does the writing; the layers above agree on its verdicts through comm."""
