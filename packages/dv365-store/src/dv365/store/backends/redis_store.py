"""Redis backend (``redis://[user:password@]host:port/db?prefix=dv365``; ``rediss://`` for TLS).

Keys (``P`` = the prefix)::

    P:active              the active version's name (one SET switches it: atomic)
    P:versions            hash: version name -> VersionInfo JSON (state loading | ready | deleting)
    P:v:<version>:<uid>   one record per user: payload || xxh3-64 (see dv365.store.records)

A ``get`` is one command: ``MGET <keys of v> P:active`` with ``v`` the last active version this client saw (and
whose record it holds). MGET is atomic, so when it reports ``v`` still active every value came from ``v`` (only
a non-active version is ever deleted). Otherwise (and on a client's first get) it is one round trip of
``MULTI; GET P:active; HGET P:versions <v>; MGET <keys of v>; EXEC``, retried with the new version until the
transaction finds the version it read still active. A single user is the same MGET of two keys: about the
cost of a raw ``GET``. A publish writes the new keys with pipelined ``MSET``, marks the version ready, switches
``P:active`` (``WATCH``-checked), deletes versions beyond ``keep`` (mark ``deleting``, ``SCAN``+``UNLINK``,
then drop the record), and finally makes it durable: ``BGSAVE`` and wait for it, unless the server runs
``appendonly yes`` with ``appendfsync always`` (``?persist=auto``, the default; ``bgsave`` or ``none`` force).
Server-side ACLs give readers and writers separate credentials (docs/store.md).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import redis
import redis.exceptions as rx
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from dv365.store.api import (
    DEFAULT_KEEP,
    EmbeddingStore,
    Progress,
    RawLookup,
    VersionInfo,
    check_version_name,
    no_active,
)
from dv365.store.errors import (
    PublishError,
    StoreAuthError,
    StoreError,
    StoreUnavailableError,
    VersionNotFoundError,
)
from dv365.store.records import assemble
from dv365.store.urls import reject_unknown

PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
MSET_KEYS = 256  # keys per MSET while publishing (~2 MB per command)
DELETE_BATCH = 1000


class RedisStore(EmbeddingStore):
    """Embeddings in a Redis server.

    Args:
        url: ``redis://[user:password@]host:port/db`` (credentials decide reader vs writer via ACLs).
        keep: versions retained after a publish.
        prefix: key namespace (several stores can share a server).
        persist: ``auto`` | ``bgsave`` | ``none``: how a publish/activate is made durable.
        socket_timeout: seconds (a publish's BGSAVE wait has its own limit, ``bgsave_timeout``).

    Example::

        store = RedisStore("redis://writer:secret@127.0.0.1:6379/0", prefix="dv365")
        store.publish("/data/snap-2026-11-22")
        store.get([1, 2, 3]).snapshot_id
    """

    OPTIONS = {"keep", "prefix", "persist", "socket_timeout", "bgsave_timeout", "password", "username"}
    INT_OPTIONS: tuple[str, ...] = ("keep",)

    def __init__(
        self,
        url: str,
        *,
        keep: int = DEFAULT_KEEP,
        prefix: str = "dv365",
        persist: str = "auto",
        socket_timeout: float = 30.0,
        bgsave_timeout: float = 600.0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        super().__init__(_redact(url), keep)
        if not PREFIX_RE.match(prefix):
            raise StoreError(f"{self.url}: prefix {prefix!r} must be letters, digits and ._:- (at most 64)")
        if persist not in ("auto", "bgsave", "none"):
            raise StoreError(f"{self.url}: persist must be auto, bgsave or none, got {persist!r}")
        self.prefix, self.persist, self.bgsave_timeout = prefix, persist, float(bgsave_timeout)
        self.url = f"{self.url}?prefix={prefix}" if "?" not in self.url else self.url
        extra = {k: v for k, v in (("username", username), ("password", password)) if v is not None}
        self._active_key, self._versions_key = self._meta_keys(prefix)
        self._seen: str | None = None  # last active version seen by this client
        self._seen_info: VersionInfo | None = None  # and its record (read again whenever the pointer moves)
        self._publishing = False
        self._infos: dict[bytes, VersionInfo] = {}
        self.r = self._connect(url, float(socket_timeout), extra)

    @staticmethod
    def _meta_keys(prefix: str) -> tuple[str, str]:
        """The keys of the active pointer and of the version records."""
        return f"{prefix}:active", f"{prefix}:versions"

    def _connect(self, url: str, socket_timeout: float, extra: dict[str, Any]) -> Any:
        """The client that holds the active pointer and the version records (here: the one server)."""
        return redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=5.0,
            retry=loading_retry(),
            retry_on_error=[rx.BusyLoadingError],
            **extra,
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStore:
        reject_unknown(options, url, cls.OPTIONS)
        kw: dict[str, Any] = {k: options[k] for k in ("prefix", "persist", "username", "password") if k in options}
        for k in ("socket_timeout", "bgsave_timeout"):
            if k in options:
                kw[k] = float(options[k])
        for k in cls.INT_OPTIONS:
            if k in options:
                kw[k] = int(options[k])
        return cls(url, **kw)

    def _key_prefix(self, version: str) -> bytes:
        return f"{self.prefix}:v:{version}:".encode()

    def record_key(self, version: str, user_id: int) -> bytes:
        return self._key_prefix(version) + str(int(user_id)).encode()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (rx.AuthenticationError, rx.NoPermissionError, rx.AuthorizationError) as e:
            raise StoreAuthError(f"{self.url}: {what}: refused by the server: {e}") from e
        except rx.ResponseError as e:
            if any(w in str(e) for w in ("NOAUTH", "NOPERM", "WRONGPASS")):
                raise StoreAuthError(f"{self.url}: {what}: refused by the server: {e}") from e
            raise StoreError(f"{self.url}: {what}: {e}") from e
        except (rx.ConnectionError, rx.TimeoutError) as e:
            raise StoreUnavailableError(f"{self.url}: {what}: {type(e).__name__}: {e}") from e

    def _info(self, raw: bytes, name: str) -> VersionInfo:
        info = self._infos.get(raw)
        if info is None:
            info = VersionInfo.from_json(raw, f"{self.url} version {name!r}")
            if len(self._infos) > 64:
                self._infos.clear()
            self._infos[raw] = info
        return info

    # ---- reads -------------------------------------------------------------------------------------
    def lookup(self, ids: np.ndarray) -> RawLookup:
        with self._errors(f"get {len(ids)} users"):
            if self._seen_info is not None and len(ids):
                # the steady state: one MGET of the active pointer and the records of the version this client
                # last saw; MGET is atomic, so when the pointer still names it every record came from it while
                # it was active (only inactive versions are deleted); otherwise the transaction below re-reads
                info = self._seen_info
                pre = self._key_prefix(info.version)
                # the pointer last: with a small value before a large one the reply is measurably slower to
                # arrive (~50 us on loopback, Redis 7.0)
                values = self._fast_mget([*[pre + b"%d" % u for u in ids.tolist()], self._active_key.encode()])
                active = values.pop() if values is not None else None
                if active is not None and active.decode() == info.version:
                    payload, present, checksums, errors = assemble(
                        iter(values), ids, info.row_format, f"{self.url} version {info.version!r}"
                    )
                    return RawLookup(payload, present, checksums, errors, info)
            version = self._seen
            for _ in range(8):
                if version is None:
                    raw = self.r.get(self._active_key)
                    if raw is None:
                        raise no_active(self.url)
                    version = raw.decode()
                pre = self._key_prefix(version)
                keys = [pre + b"%d" % u for u in ids.tolist()]
                pipe = self.r.pipeline(transaction=True)
                pipe.get(self._active_key)
                pipe.hget(self._versions_key, version)
                if keys:
                    pipe.mget(keys)
                res = pipe.execute()
                active, raw_info = res[0], res[1]
                values = res[2] if keys else []
                if active is None:
                    raise no_active(self.url)
                if active.decode() != version or raw_info is None:
                    version = active.decode()  # switched since we last looked: read the new one
                    continue
                self._seen = version
                info = replace(self._info(raw_info, version), active=True)
                self._seen_info = info if info.state == "ready" else None
                payload, present, checksums, errors = assemble(
                    iter(values), ids, info.row_format, f"{self.url} version {version!r}"
                )
                return RawLookup(payload, present, checksums, errors, info)
        raise StoreError(f"{self.url}: the active version kept changing during 8 read attempts")

    def _fast_mget(self, keys: list[bytes]) -> list[Any] | None:
        """``MGET keys`` written and read on a pooled connection directly (redis-py's command path costs more
        per call than the whole one-user read otherwise); None on any failure: the caller takes the regular
        path, which has redis-py's reconnects and retries and reports the error properly."""
        pool = self.r.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_command("MGET", *keys), check_health=False)
            reply = conn.read_response()
        except Exception:  # noqa: BLE001 - stale connection, LOADING, NOPERM...: the regular path decides
            conn.disconnect()
            return None
        finally:
            pool.release(conn)
        return reply if isinstance(reply, list) else None

    # ---- versions ----------------------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        with self._errors("list versions"):
            pipe = self.r.pipeline(transaction=True)
            pipe.get(self._active_key)
            pipe.hgetall(self._versions_key)
            active, records = pipe.execute()
        act = active.decode() if active is not None else None
        out = [replace(self._info(raw, name.decode()), active=name.decode() == act) for name, raw in records.items()]
        return sorted(out, key=lambda v: v.published_at)

    def _record(self, pipe: Any, version: str) -> VersionInfo:
        raw = pipe.hget(self._versions_key, version)
        if raw is None:
            names = sorted(n.decode() for n in pipe.hkeys(self._versions_key))
            raise VersionNotFoundError(f"{self.url}: no version {version!r} (have: {names})")
        return self._info(raw, version)

    def activate(self, version: str) -> VersionInfo:
        check_version_name(version, self.url)
        with self._errors(f"activate {version!r}"):
            info = self._activate(version)
        if not self._publishing:  # a publish persists once, at its end
            self._persist()
        return info

    def publish(self, snapshot_url: str, *, activate: bool = True, progress: Progress | None = None) -> VersionInfo:
        self._publishing = True
        try:
            return super().publish(snapshot_url, activate=activate, progress=progress)
        finally:
            self._publishing = False

    def _activate(self, version: str) -> VersionInfo:
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self._versions_key)
                    info = self._record(pipe, version)
                    if info.state != "ready":
                        raise StoreError(
                            f"{self.url}: version {version!r} is {info.state}, not ready: cannot activate it"
                        )
                    pipe.multi()
                    pipe.set(self._active_key, version)
                    pipe.execute()
                    return replace(info, active=True)
                except rx.WatchError:
                    continue

    def delete_version(self, version: str) -> None:
        check_version_name(version, self.url)
        with self._errors(f"delete {version!r}"):
            with self.r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(self._active_key, self._versions_key)
                        active = pipe.get(self._active_key)
                        if active is not None and active.decode() == version:
                            raise StoreError(
                                f"{self.url}: version {version!r} is active; activate another one before deleting it"
                            )
                        info = self._record(pipe, version)
                        pipe.multi()
                        pipe.hset(self._versions_key, version, replace(info, state="deleting").to_json())
                        pipe.execute()
                        break
                    except rx.WatchError:
                        continue
            self._delete_data(version)
            self.r.hdel(self._versions_key, version)

    def _delete_data(self, version: str) -> None:
        """Unlinks the records of ``version`` (already marked ``deleting``, so no reader accepts them)."""
        unlink_matching(self.r, self._key_prefix(version))

    # ---- publish -----------------------------------------------------------------------------------
    def _begin_version(self, info: VersionInfo) -> None:
        with self._errors(f"publish {info.version!r}"):
            if not self.r.hsetnx(self._versions_key, info.version, info.to_json()):
                raise PublishError(
                    f"{self.url}: version {info.version!r} appeared while publishing it (another publisher?)"
                )

    def _write_records(self, info: VersionInfo, ids: np.ndarray, records: list[bytes]) -> None:
        pre = self._key_prefix(info.version)
        keys = [pre + b"%d" % u for u in ids.tolist()]
        with self._errors(f"publish {info.version!r}"):
            pipe = self.r.pipeline(transaction=False)
            for s in range(0, len(keys), MSET_KEYS):
                pipe.msetnx(dict(zip(keys[s : s + MSET_KEYS], records[s : s + MSET_KEYS])))
            if not all(pipe.execute()):
                dup = next(int(u) for u, k in zip(ids.tolist(), keys) if self.r.exists(k))
                raise PublishError(
                    f"{self.url}: version {info.version!r}: user {dup} appears more than once in the "
                    "snapshot (in two shards?)"
                )

    def _commit_version(self, info: VersionInfo) -> None:
        with self._errors(f"publish {info.version!r}"):
            self.r.hset(self._versions_key, info.version, info.to_json())

    def _persist(self) -> None:
        """Makes what was written durable (see the module doc); StoreError when it cannot be ensured."""
        if self.persist == "none":
            return
        with self._errors("persist (BGSAVE)"):
            persist_server(self.r, self.url, self.persist, self.bgsave_timeout)

    def close(self) -> None:
        self.r.close()


