"""Process-level helpers for dv365's long-running commands."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_without_teardown(code: int) -> NoReturn:
    """Ends the process with ``code`` once logs and stdio are flushed, skipping interpreter teardown.

    For a process whose work is done and written (files are closed and, where it matters, fsync'd by the
    writers) that has loaded native thread pools: torch's, pyarrow's, gloo's. Tearing those down at
    interpreter exit has aborted finished processes under load (``terminate called without an active
    exception``, exit status -6): a scheduler after its last cycle, a torchrun rank after its checkpoint.
    A supervisor (systemd, torchrun) reads that as a crash. Callers release what they hold first
    (``dist.destroy_process_group()``, closed stores); ``atexit`` handlers do not run.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)


#: glibc ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_heap_memory(max_block_mb: int = 512, trim_threshold_mb: int | None = None) -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of returning it to the OS, for a process that
    allocates and frees the same large arrays again and again (a loader worker slicing 32 users: ~100 MB of
    numpy arrays per batch; a ``dv365 serve`` process answering 7.7 MB batches). By default every array above
    the dynamic mmap threshold is mapped fresh (or the heap trimmed), so each batch page-faults its buffers in
    again: measured on a loader worker's first batches, slicing ran at 11 ms/user against 4 ms/user once the
    heap held them. Blocks up to ``max_block_mb`` come from the heap, and the heap is not trimmed below
    ``trim_threshold_mb`` (default: the same); the peak RSS stays what one batch needs. Returns False where there
    is no glibc (the call is then a no-op)."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = max_block_mb if trim_threshold_mb is None else trim_threshold_mb
    return bool(mallopt(_M_MMAP_THRESHOLD, int(max_block_mb) << 20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim) << 20)
    )
