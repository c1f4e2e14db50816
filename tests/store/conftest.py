"""Fixtures of the store tests: snapshots, a real redis-server (with reader/writer ACL users), TLS material,
and one *harness* per backend so the contract suite runs the same tests against every backend."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dv365.core.quantize import RowFormat
from dv365.store import EmbeddingStore, open_store
from dv365.store.synthetic import write_synthetic_snapshot

FMT = RowFormat()  # the paper's format: 58 rows x 132 B = 7,656 B per user
USERS = np.arange(1000, 1300, dtype=np.int64)  # 300 users
READER_TOKEN = "reader-token-0123456789"
WRITER_TOKEN = "writer-token-0123456789"
REDIS_PASS = {"writer": "writer-pass-0123456789", "reader": "reader-pass-0123456789"}
REDIS = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """``snapshots("v1", fill=1)`` -> path of a complete SIMULATED snapshot (cached per arguments).
    With ``fill`` every packed byte of every user is ``fill`` (so a reader can tell versions apart)."""
    root = tmp_path_factory.mktemp("snapshots")
    made: dict[tuple[Any, ...], str] = {}

    def make(
        snapshot_id: str, fill: int | None = None, users: np.ndarray = USERS, seed: int = 0, shard_users: int = 128
    ) -> str:
        key = (snapshot_id, fill, tuple(users.tolist()), seed, shard_users)
        if key not in made:
            path = str(root / f"{snapshot_id}-{len(made)}")
            write_synthetic_snapshot(path, snapshot_id, users, fmt=FMT, seed=seed, fill=fill, shard_users=shard_users)
            made[key] = path
        return made[key]

    make.root = str(root)  # type: ignore[attr-defined]  # a gRPC server's --snapshot-root
    return make


class RedisServer:
    """A real redis-server on a free 127.0.0.1 port in a tmp dir, with ACL users ``writer`` and ``reader``
    (the default user is off: unauthenticated clients are refused) and no automatic persistence, so only
    what the store's publish saves survives a kill -9."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        (root / "redis.conf").write_text(
            f'port {self.port}\nbind 127.0.0.1\ndir {root}\ndbfilename dump.rdb\nsave ""\nappendonly no\n'
            f"protected-mode yes\n{ACL_USERS}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS or "redis-server", str(self.root / "redis.conf")],
            stdout=open(self.root / "redis.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):  # -LOADING: still reading its dump
                        return
                    time.sleep(0.05)
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start: {(self.root / 'redis.log').read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def url(self, user: str | None, prefix: str) -> str:
        cred = f"{user}:{REDIS_PASS[user]}@" if user else ""
        return f"redis://{cred}127.0.0.1:{self.port}/0?prefix={prefix}"


ACL_USERS = (
    "user default off\n"
    f"user writer on >{REDIS_PASS['writer']} ~* &* +@all\n"
    f"user reader on >{REDIS_PASS['reader']} ~* resetchannels -@all +@read +@connection +multi +exec "
    "+discard +ping +info"
)
# what redis-py's cluster client runs to learn the topology
CLUSTER_READER_ACL = " +cluster|slots +cluster|shards +cluster|nodes +command"


class RedisCluster:
    """A real Redis Cluster: ``masters`` redis-server processes in cluster mode on free 127.0.0.1 ports (each in
    its own tmp dir, with the same ACL users as :class:`RedisServer`), joined by ``redis-cli --cluster create``.
    ``kill()``/``start()`` kill -9 and restart every node (their nodes.conf brings the cluster back)."""

    def __init__(self, root: Path, masters: int = 3) -> None:
        self.root = root
        self.ports = [cluster_port() for _ in range(masters)]
        self.procs: list[subprocess.Popen[bytes]] = []
        for port in self.ports:
            d = root / str(port)
            d.mkdir()
            (d / "redis.conf").write_text(
                f'port {port}\nbind 127.0.0.1\ndir {d}\ndbfilename dump.rdb\nsave ""\nappendonly no\n'
                "cluster-enabled yes\ncluster-config-file nodes.conf\ncluster-node-timeout 2000\n"
                f"protected-mode yes\n{ACL_USERS}{CLUSTER_READER_ACL}\n"
            )
        self.start()
        try:
            self._create()
        except BaseException:
            self.kill()
            raise

    def _create(self) -> None:
        cli = shutil.which("redis-cli") or "redis-cli"
        out = subprocess.run(
            [cli, "--user", "writer", "--pass", REDIS_PASS["writer"], "--no-auth-warning", "--cluster", "create"]
            + [f"127.0.0.1:{p}" for p in self.ports]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        self.wait_ok()

    def start(self) -> None:
        for port in self.ports:
            d = self.root / str(port)
            self.procs.append(
                subprocess.Popen(
                    [REDIS or "redis-server", str(d / "redis.conf")],
                    stdout=open(d / "redis.log", "ab"),
                    stderr=subprocess.STDOUT,
                )
            )
        try:
            for port in self.ports:
                _wait_port(port, self.root / str(port) / "redis.log")
        except BaseException:
            self.kill()
            raise

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node reports ``cluster_state:ok`` (all slots served)."""
        import redis

        deadline = time.monotonic() + timeout
        for port in self.ports:
            r = redis.Redis(port=port, username="writer", password=REDIS_PASS["writer"])
            try:
                while b"cluster_state:ok" not in r.execute_command("CLUSTER", "INFO"):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster node {port} did not reach cluster_state:ok")
                    time.sleep(0.1)
            except redis.exceptions.BusyLoadingError:
                time.sleep(0.1)
            finally:
                r.close()

    def kill(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
        self.procs = []

    def restart(self) -> None:
        self.kill()
        self.start()
        self.wait_ok()

    def url(self, user: str | None, prefix: str) -> str:
        cred = f"{user}:{REDIS_PASS[user]}@" if user else ""
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])  # the client discovers the third
        return f"redis+cluster://{cred}{nodes}?prefix={prefix}"


def cluster_port() -> int:
    """A free port p <= 55535 whose cluster-bus port p + 10000 is free too."""
    import random

    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _wait_port(port: int, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on {port} did not start: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster for the session (killed at the end)."""
    if REDIS is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server/redis-cli are not installed (apt-get install redis-server); CI installs them")
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); CI installs it")
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.kill()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A self-signed certificate for localhost/127.0.0.1 made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not found: cannot make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "server.pem", d / "server.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return {"cert": str(cert), "key": str(key)}


@dataclass
class Harness:
    """One backend under test. ``writer()``/``reader()``/``anonymous()`` open clients (``anonymous`` is None
    where the backend has no network clients); ``corrupt(version, uid)`` flips a stored byte behind the
    client's back; ``restart()`` restarts the server (or re-opens the embedded store)."""

    kind: str
    writer: Callable[[], EmbeddingStore]
    reader: Callable[[], EmbeddingStore]
    anonymous: Callable[[], EmbeddingStore] | None
    corrupt: Callable[[str, int], None]
    restart: Callable[[], None]
    opened: list[EmbeddingStore] = field(default_factory=list)

    def close_all(self) -> None:
        for s in self.opened:
            try:
                s.close()
            except Exception:
                pass
        self.opened.clear()


def _tracked(h: Harness, fn: Callable[[], EmbeddingStore]) -> Callable[[], EmbeddingStore]:
    def open_() -> EmbeddingStore:
        s = fn()
        h.opened.append(s)
        return s

    return open_


def lmdb_harness(root: Path) -> Harness:
    url = f"lmdb://{root / 'store'}?keep=2"
    h = Harness(
        "lmdb",
        writer=lambda: open_store(url),
        reader=lambda: open_store(url + "&mode=ro"),
        anonymous=None,
        corrupt=lambda v, u: None,
        restart=lambda: None,
    )

    def corrupt(version: str, uid: int) -> None:
        from dv365.store.backends.lmdb_store import LmdbStore

        store = next((s for s in h.opened if isinstance(s, LmdbStore) and not s.readonly), None) or h.writer()
        flip_lmdb(store, version, uid)

    def restart() -> None:
        h.close_all()

    h.writer, h.reader = _tracked(h, h.writer), _tracked(h, h.reader)
    h.corrupt, h.restart = corrupt, restart
    return h


def flip_lmdb(store: Any, version: str, uid: int) -> None:
    """Flips one payload byte of ``uid`` in ``version`` inside an embedded store (a disk/bit-rot fault): in the
    version's row file, or in its LMDB value for versions of the per-user ``records`` layout."""
    import json

    from dv365.store.backends.lmdb_store import record_keys
    from dv365.store.backends.rowfile import RowFile, locate

    with store.env.begin() as txn:
        rec = json.loads(txn.get(b"version:" + version.encode(), db=store.meta))
    if rec.get("layout") == "rows":
        path = store._row_path(rec["seq"])
        info = rec["info"]
        rf = RowFile(path, info["user_count"], info["row_format"]["user_bytes"], "test")
        offset = locate(rf, uid) + 100
        del rf
        with open(path, "r+b") as f:  # the readers' shared mappings see the change
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x01]))
        return
    with store.env.begin(write=True) as txn:
        key = record_keys(rec["seq"], np.array([uid]))[0]
        value = bytearray(txn.get(key, db=store.data))
        value[100] ^= 0x01
        txn.put(key, bytes(value), db=store.data)


