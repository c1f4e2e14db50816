"""gRPC service specifics: TLS is enforced, health needs no token and flips on shutdown, reflection is opt-in,
SIGTERM drains in-flight calls and exits 0, any backend can sit behind the service, GetStream's pieces make
the unary Get's answer (and the client falls back to Get on a server without GetStream)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dv365.core.lookup import LookupResult
from dv365.store import StoreError, StoreUnavailableError, open_store
from dv365.store.proto import store_pb2 as pb
from dv365.store.server import ServeConfig, start_server

from .conftest import READER_TOKEN, USERS, WRITER_TOKEN, RedisServer, flip_lmdb

TOKENS = {"reader_tokens": frozenset({READER_TOKEN}), "writer_tokens": frozenset({WRITER_TOKEN})}


def _health(channel: grpc.Channel, service: str = "") -> int:
    return int(
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    )


def test_tls_is_enforced_and_health_needs_no_token(tmp_path: Path, tls_files, snapshots) -> None:  # type: ignore[no-untyped-def]
    srv = start_server(
        ServeConfig(
            backend=f"lmdb://{tmp_path}/s",
            port=0,
            tls_cert=tls_files["cert"],
            tls_key=tls_files["key"],
            snapshot_roots=(snapshots.root,),
            **TOKENS,
        )
    )
    try:
        with open(tls_files["cert"], "rb") as f:
            creds = grpc.ssl_channel_credentials(f.read())
        with grpc.secure_channel(f"localhost:{srv.port}", creds) as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
            assert _health(ch, "dv365.store.v1.EmbeddingStore") == health_pb2.HealthCheckResponse.SERVING
        plain = open_store(f"grpc://127.0.0.1:{srv.port}", token=READER_TOKEN, timeout=3)  # no TLS: refused
        with pytest.raises(StoreUnavailableError):
            plain.versions()
        plain.close()
        untrusted = open_store(f"grpcs://localhost:{srv.port}", token=READER_TOKEN, timeout=3)  # system roots
        with pytest.raises(StoreUnavailableError):
            untrusted.versions()
        untrusted.close()
        ok = open_store(f"grpcs://127.0.0.1:{srv.port}?ca={tls_files['cert']}", token=WRITER_TOKEN)
        ok.publish(snapshots("v1", seed=1))
        assert ok.get([1000]).present.all()
        ok.close()
    finally:
        srv.stop(0)


def test_reflection_is_opt_in(tmp_path: Path) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def services(reflect: bool) -> list[str] | grpc.StatusCode:
        srv = start_server(
            ServeConfig(backend=f"lmdb://{tmp_path}/s{int(reflect)}", port=0, reflection=reflect, **TOKENS)
        )
        try:
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
                stub = reflection_pb2_grpc.ServerReflectionStub(ch)
                req = reflection_pb2.ServerReflectionRequest(list_services="")
                try:
                    resp = next(
                        iter(
                            stub.ServerReflectionInfo(
                                iter([req]), metadata=(("authorization", f"Bearer {READER_TOKEN}"),), timeout=5
                            )
                        )
                    )
                except grpc.RpcError as e:
                    return e.code()
                return sorted(s.name for s in resp.list_services_response.service)
        finally:
            srv.stop(0)

    assert services(False) == grpc.StatusCode.UNIMPLEMENTED
    assert "dv365.store.v1.EmbeddingStore" in services(True)  # type: ignore[operator]


def test_serve_needs_tokens_or_explicit_anonymous(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no tokens configured"):
        start_server(ServeConfig(backend=f"lmdb://{tmp_path}/s", port=0))
    with pytest.raises(StoreError, match="at least 16"):
        start_server(ServeConfig(backend=f"lmdb://{tmp_path}/s", port=0, reader_tokens=frozenset({"short"})))


def test_grpc_in_front_of_redis(redis_server: RedisServer, snapshots) -> None:  # type: ignore[no-untyped-def]
    srv = start_server(
        ServeConfig(
            backend=redis_server.url("writer", "grpc-front"), port=0, snapshot_roots=(snapshots.root,), **TOKENS
        )
    )
    try:
        c = open_store(f"grpc://127.0.0.1:{srv.port}", token=WRITER_TOKEN)
        c.publish(snapshots("v1", seed=1))
        r = c.get([1000, 1, 1299])
        assert r.present.tolist() == [True, False, True] and r.snapshot_id == "v1"
        ids = np.r_[USERS[::-1], [1, 2]]  # 302 users: three streamed pieces, sliced from one Redis read
        direct = open_store(redis_server.url("reader", "grpc-front"))
        _assert_same(c.get(ids), direct.get(ids))
        direct.close()
        c.close()
    finally:
        srv.stop(0)


def _assert_same(a: LookupResult, b: LookupResult) -> None:
    np.testing.assert_array_equal(a.payload, b.payload)
    np.testing.assert_array_equal(a.present, b.present)
    assert a.snapshot_id == b.snapshot_id and a.errors.keys() == b.errors.keys()


def test_get_stream_pieces_match_get(tmp_path: Path, snapshots) -> None:  # type: ignore[no-untyped-def]
    """GetStream (~1 MB pieces: 136 users of 7.6 KB) gives the unary Get's answer: same rows in request order,
    an integrity error keyed by its position in the whole batch, one version."""
    url = f"lmdb://{tmp_path}/s"
    local = open_store(url)
    local.publish(snapshots("v1", seed=1))
    flip_lmdb(local, "v1", 1290)
    srv = start_server(ServeConfig(backend=url, port=0, **TOKENS))
    try:
        c = open_store(f"grpc://127.0.0.1:{srv.port}", token=READER_TOKEN)
        ids = np.r_[np.random.default_rng(3).permutation(USERS), [7, -1]]
        pos = int(np.flatnonzero(ids == 1290)[0])
        streamed = c.get(ids)
        assert c._stream  # type: ignore[attr-defined]
        assert streamed.errors.keys() == {pos} and "user 1290" in streamed.errors[pos]
        assert int(streamed.present.sum()) == len(USERS) - 1 and not streamed.payload[pos].any()
        _assert_same(streamed, local.get(ids))
        c._stream = False  # type: ignore[attr-defined]
        _assert_same(streamed, c.get(ids))
        pieces = list(c._get_stream(pb.GetRequest(user_ids=ids.tolist()), metadata=c._md))  # type: ignore[attr-defined]
        assert len(pieces) == 3
        assert c.get([]).payload.shape == (0, 58, 132)
        c.close()
    finally:
        srv.stop(0)
        local.close()


def test_client_falls_back_to_get_without_get_stream(tmp_path: Path, snapshots, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A server from before GetStream answers UNIMPLEMENTED: the client uses the unary Get from then on."""
    import dv365.store.server as server

    full = server._method_handlers
    monkeypatch.setattr(server, "_method_handlers", lambda s: {k: v for k, v in full(s).items() if k != "GetStream"})
    srv = start_server(ServeConfig(backend=f"lmdb://{tmp_path}/s", port=0, snapshot_roots=(snapshots.root,), **TOKENS))
    try:
        c = open_store(f"grpc://127.0.0.1:{srv.port}", token=WRITER_TOKEN)
        c.publish(snapshots("v1", seed=1))
        r = c.get(USERS)
        assert r.present.all() and not c._stream  # type: ignore[attr-defined]
        assert c.get([1000, 5]).present.tolist() == [True, False]
        c.close()
    finally:
        srv.stop(0)


