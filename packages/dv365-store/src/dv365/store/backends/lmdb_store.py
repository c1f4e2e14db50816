"""Embedded store: one LMDB environment (a directory) for versions, one memory-mapped row file per version.

Layout::

    <dir>/data.mdb  LMDB, database meta:
          b"active"             -> version name of the active version
          b"version:" + name    -> {"info": VersionInfo, "seq": n, "layout": "rows"} (JSON)
          b"seq"                -> last sequence number handed out (8 bytes, big endian)
    <dir>/rows/<seq>.rows       -> the version's users: sorted ids, checksums and payloads
                                   (dv365.store.backends.rowfile; immutable once committed)

Versions of the ``records`` layout (version records without ``layout``) keep their users in LMDB database
``data`` (key seq (4 B BE) + user id (8 B BE, sign bit flipped), value payload || xxh3-64).

Why it is crash-safe and atomic: a version's row file is written and fsynced completely before the LMDB write
transaction that marks the version ready (copy-on-write B+tree, fsync on commit), and never changes after;
every change of the active pointer or of version records is one LMDB transaction, so a crash leaves the last
committed state (a half-written file belongs to a version still marked "loading" and is removed when that
version is re-published or cleaned up). ``get`` reads the active pointer and version record in one read
transaction (one MVCC snapshot) and the whole batch from that version's file: a concurrent
publish/activate/prune is seen entirely or not at all (``lookup_chunks``, which the gRPC service streams,
reads every piece from the same file). Deleting a version removes its record first and unlinks its file
after, so a reader that still maps it finishes from the old inode; a reader that resolved it just before
the unlink re-resolves the active version.
One publisher at a time per directory (an ``flock`` on ``publish.lock``); any number of reader processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import lmdb
import numpy as np

from dv365.store.api import (
    DEFAULT_KEEP,
    EmbeddingStore,
    Progress,
    RawLookup,
    RowViews,
    VersionInfo,
    check_version_name,
    chunk_users,
    no_active,
)
from dv365.store.backends.rowfile import RowFile, RowFileWriter
from dv365.store.errors import (
    NoActiveVersionError,
    PublishError,
    StoreAuthError,
    StoreError,
    VersionNotFoundError,
)
from dv365.store.records import assemble
from dv365.store.urls import parse_bool, reject_unknown

_KEY = np.dtype([("seq", ">u4"), ("uid", ">u8")])
_SIGN = np.uint64(1 << 63)
_ACTIVE = b"active"
_SEQ = b"seq"
_VPREFIX = b"version:"
ROWS = "rows"  # the row-file layout (records-layout versions have no layout key: per-user LMDB values)
_ROW_FILES_CACHED = 4  # row files kept mapped per process (a deleted version's space is freed on eviction)


@dataclass(frozen=True)
class _Version:
    info: VersionInfo
    seq: int
    layout: str | None  # ROWS, or None for the records layout (per-user LMDB values)

    @functools.cached_property
    def active_info(self) -> VersionInfo:
        """``info`` marked active (what a read answers with; built once per cached record, not per read)."""
        return replace(self.info, active=True)


def record_keys(seq: int, ids: np.ndarray) -> list[bytes]:
    """LMDB keys of ``ids`` (int64) in the version with sequence number ``seq``."""
    k = np.empty(len(ids), dtype=_KEY)
    k["seq"] = seq
    k["uid"] = ids.astype(np.int64).view(np.uint64) ^ _SIGN
    raw = k.tobytes()
    return [raw[i : i + 12] for i in range(0, len(raw), 12)]


class LmdbStore(EmbeddingStore):
    """The embedded default backend (``lmdb:///path``).

    Args:
        path: the store directory. Only :meth:`publish` creates a store there: opening a directory that
            holds none creates nothing, and reads of it raise :class:`NoActiveVersionError` ("no dv365 store at
            PATH"); ``versions()`` is empty.
        keep: versions retained after a publish.
        mode: ``"rw"`` (default) or ``"ro"``: a reader that cannot publish/activate/delete.
        map_size_gb: the map's maximum size (virtual; the file grows as needed). Every process opening the
            directory should use the same value (the default, 1024 GiB, fits 140M users x 4 versions).

        layout: how new versions store their users: ``"rows"`` (default: one memory-mapped row file per
            version, :mod:`~dv365.store.backends.rowfile`) or ``"records"`` (one LMDB value per user: for stores
            that dv365-store readers without row-file support must read). Versions of either layout are read.
        create: False: refuse (StoreError "no dv365 store at PATH") a directory that holds no store, as
            ``mode="ro"`` always does (``dv365 serve`` opens its backend so).

    URL options: ``keep``, ``mode=ro`` (or ``readonly=1``), ``map_size_gb``, ``layout``, ``create=0``, and ``prefault=1``
    (call :meth:`prefault` when opening, and map each row file's pages when it is first read: for long-running
    readers on hosts whose RAM holds the files).

    Example::

        store = LmdbStore("/srv/dv365", keep=3)
        store.publish("/data/snap-2026-11-22")
        store.get([1, 2, 3]).payload.shape       # (3, 58, 132)
    """

    OPTIONS = {"keep", "mode", "map_size_gb", "readonly", "prefault", "layout", "create"}

    def __init__(
        self,
        path: str,
        *,
        keep: int = DEFAULT_KEEP,
        mode: str = "rw",
        map_size_gb: float = 1024,
        layout: str = ROWS,
        create: bool = True,
    ) -> None:
        path = os.path.abspath(path)
        super().__init__(f"lmdb://{path}", keep)
        if mode not in ("rw", "ro"):
            raise StoreError(f"{self.url}: mode must be 'rw' or 'ro', got {mode!r}")
        if layout not in (ROWS, "records"):
            raise StoreError(f"{self.url}: layout must be 'rows' or 'records', got {layout!r}")
        self.layout = layout
        self._prefault = False
        self.path = path
        self.readonly = mode == "ro"
        self._map_size = int(map_size_gb * (1 << 30))
        self._shared: _SharedEnv | None = None
        self._entries: dict[bytes, tuple[VersionInfo, int]] = {}
        self._closed = False
        if self._exists():
            self._attach()
        elif self.readonly or not create:
            raise StoreError(self._no_store())

    # ---- the environment: opened when the directory holds a store; only publish creates one --------------
    def _exists(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "data.mdb"))

    def _no_store(self) -> str:
        return f"{self.url}: no dv365 store at {self.path}; create one with `dv365 store publish`"

    def _attach(self) -> _SharedEnv:
        if self._shared is None:
            self._shared = _open_env(self.path, self.readonly, self._map_size, self.url)
        return self._shared

    def _env(self) -> _SharedEnv:
        """The open environment; a store that does not exist (yet) has no active version. Nothing is created."""
        if self._shared is None:
            if not self._exists():  # another process may have published since this client was opened
                raise NoActiveVersionError(f"{self._no_store()} (no active version)")
            self._attach()
        return self._shared  # type: ignore[return-value]

    @property
    def env(self) -> lmdb.Environment:
        return self._env().env

    @property
    def meta(self) -> Any:
        return self._env().meta

    @property
    def data(self) -> Any:
        return self._env().data

    @classmethod
    def from_url(cls, url: str, **options: Any) -> LmdbStore:
        reject_unknown(options, url, cls.OPTIONS)
        path = url[len("lmdb://") :] if url.startswith("lmdb://") else url  # lmdb:///abs/path, lmdb://rel/path
        if not path:
            raise StoreError(f"{url}: no directory in the URL (lmdb:///absolute/path)")
        mode = str(options.get("mode", "rw"))
        if "readonly" in options and parse_bool(options["readonly"], "readonly", url):
            mode = "ro"
        store = cls(
            path,
            keep=int(options.get("keep", DEFAULT_KEEP)),
            mode=mode,
            map_size_gb=float(options.get("map_size_gb", 1024)),
            layout=str(options.get("layout", ROWS)),
            create=parse_bool(options.get("create", True), "create", url),
        )
        if parse_bool(options.get("prefault", False), "prefault", url):
            store.prefault()
        return store

    def prefault(self) -> bool:
        """Maps every page of the store file into this process's page tables now (Linux ``MADV_POPULATE_READ``,
        kernel >= 5.14), so that reads take no page faults: the state a long-running reader reaches anyway.
        Measured with 1M users (8.2 GB file, page cache warm, 16-core host): a fresh process took ~310 minor
        faults per 1,000-user get (p50 5.4 ms) over its first 60 gets, 14 (p50 3.2 ms) once its map had filled
        in; the load test's embedded p50 / p99 went from 4.7 / 10.9 to 3.3 / 6.4 ms with it. Pages not in the
        page cache are read from disk, so use it where RAM holds the file. Returns False (and does nothing)
        where the platform cannot. Row files (the default layout) are populated as they are first mapped."""
        done = _populate(os.path.join(self.path, "data.mdb"))
        with contextlib.suppress(StoreError, FileNotFoundError):
            with self._snapshot() as (_, _, ver):
                if ver.layout == ROWS:  # the active file now (mapped or not yet), later ones as they are mapped
                    done = self._row_file(ver).populate() or done
        self._prefault = True
        return done

    # ---- reads -------------------------------------------------------------------------------------
    def _entry(self, raw: bytes, name: bytes) -> _Version:
        hit = self._entries.get(raw)
        if hit is None:
            d = json.loads(raw)
            hit = _Version(
                VersionInfo.from_json(json.dumps(d["info"]), f"{self.url} version {name.decode()!r}"),
                int(d["seq"]),
                d.get("layout"),
            )
            if len(self._entries) > 64:
                self._entries.clear()
            self._entries[raw] = hit
        return hit

    def _row_path(self, seq: int) -> str:
        return os.path.join(self.path, "rows", f"{seq:010d}.rows")

    def _row_file(self, ver: _Version) -> RowFile:
        """The version's mapped row file (process-wide cache); FileNotFoundError when it was just deleted."""
        shared = self._env()
        cache = shared.row_files
        with shared.row_lock:
            rf = cache.get(ver.seq)
            if rf is not None:
                cache.move_to_end(ver.seq)
                return rf
        fmt = ver.info.row_format
        rf = RowFile(
            self._row_path(ver.seq), ver.info.user_count, fmt.user_bytes, f"{self.url} version {ver.info.version!r}"
        )
        if self._prefault:
            rf.populate()
        with shared.row_lock:
            cache[ver.seq] = rf
            while len(cache) > _ROW_FILES_CACHED:
                cache.popitem(last=False)  # unmapped once no answer in flight uses it
        return rf

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[tuple[lmdb.Transaction, VersionInfo, _Version]]:
        """One read transaction (one MVCC snapshot: the active pointer and every value read through it agree),
        with the data database as its default, the active version's info and its record."""
        try:
            with self.env.begin(db=self.data, buffers=True) as txn:
                name = txn.get(_ACTIVE, db=self.meta)
                if name is None:
                    raise no_active(self.url)
                name = bytes(name)
                raw = txn.get(_VPREFIX + name, db=self.meta)
                if raw is None:
                    raise StoreError(f"{self.url}: active version {name.decode()!r} has no version record")
                ver = self._entry(bytes(raw), name)
                yield txn, ver.active_info, ver
        except lmdb.Error as e:
            raise StoreError(f"{self.url}: read failed: {e}") from e

    def _read_records(self, txn: lmdb.Transaction, info: VersionInfo, seq: int, ids: np.ndarray) -> RawLookup:
        # the records layout (per-user LMDB values). map(txn.get, keys): values are zero-copy views into the map,
        # fetched one at a time as assemble copies them
        payload, present, checksums, errors = assemble(
            map(txn.get, record_keys(seq, ids)), ids, info.row_format, f"{self.url} version {info.version!r}"
        )
        return RawLookup(payload, present, checksums, errors, info)

    @contextlib.contextmanager
    def _reader(self) -> Iterator[tuple[VersionInfo, Callable[[np.ndarray], RawLookup], RowFile | None]]:
        """The active version, a reader of it (every call is answered from that one version) and its row file
        (None for a version of the records layout)."""
        for _ in range(3):
            with self._snapshot() as (txn, info, ver):
                if ver.layout != ROWS:
                    yield info, lambda ids: self._read_records(txn, info, ver.seq, ids), None
                    return
                try:
                    rf = self._row_file(ver)
                except FileNotFoundError:
                    continue  # deleted after this snapshot was taken: resolve the active version again
            # an immutable file: no transaction needed
            yield info, lambda ids, rf=rf: RawLookup(*rf.lookup(ids), info), rf
            return
        raise StoreError(
            f"{self.url}: the row file of the active version {info.version!r} is missing ({self._row_path(ver.seq)})"
        )

    def lookup(self, ids: np.ndarray) -> RawLookup:
        with self._reader() as (_, read, _rf):
            return read(ids)

    def lookup_rows(self, ids: np.ndarray) -> RowViews:
        """Row views into the active version's row file (unverified: ``dv365 serve`` checks its copy); a
        version of the records layout is read as :meth:`lookup` (its LMDB views end with the transaction)."""
        with self._reader() as (info, read, rf):
            if rf is None:
                return RowViews.of(read(ids))
            return RowViews(*rf.views(ids), info, verified=False)

    def lookup_chunks(self, ids: np.ndarray, chunk_bytes: int) -> Iterator[RawLookup]:
        """Reads piece by piece from one version: every piece comes from the same snapshot."""
        with self._reader() as (info, read, _rf):
            step = chunk_users(chunk_bytes, info.row_format)
            for s in range(0, max(len(ids), 1), step):
                yield read(ids[s : s + step])

    # ---- versions ----------------------------------------------------------------------------------
    def _records(self, txn: lmdb.Transaction) -> Iterator[_Version]:
        cur = txn.cursor(db=self.meta)
        if not cur.set_range(_VPREFIX):
            return
        for key, raw in cur:
            key = bytes(key)
            if not key.startswith(_VPREFIX):
                break
            yield self._entry(bytes(raw), key[len(_VPREFIX) :])

    def versions(self) -> list[VersionInfo]:
        if self._shared is None and not self._exists():
            return []  # no store (yet): nothing to list, and nothing is created
        with self.env.begin() as txn:
            active = txn.get(_ACTIVE, db=self.meta)
            out = [
                replace(v.info, active=active is not None and v.info.version == active.decode())
                for v in self._records(txn)
            ]
        return sorted(out, key=lambda v: v.published_at)

    def _writable(self, what: str) -> None:
        if self.readonly:
            raise StoreAuthError(f"{self.url}: opened read-only (mode=ro, a reader): cannot {what}")

    def _get_record(self, txn: lmdb.Transaction, version: str) -> _Version:
        raw = txn.get(_VPREFIX + version.encode(), db=self.meta)
        if raw is None:
            names = [v.info.version for v in self._records(txn)]
            raise VersionNotFoundError(f"{self.url}: no version {version!r} (have: {names})")
        return self._entry(bytes(raw), version.encode())

    def activate(self, version: str) -> VersionInfo:
        self._writable(f"activate {version!r}")
        check_version_name(version, self.url)
        with self.env.begin(write=True) as txn:
            info = self._get_record(txn, version).info
            if info.state != "ready":
                raise StoreError(f"{self.url}: version {version!r} is {info.state}, not ready: cannot activate it")
            txn.put(_ACTIVE, version.encode(), db=self.meta)
        return replace(info, active=True)

    def delete_version(self, version: str) -> None:
        self._writable(f"delete {version!r}")
        check_version_name(version, self.url)
        with self.env.begin(write=True) as txn:
            active = txn.get(_ACTIVE, db=self.meta)
            if active is not None and active.decode() == version:
                raise StoreError(f"{self.url}: version {version!r} is active; activate another one before deleting it")
            seq = self._get_record(txn, version).seq
            txn.delete(_VPREFIX + version.encode(), db=self.meta)
            prefix = int(seq).to_bytes(4, "big")  # per-user values of the records layout (none for row files)
            cur = txn.cursor(db=self.data)
            if cur.set_range(prefix):
                while cur.key()[:4] == prefix and cur.delete():
                    pass
        self._drop_row_file(seq)  # after the commit: readers that resolved the version keep the old inode

    def _drop_row_file(self, seq: int) -> None:
        shared = self._env()
        with shared.row_lock:
            shared.row_files.pop(seq, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._row_path(seq))

    # ---- publish -----------------------------------------------------------------------------------
    def publish(self, snapshot_url: str, *, activate: bool = True, progress: Progress | None = None) -> VersionInfo:
        self._writable(f"publish {snapshot_url}")
        os.makedirs(self.path, exist_ok=True)
        with self._attach().lock, open(os.path.join(self.path, "publish.lock"), "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PublishError(
                    f"{self.url}: another process is publishing into this store; try again later"
                ) from None
            try:
                self._remove_orphans()
                return super().publish(snapshot_url, activate=activate, progress=progress)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _remove_orphans(self) -> None:
        """Row files without a version record (a crash between unlinking a record and its file)."""
        folder = os.path.join(self.path, "rows")
        if not os.path.isdir(folder):
            return
        with self.env.begin() as txn:
            known = {f"{v.seq:010d}.rows" for v in self._records(txn)}
        for name in os.listdir(folder):
            if name.endswith(".rows") and name not in known:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))

    def _begin_version(self, info: VersionInfo) -> None:
        with self.env.begin(write=True) as txn:
            raw = txn.get(_SEQ, db=self.meta)
            seq = (int.from_bytes(raw, "big") if raw else 0) + 1
            if seq >= 1 << 32:
                raise PublishError(f"{self.url}: version sequence exhausted")
            txn.put(_SEQ, seq.to_bytes(8, "big"), db=self.meta)
            self._put_info(txn, info, seq)
        self._seq, self._last_key = seq, b""
        self._writer: RowFileWriter | None = None
        if self.layout == ROWS:
            os.makedirs(os.path.join(self.path, "rows"), exist_ok=True)
            self._writer = RowFileWriter(
                self._row_path(seq),
                info.user_count,
                info.row_format.user_bytes,
                f"{self.url}: version {info.version!r}",
            )

    def _put_info(self, txn: lmdb.Transaction, info: VersionInfo, seq: int) -> None:
        rec: dict[str, Any] = {"info": json.loads(info.to_json()), "seq": seq}
        if self.layout == ROWS:
            rec["layout"] = ROWS
        txn.put(_VPREFIX + info.version.encode(), json.dumps(rec, sort_keys=True).encode(), db=self.meta)

    def _write_records(self, info: VersionInfo, ids: np.ndarray, records: list[bytes]) -> None:
        if self._writer is not None:
            try:
                self._writer.append(ids, records)
            except OSError as e:
                raise PublishError(f"{self.url}: version {info.version!r}: writing its row file failed: {e}") from e
            return
        keys = record_keys(self._seq, ids)
        append = keys[0] > self._last_key and all(a < b for a, b in zip(keys, keys[1:]))
        try:
            with self.env.begin(write=True) as txn:
                _, added = txn.cursor(db=self.data).putmulti(zip(keys, records), overwrite=False, append=append)
                if added != len(keys):
                    txn.abort()
                    raise PublishError(
                        f"{self.url}: version {info.version!r}: user {self._duplicate(ids, keys)} "
                        "appears more than once in the snapshot (in two shards?)"
                    )
        except lmdb.MapFullError as e:
            raise PublishError(
                f"{self.url}: version {info.version!r}: the LMDB map is full: open the store with a "
                f"larger map_size_gb ({e})"
            ) from e
        self._last_key = max(self._last_key, keys[-1])

    def _duplicate(self, ids: np.ndarray, keys: list[bytes]) -> int:
        with self.env.begin() as txn:
            return next((int(u) for u, k in zip(ids, keys) if txn.get(k, db=self.data) is not None), int(ids[0]))

    def _commit_version(self, info: VersionInfo) -> None:
        if self._writer is not None:
            try:
                self._writer.finish()  # complete and durable before the record says "ready"
            except OSError as e:
                raise PublishError(f"{self.url}: version {info.version!r}: writing its row file failed: {e}") from e
            self._writer = None
        with self.env.begin(write=True) as txn:
            self._put_info(txn, info, self._seq)

    def _abort_version(self, info: VersionInfo) -> None:
        if getattr(self, "_writer", None) is not None:
            self._writer.close()
            self._writer = None
        super()._abort_version(info)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._shared is not None:
                _release_env(self.path)


