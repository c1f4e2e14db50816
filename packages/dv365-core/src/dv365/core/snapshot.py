"""Snapshot format: what dv365-export writes and dv365-store publishes (paper §2.5).

A snapshot is a folder (any fsspec URL)::

    <root>/manifest.json          written last, atomically: a snapshot without it is not visible
    <root>/shard-00000.parquet    user_id int64 (ascending), embedding fixed_size_binary[user_bytes],
    <root>/shard-00001.parquet    crc32 uint32 of each embedding (per-value integrity)

Each embedding is ``RowFormat.rows_per_user`` rows in the :mod:`dv365.core.quantize` row format. The
manifest names the snapshot, the model version, the data cut-off, the format, and every shard with its
user count, id range, byte size and sha256, so a reader can verify what it loads.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dv365.core.errors import Dv365Error
from dv365.core.fsio import url_to_fs, write_bytes_atomic
from dv365.core.quantize import RowFormat

MANIFEST = "manifest.json"
SNAPSHOT_FORMAT = "dv365.snapshot"
SNAPSHOT_VERSION = 1


class SnapshotError(Dv365Error, IOError):
    """A snapshot or shard is missing, incomplete, corrupted or of an unknown format."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard file of a snapshot (``path`` is relative to the snapshot root)."""

    path: str
    users: int
    bytes: int
    sha256: str
    first_user: int
    last_user: int


@dataclass(frozen=True)
class SnapshotManifest:
    """``manifest.json`` of a snapshot.

    Args:
        snapshot_id: unique name of this snapshot (e.g. ``"2026-11-22T06-00Z"``).
        model_version: the user-tower checkpoint that produced it.
        data_cutoff_ts: unix seconds; timelines were cut at ``data_cutoff_ts - gap_hours``.
        row_format: the embedding row format.
        shards: every shard; each holds its users in ascending id order, and the id ranges of shards may
            overlap (dv365-export writes one run of shards per user-hash bucket).
    """

    snapshot_id: str
    model_version: str
    data_cutoff_ts: int
    row_format: RowFormat
    shards: tuple[ShardInfo, ...]
    gap_hours: float = 24.0
    created_at: float = field(default_factory=time.time)
    simulated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def user_count(self) -> int:
        return sum(s.users for s in self.shards)

    def to_json(self) -> str:
        d = {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "snapshot_id": self.snapshot_id,
            "model_version": self.model_version,
            "data_cutoff_ts": self.data_cutoff_ts,
            "gap_hours": self.gap_hours,
            "created_at": self.created_at,
            "row_format": self.row_format.to_dict(),
            "user_count": self.user_count,
            "bytes_per_user": self.row_format.user_bytes,
            "simulated": self.simulated,
            "shards": [asdict(s) for s in self.shards],
            "extra": self.extra,
        }
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> SnapshotManifest:
        try:
            d = json.loads(text)
            if d.get("format") != SNAPSHOT_FORMAT:
                raise SnapshotError(f"{where}: not a dv365 snapshot manifest (format={d.get('format')!r})")
            if int(d["version"]) > SNAPSHOT_VERSION:
                raise SnapshotError(f"{where}: snapshot format version {d['version']} is newer than this dv365")
            m = cls(
                snapshot_id=str(d["snapshot_id"]),
                model_version=str(d["model_version"]),
                data_cutoff_ts=int(d["data_cutoff_ts"]),
                row_format=RowFormat.from_dict(d["row_format"]),
                shards=tuple(ShardInfo(**s) for s in d["shards"]),
                gap_hours=float(d.get("gap_hours", 24.0)),
                created_at=float(d.get("created_at", 0.0)),
                simulated=bool(d.get("simulated", False)),
                extra=dict(d.get("extra", {})),
            )
        except SnapshotError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"{where}: malformed manifest: {type(e).__name__}: {e}") from e
        if "user_count" in d and int(d["user_count"]) != m.user_count:
            raise SnapshotError(f"{where}: user_count {d['user_count']} != sum of shard users {m.user_count}")
        return m


