"""``dv365 serve``: a gRPC service in front of any store backend.

* batched ``Get`` (payloads + checksums, so the client checks what crossed the wire; the package's client uses
  it: each stored row is copied once, straight into the answer, and hashed once, on the client) and
  ``GetStream`` (the same answer in ~1 MB pieces, read and sent in a pipeline; for clients that use it), the
  unary one-user ``GetUser`` (the online path), ``Versions``, and the writer methods
  ``Publish``/``Activate``/``Rollback``/``Delete``/``Prune``;
* the serving processes keep freed memory for reuse (:func:`~dv365.store.grpc_common.retain_freed_memory`);
* ``--workers N``: N processes, one grpcio server each, on one port (:func:`serve_workers`);
* ``--metrics-port``: Prometheus ``/metrics`` (:mod:`dv365.store.metrics`);
* bearer tokens (``authorization: Bearer <token>``) with separate reader and writer sets: a reader token cannot
  publish (PERMISSION_DENIED), no/unknown token is UNAUTHENTICATED; the standard health service
  (``grpc.health.v1``) needs no token; reflection is opt-in and needs a reader token;
* TLS with a certificate/key pair (PEM);
* SIGTERM/SIGINT: health turns NOT_SERVING, new calls are refused, calls in flight get ``grace`` seconds to
  finish, then the backend is closed and the process exits 0. Everything published was committed by the
  backend before ``Publish`` returned, so a restart loses nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dv365.store.api import EmbeddingStore, RawLookup, RowViews, VersionInfo, as_user_ids, count_answer
from dv365.store.errors import PublishError, StoreError
from dv365.store.factory import open_store, scheme_of
from dv365.store.grpc_common import (
    CHANNEL_OPTIONS,
    ERROR_KEY,
    SERVICE,
    STREAM_CHUNK_BYTES,
    WRITER_METHODS,
    encode_get_response,
    payload_offset,
    retain_freed_memory,
    status_of,
    version_from_pb,  # noqa: F401  (re-exported for symmetry)
    version_to_pb,
)
from dv365.store.metrics import ActiveVersion, StoreMetrics, prometheus_registry
from dv365.store.proto import store_pb2 as pb
from dv365.store.proto import store_pb2_grpc as pb_grpc
from dv365.store.records import drop_corrupted, verify_payloads


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``dv365 serve`` needs.

    Args:
        backend: the store URL served (``lmdb:///srv/dv365``, ``redis://…``).
        host / port: where to listen (port 0 = any free port; the bound one is reported).
        tls_cert / tls_key: PEM files; both or neither.
        reader_tokens / writer_tokens: accepted bearer tokens (writers may also read).
        allow_anonymous: serve without tokens (everyone is a writer; development only).
        reflection: register gRPC server reflection.
        threads: request threads per process.
        workers: server processes sharing the port (``--workers``; the grpc multiprocessing pattern: the parent
            checks the port is free, holds it with ``SO_REUSEPORT`` and starts one grpcio server per process on
            it; a *different* server is still refused, its plain bind finds the port in use).
        shared_port: set by the parent for its worker processes (bind with ``SO_REUSEPORT``); not for users.
        grace_s: seconds in-flight calls get on shutdown.
        metrics_port: serve Prometheus ``/metrics`` (prometheus-client) on ``host:metrics_port`` (0 = any free
            port; None = no endpoint); see :mod:`dv365.store.metrics`.
        snapshot_roots: directories a remote ``Publish`` may read snapshots from (the server resolves the
            path it is sent, symlinks and ``..`` included, and refuses one outside them; a relative path is
            taken under the roots). None: remote publish is refused.
    """

    backend: str
    host: str = "127.0.0.1"
    port: int = 7365
    tls_cert: str | None = None
    tls_key: str | None = None
    reader_tokens: frozenset[str] = field(default_factory=frozenset)
    writer_tokens: frozenset[str] = field(default_factory=frozenset)
    allow_anonymous: bool = False
    reflection: bool = False
    threads: int = 16
    workers: int = 1
    shared_port: bool = False
    grace_s: float = 10.0
    snapshot_roots: tuple[str, ...] = ()
    metrics_port: int | None = None

    def check(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise StoreError("dv365 serve: --tls-cert and --tls-key go together")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path and not os.path.isfile(path):
                raise StoreError(f"dv365 serve: {flag} {path}: no such file")
        if not (self.reader_tokens or self.writer_tokens or self.allow_anonymous):
            raise StoreError(
                "dv365 serve: no tokens configured: give --reader-token-file/--writer-token-file (or "
                "DV365_STORE_READER_TOKENS/DV365_STORE_WRITER_TOKENS), or --allow-anonymous for development"
            )
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise StoreError(f"dv365 serve: port {self.port!r} is not a TCP port: use 0..65535 (0 = any free port)")
        if not 1 <= self.workers <= 64 or not 1 <= self.threads <= 1024:
            raise StoreError(
                f"dv365 serve: --workers {self.workers} / --threads {self.threads}: use 1..64 processes, 1..1024 threads"
            )
        if any(len(t) < 16 for t in self.reader_tokens | self.writer_tokens):
            raise StoreError("dv365 serve: every token must be at least 16 characters")
        for root in self.snapshot_roots:
            if "://" in root or not os.path.isdir(root):
                raise StoreError(f"dv365 serve: --snapshot-root {root}: not a directory")


def _abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, msg: str) -> grpc.RpcMethodHandler:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, msg)

    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class TokenAuth(grpc.ServerInterceptor):
    """Bearer-token check: health needs none, the store's writer methods need a writer token, the rest a
    reader (or writer) token. Tokens are compared in constant time."""

    def __init__(self, readers: frozenset[str], writers: frozenset[str], anonymous: bool) -> None:
        self.readers = [t.encode() for t in readers]
        self.writers = [t.encode() for t in writers]
        self.anonymous = anonymous

    def _role(self, token: bytes) -> str | None:
        role = None
        for t in self.readers:
            if hmac.compare_digest(t, token):
                role = "reader"
        for t in self.writers:
            if hmac.compare_digest(t, token):
                role = "writer"
        return role

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        service, _, method = details.method.rpartition("/")
        if service == "/grpc.health.v1.Health":
            return continuation(details)
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        role = self._role(token.encode()) if token else None
        if role is None and self.anonymous and not token:
            role = "writer"
        if role is None:
            return _abort_handler(
                continuation(details),
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown bearer token (metadata 'authorization: Bearer <token>')",
            )
        if service == f"/{SERVICE}" and method in WRITER_METHODS and role != "writer":
            return _abort_handler(
                continuation(details),
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs a writer token; this is a reader token",
            )
        return continuation(details)


