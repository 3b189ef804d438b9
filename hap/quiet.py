"""Keep what libraries print out of hap's own output.

Solver libraries write to file descriptor 1 from C code (highspy ≥ 1.16 prints a banner
the first time a solver is made), past ``sys.stdout``; ``hap-plan --json`` must still
print exactly one JSON object. ``library_output()`` points descriptor 1 at a temporary
file while a library call runs and hands back what it wrote, so the caller decides where
it goes: the log at INFO (``hap-plan --verbose``), or the error report when a solve fails.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from collections.abc import Iterator


class Captured:
    """What the library wrote to descriptor 1; ``text`` is filled when the block ends."""

    text: str = ""


def _flush_c_stdio() -> None:
    # a C library's stdout is block-buffered when it is not a terminal: flush it while the
    # descriptor still points at the capture file, or the text surfaces later on the real stdout
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C runtime to flush (not a POSIX libc)
        pass


@contextlib.contextmanager
def library_output() -> Iterator[Captured]:
    """Run the block with descriptor 1 redirected to a temporary file; yield a ``Captured``."""
    out = Captured()
    fd_out = 1
    sys.stdout.flush()
    try:
        saved = os.dup(fd_out)
    except OSError:  # no descriptor 1 to redirect (a daemon): nothing can reach the user's stdout anyway
        yield out
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd_out)
        try:
            yield out
        finally:
            _flush_c_stdio()
            os.dup2(saved, fd_out)
            os.close(saved)
            tmp.seek(0)
            out.text = tmp.read().decode(errors="replace")
