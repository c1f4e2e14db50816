"""Redis Cluster backend (``redis+cluster://[user:password@]host:port[,host:port...]?prefix=dv365``;
``rediss+cluster://`` for TLS), through redis-py's cluster client (topology, slot map, credentials).

Users are spread over ``B`` *buckets* (``user_id mod B``, ``B`` = ``?buckets=``, default 128, fixed for a store
at its first publish); every key of a bucket carries the hash tag ``{P:b}`` (``P`` = the prefix), so it lives in
one hash slot and a multi-key command within a bucket never fails with CROSSSLOT::

    {P}:active              the active version (the truth; WATCH-checked switch, as in the Redis backend)
    {P}:versions            hash: version name -> VersionInfo JSON (state loading | ready | deleting)
    {P}:layout              the bucket count B
    {P:b}:active            bucket b's copy of the active version (written after {P}:active on a switch)
    {P:b}:live:<version>    bucket b's marker of a ready version (value: its publication time)
    {P:b}:v:<version>:<uid> one record per user: payload || xxh3-64 (see dv365.store.records)

A ``get`` is one pipelined round per node: for every bucket of the batch one ``MGET <records of v in b>
{P:b}:active {P:b}:live:<v>``, the buckets of a node sent together on one connection, all nodes written
before any is read (``v`` = the version this client last saw active). ``MGET`` is atomic, so a bucket whose
marker is present answered from ``v`` while ``v`` was whole: a delete removes every marker before any record.
When every bucket's copy names ``v`` the batch is answered; when a copy names another version (a switch in
flight) the client reads ``{P}:active`` and answers from ``v`` only if it is still the active one, else reads
again from the new one. Every batch therefore comes from one whole version, never a mix. A single user is one
``MGET`` to one node: the online path costs about a raw ``GET``.

A publish writes each bucket's records with ``MSETNX`` (pipelined per node), then every bucket's marker, then
marks the version ready; activating sets ``{P}:active`` and then every bucket's copy; persisting runs
``BGSAVE`` on every primary (``?persist=`` as in the Redis backend).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import redis.exceptions as rx
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from dv365.store.api import RawLookup, VersionInfo, no_active
from dv365.store.backends.redis_store import (
    DELETE_BATCH,
    MSET_KEYS,
    RedisStore,
    loading_retry,
    persist_server,
)
from dv365.store.errors import PublishError, StoreAuthError, StoreError, StoreUnavailableError
from dv365.store.records import assemble

DEFAULT_BUCKETS = 128
MAX_BUCKETS = 16384
READ_ATTEMPTS = 8
_TOPOLOGY_ERRORS = (rx.MovedError, rx.AskError, rx.TryAgainError, rx.ClusterDownError)


class RedisClusterStore(RedisStore):
    """Embeddings in a Redis Cluster (see the module doc for the key layout and the read protocol).

    Args:
        url: ``redis+cluster://[user:password@]host:port[,host:port...]`` (any reachable nodes; the rest of the
            topology is discovered).
        keep / prefix / persist / socket_timeout / bgsave_timeout / username / password: as for
            :class:`~dv365.store.backends.redis_store.RedisStore`.
        buckets: hash-tag buckets users are spread over (a writer's first publish fixes it for the store).

    Example::

        store = RedisClusterStore("redis+cluster://writer:secret@10.0.0.1:7000,10.0.0.2:7000", prefix="dv365")
        store.publish("/data/snap-2026-11-22")
        store.get([42]).snapshot_id
    """

    OPTIONS = RedisStore.OPTIONS | {"buckets"}
    INT_OPTIONS = ("keep", "buckets")

    def __init__(self, url: str, *, buckets: int = DEFAULT_BUCKETS, **kw: Any) -> None:
        if not 1 <= int(buckets) <= MAX_BUCKETS:
            raise StoreError(f"{url}: buckets={buckets}: use 1..{MAX_BUCKETS}")
        self._want_buckets = int(buckets)
        self._nb: int | None = None  # the store's bucket count, read from {P}:layout when first needed
        self._nodes: list[Any] = []  # bucket -> the redis.Redis client of the primary serving its slot
        self._vinfo: dict[str, tuple[bytes, VersionInfo]] = {}
        super().__init__(url, **kw)
        self._layout_key = f"{{{self.prefix}}}:layout"

    @staticmethod
    def _meta_keys(prefix: str) -> tuple[str, str]:
        return f"{{{prefix}}}:active", f"{{{prefix}}}:versions"

    def _connect(self, url: str, socket_timeout: float, extra: dict[str, Any]) -> Any:
        scheme, _, rest = url.partition("://")
        rest = rest.split("/", 1)[0]
        cred, _, hosts = rest.rpartition("@")
        if cred:
            user, _, password = cred.partition(":")
            extra = {"username": user or None, "password": password or None, **extra}
        nodes = []
        for hp in hosts.split(","):
            host, _, port = hp.strip().rpartition(":")
            if not host or not port.isdigit():
                raise StoreError(f"{self.url}: node {hp!r} is not host:port (give redis+cluster://host:port,...)")
            nodes.append(ClusterNode(host.strip("[]"), int(port)))
        try:
            self.rc = RedisCluster(
                startup_nodes=nodes,
                ssl=scheme.startswith("rediss"),
                socket_timeout=socket_timeout,
                socket_connect_timeout=5.0,
                retry=loading_retry(),
                **{k: v for k, v in extra.items() if v is not None},
            )
        except (rx.RedisClusterException, rx.ConnectionError, rx.TimeoutError) as e:
            # as with one server, opening does not fail: the first operation raises (StoreAuthError when the
            # cluster refused the credentials, StoreUnavailableError when no node answered)
            if any(w in str(e) for w in ("NOAUTH", "authenticated", "WRONGPASS", "NOPERM", "invalid username")):
                err: StoreError = StoreAuthError(f"{self.url}: refused by the cluster: {e}")
            else:
                err = StoreUnavailableError(f"{self.url}: cannot reach the cluster: {e}")
            self.rc = _Unusable(err)
            return _Unusable(err)
        # the active pointer and the version records share the hash tag {P}: one node holds both, and the
        # Redis backend's transactions on them (WATCH/MULTI) run unchanged on that node's client
        return self.rc.get_redis_connection(self.rc.get_node_from_key(self._active_key))

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            with super()._errors(what):
                yield
        except rx.RedisClusterException as e:
            raise StoreUnavailableError(f"{self.url}: {what}: {type(e).__name__}: {e}") from e

    # ---- layout ------------------------------------------------------------------------------------
    def _tag(self, bucket: int) -> str:
        return f"{{{self.prefix}:{bucket}}}"

    def _key_prefix(self, version: str, bucket: int = 0) -> bytes:  # type: ignore[override]
        return f"{self._tag(bucket)}:v:{version}:".encode()

    def record_key(self, version: str, user_id: int) -> bytes:
        return self._key_prefix(version, int(user_id) % self._buckets()) + str(int(user_id)).encode()

    def _marker(self, bucket: int, version: str) -> bytes:
        return f"{self._tag(bucket)}:live:{version}".encode()

    def _buckets(self, create: bool = False) -> int:
        if self._nb is None:
            raw = self.r.get(self._layout_key)
            if raw is None and create:
                self.r.setnx(self._layout_key, self._want_buckets)
                raw = self.r.get(self._layout_key)
            if raw is None:
                return self._want_buckets  # nothing published yet: nothing to read either
            self._nb = int(raw)
            self._route()
        return self._nb

    def _route(self) -> None:
        """Maps every bucket to the client of the primary that serves its slot (re-done after a MOVED)."""
        nm = self.rc.nodes_manager
        self._nodes = [
            self.rc.get_redis_connection(nm.get_node_from_slot(key_slot(self._tag(b).encode())))
            for b in range(self._nb or 0)
        ]

    def _refresh(self) -> None:
        self.rc.nodes_manager.initialize()
        self._route()
        self.r = self.rc.get_redis_connection(self.rc.get_node_from_key(self._active_key))

    def _round(self, commands: dict[int, list[tuple[Any, ...]]]) -> dict[int, list[Any]]:
        """One pipelined round: ``{bucket: [command, ...]}`` -> ``{bucket: [reply, ...]}``. The commands of the
        buckets a node serves go out together on one of its connections; every node is written before any is
        read, so the nodes work in parallel. An error reply is returned as its exception."""
        by_node: dict[int, tuple[Any, list[tuple[int, tuple[Any, ...]]]]] = {}
        for b, cmds in commands.items():
            client = self._nodes[b]
            by_node.setdefault(id(client), (client, []))[1].extend((b, c) for c in cmds)
        taken: list[tuple[Any, Any, list[tuple[int, tuple[Any, ...]]]]] = []
        out: dict[int, list[Any]] = {b: [] for b in commands}
        try:
            for client, cmds in by_node.values():
                pool = client.connection_pool
                conn = pool.get_connection()
                taken.append((pool, conn, cmds))
                conn.send_packed_command(conn.pack_commands([c for _, c in cmds]), check_health=False)
            for _, conn, cmds in taken:
                for b, _c in cmds:
                    try:
                        out[b].append(conn.read_response())
                    except rx.ResponseError as e:
                        out[b].append(e)
        except BaseException:
            for _, conn, _cmds in taken:
                conn.disconnect()  # replies may be left unread on it
            raise
        finally:
            for pool, conn, _cmds in taken:
                pool.release(conn)
        for replies in out.values():
            for r in replies:
                if isinstance(r, _TOPOLOGY_ERRORS):
                    raise r
                if isinstance(r, rx.ResponseError):
                    raise r
        return out

    # ---- reads -------------------------------------------------------------------------------------
    def lookup(self, ids: np.ndarray) -> RawLookup:
        with self._errors(f"get {len(ids)} users"):
            for attempt in range(READ_ATTEMPTS):
                try:
                    got = self._read(ids)
                except (*_TOPOLOGY_ERRORS, rx.ConnectionError, rx.TimeoutError):
                    if attempt == READ_ATTEMPTS - 1:
                        raise
                    # a slot moved, a primary failed over or restarted: re-learn the slot map, reconnect
                    time.sleep(min(0.05 * 2**attempt, 1.0))
                    self._refresh()
                    continue
                if got is not None:
                    return got
        raise StoreError(f"{self.url}: the active version kept changing during {READ_ATTEMPTS} read attempts")

    def _active_now(self) -> str:
        raw = self.r.get(self._active_key)
        if raw is None:
            raise no_active(self.url)
        return raw.decode()  # type: ignore[no-any-return]

    def _read(self, ids: np.ndarray) -> RawLookup | None:
        """One attempt (see the module doc); None when the version changed under it."""
        version = self._seen or self._active_now()
        nb = self._buckets()
        if self._nb is None:
            raise no_active(self.url)
        if not len(ids):
            return self._answer(version, None, ids, [])
        if len(ids) == 1:  # the online path: one MGET to one node
            uid = int(ids[0])
            order = None
            groups = {uid % nb: [uid]}
        else:
            bucket = ids % nb
            order = np.argsort(bucket, kind="stable")
            sorted_b = bucket[order]
            cuts = np.flatnonzero(np.diff(sorted_b)) + 1
            sorted_ids = ids[order].tolist()
            starts = [0, *cuts.tolist()]
            ends = [*cuts.tolist(), len(ids)]
            groups = {int(sorted_b[s]): sorted_ids[s:e] for s, e in zip(starts, ends)}
        v = version.encode()
        cmds: dict[int, list[tuple[Any, ...]]] = {}
        for b, uids in groups.items():
            p = self._key_prefix(version, b)
            # the records first, the bucket's pointer copy and marker last (see RedisStore.lookup)
            cmds[b] = [
                ("MGET", *[p + b"%d" % u for u in uids], f"{self._tag(b)}:active".encode(), self._marker(b, version))
            ]
        replies = self._round(cmds)
        nonce = None
        copies_agree = True
        values: list[Any] = []
        for b in groups:
            reply = replies[b][0]
            copy, marker = reply[-2], reply[-1]
            if marker is None or (nonce is not None and marker != nonce):
                self._seen = None  # v is being deleted (or was never ready): read the active pointer again
                return None
            nonce = marker
            copies_agree &= copy == v
            values.extend(reply[:-2])
        if not copies_agree:  # a switch in flight: the pointer decides
            active = self._active_now()
            if active != version:
                self._seen = active
                return None
        if order is not None:
            ordered: list[Any] = [None] * len(ids)
            for pos, val in zip(order.tolist(), values):
                ordered[pos] = val
            values = ordered
        return self._answer(version, nonce, ids, values)

    def _answer(self, version: str, nonce: bytes | None, ids: np.ndarray, values: list[Any]) -> RawLookup | None:
        info = self._version_info(version, nonce)
        if info is None:
            self._seen = None
            return None
        self._seen = version
        payload, present, checksums, errors = assemble(
            iter(values), ids, info.row_format, f"{self.url} version {version!r}"
        )
        return RawLookup(payload, present, checksums, errors, replace(info, active=True))

    def _version_info(self, version: str, nonce: bytes | None) -> VersionInfo | None:
        """The record of ``version`` (cached while its markers carry the same publication time); None when it is
        no longer a ready version."""
        hit = self._vinfo.get(version)
        if hit is not None and (nonce is None or hit[0] == nonce):
            return hit[1]
        raw = self.r.hget(self._versions_key, version)
        if raw is None:
            return None
        info = self._info(raw, version)
        if info.state != "ready" or (nonce is not None and _nonce(info) != nonce):
            return None
        if len(self._vinfo) > 64:
            self._vinfo.clear()
        self._vinfo[version] = (_nonce(info), info)
        return info

    # ---- versions ----------------------------------------------------------------------------------
    def _activate(self, version: str) -> VersionInfo:
        info = super()._activate(version)  # the pointer first: it is the truth readers fall back on
        nb = self._buckets()
        self._round({b: [("SET", f"{self._tag(b)}:active".encode(), version.encode())] for b in range(nb)})
        return info

    def _delete_data(self, version: str) -> None:
        nb = self._buckets()
        # every marker first: from here on no reader accepts a bucket of this version
        self._round({b: [("DEL", self._marker(b, version))] for b in range(nb)})
        tag = re.escape(f"{{{self.prefix}:".encode())
        mine = re.compile(tag + rb"[0-9]+\}:v:" + re.escape(version.encode()) + rb":-?[0-9]+")
        match = f"{{{self.prefix}:*}}:v:{version}:*"
        for node in self.rc.get_primaries():  # one SCAN per primary; UNLINK key by key (their slots differ)
            client = self.rc.get_redis_connection(node)
            pipe = client.pipeline(transaction=False)
            for key in client.scan_iter(match=match, count=DELETE_BATCH):
                if mine.fullmatch(key):
                    pipe.unlink(key)
                if len(pipe) >= DELETE_BATCH:
                    pipe.execute()
            pipe.execute()

    # ---- publish -----------------------------------------------------------------------------------
    def _begin_version(self, info: VersionInfo) -> None:
        with self._errors(f"publish {info.version!r}"):
            nb = self._buckets(create=True)
            if nb != self._want_buckets and self._want_buckets != DEFAULT_BUCKETS:
                raise PublishError(
                    f"{self.url}: buckets={self._want_buckets}, but this store was laid out with {nb} buckets"
                )
        super()._begin_version(info)

    def _write_records(self, info: VersionInfo, ids: np.ndarray, records: list[bytes]) -> None:
        nb = self._buckets()
        groups: dict[int, list[tuple[bytes, bytes]]] = {}
        for uid, rec in zip(ids.tolist(), records):
            b = uid % nb
            groups.setdefault(b, []).append((self._key_prefix(info.version, b) + b"%d" % uid, rec))
        cmds: dict[int, list[tuple[Any, ...]]] = {}
        for b, pairs in groups.items():
            cmds[b] = [
                ("MSETNX", *[x for kv in pairs[s : s + MSET_KEYS] for x in kv]) for s in range(0, len(pairs), MSET_KEYS)
            ]
        with self._errors(f"publish {info.version!r}"):
            replies = self._round(cmds)
            if not all(r == 1 for rs in replies.values() for r in rs):
                dup = next(int(u) for u in ids.tolist() if self.rc.exists(self.record_key(info.version, u)))
                raise PublishError(
                    f"{self.url}: version {info.version!r}: user {dup} appears more than once in the "
                    "snapshot (in two shards?)"
                )

    def _commit_version(self, info: VersionInfo) -> None:
        with self._errors(f"publish {info.version!r}"):
            nb = self._buckets()
            self._round({b: [("SET", self._marker(b, info.version), _nonce(info))] for b in range(nb)})
        super()._commit_version(info)

    def _persist(self) -> None:
        if self.persist == "none":
            return
        with self._errors("persist (BGSAVE on every primary)"):
            for node in self.rc.get_primaries():
                persist_server(self.rc.get_redis_connection(node), self.url, self.persist, self.bgsave_timeout)

    def close(self) -> None:
        if not isinstance(self.rc, _Unusable):
            self.rc.close()


class _Unusable:
    """Stands for the cluster client when opening failed: every use raises the error opening met."""

    def __init__(self, error: StoreError) -> None:
        self._error = error

    def __getattr__(self, name: str) -> Any:
        raise self._error


def _nonce(info: VersionInfo) -> bytes:
    return repr(info.published_at).encode()
