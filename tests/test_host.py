"""captioning.host: with freed memory kept, a step's large buffers are reused without faulting
their pages in again (what made steps slow once tf.data had run)."""

import subprocess
import sys

import pytest
from conftest import REPO

ALLOCATE_FIVE_TIMES = """
import ctypes, resource, sys
from captioning import host
if sys.argv[1] == "kept":
    assert host.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def step():  # A 64 MB buffer written and freed, as XLA's runtime does with a step's temporaries.
    buffer = libc.malloc(64 * 2**20)
    ctypes.memset(buffer, 1, 64 * 2**20)
    libc.free(buffer)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_memory_serves_the_next_step_without_page_faults():
    faults = {
        mode: int(
            subprocess.check_output([sys.executable, "-c", ALLOCATE_FIVE_TIMES, mode], cwd=REPO)
        )
        for mode in ("default", "kept")
    }
    pages = 5 * 64 * 2**20 // 4096
    assert faults["default"] > 0.9 * pages  # Every page faulted in again at every step.
    assert faults["kept"] < 0.05 * pages
