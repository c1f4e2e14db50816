"""gRPC service specifics: TLS is enforced, health needs no token and flips on shutdown, reflection is opt-in,
SIGTERM drains in-flight calls and exits 0, any backend can sit behind the service, GetStream's pieces make
the unary Get's answer (the client reads batches through Get only), the client's zero-copy batch answer holds
the embedded store's arrays, and a row corrupted in the store or in transfer is an error naming its user."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dv365.core.lookup import LookupResult
from dv365.store import StoreError, StoreUnavailableError, open_store
from dv365.store.proto import store_pb2 as pb
from dv365.store.server import ServeConfig, start_server

from .conftest import FMT, READER_TOKEN, USERS, WRITER_TOKEN, RedisServer, flip_lmdb

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


def _decode(ids: np.ndarray, data: bytes) -> tuple[np.ndarray, np.ndarray, dict[int, str], str]:
    """payload [B, user_bytes], present, errors and version of one serialized GetResponse (read as any client)."""
    resp = pb.GetResponse.FromString(data)
    pay = np.frombuffer(resp.payload, np.uint8).reshape(len(resp.present), -1)
    return pay, np.frombuffer(resp.present, bool), dict(resp.errors), resp.version.version


@contextlib.contextmanager
def _served(tmp_path: Path, snapshots, corrupt: int | None = None) -> Iterator[tuple[Any, Any, Any]]:  # type: ignore[no-untyped-def]
    """An LMDB store holding v1 (seed 1; user ``corrupt``'s stored row flipped), a server over it and a reader
    client: yields (store, server, client)."""
    url = f"lmdb://{tmp_path}/s"
    local = open_store(url + "?keep=3")
    local.publish(snapshots("v1", seed=1))
    if corrupt is not None:
        flip_lmdb(local, "v1", corrupt)
    srv = start_server(ServeConfig(backend=url, port=0, **TOKENS))
    c = open_store(f"grpc://127.0.0.1:{srv.port}", token=READER_TOKEN)
    try:
        yield local, srv, c
    finally:
        c.close()
        srv.stop(0)
        local.close()


def test_get_stream_pieces_match_get(tmp_path: Path, snapshots) -> None:  # type: ignore[no-untyped-def]
    """GetStream (~1 MB pieces: 136 users of 7.6 KB; served for clients that use it, the package's client reads
    batches through Get) gives the unary Get's answer: same rows in request order, an integrity error keyed by
    its position in the whole batch, one version."""
    with _served(tmp_path, snapshots, corrupt=1290) as (local, srv, c):
        ids = np.r_[np.random.default_rng(3).permutation(USERS), [7, -1]]
        pos = int(np.flatnonzero(ids == 1290)[0])
        got = c.get(ids)
        assert got.errors.keys() == {pos} and "user 1290" in got.errors[pos]
        assert int(got.present.sum()) == len(USERS) - 1 and not got.payload[pos].any()
        _assert_same(got, local.get(ids))
        stream = c.channel.unary_stream(  # type: ignore[attr-defined]
            "/dv365.store.v1.EmbeddingStore/GetStream",
            request_serializer=pb.GetRequest.SerializeToString,
            response_deserializer=None,
        )
        pieces = [_decode(ids, p) for p in stream(pb.GetRequest(user_ids=ids.tolist()), metadata=c._md)]  # type: ignore[attr-defined]
        assert len(pieces) == 3 and {p[3] for p in pieces} == {"v1"}
        np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), got.payload.reshape(len(ids), -1))
        np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), got.present)
        assert {k for p in pieces for k in p[2]} == {pos}
        assert c.get([]).payload.shape == (0, 58, 132)


def test_client_needs_only_get(tmp_path: Path, snapshots, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A server without GetStream (UNIMPLEMENTED) serves the package's client: batches go through Get."""
    import dv365.store.server as server

    full = server._method_handlers
    monkeypatch.setattr(server, "_method_handlers", lambda s: {k: v for k, v in full(s).items() if k != "GetStream"})
    srv = start_server(ServeConfig(backend=f"lmdb://{tmp_path}/s", port=0, snapshot_roots=(snapshots.root,), **TOKENS))
    try:
        c = open_store(f"grpc://127.0.0.1:{srv.port}", token=WRITER_TOKEN)
        c.publish(snapshots("v1", seed=1))
        r = c.get(USERS)
        assert r.present.all()
        assert c.get([1000, 5]).present.tolist() == [True, False]
        c.close()
    finally:
        srv.stop(0)


def test_zero_copy_answer_matches_the_embedded_store(tmp_path: Path, snapshots) -> None:  # type: ignore[no-untyped-def]
    """The client's batch answer is a read-only view of the received message (no copy) holding the embedded
    store's arrays: same rows, presence, errors, version, for row-file and records-layout versions, repeated and
    unknown users included; an answer without any corrupted row leaves it a view, present stays writable."""
    with _served(tmp_path, snapshots) as (local, srv, c):
        rng = np.random.default_rng(5)
        ids = np.r_[rng.choice(USERS, 500), [7, -1, 1000, 1000, 2**62]]
        r = c.get(ids)
        assert not r.payload.flags.writeable and not r.payload.flags.owndata and r.present.flags.writeable
        assert r.payload.shape == (len(ids), 58, 132) and int(r.present.sum()) == 502 and not r.errors
        _assert_same(r, local.get(ids))
        f = c.get_float(ids[:4])  # de-quantizes from a copy: the view is never written
        np.testing.assert_array_equal(f.embeddings.numpy(), local.get_float(ids[:4]).embeddings.numpy())
        with open_store(f"lmdb://{tmp_path}/r?layout=records") as rec:  # records layout: the verified path
            rec.publish(snapshots("v1", seed=1))
        srv2 = start_server(ServeConfig(backend=f"lmdb://{tmp_path}/r", port=0, **TOKENS))
        try:
            c2 = open_store(f"grpc://127.0.0.1:{srv2.port}", token=READER_TOKEN)
            _assert_same(c2.get(ids), r)
            c2.close()
        finally:
            srv2.stop(0)


def test_corrupted_rows_are_errors_whoever_checks(tmp_path: Path, snapshots) -> None:  # type: ignore[no-untyped-def]
    """A row corrupted in the store: the package's client (the server leaves the check to it,
    ``client_verifies``) and a client that does not check (the server checks, as before) both get it as an
    error naming the user, not present, zero bytes; the other rows are intact."""
    with _served(tmp_path, snapshots, corrupt=1005) as (local, srv, c):
        ids = np.array([1003, 1005, 9, 1299])
        r = c.get(ids)
        assert r.present.tolist() == [True, False, False, True] and r.errors.keys() == {1}
        assert "user 1005" in r.errors[1] and "'v1'" in r.errors[1] and "checksum" in r.errors[1]
        assert not r.payload[1].any() and r.payload.flags.writeable  # zeroed in a copy
        _assert_same(r, local.get(ids))
        before = srv.servicer.metrics.snapshot()["methods"]["Get"]["checksum_failures"]
        data = c._get_raw(pb.GetRequest(user_ids=ids.tolist()), metadata=c._md)  # type: ignore[attr-defined]
        pay, present, errors, version = _decode(ids, data)  # a client that does not check: the server did
        assert present.tolist() == [True, False, False, True] and errors.keys() == {1} and "user 1005" in errors[1]
        assert not pay[1].any() and version == "v1"
        np.testing.assert_array_equal(pay, r.payload.reshape(len(ids), -1))
        assert srv.servicer.metrics.snapshot()["methods"]["Get"]["checksum_failures"] == before + 1


def test_answer_corrupted_in_transfer_is_an_error_naming_the_user(tmp_path: Path, snapshots) -> None:  # type: ignore[no-untyped-def]
    """A real grpcio server between client and service flips one payload byte of every Get answer: the client
    reports that user (error naming it, not present, zero row) and returns the others intact; a truncated
    answer is a StoreError, never a short array."""
    from concurrent import futures

    from dv365.store.grpc_common import payload_offset

    ids = np.array([1003, 1005, 9, 1299])
    n = FMT.user_bytes
    mode = {"damage": "flip"}
    with _served(tmp_path, snapshots) as (local, srv, direct):
        upstream = direct.channel.unary_unary(  # type: ignore[attr-defined]
            "/dv365.store.v1.EmbeddingStore/Get", request_serializer=None, response_deserializer=None
        )

        def relay(request: bytes, context: grpc.ServicerContext) -> bytes:
            data = bytearray(upstream(request, metadata=direct._md))  # type: ignore[attr-defined]
            if mode["damage"] == "flip":
                data[payload_offset(len(ids) * n) + 3 * n + 77] ^= 0x40  # user 1299's row (position 3)
                return bytes(data)
            return bytes(data[: len(data) // 2])

        proxy = grpc.server(futures.ThreadPoolExecutor(2))
        handler = grpc.unary_unary_rpc_method_handler(relay, request_deserializer=None, response_serializer=None)
        proxy.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("dv365.store.v1.EmbeddingStore", {"Get": handler}),)
        )
        port = proxy.add_insecure_port("127.0.0.1:0")
        proxy.start()
        try:
            c = open_store(f"grpc://127.0.0.1:{port}", token=READER_TOKEN)
            r = c.get(ids)
            assert r.present.tolist() == [True, True, False, False] and r.errors.keys() == {3}
            assert "user 1299" in r.errors[3] and "checksum" in r.errors[3] and not r.payload[3].any()
            np.testing.assert_array_equal(r.payload[:3], local.get(ids).payload[:3])
            mode["damage"] = "truncate"
            with pytest.raises(StoreError, match="malformed answer for 4 users"):
                c.get(ids)
            c.close()
        finally:
            proxy.stop(0)


def test_serving_processes_retain_freed_memory() -> None:
    """dv365 serve's malloc settings apply in a fresh process (glibc: mallopt accepts both parameters)."""
    code = "from dv365.store.grpc_common import retain_freed_memory as r; print(r())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")