_MADV_POPULATE_READ = 22  # linux/mman.h, kernel >= 5.14


def _populate(file: str) -> bool:
    """``madvise(MADV_POPULATE_READ)`` over this process's mappings of ``file`` (found in /proc/self/maps),
    up to the file's current end; True when at least one mapping was populated."""
    if not sys.platform.startswith("linux"):
        return False
    real = os.path.realpath(file)
    try:
        size = os.path.getsize(real)
        with open("/proc/self/maps") as f:
            spans = [line.rstrip("\n").split(maxsplit=5) for line in f]
    except OSError:
        return False
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = False
    for span in spans:
        if len(span) == 6 and span[5] == real:
            lo, hi = (int(x, 16) for x in span[0].split("-"))
            length = min(hi - lo, size - int(span[2], 16))
            if length > 0 and madvise(lo, length, _MADV_POPULATE_READ) == 0:  # ctypes drops the GIL meanwhile
                done = True
    return done


class _SharedEnv:
    """LMDB allows one open environment per directory per process: clients of one directory share it."""

    def __init__(self, path: str, readonly: bool, map_size: int, url: str) -> None:
        if not readonly:
            os.makedirs(path, exist_ok=True)
        # a reader still opens the map read-write when it may (the role is enforced by the client), so that a
        # writer of the same directory in the same process can share the environment
        self.readonly = readonly and not os.access(path, os.W_OK)
        try:
            self.env = lmdb.open(
                path,
                map_size=map_size,
                max_dbs=4,
                max_readers=1024,
                readonly=self.readonly,
                readahead=False,
                meminit=False,
                lock=True,
                subdir=True,
            )
            self.meta = self.env.open_db(b"meta", create=not self.readonly)
            self.data = self.env.open_db(b"data", create=not self.readonly)
        except lmdb.Error as e:
            raise StoreError(f"{url}: cannot open the LMDB store: {e}") from e
        self.lock = threading.Lock()
        self.refs = 0
        self.row_files: OrderedDict[int, RowFile] = OrderedDict()  # seq -> mapped row file (LRU)
        self.row_lock = threading.Lock()  # guards row_files (``lock`` is held through a whole publish)


_ENVS: dict[str, _SharedEnv] = {}
_ENVS_LOCK = threading.Lock()


def _open_env(path: str, readonly: bool, map_size: int, url: str) -> _SharedEnv:
    with _ENVS_LOCK:
        shared = _ENVS.get(path)
        if shared is None:
            shared = _ENVS[path] = _SharedEnv(path, readonly, map_size, url)
        elif shared.readonly and not readonly:
            raise StoreError(f"{url}: already open read-only in this process (the directory is not writable)")
        shared.refs += 1
        return shared


def _release_env(path: str) -> None:
    with _ENVS_LOCK:
        shared = _ENVS.get(path)
        if shared is not None:
            shared.refs -= 1
            if shared.refs <= 0:
                shared.env.close()
                del _ENVS[path]
