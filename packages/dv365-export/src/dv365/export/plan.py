"""Who is exported, into which shard, and whether their embedding is re-encoded or carried forward.

The plan is a pure function of (dataset, data cut-off, previous snapshot, refresh policy, shard size), so every
worker and every restart of a job computes the same one:

* **users**: every user with at least one event visible at the cut (``ts <= cutoff - gap``), plus, in an
  incremental export, the previous snapshot's users (carried forward even when the dataset no longer has them).
* **shards** follow the dataset's hash partitioning (:func:`dv365.core.timeline.user_bucket`): the users of
  bucket ``b``, ascending, in chunks of ``shard_users``: ``shard-b00007-00002.parquet`` is the third chunk of
  bucket 7. Shards are listed bucket by bucket, so worker ``r`` of ``W`` takes a contiguous slice of the list:
  a hash range of users (:func:`worker_range`). The shard list does not depend on the number of workers.
* **refresh** (paper §2.5: "refreshing embeddings based on user activity levels and applying incremental
  updates"), given a previous snapshot: ``all`` re-encodes everyone; ``active`` re-encodes users with at
  least one new visible event since the previous cut and carries the others byte for byte; ``activity``
  re-encodes only users with at least ``min_new_events`` new events (the light users wait for a later
  ``active``/``all`` run). Users the previous snapshot does not have are always encoded.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from dv365.core.fsio import url_to_fs
from dv365.core.quantize import RowFormat
from dv365.core.snapshot import SnapshotError, SnapshotManifest, read_manifest, read_shard
from dv365.core.timeline import EVENT_KINDS, TimelineDataset, user_bucket
from dv365.export.errors import ExportError

REFRESH_POLICIES = ("active", "activity", "all")


@dataclass(frozen=True)
class UserActivity:
    """Per-user event counts at a cut (users with at least one visible event, ascending)."""

    user_ids: np.ndarray  # [U] int64
    visible: np.ndarray  # [U] events with ts <= cut
    new: np.ndarray  # [U] events with since < ts <= cut (all visible ones when there is no ``since``)


def scan_activity(ds: TimelineDataset, cut: int, since: int | None = None) -> UserActivity:
    """Reads only ``user_id`` and ``ts`` of every part file, one record batch at a time, and counts each user's
    visible / new events. Memory grows with the number of users, not with the number of events."""
    users_parts, vis_parts, new_parts = [], [], []
    for kind in EVENT_KINDS:
        for b in range(ds.meta.num_buckets):
            for path in ds.part_files(kind, b):
                with ds.fs.open(path, "rb") as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=1 << 20, columns=["user_id", "ts"]):
                        uid = batch.column(0).to_numpy().astype(np.int64, copy=False)
                        t = batch.column(1).to_numpy().astype(np.int64, copy=False)
                        keep = t <= cut
                        uid, t = uid[keep], t[keep]
                        u, inv, vis = np.unique(uid, return_inverse=True, return_counts=True)
                        users_parts.append(u)
                        vis_parts.append(vis)
                        new_parts.append(vis if since is None else np.bincount(inv[t > since], minlength=len(u)))
    if not users_parts:
        z = np.zeros(0, np.int64)
        return UserActivity(z, z, z)
    uid = np.concatenate(users_parts)
    users, inv = np.unique(uid, return_inverse=True)
    visible = np.bincount(inv, weights=np.concatenate(vis_parts), minlength=len(users))
    new = np.bincount(inv, weights=np.concatenate(new_parts), minlength=len(users))
    return UserActivity(users.astype(np.int64), visible.astype(np.int64), new.astype(np.int64))


@dataclass(frozen=True)
class PlannedShard:
    """One shard of the plan: its users (ascending) and which of them are (re-)encoded."""

    name: str
    bucket: int
    users: np.ndarray  # [n] int64, ascending
    encode: np.ndarray  # [n] bool: True = run the tower, False = carry the previous snapshot's bytes

    @property
    def encoded(self) -> int:
        return int(self.encode.sum())

    @property
    def carried(self) -> int:
        return len(self.users) - self.encoded


def shard_name(bucket: int, chunk: int) -> str:
    return f"shard-b{bucket:05d}-{chunk:05d}.parquet"


def select_encode(
    activity: UserActivity, previous_ids: np.ndarray | None, refresh: str, min_new_events: int
) -> tuple[np.ndarray, np.ndarray]:
    """(all users of the snapshot, ascending; bool mask of those to encode)."""
    if refresh not in REFRESH_POLICIES:
        raise ExportError(f"--refresh must be one of {REFRESH_POLICIES}, got {refresh!r}")
    if previous_ids is None or refresh == "all":
        return activity.user_ids, np.ones(len(activity.user_ids), bool)
    users = np.union1d(activity.user_ids, previous_ids)
    in_data = np.isin(users, activity.user_ids)
    in_prev = np.isin(users, previous_ids)
    new = np.zeros(len(users), np.int64)
    new[in_data] = activity.new
    threshold = 1 if refresh == "active" else max(int(min_new_events), 1)
    encode = in_data & (~in_prev | (new >= threshold))
    return users, encode


def make_plan(users: np.ndarray, encode: np.ndarray, num_buckets: int, shard_users: int) -> list[PlannedShard]:
    """Shards bucket by bucket, ``shard_users`` users each (ascending ids inside a bucket)."""
    if shard_users <= 0:
        raise ExportError(f"--shard-users must be positive, got {shard_users}")
    buckets = user_bucket(users, num_buckets)
    plan: list[PlannedShard] = []
    for b in range(num_buckets):
        sel = np.flatnonzero(buckets == b)  # users is ascending, so sel is too
        for k, s in enumerate(range(0, len(sel), shard_users)):
            rows = sel[s : s + shard_users]
            plan.append(PlannedShard(shard_name(b, k), b, users[rows], encode[rows]))
    return plan


def plan_digest(plan: list[PlannedShard]) -> str:
    """sha256 over every shard's name, users and encode mask: a restart must find the same plan."""
    h = hashlib.sha256()
    for s in plan:
        h.update(s.name.encode())
        h.update(np.ascontiguousarray(s.users, np.int64).tobytes())
        h.update(np.packbits(s.encode).tobytes())
    return h.hexdigest()


