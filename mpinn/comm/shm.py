"""MPICH's shared-memory segment of this node, removed before an abort.

MPICH keeps one named segment per node and job in /dev/shm (``mpich_shm_*``) for as
long as the job runs, and removes it in MPI_Finalize. MPI_Abort and a killed rank
skip that, and each such job leaves the segment behind: a few MB of RAM, never
freed until the next reboot. The rank that aborts maps its node's segment, so it
can remove the name first. Ranks that still map it keep their mapping (a removed
name is not a removed segment), and nothing opens it by name after MPI_Init.
Other nodes' segments stay; the batch system's job cleanup, or a reboot, removes
them (see docs/failures.md).
"""

from __future__ import annotations

import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIXES = ("mpich_shm_",)  # MPICH's, also under Intel MPI's and MVAPICH's ch4


def mapped_segments(maps: Path = Path("/proc/self/maps"), prefixes: tuple[str, ...] = PREFIXES
                    ) -> set[Path]:
    """The named segments (names starting with one of prefixes) that the process whose
    /proc/PID/maps is `maps` maps: this process's by default; none if /proc is not Linux's."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return set()
    found = set()
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset device inode [path]
        if len(fields) < 6 or fields[5].endswith(" (deleted)"):
            continue
        path = Path(fields[5])
        if path.parent == SHM_DIR and path.name.startswith(prefixes):
            found.add(path)
    return found


def release_segments() -> None:
    """Remove the names of the segments this process maps (before MPI_Abort)."""
    for path in mapped_segments():
        try:
            os.unlink(path)
        except OSError:
            pass  # already gone, or another user's: nothing to release here
