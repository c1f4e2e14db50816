"""The embedded store's row files (one memory-mapped file per version): the older per-user LMDB layout stays
readable next to them, a damaged file is an error (never garbage), a stream started on a version finishes on it
after that version is deleted, and publish failures leave no file behind."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dv365.store import open_store
from dv365.store.errors import PublishError, StoreError

from .conftest import FMT, USERS, flip_lmdb

CODES = slice(0, FMT.packed_bytes)  # the packed int4 codes of a row (``fill`` sets them; scale/bias follow)


def _files(root: str) -> list[str]:
    d = os.path.join(root, "rows")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_records_and_rows_versions_live_side_by_side(tmp_path, snapshots) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "s")
    ids = np.array([1003, 5, 1299, 1003, 1000])
    with open_store(f"lmdb://{root}?layout=records") as old:  # written as dv365-store did before row files
        old.publish(snapshots("v1", fill=0x11))
    assert _files(root) == []
    with open_store(f"lmdb://{root}?keep=3") as s:
        s.publish(snapshots("v2", fill=0x22))
        assert _files(root) == ["0000000002.rows"]
        for version, fill in (("v2", 0x22), ("v1", 0x11), ("v2", 0x22)):  # roll back to the records version and on
            s.activate(version)
            r = s.get(ids)
            assert r.snapshot_id == version and r.present.tolist() == [True, False, True, True, True] and not r.errors
            assert (r.payload[r.present][..., CODES] == fill).all() and (r.payload[~r.present] == 0).all()
        for version in ("v1", "v2"):  # corruption is caught in both layouts
            s.activate(version)
            flip_lmdb(s, version, 1299)
            r = s.get(ids)
            assert r.present.tolist() == [True, False, False, True, True]
            assert "user 1299" in r.errors[2] and "checksum" in r.errors[2] and (r.payload[2] == 0).all()
        s.delete_version("v1")
        s.publish(snapshots("v3", fill=0x33))
        s.delete_version("v2")
        assert _files(root) == ["0000000003.rows"]
        assert [v.version for v in s.versions()] == ["v3"]


def test_damaged_row_file_is_an_error(tmp_path, snapshots) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "s")
    with open_store(f"lmdb://{root}") as s:
        s.publish(snapshots("v1"))
    path = os.path.join(root, "rows", "0000000001.rows")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4096)
    with open_store(f"lmdb://{root}?mode=ro") as r:
        with pytest.raises(StoreError, match="damaged"):
            r.get([1000])
    os.unlink(path)
    with open_store(f"lmdb://{root}?mode=ro") as r:
        with pytest.raises(StoreError, match="row file of the active version 'v1' is missing"):
            r.get([1000])


def test_stream_finishes_on_its_version_after_it_is_deleted(tmp_path, snapshots) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "s")
    with open_store(f"lmdb://{root}?keep=1") as w:
        w.publish(snapshots("v1", fill=0x11))  # only a publish creates the store a reader opens
        with open_store(f"lmdb://{root}?mode=ro") as r:
            pieces = r.lookup_chunks(USERS, 10 * 7656)  # type: ignore[attr-defined]  # 10 users per piece
            first = next(pieces)
            w.publish(snapshots("v2", fill=0x22))  # keep=1: v1 is deleted and its file unlinked
            assert _files(root) == ["0000000002.rows"] and [v.version for v in w.versions()] == ["v2"]
            rest = list(pieces)
            assert {p.info.version for p in [first, *rest]} == {"v1"}
            assert all(p.present.all() and (p.to_result().payload[..., CODES] == 0x11).all() for p in [first, *rest])
            assert sum(len(p.present) for p in [first, *rest]) == len(USERS)
            after = r.get([1000])
            assert after.snapshot_id == "v2" and (after.payload[..., CODES] == 0x22).all()


def test_failed_publish_leaves_no_file(tmp_path, snapshots) -> None:  # type: ignore[no-untyped-def]
    root = str(tmp_path / "s")
    dup = snapshots("dup", users=np.array([1, 2, 3, 4, 5, 3]), shard_users=3)  # user 3 in both shards
    with open_store(f"lmdb://{root}") as s:
        s.publish(snapshots("v1"))
        with pytest.raises(PublishError, match="user 3 appears more than once"):
            s.publish(dup)
        assert _files(root) == ["0000000001.rows"] and [v.version for v in s.versions()] == ["v1"]
        open(os.path.join(root, "rows", "0000000099.rows"), "wb").close()  # left by a crash after unlinking a record
        s.publish(snapshots("v2"))
        assert _files(root) == ["0000000001.rows", "0000000003.rows"]
        assert s.get([1000]).snapshot_id == "v2"


def test_row_views_are_the_rows_in_place(tmp_path, snapshots) -> None:  # type: ignore[no-untyped-def]
    """lookup_rows (what dv365 serve copies into its Get answer): one view per user into the row file, in
    request order, zero rows for unknown users; unchecked, so a corrupted row comes back as stored and fails
    verify_payloads on the joined copy, where lookup() reports it."""
    from dv365.store.records import verify_payloads

    root = str(tmp_path / "s")
    ids = np.array([1003, 5, 1299, 1003, 1000, -7])
    with open_store(f"lmdb://{root}") as s:
        s.publish(snapshots("v1", seed=2))
        want = s.get(ids)
        v = s.lookup_rows(ids)  # type: ignore[attr-defined]
        assert not v.verified and v.info.version == "v1" and len(v.rows) == len(ids) and not v.errors
        joined = np.frombuffer(b"".join(v.rows), np.uint8).reshape(len(ids), FMT.user_bytes)
        np.testing.assert_array_equal(joined, want.payload.reshape(len(ids), -1))
        assert v.present.tolist() == want.present.tolist() and v.checksums[~v.present].tolist() == [0, 0]
        assert not verify_payloads(joined, ids, v.checksums, v.present).size
        flip_lmdb(s, "v1", 1299)
        v = s.lookup_rows(ids)  # type: ignore[attr-defined]
        joined = np.frombuffer(b"".join(v.rows), np.uint8).reshape(len(ids), FMT.user_bytes)
        assert v.present[2] and verify_payloads(joined, ids, v.checksums, v.present).tolist() == [2]
        assert s.get(ids).errors.keys() == {2}
    with open_store(f"lmdb://{tmp_path}/r?layout=records") as rec:  # records layout: lookup()'s checked answer
        rec.publish(snapshots("v1", seed=2))
        v = rec.lookup_rows(ids)  # type: ignore[attr-defined]
        assert v.verified and v.present.tolist() == want.present.tolist()


def test_one_user_reads_match_batch_reads(tmp_path, snapshots) -> None:  # type: ignore[no-untyped-def]
    """The row file's one-user path (the online get) answers exactly what a batch read answers for that user:
    every stored user, unknown ones (below, between and above the ids), a corrupted row (error, zeros)."""
    root = str(tmp_path / "s")
    with open_store(f"lmdb://{root}") as s:
        s.publish(snapshots("v1", seed=4))
        flip_lmdb(s, "v1", 1100)
        ids = np.r_[USERS, [-5, 999, 1300, 2**40]]
        batch = s.get(np.r_[ids, ids[:1]])  # B > 1: the batch path
        for k, uid in enumerate(ids.tolist()):
            one = s.get([uid])
            assert one.present[0] == batch.present[k] and one.errors.keys() == ({0} if k in batch.errors else set())
            np.testing.assert_array_equal(one.payload[0], batch.payload[k])
            if k in batch.errors:
                assert one.errors[0] == batch.errors[k] and "user 1100" in one.errors[0]
        assert int(batch.present.sum()) == len(USERS) and batch.errors.keys() == {100}