def _redis_like_harness(
    kind: str, url: Callable[[str | None], str], corrupt: Callable[[str, int], None], restart: Callable[[], None]
) -> Harness:
    """A harness over a Redis server or cluster: ``url(user)`` opens it as ``writer``, ``reader`` or nobody."""
    h = Harness(
        kind,
        writer=lambda: open_store(url("writer") + "&keep=2"),
        reader=lambda: open_store(url("reader")),
        anonymous=lambda: open_store(url(None)),
        corrupt=corrupt,
        restart=restart,
    )

    def restart_all() -> None:
        h.close_all()
        restart()

    h.writer, h.reader, h.anonymous = _tracked(h, h.writer), _tracked(h, h.reader), _tracked(h, h.anonymous)  # type: ignore[arg-type]
    h.restart = restart_all
    return h


def redis_harness(srv: RedisServer, prefix: str) -> Harness:
    import redis

    def corrupt(version: str, uid: int) -> None:
        r = redis.Redis(port=srv.port, username="writer", password=REDIS_PASS["writer"])
        key = f"{prefix}:v:{version}:{uid}"
        b = r.getrange(key, 100, 100)
        r.setrange(key, 100, bytes([b[0] ^ 0x01]))
        r.close()

    def restart() -> None:
        srv.kill()
        srv.start()

    return _redis_like_harness("redis", lambda user: srv.url(user, prefix), corrupt, restart)


