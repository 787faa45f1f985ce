"""Who speaks for the job: rank 0, once, after the ranks have reduced what it reports."""

from __future__ import annotations

from typing import Any, TextIO

from mpinn.base.console import say
from mpinn.comm.world import Comm


def print0(comm: Comm, *args: Any, file: TextIO | None = None) -> None:
    """Print once, from rank 0 (the one place ranks decide who logs)."""
    if comm.rank == 0:
        say(" ".join(str(a) for a in args), file)
