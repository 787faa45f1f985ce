"""Lines to the terminal: each in one write(2), so that the lines of ranks never mix."""

from __future__ import annotations

import os
import sys
from typing import TextIO


def say(text: str, file: TextIO | None = None) -> None:
    """Write text and a newline in ONE write(2), after whatever the stream buffered.

    mpiexec merges the output of all ranks; a line written in one call (under
    PIPE_BUF, 4 KiB) reaches it whole, so lines of different ranks never share
    a line of the job's output.
    """
    stream = file or sys.stdout
    stream.flush()
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor
        print(text, file=stream, flush=True)
        return
    data = (text + "\n").encode(errors="replace")
    while data:
        data = data[os.write(fd, data):]