def loading_retry() -> Retry:
    """A server that just restarted answers LOADING until its dump is read: wait for it (up to ~30 s)."""
    return Retry(ExponentialBackoff(cap=2.0, base=0.05), 25, supported_errors=(rx.BusyLoadingError,))


def unlink_matching(r: Any, prefix: bytes) -> None:
    """Unlinks every key of server ``r`` that is ``prefix`` followed by a user id (SCAN + UNLINK in batches;
    the id check keeps version ``a`` from taking the keys of a version ``a:b``)."""
    batch: list[bytes] = []
    for key in r.scan_iter(match=prefix + b"*", count=DELETE_BATCH):
        if _UID_RE.fullmatch(key[len(prefix) :]):
            batch.append(key)
        if len(batch) >= DELETE_BATCH:
            r.unlink(*batch)
            batch = []
    if batch:
        r.unlink(*batch)


_UID_RE = re.compile(rb"-?[0-9]+")


def persist_server(r: Any, url: str, persist: str, timeout: float) -> None:
    """Makes server ``r`` durable: nothing to do when it runs ``appendonly yes`` + ``appendfsync always`` (and
    ``persist`` is ``auto``), else a BGSAVE that is waited for."""
    if persist == "auto":
        try:
            cfg = r.config_get("append*")
            if cfg.get("appendonly") == "yes" and cfg.get("appendfsync") == "always":
                return
        except rx.ResponseError:  # CONFIG not allowed for this user: fall back to BGSAVE
            pass
    bgsave(r, url, timeout)


