"""Load with change: 16 clients doing single-user gets (the online path) while a new version is published and
activated twice (and the oldest pruned, keep=2): no errors, and every answer is one whole version's bytes.

Scaled for CI (DV365_LOAD_REQUESTS per client, default 400; the issue's full run is 10,000 each)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from .conftest import USERS, Harness

CLIENTS = 16
REQUESTS = int(os.environ.get("DV365_LOAD_REQUESTS", "400"))


def test_single_user_load_while_versions_change(harness: Harness, snapshots) -> None:  # type: ignore[no-untyped-def]
    fills = {"load-0": 1, "load-1": 2, "load-2": 3}
    paths = {name: snapshots(name, fill=f) for name, f in fills.items()}
    writer = harness.writer()
    writer.publish(paths["load-0"])
    readers = [harness.reader() for _ in range(CLIENTS)]
    published = threading.Event()
    problems: list[str] = []
    seen: list[dict[str, int]] = [{} for _ in range(CLIENTS)]
    done = [0] * CLIENTS

    def client(k: int) -> None:
        rng = np.random.default_rng(k)
        store = readers[k]
        after = 0  # gets started once both switches were done: every client reads the last version too
        try:
            while done[k] < REQUESTS or after < 3:
                after += published.is_set()
                uid = int(rng.choice(USERS))
                r = store.get([uid])
                done[k] += 1
                seen[k][r.snapshot_id] = seen[k].get(r.snapshot_id, 0) + 1
                if not r.present[0] or r.errors:
                    problems.append(f"client {k}: user {uid} missing in {r.snapshot_id}: {r.errors}")
                elif not (r.payload[0, :, :128] == fills[r.snapshot_id]).all():
                    problems.append(f"client {k}: user {uid} labelled {r.snapshot_id} holds other bytes")
        except Exception as e:  # noqa: BLE001 - every failure is reported by the assertion below
            problems.append(f"client {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for name in ("load-1", "load-2"):  # each under load: load, then switch
        while min(done) < REQUESTS // 4 and time.monotonic() - t0 < 30:
            time.sleep(0.01)
        writer.publish(paths[name], activate=False)
        writer.activate(name)
    published.set()
    for t in threads:
        t.join(120)
    assert not problems, problems[:3]
    total = sum(done)
    assert total >= CLIENTS * REQUESTS
    versions = {v for s in seen for v in s}
    assert {"load-0", "load-2"} <= versions, versions  # the clients did read across the switches
    assert [v.version for v in writer.versions()] == ["load-1", "load-2"]  # keep=2 pruned load-0 meanwhile
    assert all(r.get([int(USERS[0])]).snapshot_id == "load-2" for r in readers)
