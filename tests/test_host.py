"""captioning.host: with freed memory kept, a step's large buffers are reused without faulting
their pages in again (what made steps slow once tf.data had run)."""

import subprocess
import sys

import pytest
from conftest import REPO

ALLOCATE_FIVE_TIMES = """
import ctypes, resource, sys, threading
from captioning import host
if sys.argv[1] == "kept":
    assert host.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = int(sys.argv[2]) * 2**20
def step():  # A buffer written and freed, as XLA's runtime does with a step's temporaries.
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)
    libc.free(buffer)
def steps():
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=steps) if sys.argv[3] == "thread" else None
steps() if thread is None else (thread.start(), thread.join())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
@pytest.mark.parametrize(
    "megabytes, where",
    [(64, "main"), (80, "thread")],  # A thread's arena cannot hold 80 MB: mmapped by default.
)
def test_kept_memory_serves_the_next_step_without_page_faults(megabytes, where):
    faults = {
        mode: int(
            subprocess.check_output(
                [sys.executable, "-c", ALLOCATE_FIVE_TIMES, mode, str(megabytes), where], cwd=REPO
            )
        )
        for mode in ("default", "kept")
    }
    pages = 5 * megabytes * 2**20 // 4096
    assert faults["default"] > 0.9 * pages  # Every page faulted in again at every step.
    assert faults["kept"] < 0.05 * pages
