"""The one client interface of every dv365 embedding store (embedded LMDB, Redis, gRPC).

:class:`EmbeddingStore` implements dv365-core's :class:`~dv365.core.lookup.EmbeddingReader` (``get``), adds a
de-quantizing ``get_float``, and the version life cycle: ``publish`` (load a snapshot folder written by
dv365-export), ``versions``, ``activate``/``rollback`` and retention of the last ``keep`` versions.

A *version* is one published snapshot, named by its ``snapshot_id``. Exactly one version is *active*; every
``get`` answers a whole batch from one version (``LookupResult.snapshot_id``), never a mix.
"""

from __future__ import annotations

import abc
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from dv365.core.lookup import LookupResult
from dv365.core.quantize import RowFormat
from dv365.core.snapshot import SnapshotError, SnapshotManifest, read_manifest, read_shard
from dv365.store.errors import (
    InvalidRequestError,
    NoActiveVersionError,
    PublishError,
    StoreError,
    VersionNotFoundError,
)
from dv365.store.metrics import StoreMetrics
from dv365.store.records import encode_records

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
MAX_BATCH = 10_000  # users per get (10,000 x 7.6 KB = 77 MB per answer)
DEFAULT_KEEP = 3
WRITE_CHUNK = 4096  # users per backend write while publishing

Progress = Callable[[int], None]


@dataclass(frozen=True)
class VersionInfo:
    """One published snapshot in a store.

    Args:
        version: the snapshot id (unique in the store).
        model_version / data_cutoff_ts / row_format / simulated: copied from the snapshot manifest.
        user_count: users in the version.
        published_at: unix seconds when its publication started (orders versions for rollback/retention).
        source: the snapshot URL it was loaded from.
        state: ``"ready"``, or ``"loading"`` while (or if a crash left it) half-published.
        active: whether ``get`` answers from it now.
    """

    version: str
    model_version: str
    data_cutoff_ts: int
    user_count: int
    row_format: RowFormat
    published_at: float
    source: str
    state: str = "ready"
    active: bool = False
    simulated: bool = False

    def to_json(self) -> str:
        d = asdict(self)
        d["row_format"] = self.row_format.to_dict()
        d.pop("active")  # derived from the store's active pointer, never stored
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "version") -> VersionInfo:
        try:
            d: dict[str, Any] = json.loads(text)
            d["row_format"] = RowFormat.from_dict(d["row_format"])
            d.pop("active", None)
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: malformed version record: {type(e).__name__}: {e}") from e

    @classmethod
    def from_manifest(cls, m: SnapshotManifest, source: str) -> VersionInfo:
        return cls(
            version=m.snapshot_id,
            model_version=m.model_version,
            data_cutoff_ts=m.data_cutoff_ts,
            user_count=m.user_count,
            row_format=m.row_format,
            published_at=time.time(),
            source=source,
            state="loading",
            simulated=m.simulated,
        )


@dataclass(frozen=True)
class FloatLookupResult:
    """``get_float``'s answer: de-quantized embeddings.

    Attributes:
        embeddings: ``torch.Tensor`` ``[B, rows_per_user, dim]`` float32; zero rows for missing users.
        present / snapshot_id / age_s / errors: as in :class:`~dv365.core.lookup.LookupResult`.
    """

    embeddings: Any  # torch.Tensor (torch is imported lazily)
    present: np.ndarray
    snapshot_id: str
    age_s: float
    errors: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RawLookup:
    """A backend's answer before it becomes a LookupResult (the gRPC service forwards the checksums)."""

    payload: np.ndarray  # [B, user_bytes] uint8
    present: np.ndarray  # [B] bool
    checksums: np.ndarray  # [B] uint64, the stored xxh3 of each present payload
    errors: dict[int, str]
    info: VersionInfo

    def part(self, lo: int, hi: int) -> RawLookup:
        """Users ``lo:hi`` of this answer (views; ``errors`` re-keyed to positions within the part)."""
        errors = {k - lo: v for k, v in self.errors.items() if lo <= k < hi}
        return RawLookup(self.payload[lo:hi], self.present[lo:hi], self.checksums[lo:hi], errors, self.info)

    def to_result(self, now: float | None = None) -> LookupResult:
        fmt = self.info.row_format
        now = time.time() if now is None else now
        return LookupResult(
            payload=self.payload.reshape(len(self.present), fmt.rows_per_user, fmt.row_bytes),
            present=self.present,
            snapshot_id=self.info.version,
            age_s=now - self.info.data_cutoff_ts,
            row_format=fmt,
            errors=self.errors,
        )


