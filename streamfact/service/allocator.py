"""Keep a long-running process's RSS flat: big transient arrays go back to the OS.

glibc's malloc serves blocks above a *dynamic* mmap threshold with ``mmap``
(returned to the OS on ``free``) and smaller ones from its heaps. Each time an
mmapped block is freed the threshold rises to that block's size (up to 32 MiB),
so after the first refinement the daemon's 10–30 MB temporaries (the refinement
blocks, snapshot copies) come from the heaps, where freed memory stays part of
the RSS and fragments across the threads' arenas. Measured on the daemon
benchmark (1M events, then 40 s at 8k events/s): steady-phase RSS 613–820 MB
and creeping with the dynamic threshold, 440–610 MB without a trend with it
pinned at 1 MiB, at the same end-to-end throughput (97k vs 99k events/s;
KeyedSVD alone, which reallocates its refinement blocks, runs ~4 % slower).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["pin_mmap_threshold"]

log = logging.getLogger("streamfact.serve")

_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` (which also stops it adapting).

    A no-op returning False off glibc, or when the user set
    ``MALLOC_MMAP_THRESHOLD_`` themselves (their value stands). O(1).
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    log.debug("mmap threshold pinned at %d bytes: %s", nbytes, ok)
    return ok