def worker_range(num_shards: int, rank: int, world: int) -> range:
    """The contiguous slice of the shard list (= a hash range of users) that worker ``rank`` of ``world`` exports."""
    if world <= 0 or not 0 <= rank < world:
        raise ExportError(f"--worker-rank {rank} is not in [0, --num-workers={world})")
    return range(rank * num_shards // world, (rank + 1) * num_shards // world)


class SnapshotIndex:
    """Random access by user id into a complete snapshot (the previous one of an incremental export, or a
    side of ``dv365 export compare``). Only the ``user_id`` columns are read up front; payloads are read per
    shard (sha256 and crc32 verified) with a small cache.

    Example::

        prev = SnapshotIndex("out/export/snap-1")
        prev.manifest.snapshot_id, len(prev.user_ids)
        payload = prev.payload(np.array([3, 17]))      # [2, user_bytes] uint8
    """

    def __init__(self, url: str, manifest: SnapshotManifest | None = None, cache_shards: int = 2) -> None:

        self.url = url
        self.manifest = manifest or read_manifest(url)
        self.fmt: RowFormat = self.manifest.row_format
        fs, root = url_to_fs(url)
        ids, shard = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for k, info in enumerate(self.manifest.shards):
            path = posixpath.join(root, info.path)
            if not fs.exists(path):
                raise SnapshotError(f"{url}: shard {info.path} is missing")
            with fs.open(path, "rb") as f:
                col = pq.read_table(f, columns=["user_id"]).column("user_id").to_numpy().astype(np.int64)
            if len(col) != info.users:
                raise SnapshotError(f"{url}: shard {info.path} has {len(col)} users, the manifest says {info.users}")
            ids.append(col)
            shard.append(np.full(len(col), k, np.int64))
        all_ids, all_shard = np.concatenate(ids), np.concatenate(shard)
        rows = np.concatenate([np.arange(n.size) for n in ids])
        order = np.argsort(all_ids, kind="stable")
        self.user_ids, self._shard, self._row = all_ids[order], all_shard[order], rows[order]
        if len(self.user_ids) > 1 and (np.diff(self.user_ids) == 0).any():
            dup = int(self.user_ids[1:][np.diff(self.user_ids) == 0][0])
            raise SnapshotError(f"{url}: user {dup} appears in more than one shard")
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_shards = cache_shards

    def contains(self, user_ids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.user_ids, user_ids)
        pos = np.minimum(pos, max(len(self.user_ids) - 1, 0))
        return (self.user_ids[pos] == user_ids) if len(self.user_ids) else np.zeros(len(user_ids), bool)

    def _shard_payload(self, k: int) -> np.ndarray:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        _, data = read_shard(self.url, self.manifest.shards[k], self.fmt, verify=True)
        self._cache[k] = data
        while len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return data

    def payload(self, user_ids: np.ndarray) -> np.ndarray:
        """``[n, user_bytes]`` uint8 of the given users (every one must be in the snapshot)."""
        user_ids = np.asarray(user_ids, np.int64)
        out = np.empty((len(user_ids), self.fmt.user_bytes), np.uint8)
        if not len(user_ids):
            return out
        present = self.contains(user_ids)
        if not present.all():
            raise SnapshotError(
                f"{self.url}: user {int(user_ids[~present][0])} is not in snapshot {self.manifest.snapshot_id!r}"
            )
        pos = np.searchsorted(self.user_ids, user_ids)
        shards, rows = self._shard[pos], self._row[pos]
        for k in np.unique(shards):
            sel = shards == k
            out[sel] = self._shard_payload(int(k))[rows[sel]]
        return out

    def iter_shards(self) -> list[tuple[int, np.ndarray]]:
        """Shard indices with their user ids (manifest order)."""
        return [(k, self.user_ids[self._shard == k]) for k in range(len(self.manifest.shards))]
