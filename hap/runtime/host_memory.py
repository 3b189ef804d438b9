"""Keep the host allocator's freed memory in the process (glibc only).

glibc returns large freed blocks to the kernel (``munmap`` above ``M_MMAP_THRESHOLD``, heap
trimming above ``M_TRIM_THRESHOLD``), so a training step that frees and re-allocates the same
activations page-faults them in again every step, and an emulated slow rank dilates those
faults with its compute (docs/benchmarks.md has the measurement). jemalloc and tcmalloc, which PyTorch
recommends for CPU training, keep freed memory the same way. Set ``HAP_KEEP_HOST_MEMORY=0`` to
leave the allocator as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks below 1 GiB come from the heap, and the heap is never trimmed

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory mapped (once per process); True if it took effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("HAP_KEEP_HOST_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
    return _done