def redis_cluster_harness(cluster: RedisCluster, prefix: str) -> Harness:
    def corrupt(version: str, uid: int) -> None:
        from dv365.store.backends.redis_cluster_store import RedisClusterStore

        store = open_store(cluster.url("writer", prefix))
        assert isinstance(store, RedisClusterStore)
        key = store.record_key(version, uid)
        b = store.rc.getrange(key, 100, 100)
        store.rc.setrange(key, 100, bytes([b[0] ^ 0x01]))
        store.close()

    return _redis_like_harness("redis-cluster", lambda user: cluster.url(user, prefix), corrupt, cluster.restart)


def grpc_harness(root: Path, tls: dict[str, str], snapshot_root: str) -> Harness:
    from dv365.store.server import ServeConfig, start_server

    cfg = ServeConfig(
        backend=f"lmdb://{root / 'store'}?keep=2",
        port=0,
        tls_cert=tls["cert"],
        tls_key=tls["key"],
        reader_tokens=frozenset({READER_TOKEN}),
        writer_tokens=frozenset({WRITER_TOKEN}),
        grace_s=2,
        snapshot_roots=(snapshot_root,),
    )
    state = {"server": start_server(cfg)}

    def client(token: str | None) -> Callable[[], EmbeddingStore]:
        return lambda: open_store(
            f"grpcs://localhost:{state['server'].port}?ca={tls['cert']}", **({"token": token} if token else {})
        )

    h = Harness(
        "grpc",
        writer=client(WRITER_TOKEN),
        reader=client(READER_TOKEN),
        anonymous=client(None),
        corrupt=lambda v, u: flip_lmdb(state["server"].store, v, u),
        restart=lambda: None,
    )

    def restart() -> None:
        h.close_all()
        state["server"].stop(2)
        state["server"] = start_server(cfg)

    h.writer, h.reader, h.anonymous = _tracked(h, h.writer), _tracked(h, h.reader), _tracked(h, h.anonymous)  # type: ignore[arg-type]
    h.restart = restart
    h.stop = lambda: state["server"].stop(0)  # type: ignore[attr-defined]
    return h


@pytest.fixture(params=["lmdb", "redis", "redis-cluster", "grpc"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """The backend under test (the contract suite is parametrised by it)."""
    kind = request.param
    if kind == "lmdb":
        h = lmdb_harness(tmp_path)
    elif kind == "redis":
        h = redis_harness(request.getfixturevalue("redis_server"), f"t{os.getpid()}x{id(request)}")
    elif kind == "redis-cluster":
        h = redis_cluster_harness(request.getfixturevalue("redis_cluster"), f"t{os.getpid()}x{id(request)}")
    else:
        h = grpc_harness(tmp_path, request.getfixturevalue("tls_files"), request.getfixturevalue("snapshots").root)
    yield h
    h.close_all()
    if kind == "grpc":
        h.stop()  # type: ignore[attr-defined]
