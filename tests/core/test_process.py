"""dv365.core.process: ending a finished process without teardown; keeping freed heap memory for reuse."""

from __future__ import annotations

import subprocess
import sys

import pytest

RSS = """
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_exit_without_teardown_flushes_and_keeps_the_code() -> None:
    done = _run(
        "import sys, logging, atexit\n"
        "from dv365.core.process import exit_without_teardown\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "logging.basicConfig(stream=sys.stderr)\n"
        "print('buffered line', end='')\n"
        "logging.getLogger('x').warning('logged line')\n"
        "exit_without_teardown(3)\n"
    )
    assert done.returncode == 3
    assert done.stdout == "buffered line"  # flushed; atexit handlers do not run
    assert "logged line" in done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc: Linux only")
def test_keep_heap_memory_reuses_freed_large_blocks() -> None:
    """A freed 200 MB array: returned to the OS by default (RSS drops), kept in the heap after
    keep_heap_memory() (RSS stays, so the next batch's arrays are not page-faulted in again)."""
    code = (
        RSS
        + "import sys, numpy as np\n"
        + "from dv365.core.process import keep_heap_memory\n"
        + "ok = keep_heap_memory() if sys.argv[-1] == 'keep' else None\n"
        + "a = np.ones(200 << 17)  # 200 MB of float64\n"
        + "before = rss_mb(); del a\n"
        + "print(ok, before, rss_mb())\n"
    )
    outs = {}
    for mode in ("keep", "default"):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        ok, before, after = done.stdout.split()
        outs[mode] = (ok, float(before), float(after))
    assert outs["keep"][0] == "True"
    assert outs["default"][1] - outs["default"][2] > 150  # mapped fresh, unmapped on free
    assert outs["keep"][1] - outs["keep"][2] < 20  # kept for reuse
