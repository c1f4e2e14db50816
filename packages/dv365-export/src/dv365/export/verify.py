"""``dv365 export verify``: is a snapshot complete and intact? (what a reader checks before trusting it)

Checks the manifest (format, version, row format, user count = sum of shards), then every shard: present,
size and sha256 as in the manifest, the Parquet columns, the embedding width, every user's crc32, users
ascending inside the shard and within its ``first_user``/``last_user``, and no user in two shards. The first
problem raises core's :class:`~dv365.core.snapshot.SnapshotError` naming the shard, and the user where one is
at fault (a corrupted shard names the first user whose embedding fails its crc32).
"""

from __future__ import annotations

import hashlib
import posixpath
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dv365.core.fsio import url_to_fs
from dv365.core.snapshot import SnapshotError, SnapshotManifest, read_manifest


@dataclass(frozen=True)
class VerifyReport:
    """A verified snapshot's facts."""

    url: str
    manifest: SnapshotManifest
    users: int
    shards: int
    bytes: int  # shard files in total

    def summary(self) -> str:
        from dv365.export.job import iso

        m, f = self.manifest, self.manifest.row_format
        sim = " SIMULATED data," if m.simulated else ""
        return (
            f"snapshot {m.snapshot_id!r} OK:{sim} {self.users:,} users in {self.shards} shards, "
            f"{f.rows_per_user} x {f.dim} at {f.bits} bits = {f.user_bytes:,} B/user, {self.bytes:,} B of "
            f"shards; model {m.model_version!r}, data cut-off {iso(m.data_cutoff_ts)} (gap {m.gap_hours:g} h), "
            f"created {iso(m.created_at)}; every sha256 and crc32 checked"
        )


def _crc32(rows: np.ndarray) -> np.ndarray:
    return np.fromiter((zlib.crc32(r.tobytes()) for r in rows), dtype=np.uint32, count=len(rows))


def verify_snapshot(url: str) -> VerifyReport:
    """Verifies everything listed in the module docstring; returns the facts or raises SnapshotError."""
    m = read_manifest(url)  # SnapshotError for a missing / malformed manifest
    fmt = m.row_format
    fs, root = url_to_fs(url)
    seen: list[np.ndarray] = []
    total = 0
    for info in m.shards:
        where = f"{url}: shard {info.path}"
        path = posixpath.join(root, info.path)
        if not fs.exists(path):
            raise SnapshotError(f"{where} is missing")
        blob = fs.cat_file(path)
        total += len(blob)
        try:
            table = pq.read_table(pa.BufferReader(blob))
            ids = table.column("user_id").to_numpy().astype(np.int64)
            emb = table.column("embedding").combine_chunks()
            crc = table.column("crc32").to_numpy()
        except (pa.ArrowException, KeyError, OSError) as e:
            raise SnapshotError(f"{where} is not a readable snapshot shard ({type(e).__name__}: {e})") from e
        if emb.type.byte_width != fmt.user_bytes:
            raise SnapshotError(
                f"{where}: embeddings of {emb.type.byte_width} B, the row format needs {fmt.user_bytes}"
            )
        data = np.frombuffer(
            emb.buffers()[1], np.uint8, count=len(ids) * fmt.user_bytes, offset=emb.offset * fmt.user_bytes
        ).reshape(len(ids), fmt.user_bytes)
        bad = np.flatnonzero(_crc32(data) != crc)
        sha_ok = hashlib.sha256(blob).hexdigest() == info.sha256 and len(blob) == info.bytes
        if len(bad):
            raise SnapshotError(
                f"{where} is corrupted: the embedding of user {int(ids[bad[0]])} fails its crc32 "
                f"check ({len(bad)} user(s) in all){'' if sha_ok else '; sha256 mismatch too'}"
            )
        if not sha_ok:
            raise SnapshotError(
                f"{where} is corrupted: its sha256 / size does not match the manifest "
                "(every embedding passes its crc32: the damage is in the file's other bytes)"
            )
        if len(ids) != info.users:
            raise SnapshotError(f"{where}: {len(ids)} users, the manifest says {info.users}")
        if len(ids) and ((np.diff(ids) <= 0).any() or ids[0] != info.first_user or ids[-1] != info.last_user):
            raise SnapshotError(f"{where}: users are not ascending within [{info.first_user}, {info.last_user}]")
        seen.append(ids)
    every = np.sort(np.concatenate(seen + [np.zeros(0, np.int64)]))
    if len(every) > 1 and (np.diff(every) == 0).any():
        dup = int(every[1:][np.diff(every) == 0][0])
        raise SnapshotError(f"{url}: user {dup} is in more than one shard")
    return VerifyReport(url, m, len(every), len(m.shards), total)