class StoreServicer(pb_grpc.EmbeddingStoreServicer):
    """The EmbeddingStore service over one backend store.

    Args:
        store: the backend.
        snapshot_roots: the directories ``Publish`` may read from (none: remote publish is refused).

    Error messages sent to clients name neither the backend's URL/directory nor the snapshot roots' absolute
    paths: they read ``<store>`` and ``<snapshot-root>``.
    """

    def __init__(self, store: EmbeddingStore, snapshot_roots: tuple[str, ...] = ()) -> None:
        self.store = store
        self.roots = tuple(dict.fromkeys(os.path.realpath(r) for r in snapshot_roots))
        secrets = {store.url: "<store>", str(getattr(store, "path", "") or ""): "<store>"}
        for r in snapshot_roots:
            secrets[os.path.abspath(r)] = secrets[os.path.realpath(r)] = "<snapshot-root>"
        secrets.pop("", None)
        self._secrets = sorted(secrets.items(), key=lambda kv: -len(kv[0]))  # longest first
        self.calls = 0
        self._count = threading.Lock()
        self.metrics = StoreMetrics()  # by gRPC method; exposed by --metrics-port

    def redact(self, message: str) -> str:
        """``message`` without the server's paths (the backend's URL and directory, the snapshot roots)."""
        for secret, placeholder in self._secrets:
            message = message.replace(secret, placeholder)
        return message

    def snapshot_path(self, given: str) -> str:
        """The local snapshot directory a remote ``Publish`` of ``given`` reads: under a snapshot root, after
        symlinks and ``..`` are resolved; PublishError otherwise (naming what the client sent, not the server's
        paths)."""
        if not self.roots:
            raise PublishError(
                "this server takes no remote publish: no snapshot root is configured (start dv365 serve with "
                "--snapshot-root DIR), or publish into its backend with `dv365 store publish`"
            )
        path = given[len("file://") :] if given.startswith("file://") else given
        if not path or "://" in path:
            raise PublishError(f"snapshot {given!r}: give a directory under a snapshot root of this server")
        if os.path.isabs(path):
            real = os.path.realpath(path)
        else:  # under the first root that has it (or the first root)
            joined = [os.path.join(r, path) for r in self.roots]
            real = os.path.realpath(next((j for j in joined if os.path.lexists(j)), joined[0]))
        if any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.roots):
            return real
        raise PublishError(f"snapshot {given!r} is not under a snapshot root of this server: refused")

    def _counted(self) -> None:
        with self._count:
            self.calls += 1

    def _run(self, context: grpc.ServicerContext, method: str, fn: Callable[[], Any]) -> Any:
        self._counted()
        t0 = time.perf_counter()
        try:
            out = fn()
        except StoreError as e:
            self.metrics.observe(method, time.perf_counter() - t0, error=True)
            self._abort(context, e)
        else:
            self.metrics.observe(method, time.perf_counter() - t0)
            return out

    def _read(self, context: grpc.ServicerContext, method: str, ids: Callable[[], np.ndarray]) -> RawLookup:
        """The backend's answer for a read method, counted (latency, users, missing, checksum failures)."""
        self._counted()
        t0 = time.perf_counter()
        try:
            raw = self.store.lookup(ids())
        except StoreError as e:
            self.metrics.observe(method, time.perf_counter() - t0, error=True)
            self._abort(context, e)
            raise  # abort raises; this keeps the type checker informed
        count_answer(self.metrics, method, raw, time.perf_counter() - t0)
        return raw

    def _abort(self, context: grpc.ServicerContext, e: StoreError) -> None:
        context.set_trailing_metadata(((ERROR_KEY, type(e).__name__),))
        context.abort(status_of(e), self.redact(str(e)))

    def _ids(self, request: pb.GetRequest) -> np.ndarray:
        return as_user_ids(np.fromiter(request.user_ids, dtype=np.int64, count=len(request.user_ids)), self.store.url)

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> bytes:
        """Returns the serialized GetResponse. The backend's rows are copied once, straight into the message
        (row views of an LMDB row file: no gathered array in between). They are checked against their stored
        checksums in that copy (a row that fails is sent as zeros, not present, with its error), unless the
        request says the client checks them itself (``client_verifies``: the package's client, which checks
        every row it receives): then each row is hashed once, end to end, on the client (:func:`_encode_rows`)."""
        self._counted()
        t0 = time.perf_counter()
        try:
            ids = self._ids(request)
            views = self.store.lookup_rows(ids)
        except StoreError as e:
            self.metrics.observe("Get", time.perf_counter() - t0, error=True)
            self._abort(context, e)
            raise  # abort raises; this keeps the type checker informed
        data, views = _encode_rows(views, ids, self.store.url, check=not request.client_verifies)
        count_answer(self.metrics, "Get", views, time.perf_counter() - t0)
        return data

    def GetStream(self, request: pb.GetRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Yields serialized GetResponse pieces of ~STREAM_CHUNK_BYTES; the backend reads the next piece (from the
        same snapshot) while grpc sends the one before."""
        self._counted()
        t0 = time.perf_counter()
        users = missing = failed = 0
        try:
            pos = 0
            for raw in self.store.lookup_chunks(self._ids(request), STREAM_CHUNK_BYTES):
                yield _encode(raw, pos)
                pos += len(raw.present)
                users, failed = users + len(raw.present), failed + len(raw.errors)
                missing += len(raw.present) - int(raw.present.sum()) - len(raw.errors)
                self.metrics.answered_from(raw.info.version, raw.info.data_cutoff_ts, raw.info.published_at)
        except StoreError as e:
            self.metrics.observe("GetStream", time.perf_counter() - t0, error=True)
            self._abort(context, e)
        self.metrics.observe("GetStream", time.perf_counter() - t0, users, missing, failed)

    def GetUser(self, request: pb.GetUserRequest, context: grpc.ServicerContext) -> pb.GetUserResponse:
        """One user: the backend's single-user read, no batch framing; the VersionInfo only when the client
        does not hold it yet."""
        return _user_response(self._read(context, "GetUser", lambda: _one(request.user_id)), request)

    def Versions(self, request: pb.VersionsRequest, context: grpc.ServicerContext) -> pb.VersionsResponse:
        return self._run(
            context, "Versions", lambda: pb.VersionsResponse(versions=[version_to_pb(v) for v in self.store.versions()])
        )

    def Publish(self, request: pb.PublishRequest, context: grpc.ServicerContext) -> pb.VersionInfo:
        return self._run(
            context,
            "Publish",
            lambda: version_to_pb(
                self.store.publish(self.snapshot_path(request.snapshot_url), activate=not request.no_activate)
            ),
        )

    def Activate(self, request: pb.ActivateRequest, context: grpc.ServicerContext) -> pb.VersionInfo:
        return self._run(context, "Activate", lambda: version_to_pb(self.store.activate(request.version)))

    def Rollback(self, request: pb.RollbackRequest, context: grpc.ServicerContext) -> pb.VersionInfo:
        return self._run(context, "Rollback", lambda: version_to_pb(self.store.rollback()))

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.Empty:
        return self._run(context, "Delete", lambda: (self.store.delete_version(request.version), pb.Empty())[1])

    def Prune(self, request: pb.PruneRequest, context: grpc.ServicerContext) -> pb.PruneResponse:
        return self._run(context, "Prune", lambda: pb.PruneResponse(deleted=self.store.prune(request.keep or None)))


def _small(info: VersionInfo, errors: dict[int, str], offset: int) -> bytes:
    """GetResponse's small fields (version, errors keyed from ``offset``), serialized."""
    return pb.GetResponse(
        version=version_to_pb(info), errors={offset + int(k): v for k, v in errors.items()}
    ).SerializeToString()


def _encode(raw: RawLookup, offset: int) -> bytes:
    """A serialized GetResponse of ``raw`` (``offset``: the batch position of its first user, for error keys)."""
    payload = memoryview(np.ascontiguousarray(raw.payload).reshape(-1))
    return encode_get_response(
        (payload,),
        payload.nbytes,
        memoryview(np.ascontiguousarray(raw.present).view(np.uint8)),
        memoryview(raw.checksums.astype("<u8").view(np.uint8)),
        _small(raw.info, raw.errors, offset),
    )


def _encode_rows(views: RowViews, ids: np.ndarray, url: str, check: bool = True) -> tuple[bytes, RowViews]:
    """The serialized GetResponse of ``views``, and the answer it holds. Unverified rows (``views.verified``
    False) are checked in the message, i.e. in the one copy of them that is sent, unless ``check`` is False (the
    client checks them: they go out with their stored checksums as read). A row that fails its checksum makes
    the message be built again with zeros in its place, the user not present and its error (rare)."""
    B, n = len(views.present), views.info.row_format.user_bytes

    def encode(v: RowViews) -> bytes:
        return encode_get_response(
            v.rows,
            B * n,
            memoryview(np.ascontiguousarray(v.present).view(np.uint8)),
            memoryview(v.checksums.astype("<u8").view(np.uint8)),
            _small(v.info, v.errors, 0),
        )

    data = encode(views)
    if views.verified or not check or not B:
        return data, views
    payload = np.frombuffer(data, np.uint8, B * n, payload_offset(B * n)).reshape(B, n)
    bad = verify_payloads(payload, ids, views.checksums, views.present)
    if not len(bad):
        return data, views
    present, stored, errors = views.present.copy(), views.checksums.copy(), dict(views.errors)
    drop_corrupted(
        np.empty((B, 0), np.uint8), present, stored, ids, bad, f"{url} version {views.info.version!r}", errors
    )
    rows, zero = list(views.rows), bytes(n)
    for i in bad.tolist():
        rows[i] = zero
    views = RowViews(rows, present, stored, errors, views.info, verified=True)
    return encode(views), views


def _one(user_id: int) -> np.ndarray:
    return np.array([user_id], dtype=np.int64)


def _user_response(raw: RawLookup, request: pb.GetUserRequest) -> pb.GetUserResponse:
    info = raw.info
    resp = pb.GetUserResponse(version=info.version, published_at=info.published_at, error=raw.errors.get(0, ""))
    if raw.present[0]:
        resp.present = True
        resp.payload = raw.payload[0].tobytes()
        resp.checksum = int(raw.checksums[0])
    if request.known_version != info.version:
        resp.info.CopyFrom(version_to_pb(info))
    return resp


def _method_handlers(servicer: StoreServicer) -> dict[str, grpc.RpcMethodHandler]:
    """Every method of store.proto's service (from its descriptor); Get/GetStream return pre-serialized bytes."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["EmbeddingStore"].methods:
        req, resp = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(
            getattr(servicer, m.name),
            request_deserializer=req.FromString,
            response_serializer=None if m.name in ("Get", "GetStream") else resp.SerializeToString,
        )
    return handlers


class RunningServer:
    """A started service: ``.port`` is the bound port; ``.stop()`` shuts it down gracefully."""

    def __init__(self, config: ServeConfig, store: EmbeddingStore) -> None:
        config.check()
        self.config, self.store = config, store
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="dv365-serve"),
            interceptors=[TokenAuth(config.reader_tokens, config.writer_tokens, config.allow_anonymous)],
            # no SO_REUSEPORT: a second server on a port in use must fail, not split the clients with the first
            # (the worker processes of one `--workers N` serve share theirs; their parent checked it was free)
            options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", int(config.shared_port))],
            maximum_concurrent_rpcs=config.threads * 8,
        )
        self.servicer = StoreServicer(store, config.snapshot_roots)
        self.server.add_registered_method_handlers(SERVICE, _method_handlers(self.servicer))
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.reflection:
            from grpc_reflection.v1alpha import reflection

            names = (
                pb.DESCRIPTOR.services_by_name["EmbeddingStore"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, self.server)
        address = f"{config.host}:{config.port}"
        problem = _bind_problem(config.host, config.port) if config.port and not config.shared_port else None
        if problem is not None and "in use" in problem:  # before grpc tries (and logs its own lines)
            self.server.stop(None)
            raise StoreError(f"dv365 serve: cannot listen on {address}: {problem}")
        try:
            if config.tls_cert:
                with open(config.tls_cert, "rb") as c, open(config.tls_key, "rb") as k:  # type: ignore[arg-type]
                    creds = grpc.ssl_server_credentials([(k.read(), c.read())])
                self.port = self.server.add_secure_port(address, creds)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio >= 1.60 raises where older ones returned 0
            self.port = 0
        if not self.port or (config.port and self.port != config.port):
            self.server.stop(None)
            problem = _bind_problem(config.host, config.port)
            raise StoreError(f"dv365 serve: cannot listen on {address}: {problem or 'grpc could not bind it'}")
        self.stopped = threading.Event()

    def start(self) -> RunningServer:
        self.metrics_port: int | None = None
        self._metrics_http: Any = None
        if self.config.metrics_port is not None:
            self._start_metrics(self.config.metrics_port)
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def _start_metrics(self, port: int) -> None:
        try:
            from prometheus_client import start_http_server
        except ImportError as e:
            raise StoreError(
                "dv365 serve: --metrics-port needs prometheus-client: pip install 'dv365-store[metrics]'"
            ) from e
        try:
            http, _thread = start_http_server(port, addr=self.config.host, registry=self._registry())
        except OSError as e:
            self.server.stop(None)
            raise StoreError(f"dv365 serve: cannot serve /metrics on {self.config.host}:{port}: {e}") from e
        self._metrics_http, self.metrics_port = http, int(http.server_port)

    def _registry(self) -> Any:
        store = self.store

        def active() -> ActiveVersion | None:
            try:
                v = store.active()
            except StoreError:
                return None
            return None if v is None else ActiveVersion(v.version, v.data_cutoff_ts, v.published_at)

        return prometheus_registry(self.servicer.metrics, active)

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones finish (``grace`` s), close the backend."""
        if self.stopped.is_set():
            return
        self.health.enter_graceful_shutdown()
        self.server.stop(self.config.grace_s if grace is None else grace).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.store.close()
        self.stopped.set()


def _bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, found by binding a plain socket there (no SO_REUSEPORT);
    None when it can."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return f"port {port} is in use (another process listens on it)"
        return f"{e.strerror or e}"
    return None


def start_server(config: ServeConfig, store: EmbeddingStore | None = None) -> RunningServer:
    """Checks ``config``, opens the backend (unless given) and starts serving; returns at once. A store this
    function opened is closed again when the server cannot start."""
    config.check()
    own = store is None
    backend = open_store(config.backend) if store is None else store
    try:
        return RunningServer(config, backend).start()
    except BaseException:
        if own:
            backend.close()
        raise


def open_served_store(url: str) -> EmbeddingStore:
    """The backend ``dv365 serve`` serves: it must already hold a store. An embedded (``lmdb://``) directory
    without one is refused (``create=0``) rather than served empty: a mistyped path would otherwise answer
    every client "no active version"; create the store with ``dv365 store publish`` first."""
    return open_store(url, create=False) if scheme_of(url) == "lmdb" else open_store(url)


def serve_forever(config: ServeConfig, out: Any = sys.stdout) -> int:
    """``dv365 serve``: runs until SIGTERM/SIGINT, then shuts down gracefully; returns the exit code. The
    start-up checks (config, tokens, the backend holds a store, the port is free) run before anything is
    served, and a failed one leaves nothing behind. ``config.workers > 1``: :func:`serve_workers`."""
    config.check()
    if config.workers > 1:
        return serve_workers(config, out)
    retain_freed_memory()
    store = open_served_store(config.backend)
    try:
        running = start_server(config, store)
    except BaseException:
        store.close()
        raise
    cause: list[str] = []

    def on_signal(signum: int, frame: Any) -> None:
        cause.append(signal.Signals(signum).name)
        threading.Thread(target=running.stop, name="dv365-serve-stop", daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    active = running.store.active()
    tls = "TLS" if config.tls_cert else "plaintext"
    auth = (
        "anonymous allowed"
        if config.allow_anonymous
        else f"{len(config.reader_tokens)} reader / {len(config.writer_tokens)} writer tokens"
    )
    print(
        f"dv365 serve: listening on {config.host}:{running.port} ({tls}, {auth}, pid {os.getpid()}"
        f"{f', /metrics on port {running.metrics_port}' if running.metrics_port else ''}), backend "
        f"{running.store.url}, active version {active.version if active else None!r}",
        file=out,
        flush=True,
    )
    t0 = time.time()
    while not running.stopped.wait(0.5):
        pass
    print(
        f"dv365 serve: stopped on {cause[0] if cause else 'request'} after {time.time() - t0:.0f} s and "
        f"{running.servicer.calls} calls (grace {config.grace_s:g} s)",
        file=out,
        flush=True,
    )
    return 0


@contextlib.contextmanager
def _reserve_port(host: str, port: int) -> Iterator[int]:
    """Holds ``host:port`` (0: a free one) with ``SO_REUSEPORT`` while the worker processes bind it too (grpc's
    multiprocessing example); yields the port. Bound, never listening: it takes no connections."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def _worker(config: ServeConfig, index: int, ready: Any) -> None:
    """One worker process of :func:`serve_workers`: a grpcio server on the shared port until SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and forwards SIGTERM
    retain_freed_memory()
    try:
        running = start_server(config, open_served_store(config.backend))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which exits 1 with it
        ready.put((index, 0, None, str(e)))
        return
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=running.stop, daemon=True).start())
    ready.put((index, os.getpid(), running.metrics_port, None))
    while not running.stopped.wait(0.5):
        pass