def test_sigterm_drains_in_flight_calls_and_exits_0(tmp_path: Path, snapshots) -> None:  # type: ignore[no-untyped-def]
    tok = tmp_path / "writers"
    tok.write_text(WRITER_TOKEN + "\n")
    url = f"lmdb://{tmp_path}/s"
    s = open_store(url)
    s.publish(snapshots("v1", seed=1))
    s.close()
    big = snapshots("big", seed=5, users=__import__("numpy").arange(20_000, 32_000), shard_users=1000)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dv365.core.cli",
            "serve",
            "--backend",
            url,
            "--port",
            "0",
            "--writer-token-file",
            str(tok),
            "--grace",
            "30",
            "--snapshot-root",
            snapshots.root,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "listening on 127.0.0.1:" in line and "active version 'v1'" in line, line
        port = int(line.split("listening on 127.0.0.1:")[1].split(" ")[0])
        c = open_store(f"grpc://127.0.0.1:{port}", token=WRITER_TOKEN)
        assert c.get([1000]).present.all()
        result: dict[str, object] = {}
        t = threading.Thread(target=lambda: result.update(v=c.publish(big), done=time.monotonic()))  # slow call
        t.start()
        time.sleep(0.2)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert getattr(result.get("v"), "version", None) == "big"  # it completed despite SIGTERM
        assert result["done"] > signalled  # type: ignore[operator]  (it really was in flight)
        assert proc.wait(60) == 0
        out = proc.stdout.read()  # type: ignore[union-attr]
        assert "stopped on SIGTERM" in out
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    s = open_store(url)  # the restarted store has what the drained call published
    assert s.active().version == "big" and s.get([20_500]).present.all()  # type: ignore[union-attr]
    s.close()
