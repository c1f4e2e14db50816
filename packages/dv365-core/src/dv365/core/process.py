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
