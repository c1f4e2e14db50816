"""The embedded store's row file: one immutable, memory-mapped file per published version.

Layout (little endian; every section starts on a 4 KiB boundary)::

    header   magic b"DV365ROWS\\0", format (u32), users U (u64), user_bytes n (u64), section offsets (4 x u64)
    ids      int64 [U]    the version's user ids, sorted
    slots    int64 [U]    slot of ids[i] (the order users arrived in while publishing)
    sums     uint64 [U]   xxh3-64 of each slot's payload, seeded with its user id (dv365.store.records)
    payload  uint8 [U, n] the int4 rows of each slot

A batch get is a ``searchsorted`` of the ids, one gather of payload rows and checksums (numpy, outside the
interpreter loop) and one checksum pass: no per-user key lookup. Why not one LMDB value per user (the layout
before): 1,000 B+tree lookups and copies in the interpreter took ~2.4x the time of this file's gather at
200K users on the dev VM (docs/store.md "Measured", D); and large LMDB values cannot replace it, because
py-lmdb touches every page of a value it returns (a 31 MB block value per 4,096 users read 2.8x *slower*).

The file is written completely and fsynced before the version record that names it is committed in LMDB
(:mod:`dv365.store.backends.lmdb_store`), so a crash never leaves a committed version with a partial file;
it is never modified afterwards, and deleting a version unlinks it only after the record is gone (a reader
that still maps it keeps reading the old inode).
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import numpy as np

from dv365.store.errors import PublishError, StoreError
from dv365.store.records import CHECKSUM_BYTES, checksum, corrupted_message, drop_corrupted, verify_payloads

MAGIC = b"DV365ROWS\0"
FORMAT = 1
_HEADER = struct.Struct("<10sIQQ4Q")
_PAGE = 4096
_MADV_POPULATE_READ = 22  # linux/mman.h, kernel >= 5.14


def _align(x: int) -> int:
    return (x + _PAGE - 1) // _PAGE * _PAGE


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    """``os.pwrite`` until every byte is written (Linux writes at most ~2 GiB per call)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def layout(users: int, user_bytes: int) -> tuple[int, int, int, int, int]:
    """Byte offsets of the ids, slots, sums and payload sections, and the file size."""
    ids = _PAGE
    slots = _align(ids + 8 * users)
    sums = _align(slots + 8 * users)
    payload = _align(sums + 8 * users)
    return ids, slots, sums, payload, payload + users * user_bytes