@dataclass(frozen=True)
class RowViews:
    """A backend's answer as its rows *in place* (what ``dv365 serve`` copies once into its ``Get`` answer).

    ``rows`` is a sequence of buffers whose concatenation is the ``[B, user_bytes]`` payload in request order
    (zero bytes where a user is not returned): one row view per user into the backend's memory (a row file's
    map), or a single buffer of the whole payload. ``verified``: whether every present row was already checked
    against its checksum; when False the caller must check its copy (:func:`dv365.store.records.verify_payloads`)
    before anything is answered from it.
    """

    rows: Sequence[Any]
    present: np.ndarray  # [B] bool
    checksums: np.ndarray  # [B] uint64, the stored xxh3 of each present payload (0 elsewhere)
    errors: dict[int, str]
    info: VersionInfo
    verified: bool

    @classmethod
    def of(cls, raw: RawLookup) -> RowViews:
        """A checked :class:`RawLookup` as one buffer of the whole payload."""
        return cls((raw.payload,), raw.present, raw.checksums, raw.errors, raw.info, verified=True)


def count_answer(metrics: StoreMetrics, method: str, raw: RawLookup | RowViews, seconds: float) -> None:
    """Counts one answered call: its users, the missing ones, those whose stored value failed its checksum."""
    failed = len(raw.errors)
    users = len(raw.present)
    missing = (users - int(raw.present[0]) if users == 1 else users - int(raw.present.sum())) - failed
    metrics.observe(method, seconds, users, missing, failed)
    info = raw.info
    metrics.answered_from(info.version, info.data_cutoff_ts, info.published_at)


def as_user_ids(user_ids: Sequence[int] | np.ndarray, where: str) -> np.ndarray:
    """Validates a batch of user ids: 1-D, integral, at most :data:`MAX_BATCH`."""
    arr = np.asarray(user_ids)
    if arr.ndim != 1:
        raise InvalidRequestError(f"{where}: user_ids must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidRequestError(f"{where}: user_ids must be integers, got dtype {arr.dtype} (first: {arr[0]!r})")
    if len(arr) > MAX_BATCH:
        raise InvalidRequestError(f"{where}: a batch of {len(arr)} users is over the limit of {MAX_BATCH}; split it")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) >= 1 << 63:
        raise InvalidRequestError(f"{where}: user id {int(arr.max())} does not fit in int64")
    return arr.astype(np.int64, copy=False)