def serve_workers(config: ServeConfig, out: Any = sys.stdout) -> int:
    """``dv365 serve --workers N``: N processes, each one grpcio server (own backend client, own threads) on one
    port the kernel balances connections over (``SO_REUSEPORT``). The port must be free first: the same check
    as one server, so a different server on a port in use is refused. With ``--metrics-port P`` worker ``i``
    serves its ``/metrics`` on ``P + i``. SIGTERM/SIGINT: every worker drains (``grace``), then exit 0."""
    import multiprocessing as mp

    with open_served_store(config.backend) as probe:  # the backend holds a store: refuse before starting anything
        backend_url = probe.url  # without credentials
    problem = _bind_problem(config.host, config.port) if config.port else None
    if problem is not None:
        raise StoreError(f"dv365 serve: cannot listen on {config.host}:{config.port}: {problem}")
    ctx = mp.get_context("spawn")  # no grpc state crosses a fork
    ready = ctx.Queue()
    with _reserve_port(config.host, config.port) as port:
        procs = []
        for i in range(config.workers):
            mport = None if config.metrics_port is None else (config.metrics_port + i if config.metrics_port else 0)
            cfg = replace(config, port=port, shared_port=True, metrics_port=mport, workers=1)
            procs.append(ctx.Process(target=_worker, args=(cfg, i, ready), name=f"dv365-serve-{i}", daemon=True))
        for p in procs:
            p.start()
        started: dict[int, tuple[int, int | None]] = {}
        failure = None
        try:
            while len(started) < len(procs) and failure is None:
                index, pid, mport, failure = ready.get(timeout=120)
                started[index] = (pid, mport)
        except Exception as e:  # noqa: BLE001 - a worker died before reporting
            failure = f"a worker did not start: {type(e).__name__}: {e}"
        if failure is not None:
            _stop_workers(procs, 0)
            raise StoreError(f"dv365 serve: {failure}")
        cause: list[str] = []

        def on_signal(signum: int, frame: Any) -> None:
            cause.append(signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        pids = ", ".join(str(started[i][0]) for i in sorted(started))
        metrics = [started[i][1] for i in sorted(started) if started[i][1]]
        print(
            f"dv365 serve: listening on {config.host}:{port} ({'TLS' if config.tls_cert else 'plaintext'}, "
            f"{config.workers} worker processes, pids {pids}"
            f"{f', /metrics on ports {metrics}' if metrics else ''}), backend {backend_url}",
            file=out,
            flush=True,
        )
        t0 = time.time()
        while not cause and all(p.is_alive() for p in procs):
            time.sleep(0.2)
        codes = _stop_workers(procs, config.grace_s)
    print(
        f"dv365 serve: stopped on {cause[0] if cause else 'a worker exit'} after {time.time() - t0:.0f} s "
        f"({config.workers} workers, exit codes {codes})",
        file=out,
        flush=True,
    )
    return 0 if cause and all(c == 0 for c in codes) else 1


def _stop_workers(procs: list[Any], grace: float) -> list[int | None]:
    for p in procs:
        if p.is_alive():
            p.terminate()  # SIGTERM: the worker drains its calls in flight
    for p in procs:
        p.join(grace + 15)
        if p.is_alive():
            p.kill()
            p.join(5)
    return [p.exitcode for p in procs]