def _crc32(payload: np.ndarray) -> np.ndarray:
    return np.fromiter((zlib.crc32(row.tobytes()) for row in payload), dtype=np.uint32, count=len(payload))


def write_shard(url: str, name: str, user_ids: np.ndarray, payload: np.ndarray, fmt: RowFormat) -> ShardInfo:
    """Writes one shard (users sorted ascending) atomically; returns its manifest entry.

    ``payload`` is ``[U, user_bytes]`` uint8 (or ``[U, rows_per_user, row_bytes]``).
    """
    ids = np.asarray(user_ids, dtype=np.int64)
    data = np.ascontiguousarray(payload, dtype=np.uint8).reshape(len(ids), -1)
    if data.shape[1] != fmt.user_bytes:
        raise SnapshotError(f"shard {name}: payload has {data.shape[1]} bytes per user, format needs {fmt.user_bytes}")
    order = np.argsort(ids, kind="stable")
    ids, data = ids[order], data[order]
    if len(ids) > 1 and (np.diff(ids) == 0).any():
        dup = int(ids[1:][np.diff(ids) == 0][0])
        raise SnapshotError(f"shard {name}: user {dup} appears more than once")
    emb = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(fmt.user_bytes), len(ids), [None, pa.py_buffer(data.tobytes())]
    )
    table = pa.table(
        {"user_id": pa.array(ids, pa.int64()), "embedding": emb, "crc32": pa.array(_crc32(data), pa.uint32())}
    )
    fs, root = url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    path = posixpath.join(root, name)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="none")
    blob = sink.getvalue().to_pybytes()
    write_bytes_atomic(fs, path, blob)
    return ShardInfo(
        name,
        len(ids),
        len(blob),
        hashlib.sha256(blob).hexdigest(),
        int(ids[0]) if len(ids) else -1,
        int(ids[-1]) if len(ids) else -1,
    )


def read_shard(url: str, info: ShardInfo, fmt: RowFormat, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids [U], payload [U, user_bytes] uint8) of one shard; with ``verify`` the file's sha256 and
    every embedding's crc32 are checked (SnapshotError naming the shard and user otherwise)."""
    fs, root = url_to_fs(url)
    path = posixpath.join(root, info.path)
    if not fs.exists(path):
        raise SnapshotError(f"{url}: shard {info.path} is missing")
    blob = fs.cat_file(path)
    if verify and hashlib.sha256(blob).hexdigest() != info.sha256:
        raise SnapshotError(f"{url}: shard {info.path} is corrupted (sha256 mismatch with the manifest)")
    table = pq.read_table(pa.BufferReader(blob))
    ids = table.column("user_id").to_numpy()
    emb = table.column("embedding").combine_chunks()
    data = np.frombuffer(
        emb.buffers()[1], dtype=np.uint8, count=len(ids) * fmt.user_bytes, offset=emb.offset * fmt.user_bytes
    ).reshape(len(ids), fmt.user_bytes)
    if verify:
        crc = table.column("crc32").to_numpy()
        bad = np.flatnonzero(_crc32(data) != crc)
        if len(bad):
            raise SnapshotError(f"{url}: shard {info.path}: embedding of user {int(ids[bad[0]])} fails its crc32 check")
    return ids, data


def write_manifest(url: str, manifest: SnapshotManifest) -> None:
    """Publishes the snapshot: ``manifest.json`` is written last and atomically."""
    fs, root = url_to_fs(url)
    write_bytes_atomic(fs, posixpath.join(root, MANIFEST), manifest.to_json().encode())


def read_manifest(url: str) -> SnapshotManifest:
    fs, root = url_to_fs(url)
    path = posixpath.join(root, MANIFEST)
    if not fs.exists(path):
        raise SnapshotError(f"{url}: no complete snapshot here (manifest.json not found)")
    return SnapshotManifest.from_json(fs.cat_file(path).decode(), url)
