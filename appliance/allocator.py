"""glibc's allocator tuned for what bootback allocates: many short-lived buffers of 1-16 MiB (chunks, their
compressed objects, packs, NFS reads) from a few threads.

With glibc's defaults such a buffer is mostly fresh memory: blocks above the mmap threshold (dynamic, from
128 KiB) are mapped and unmapped per allocation, each thread past the first gets its own arena whose free top is
handed back to the kernel, and every page handed back is faulted in and zeroed again on the next use. Measured
on a 1 GiB backup to S3 (2 cores, docs/benchmarks.md): 170,000 page faults and ~1.0 s of kernel time with the
defaults; ~93,000 and ~0.5 s with the settings below, the same user time. Python holds the GIL around every
allocation of these objects, so two arenas cost no lock contention worth measuring.

The settings keep at most TRIM_THRESHOLD of free heap top per arena before giving it back: a bounded price for
a process whose buffers are bounded anyway. A libc without ``mallopt`` (musl, macOS) is left as it is.
"""

from __future__ import annotations

import ctypes

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 << 20  # above the largest buffer we allocate often (a 16 MiB pack plus its framing)
TRIM_THRESHOLD = 128 << 20
ARENA_MAX = 2

_tuned = False


def tune() -> bool:
    """Apply the settings once per process, before its worker threads start; False where they cannot apply."""
    global _tuned
    if _tuned:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on (no ldconfig search)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt answers 1 on success; setting a threshold also turns off glibc's dynamic one. Each setting on its
    # own: one refused (a 32-bit libc caps the mmap threshold lower) leaves the others applied.
    applied = [
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_ARENA_MAX, ARENA_MAX),
        )
    ]
    _tuned = all(applied)
    return _tuned