class RowFileWriter:
    """Writes one version's row file while its snapshot streams in (ids in any order, each exactly once).

    Args:
        path: the file to create (a leftover from a crashed publish is replaced).
        users: the snapshot's user count (from its manifest): the file is sized for exactly that many.
        user_bytes: bytes of one user's payload.
        where: names the store and version in errors.
    """

    def __init__(self, path: str, users: int, user_bytes: int, where: str) -> None:
        self.path, self.users, self.n, self.where = path, int(users), int(user_bytes), where
        self.offsets = layout(self.users, self.n)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.offsets[4])
        self.count = 0
        self.ids: list[np.ndarray] = []

    def append(self, ids: np.ndarray, records: list[bytes]) -> None:
        """Adds users ``ids`` with their stored records (``payload || xxh3``, :func:`~dv365.store.records.encode_records`)."""
        k = len(ids)
        if self.count + k > self.users:
            raise PublishError(
                f"{self.where}: the snapshot holds more users than its manifest's user_count {self.users:,}"
            )
        rec = np.frombuffer(b"".join(records), dtype=np.uint8).reshape(k, self.n + CHECKSUM_BYTES)
        _, _, sums, payload, _ = self.offsets
        _pwrite_all(self.fd, np.ascontiguousarray(rec[:, : self.n]).data, payload + self.count * self.n)
        _pwrite_all(self.fd, np.ascontiguousarray(rec[:, self.n :]).data, sums + self.count * 8)
        self.ids.append(np.asarray(ids, dtype=np.int64))
        self.count += k

    def finish(self) -> None:
        """Writes the sorted index and the header and makes the file durable (fsync file and directory).

        Raises:
            PublishError: a user appears twice, or fewer users came than the manifest promised.
        """
        if self.count != self.users:
            raise PublishError(
                f"{self.where}: the snapshot held {self.count:,} users, its manifest says {self.users:,}"
            )
        ids = np.concatenate(self.ids) if self.ids else np.empty(0, np.int64)
        slots = np.argsort(ids, kind="stable")
        sorted_ids = ids[slots]
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if len(dup):
            raise PublishError(
                f"{self.where}: user {int(sorted_ids[dup[0]])} appears more than once in the snapshot (in two shards?)"
            )
        o_ids, o_slots, o_sums, o_payload, _ = self.offsets
        _pwrite_all(self.fd, sorted_ids.data, o_ids)
        _pwrite_all(self.fd, slots.astype(np.int64).data, o_slots)
        _pwrite_all(self.fd, _HEADER.pack(MAGIC, FORMAT, self.users, self.n, o_ids, o_slots, o_sums, o_payload), 0)
        os.fsync(self.fd)
        self.close()
        dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RowFile:
    """A committed row file, memory-mapped read-only (shared by every reader of the process).

    Raises:
        FileNotFoundError: the file is gone (its version was just deleted: the caller re-resolves the version).
        StoreError: the file cannot be mapped, or is truncated or not a row file of this format and size.
    """

    def __init__(self, path: str, users: int, user_bytes: int, where: str) -> None:
        self.path, self.where = path, where
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise  # the caller re-resolves the version (it may have been deleted meanwhile)
        except (OSError, ValueError) as e:
            raise StoreError(f"{where}: cannot map the row file {path}: {e}") from e
        try:
            magic, fmt, U, n, *offs = _HEADER.unpack_from(self._map, 0)
        except struct.error:
            magic, fmt, U, n, offs = b"", 0, -1, -1, [0, 0, 0, 0]
        want = layout(users, user_bytes)
        if (
            magic != MAGIC
            or fmt != FORMAT
            or U != users
            or n != user_bytes
            or tuple(offs) != want[:4]
            or len(self._map) != want[4]
        ):
            size = len(self._map)
            self._map.close()
            raise StoreError(
                f"{where}: row file {path} is damaged (header or size does not match the version: "
                f"{size:,} bytes, expected {want[4]:,} for {users:,} users x {user_bytes} bytes)"
            )
        self.users, self.n = users, user_bytes
        buf = memoryview(self._map)
        o_ids, o_slots, o_sums, o_payload = offs
        self.ids = np.frombuffer(buf, np.int64, users, o_ids)
        self.slots = np.frombuffer(buf, np.int64, users, o_slots)
        self.sums = np.frombuffer(buf, "<u8", users, o_sums)
        self.payload = np.frombuffer(buf, np.uint8, users * user_bytes, o_payload).reshape(users, user_bytes)
        self._view, self._payload_offset = buf, o_payload  # for views(): row slices of the map
        self._zero = bytes(user_bytes)  # the row of an absent user

    def populate(self) -> bool:
        """Maps every page now (``MADV_POPULATE_READ``, Linux >= 5.14); False where the platform cannot."""
        try:
            self._map.madvise(_MADV_POPULATE_READ)
            return True
        except (AttributeError, OSError, ValueError):
            return False

    def _locate(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``present [B]``, ``slot [B]`` (each user's row; 0 where the index entry is damaged) and the mask of
        damaged index entries (an out-of-range slot: reported per user, never read) of int64 ids ``q``."""
        B, U = len(q), self.users
        order = np.argsort(q)  # sorted needles: numpy's binary search starts from the previous bound
        pos = np.empty(B, dtype=np.intp)
        pos[order] = np.searchsorted(self.ids, q[order])  # 0.20 vs 0.33 ms for 1,000 of 1M ids
        np.minimum(pos, U - 1, out=pos)
        present = self.ids[pos] == q
        slot = self.slots[pos]
        bad_slot = (slot < 0) | (slot >= U)
        if bad_slot.any():
            slot = np.where(bad_slot, 0, slot)
        return present, slot, bad_slot

    def lookup(self, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
        """``payload [B, n]`` (zero rows where not returned), ``present [B]``, stored ``checksums [B]`` and
        ``errors`` {position: message} for users whose stored row fails its checksum."""
        q = np.ascontiguousarray(user_ids, dtype=np.int64)
        B = len(q)
        if self.users == 0:
            return np.zeros((B, self.n), np.uint8), np.zeros(B, bool), np.zeros(B, np.uint64), {}
        if B == 1:
            return self._lookup_one(int(q[0]))
        present, slot, bad_slot = self._locate(q)
        # mode='clip' skips numpy's per-index bounds check: every slot is in range here (checked above);
        # 1,000 rows at 1M users: p50 1.41 -> 1.23 ms (docs/store.md, "Measured", E)
        payload = np.take(self.payload, slot, axis=0, mode="clip")
        stored = self.sums[slot].astype(np.uint64)
        errors: dict[int, str] = {}
        bad = np.union1d(np.flatnonzero(present & bad_slot), verify_payloads(payload, q, stored, present & ~bad_slot))
        drop_corrupted(payload, present, stored, q, bad, self.where, errors)
        return payload, present, stored, errors

    def _lookup_one(self, uid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
        """:meth:`lookup` of one user (the online path): the same checks on scalars, no batch machinery."""
        n = self.n
        payload, present, stored = np.zeros((1, n), np.uint8), np.zeros(1, bool), np.zeros(1, np.uint64)
        i = int(np.searchsorted(self.ids, uid))
        if i >= self.users or int(self.ids[i]) != uid:
            return payload, present, stored, {}
        slot = int(self.slots[i])
        if not 0 <= slot < self.users:  # a damaged index entry: reported, never read
            return payload, present, stored, {0: corrupted_message(self.where, uid)}
        start = self._payload_offset + slot * n
        row, stored_sum = self._view[start : start + n], int(self.sums[slot])
        if checksum(row, uid) != stored_sum:
            return payload, present, stored, {0: corrupted_message(self.where, uid)}
        payload[0] = np.frombuffer(row, np.uint8)
        present[0], stored[0] = True, stored_sum
        return payload, present, stored, {}

    def views(self, user_ids: np.ndarray) -> tuple[list[Any], np.ndarray, np.ndarray, dict[int, str]]:
        """The rows of ``user_ids`` *in place*: ``rows`` (B buffers of ``n`` bytes: read-only views into the
        map, a shared zero row where a user is absent), ``present [B]``, the stored ``checksums [B]`` (0 where
        absent) and ``errors`` for users whose index entry is damaged (absent too). The payloads are *not*
        checked against their checksums here: the caller copies the rows once (``dv365 serve`` joins them into
        its answer) and checks that copy (:func:`~dv365.store.records.verify_payloads`), instead of gathering
        them into an array, checking it, and copying them again."""
        q = np.ascontiguousarray(user_ids, dtype=np.int64)
        B, n = len(q), self.n
        if self.users == 0 or B == 0:
            return [self._zero] * B, np.zeros(B, bool), np.zeros(B, np.uint64), {}
        present, slot, bad_slot = self._locate(q)
        stored = self.sums[slot].astype(np.uint64)
        errors: dict[int, str] = {}
        # reports the damaged entries, clears `present` and `stored` of them and of the absent users
        drop_corrupted(
            np.empty((B, 0), np.uint8), present, stored, q, np.flatnonzero(present & bad_slot), self.where, errors
        )
        mv, start = self._view, self._payload_offset
        rows: list[Any] = [mv[o : o + n] for o in (slot * n + start).tolist()]
        if not present.all():
            zero = self._zero
            for i in np.flatnonzero(~present).tolist():
                rows[i] = zero
        return rows, present, stored, errors


def locate(rf: Any, uid: int) -> int:
    """Byte offset of ``uid``'s payload in its row file (for tools and fault-injection tests)."""
    i = int(np.searchsorted(rf.ids, uid))
    if i >= rf.users or int(rf.ids[i]) != uid:
        raise KeyError(uid)
    return layout(rf.users, rf.n)[3] + int(rf.slots[i]) * rf.n
