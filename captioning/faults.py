"""Faults a long run meets and survives, named in one line each (README "What survives what").

`Fault` is the base of the expected ones: main.py prints its message as one line (no traceback)
and exits with status 1. This module imports nothing of the package, so every layer may use it.

  DiskFull           a file or checkpoint could not be written: the path and the bytes needed
  DamagedCheckpoint  a checkpoint cannot be read: its path, what is wrong, the intact ones
  Diverged           a non-finite loss or gradient norm: the step, the last good checkpoint

`writing(path, needed)` turns a full disk while writing `path` into `DiskFull`;
`StopSignals` turns SIGTERM and SIGINT into a request to stop after the current step.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import shutil
import signal
import sys
import threading

# errno values (and the words tensorstore/Orbax put in their messages) of a full disk or quota.
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = ("RESOURCE_EXHAUSTED", "No space left on device", "Disk quota exceeded")


class Fault(Exception):
    """An expected fault: the message says what happened and what to do; no traceback needed."""


class DiskFull(Fault):
    """`path` could not be written: its filesystem is full."""

    def __init__(self, path: str, needed: int | None):
        self.path, self.needed = path, needed
        free = free_bytes(path)
        need = f"about {needed:,} bytes" if needed else "more space"
        have = f", {free:,} bytes free" if free is not None else ""
        super().__init__(
            f"Disk full: cannot write {path} (needs {need}{have}). Nothing already written is "
            "lost: free some space and run the same command again, it resumes."
        )


class DamagedCheckpoint(Fault):
    """A checkpoint cannot be read (truncated or missing files)."""


class Diverged(Fault):
    """A non-finite loss or gradient norm."""


def free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem of `path` (or of its nearest existing folder)."""
    folder = os.path.abspath(path)
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or one it was raised from) says the disk or the quota is full."""
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, DiskFull):
            return True
        if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
            return True
        if any(word in str(error) for word in _FULL_WORDS):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


@contextlib.contextmanager
def writing(path: str, needed: int | None = None, *temporary: str):
    """Raises `DiskFull` naming `path` and `needed` bytes when the block fails for want of
    space, after removing the `temporary` files it leaves."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e) or isinstance(e, DiskFull):
            raise
        for tmp in temporary:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise DiskFull(path, needed) from e


def resume_command() -> str:
    """The command line this process was started with, to rerun it."""
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])


class StopSignals:
    """While active (`with StopSignals() as stop:`), SIGTERM and SIGINT set `stop.signum`
    instead of ending the process; a second one ends it as usual. Outside the main thread
    (where Python cannot handle signals) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        for sig, handler in self._previous.items():  # A second signal ends the process.
            signal.signal(sig, handler)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
