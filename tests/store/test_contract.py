"""The one contract every backend (embedded LMDB, Redis, gRPC) passes: same tests, parametrised by backend."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dv365.core.lookup import EmbeddingReader
from dv365.core.quantize import dequantize_rows
from dv365.core.snapshot import read_manifest, read_shard
from dv365.store import (
    InvalidRequestError,
    NoActiveVersionError,
    PublishError,
    StoreAuthError,
    StoreError,
    VersionNotFoundError,
)

from .conftest import FMT, USERS, Harness


def _expected(path: str) -> dict[int, np.ndarray]:
    m = read_manifest(path)
    out: dict[int, np.ndarray] = {}
    for s in m.shards:
        ids, data = read_shard(path, s, m.row_format)
        out.update(zip(ids.tolist(), data))
    return out


def test_get_returns_published_payloads(harness: Harness, snapshots) -> None:  # type: ignore[no-untyped-def]
    path = snapshots("v1", seed=1)
    store = harness.writer()
    assert isinstance(store, EmbeddingReader)
    with pytest.raises(NoActiveVersionError, match="no active version"):
        store.get([1, 2])
    info = store.publish(path)
    assert (info.version, info.active, info.state, info.user_count) == ("v1", True, "ready", len(USERS))
    want = _expected(path)
    ids = [1003, 5, 1299, 1003, -7, 1000]  # duplicates, unknown and negative ids are fine
    r = store.get(ids)
    assert r.payload.shape == (6, FMT.rows_per_user, FMT.row_bytes) and r.payload.dtype == np.uint8
    assert r.present.tolist() == [True, False, True, True, False, True]
    assert r.snapshot_id == "v1" and r.errors == {} and r.row_format == FMT
    assert 3500 < r.age_s < 3700  # the synthetic snapshot's data cut-off is one hour ago
    for i, uid in enumerate(ids):
        row = r.payload[i].reshape(-1)
        np.testing.assert_array_equal(row, want[uid] if uid in want else np.zeros(FMT.user_bytes, np.uint8))
    f = store.get_float(ids)
    assert f.embeddings.shape == (6, 58, 256) and f.embeddings.dtype == torch.float32
    torch.testing.assert_close(f.embeddings[0], dequantize_rows(torch.from_numpy(r.payload[0].copy())))
    assert float(f.embeddings[1].abs().sum()) == 0.0 and f.snapshot_id == "v1"
    assert store.get([]).payload.shape == (0, 58, 132)
    reader = harness.reader()
    np.testing.assert_array_equal(reader.get(ids).payload, r.payload)


def test_versions_activate_rollback_and_retention(harness: Harness, snapshots) -> None:  # type: ignore[no-untyped-def]
    store = harness.writer()
    store.publish(snapshots("a", fill=1))
    store.publish(snapshots("b", fill=2))
    assert [(v.version, v.active) for v in store.versions()] == [("a", False), ("b", True)]
    assert store.get([1000]).snapshot_id == "b"
    assert store.rollback().version == "a"
    r = store.get([1000, 1001])
    assert r.snapshot_id == "a" and (r.payload[:, :, :128] == 1).all()
    with pytest.raises(StoreError, match="no older ready version"):
        store.rollback()
    assert store.activate("b").active
    info = store.publish(snapshots("c", fill=3), activate=False)  # loaded, not active; keep=2 drops "a"
    assert not info.active and store.get([1000]).snapshot_id == "b"
    assert [(v.version, v.active) for v in store.versions()] == [("b", True), ("c", False)]
    store.activate("c")
    assert store.get([1000]).snapshot_id == "c"
    with pytest.raises(VersionNotFoundError, match="'a'"):
        store.activate("a")
    with pytest.raises(PublishError, match="already has this version"):
        store.publish(snapshots("c", fill=3))
    with pytest.raises(StoreError, match="is active"):
        store.delete_version("c")
    store.delete_version("b")
    assert [v.version for v in store.versions()] == ["c"]


def test_publish_under_concurrent_readers_is_atomic(harness: Harness, snapshots) -> None:  # type: ignore[no-untyped-def]
    """Readers hammer whole-batch gets while versions are published, switched and pruned (keep=2): every
    batch comes from one version, complete, never a mix and never a hole."""
    fills = {f"atomic-{k}": k + 1 for k in range(4)}
    paths = {name: snapshots(name, fill=f) for name, f in fills.items()}
    writer = harness.writer()
    writer.publish(paths["atomic-0"])
    stop = threading.Event()
    seen: dict[str, int] = {}
    problems: list[str] = []
    rng = np.random.default_rng(0)
    batches = [rng.choice(USERS, size=200) for _ in range(8)]

    def read_loop(k: int) -> None:
        reader = harness.reader()
        n = 0
        while not stop.is_set() or n < 3:
            r = reader.get(batches[n % len(batches)])
            n += 1
            fill = fills[r.snapshot_id]
            seen[r.snapshot_id] = seen.get(r.snapshot_id, 0) + 1
            if not r.present.all() or r.errors:
                problems.append(
                    f"{r.snapshot_id}: {int((~r.present).sum())} missing, errors {list(r.errors.values())[:1]}"
                )
            elif not (r.payload[:, :, :128] == fill).all():
                problems.append(
                    f"batch labelled {r.snapshot_id} holds bytes of other versions: "
                    f"{sorted(set(np.unique(r.payload[:, :, :128]).tolist()))}"
                )

    threads = [threading.Thread(target=read_loop, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for name in ["atomic-1", "atomic-2", "atomic-3"]:
        time.sleep(0.05)
        writer.publish(paths[name])
    writer.rollback()
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(60)
    assert not problems, problems[:3]
    assert len(seen) >= 2, seen  # the readers did see versions change under them
    assert [v.version for v in writer.versions()] == ["atomic-2", "atomic-3"]


def test_lookup_chunks_pieces_come_from_one_version(harness: Harness, snapshots) -> None:  # type: ignore[no-untyped-def]
    """lookup_chunks (what GetStream sends) stays on the version it started with while another is activated
    between two of its pieces; an empty batch is one empty piece that still names the version."""
    store = harness.writer()
    store.publish(snapshots("a", fill=1))
    store.publish(snapshots("b", fill=2), activate=False)
    ids = np.r_[USERS, [1]].astype(np.int64)
    pieces = store.lookup_chunks(ids, 40 * FMT.user_bytes + 1)
    first = next(pieces)
    switch = threading.Thread(target=store.activate, args=("b",))  # another thread, as a second client would
    switch.start()
    switch.join()
    assert store.get([1000]).snapshot_id == "b"
    parts = [first, *pieces]
    assert [len(p.present) for p in parts] == [40] * 7 + [21] and {p.info.version for p in parts} == {"a"}
    payload = np.concatenate([p.payload for p in parts]).reshape(len(ids), FMT.rows_per_user, FMT.row_bytes)
    assert (payload[:-1, :, :128] == 1).all() and not payload[-1].any()
    assert np.concatenate([p.present for p in parts]).tolist() == [True] * len(USERS) + [False]
    empty = list(store.lookup_chunks(np.array([], dtype=np.int64), 1 << 20))
    assert len(empty) == 1 and empty[0].payload.shape == (0, FMT.user_bytes) and empty[0].info.version == "b"


def test_corrupted_value_is_an_error_for_that_user_not_garbage(harness: Harness, snapshots) -> None:  # type: ignore[no-untyped-def]
    store = harness.writer()
    store.publish(snapshots("v1", seed=1))
    harness.corrupt("v1", 1005)
    r = store.get([1004, 1005, 1006])
    assert r.present.tolist() == [True, False, True]
    assert list(r.errors) == [1]
    assert "user 1005" in r.errors[1] and "'v1'" in r.errors[1] and "checksum" in r.errors[1]
    assert not r.payload[1].any()  # zeros, never the damaged bytes
    f = store.get_float([1005])
    assert not f.present[0] and 0 in f.errors


def test_auth_unauthenticated_and_reader_writes_are_refused(harness: Harness, snapshots) -> None:  # type: ignore[no-untyped-def]
    path = snapshots("v1", seed=1)
    harness.writer().publish(path)
    reader = harness.reader()
    assert reader.get([1000]).present.all()
    assert [v.version for v in reader.versions()] == ["v1"]
    with pytest.raises(StoreAuthError):
        reader.publish(snapshots("v2", seed=2))
    with pytest.raises(StoreAuthError):
        reader.activate("v1")
    assert [v.version for v in harness.writer().versions()] == ["v1"]  # nothing was changed
    if harness.anonymous is None:
        pytest.skip("embedded LMDB has no network clients: access control is the file system's (mode=ro checked above)")
    anon = harness.anonymous()
    with pytest.raises(StoreAuthError):
        anon.get([1000])
    with pytest.raises(StoreAuthError):
        anon.publish(snapshots("v2", seed=2))


def test_restart_loses_nothing_published(harness: Harness, snapshots) -> None:  # type: ignore[no-untyped-def]
    store = harness.writer()
    store.publish(snapshots("old", seed=3))
    store.publish(snapshots("new", seed=4))
    store.rollback()  # the active pointer is state too
    before = store.get(USERS[:50])
    harness.restart()
    store = harness.writer()
    assert [(v.version, v.active, v.state) for v in store.versions()] == [
        ("old", True, "ready"),
        ("new", False, "ready"),
    ]
    after = store.get(USERS[:50])
    assert after.snapshot_id == "old" and after.present.all()
    np.testing.assert_array_equal(after.payload, before.payload)
    assert store.activate("new").version == "new"


def test_failed_publish_leaves_the_active_version_alone(harness: Harness, snapshots, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    store = harness.writer()
    store.publish(snapshots("good", seed=1))
    bad = Path(snapshots.root) / f"bad-{tmp_path.name}"  # under the gRPC server's --snapshot-root
    shutil.copytree(snapshots("bad", seed=2), bad)
    shard = sorted(bad.glob("shard-00001.parquet"))[0]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(PublishError, match="shard-00001.parquet"):
        store.publish(str(bad))
    assert [(v.version, v.active) for v in store.versions()] == [("good", True)]
    assert store.get([1000]).snapshot_id == "good"
    with pytest.raises(PublishError, match="manifest"):
        store.publish(str(Path(snapshots.root) / "nowhere"))


def test_bad_requests_are_clear_errors(harness: Harness, snapshots) -> None:  # type: ignore[no-untyped-def]
    store = harness.writer()
    store.publish(snapshots("v1", seed=1))
    with pytest.raises(InvalidRequestError, match="1-D"):
        store.get(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(InvalidRequestError, match="integers"):
        store.get([1.5, 2.0])
    with pytest.raises(InvalidRequestError, match="over the limit"):
        store.get(np.arange(10_001))
    with pytest.raises(StoreError, match="not a valid name"):
        store.activate("../etc")
