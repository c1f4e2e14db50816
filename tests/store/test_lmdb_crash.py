"""The embedded store is crash-safe: a publisher killed -9 mid-publish leaves the active version serving,
the half-loaded version marked "loading", and a re-publish of it cleans it and succeeds."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np

from dv365.store import open_store


def test_publisher_killed_mid_publish(tmp_path, snapshots) -> None:  # type: ignore[no-untyped-def]
    url = f"lmdb://{tmp_path}/s"
    with open_store(url) as s:
        s.publish(snapshots("old", seed=1))
    big = snapshots("big", seed=2, users=np.arange(50_000, 70_000), shard_users=2000)
    code = f"from dv365.store import open_store; open_store({url!r}).publish({big!r})"
    proc = subprocess.Popen([sys.executable, "-c", code])
    store = open_store(url + "?mode=ro")
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:  # wait until the child has committed some of the new version
            states = {v.version: v.state for v in store.versions()}
            if states.get("big") == "loading":
                time.sleep(0.3)
                break
            assert proc.poll() is None, "the publisher finished before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        vs = {v.version: (v.state, v.active) for v in store.versions()}
        assert vs == {"old": ("ready", True), "big": ("loading", False)}
        r = store.get([1000, 50_000])
        assert r.snapshot_id == "old" and r.present.tolist() == [True, False] and not r.errors
    finally:
        if proc.poll() is None:
            proc.kill()
        store.close()
    with open_store(url) as s:
        assert s.publish(big).version == "big"
        assert s.get([50_000, 69_999]).present.all()
        assert [(v.version, v.state) for v in s.versions()] == [("old", "ready"), ("big", "ready")]