def chunk_users(chunk_bytes: int, fmt: RowFormat) -> int:
    """Users per piece of :meth:`EmbeddingStore.lookup_chunks` (at least 1)."""
    return max(1, int(chunk_bytes) // fmt.user_bytes)


def check_version_name(version: str, where: str) -> None:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise InvalidRequestError(
            f"{where}: version {version!r} is not a valid name (letters, digits and ._:+- , "
            "first a letter or digit, at most 128 characters)"
        )


class EmbeddingStore(abc.ABC):
    """Base of every backend client (it is an :class:`~dv365.core.lookup.EmbeddingReader`).

    Args:
        url: the store URL (``lmdb:///path``, ``redis://host:port/db``, ``grpc://host:port``).
        keep: versions to retain: after a publish, ready versions beyond the ``keep`` newest are deleted
            (the active one never is).

    Example::

        store = open_store("lmdb:///srv/dv365")           # any backend, chosen by URL
        store.publish("/data/snapshots/2026-11-22T06")      # load + activate + prune to `keep`
        r = store.get([42, 7, 123456])                     # LookupResult: payload [3, 58, 132] uint8
        r.present, r.snapshot_id, r.age_s
        store.rollback()                                   # back to the previous version
    """

    def __init__(self, url: str, keep: int = DEFAULT_KEEP) -> None:
        if int(keep) < 1:
            raise StoreError(f"{url}: keep={keep}: at least the active version must be kept")
        self.url = url
        self.keep = int(keep)
        self.metrics = StoreMetrics()  # what this client asked and got (see dv365.store.metrics)

    # ---- reads -------------------------------------------------------------------------------------
    def get(self, user_ids: Sequence[int] | np.ndarray) -> LookupResult:
        """Batched lookup from the active version; unknown users are ``present == False``; a stored value
        that fails its checksum is ``present == False`` with a message in ``errors`` (never garbage)."""
        t0 = time.perf_counter()
        try:
            raw = self.lookup(as_user_ids(user_ids, self.url))
        except StoreError:
            self.metrics.observe("get", time.perf_counter() - t0, error=True)
            raise
        count_answer(self.metrics, "get", raw, time.perf_counter() - t0)
        return raw.to_result()

    def get_float(self, user_ids: Sequence[int] | np.ndarray) -> FloatLookupResult:
        """Like :meth:`get`, de-quantized to float32 ``[B, rows_per_user, dim]`` (zero rows for missing users)."""
        import torch

        from dv365.core.quantize import dequantize_rows

        r = self.get(user_ids)
        # a gRPC answer's payload is a read-only view of the received message; torch wants a writable array
        q = r.payload if r.payload.flags.writeable else r.payload.copy()
        x = dequantize_rows(torch.from_numpy(q), bits=r.row_format.bits)
        x[~torch.from_numpy(r.present)] = 0.0
        return FloatLookupResult(x, r.present, r.snapshot_id, r.age_s, r.errors)

    @abc.abstractmethod
    def lookup(self, ids: np.ndarray) -> RawLookup:
        """Reads validated int64 ids from one version (the active one at the time of the read)."""

    def lookup_rows(self, ids: np.ndarray) -> RowViews:
        """The answer of :meth:`lookup` as :class:`RowViews` (what ``dv365 serve``'s ``Get`` sends). This default
        is one :meth:`lookup` (verified, one buffer); a backend whose rows can be viewed in place overrides it
        (LMDB row files: the server then copies each row once, straight into its answer)."""
        return RowViews.of(self.lookup(ids))

    def lookup_chunks(self, ids: np.ndarray, chunk_bytes: int) -> Iterator[RawLookup]:
        """The answer of :meth:`lookup` as consecutive pieces of about ``chunk_bytes`` of payload (at least one
        user each; one empty piece for an empty batch), every piece from the same version. The gRPC service
        streams them, so the look-up of a piece overlaps the transfer of the one before. Errors are keyed by
        position within the piece. This default slices one :meth:`lookup`; a backend that can read a version
        piece by piece from one snapshot overrides it (LMDB)."""
        raw = self.lookup(ids)
        step = chunk_users(chunk_bytes, raw.info.row_format)
        for s in range(0, max(len(ids), 1), step):
            yield raw.part(s, s + step)

    # ---- versions ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def versions(self) -> list[VersionInfo]:
        """Every version in the store, oldest publication first; ``active`` marks the active one."""

    def active(self) -> VersionInfo | None:
        return next((v for v in self.versions() if v.active), None)

    def version(self, version: str) -> VersionInfo:
        for v in self.versions():
            if v.version == version:
                return v
        raise VersionNotFoundError(f"{self.url}: no version {version!r} (have: {[v.version for v in self.versions()]})")

    @abc.abstractmethod
    def activate(self, version: str) -> VersionInfo:
        """Atomically makes ``version`` (a ready one) the one every following ``get`` answers from."""

    def rollback(self) -> VersionInfo:
        """Activates the newest ready version published before the active one."""
        vs = self.versions()
        cur = next((v for v in vs if v.active), None)
        if cur is None:
            raise NoActiveVersionError(f"{self.url}: no active version to roll back from")
        older = [v for v in vs if v.state == "ready" and v.published_at < cur.published_at]
        if not older:
            raise StoreError(
                f"{self.url}: cannot roll back from {cur.version!r}: no older ready version is retained "
                f"(keep={self.keep})"
            )
        return self.activate(older[-1].version)

    @abc.abstractmethod
    def delete_version(self, version: str) -> None:
        """Deletes a version that is not active (a half-published one too)."""

    def prune(self, keep: int | None = None) -> list[str]:
        """Deletes ready versions beyond the ``keep`` newest (never the active one); returns their names."""
        keep = self.keep if keep is None else int(keep)
        if keep < 1:
            raise StoreError(f"{self.url}: keep={keep}: at least the active version must be kept")
        ready = [v for v in self.versions() if v.state == "ready"]
        doomed = [v.version for v in ready[:-keep] if not v.active] if len(ready) > keep else []
        for name in doomed:
            self.delete_version(name)
        return doomed

    # ---- publish -----------------------------------------------------------------------------------
    def publish(self, snapshot_url: str, *, activate: bool = True, progress: Progress | None = None) -> VersionInfo:
        """Loads a complete snapshot folder (every shard's sha256 and every user's crc32 verified), marks it
        ready, activates it (unless ``activate=False``) and prunes to ``keep``. On any failure the partial
        version is removed and the active version is untouched (:class:`PublishError` names version and shard)."""
        try:
            manifest = read_manifest(snapshot_url)
        except SnapshotError as e:
            raise PublishError(f"{self.url}: cannot publish {snapshot_url}: {e}") from e
        info = VersionInfo.from_manifest(manifest, snapshot_url)
        where = f"{self.url}: publishing version {info.version!r} from {snapshot_url}"
        check_version_name(info.version, where)
        existing = {v.version: v for v in self.versions()}
        if info.version in existing:
            if existing[info.version].state == "ready":
                raise PublishError(
                    f"{where}: the store already has this version (versions are immutable; "
                    "export under a new snapshot id, or delete it first)"
                )
            self.delete_version(info.version)  # left half-published by an earlier crash
        self._begin_version(info)
        try:
            for shard in manifest.shards:
                for ids, records in _shard_chunks(snapshot_url, shard, manifest.row_format, where):
                    self._write_records(info, ids, records)
                    if progress:
                        progress(len(ids))
            info = replace(info, state="ready")
            self._commit_version(info)
        except BaseException as e:
            self._abort_version(info)
            if isinstance(e, StoreError):
                raise
            if isinstance(e, (SnapshotError, OSError, ValueError)):
                raise PublishError(f"{where}: {e}") from e
            raise
        if activate:
            info = self.activate(info.version)
        self.prune()
        self._persist()
        return info

    def _begin_version(self, info: VersionInfo) -> None:
        raise StoreError(f"{self.url}: this client cannot publish")

    def _write_records(self, info: VersionInfo, ids: np.ndarray, records: list[bytes]) -> None:
        raise NotImplementedError

    def _commit_version(self, info: VersionInfo) -> None:
        raise NotImplementedError

    def _abort_version(self, info: VersionInfo) -> None:
        try:
            self.delete_version(info.version)
        except StoreError:
            pass

    def _persist(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Makes what was written durable (a backend whose writes are not durable on commit overrides it)."""

    # ---- life cycle --------------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - a no-op for backends that hold nothing
        """Releases connections / maps; the store object is unusable afterwards."""

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, keep={self.keep})"


def _shard_chunks(url: str, shard: Any, fmt: RowFormat, where: str) -> Iterator[tuple[np.ndarray, list[bytes]]]:
    try:
        ids, payload = read_shard(url, shard, fmt, verify=True)
    except SnapshotError as e:
        raise PublishError(f"{where}: shard {shard.path}: {e}") from e
    for s in range(0, len(ids), WRITE_CHUNK):
        chunk_ids = ids[s : s + WRITE_CHUNK]
        yield chunk_ids, encode_records(chunk_ids, payload[s : s + WRITE_CHUNK])


def no_active(url: str) -> NoActiveVersionError:
    return NoActiveVersionError(f"{url}: no active version: publish a snapshot first (`dv365 store publish`)")