def bgsave(r: Any, url: str, timeout: float) -> None:
    """Runs a BGSAVE on server ``r`` that starts after the caller's writes and waits for it to succeed."""
    deadline = time.monotonic() + timeout
    while True:  # a save already running may have started before our writes: wait for it, then start ours
        p = r.info("persistence")
        if not p.get("rdb_bgsave_in_progress"):
            before = int(p.get("rdb_saves", 0))
            try:
                r.bgsave()
                break
            except rx.ResponseError as e:
                if "in progress" not in str(e):
                    raise
        if time.monotonic() > deadline:
            raise StoreError(f"{url}: could not start a BGSAVE within {timeout:.0f} s")
        time.sleep(0.05)
    while True:
        p = r.info("persistence")
        if not p.get("rdb_bgsave_in_progress") and int(p.get("rdb_saves", before + 1)) > before:
            break
        if time.monotonic() > deadline:
            raise StoreError(f"{url}: BGSAVE did not finish within {timeout:.0f} s")
        time.sleep(0.02)
    if p.get("rdb_last_bgsave_status") != "ok":
        raise StoreError(
            f"{url}: BGSAVE failed (rdb_last_bgsave_status={p.get('rdb_last_bgsave_status')}): "
            "the publish is not durable; check the server's dir and disk"
        )


def _redact(url: str) -> str:
    """The URL without its password (for messages)."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)
