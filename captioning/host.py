"""Process-wide settings of the host that the steps' speed depends on.

`keep_freed_memory()`: XLA's CPU runtime allocates every large buffer of a step (the LSTM's
stacked states, the weights' gradients, the optimizer's updates) afresh at every step. glibc's
malloc hands allocations above its mmap threshold (at most 32 MB) straight to the kernel and
unmaps them when freed, so every step faults all of those pages in again and zeroes them: system
time of the order of user time, and, once a tf.data pipeline has run in the process (which moves
the threshold), much slower steps (measured: configs/notes/flickr8k.md). Serving every
allocation from the heap and not trimming it keeps freed pages for the next step; the heap then
stays at its peak instead of shrinking between steps, which the steps reach anyway. XLA runs a
step on its own threads, and glibc gives threads arenas whose heaps hold at most 64 MB: a larger
buffer (a step's temporaries are one allocation) is mmapped and unmapped whatever the settings.
So every thread allocates from the main arena, which has no such limit (its one lock is not
contended: a step makes few, large allocations).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from absl import logging

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h).
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
    """Tells glibc's malloc never to unmap freed buffers, from any thread: -> whether it applied
    (False on other C libraries and systems: nothing changes). Call it before importing what
    starts threads (numpy's BLAS, TensorFlow, JAX): glibc fixes its number of arenas when a thread
    other than the main one first allocates, and later settings do not change it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # Not glibc (e.g. musl has no mallopt).
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
    applied = all([bool(mallopt(option, value)) for option, value in settings])
    if applied:
        logging.info("malloc keeps freed memory for the next step (captioning/host.py).")
    return applied
