"""Process-wide settings of the host that the steps' speed depends on.

`keep_freed_memory()`: XLA's CPU runtime allocates every large buffer of a step (the LSTM's
stacked states, the weights' gradients, the optimizer's updates) afresh at every step. glibc's
malloc hands allocations above its mmap threshold (at most 32 MB) straight to the kernel and
unmaps them when freed, so every step faults all of those pages in again and zeroes them: system
time of the order of user time, and, once a tf.data pipeline has run in the process (which moves
the threshold), much slower steps (measured: configs/flickr8k_attention.py). Serving every
allocation from the heap and not trimming it keeps freed pages for the next step; the heap then
stays at its peak instead of shrinking between steps, which the steps reach anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from absl import logging

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h).
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tells glibc's malloc never to unmap freed buffers: -> whether it applied (False on other
    C libraries and systems, where nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # Not glibc (e.g. musl has no mallopt).
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if applied:
        logging.info("malloc keeps freed memory for the next step (captioning/host.py).")
    return applied
