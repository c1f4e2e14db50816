"""``dv365 bench store`` (load test) and ``dv365 bench store-kv`` (the embedded-KV choice: LMDB vs SQLite).

store: publishes a SIMULATED snapshot of ``--users`` users (default 1M; ``--quick``: 20K) into the embedded
LMDB store, a throwaway redis-server, a throwaway 3-master Redis Cluster and ``dv365 serve`` processes (gRPC over
that LMDB store, reader token, plaintext on 127.0.0.1, one with 1 worker process (``grpc``) and one with
``--workers 2`` (``grpc-2w``); the LMDB readers open it with ``?prefault=1``), then runs gets of
``--batch-users`` (default 1,000) random users with 1 and 16 concurrent client *processes* for each backend,
beside references: raw redis-py ``MGET`` of the same keys (``redis-mget``) and ``grpc-raw``, a bare grpcio
unary call answering the same number of bytes (the transport floor of gRPC; both ends use the service's
channel options, ``grpc_common.CHANNEL_OPTIONS``, and its server the serving processes' malloc settings,
``grpc_common.retain_freed_memory``, so the floor moves with them).
Single-user mode, ``--batch-users 1`` (the online path: gRPC ``GetUser``): the references are raw redis-py
``GET`` of the same 7.7 KB values on the Redis server (``redis-get``) and on the cluster
(``redis-cluster-get``, redis-py's cluster client), and ``grpc-raw`` returning one user's bytes.
Reported per backend and concurrency: p50/p99 latency (ms), gets/s, users/s and errors (exceptions, integrity
errors or missing users: must be 0), the 1-minute load average when the run started and the share of CPU time
the hypervisor stole during it (``steal_pct``, Linux). Each client first does untimed warm-up gets, and before
the first run the kernel writes back the snapshot (``os.sync``), so no background writeback overlaps the timed
gets. Environment knobs: ``DV365_BENCH_DIR`` (work dir, default a temp dir that is removed; a kept dir's
snapshot is reused by the next run with the same users, seed and row format), ``DV365_BENCH_SECONDS``
(measured seconds per run), ``DV365_BENCH_STORE_BACKENDS`` (comma list of embedded, redis, redis-cluster, grpc,
grpc-2w, redis-mget, redis-get, redis-cluster-get, grpc-raw), ``DV365_BENCH_CLIENTS`` (e.g. ``1,16``), ``DV365_BENCH_TRACE`` (a folder: each client writes its
per-get latencies there, in order, as JSON).
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dv365.core.quantize import RowFormat

TOKEN = "bench-reader-token-0123456789"
ALL_BACKENDS = (
    "embedded",
    "redis",
    "redis-cluster",
    "grpc",
    "grpc-2w",
    "redis-mget",
    "redis-get",
    "redis-cluster-get",
    "grpc-raw",
)
#: the default backends of a batch run, and of a single-user run (``--batch-users 1``: raw GET references)
BATCH_BACKENDS = ("embedded", "redis", "redis-cluster", "grpc", "grpc-2w", "redis-mget", "grpc-raw")
USER_BACKENDS = (
    "embedded",
    "redis",
    "redis-cluster",
    "grpc",
    "grpc-2w",  # dv365 serve --workers 2
    "redis-get",
    "redis-cluster-get",
    "grpc-raw",
)
CLUSTER_MASTERS = 3
RAW_METHOD = "/dv365.bench.Raw/Get"
WARMUP_GETS, WARMUP_S = 20, 0.5  # untimed gets of each client before the timed run


def _env_list(name: str, default: str) -> list[str]:
    return [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- client processes --------------------------------------------------------------------------------
def _make_get(kind: str, url: str) -> Callable[[np.ndarray], int]:
    """A function doing one batch get and returning its error count (exceptions are counted by the caller)."""
    if kind == "grpc-raw":  # the transport floor: a bare grpcio unary call answering as many bytes as a Get
        import grpc

        from dv365.store.grpc_common import CHANNEL_OPTIONS

        call = grpc.insecure_channel(url, CHANNEL_OPTIONS).unary_unary(RAW_METHOD)

        def raw(ids: np.ndarray) -> int:
            return int(len(call(ids.tobytes())) != len(ids) * (RowFormat().user_bytes + 9))

        return raw
    if kind == "redis-mget":
        import redis

        base, _, prefix = url.partition("#")
        r = redis.Redis.from_url(base)
        version = r.get(f"{prefix}:active").decode()
        pre = f"{prefix}:v:{version}:".encode()

        def mget(ids: np.ndarray) -> int:
            values = r.mget([pre + b"%d" % u for u in ids.tolist()])
            return sum(v is None for v in values)

        return mget
    from dv365.store.factory import open_store

    if kind in ("redis-get", "redis-cluster-get"):  # raw redis-py GET of the same keys (the store names them)
        store = open_store(url)
        client: Any = getattr(store, "rc", None) or store.r  # type: ignore[attr-defined]
        name = store.record_key  # type: ignore[attr-defined]
        version = store.versions()[-1].version

        def raw_get(ids: np.ndarray) -> int:
            return sum(client.get(name(version, u)) is None for u in ids.tolist())

        return raw_get
    store = open_store(url, **({"token": TOKEN} if kind.startswith("grpc") else {}))

    def get(ids: np.ndarray) -> int:
        res = store.get(ids)
        return len(res.errors) + int((~res.present).sum())

    return get


def _client(
    kind: str,
    url: str,
    users: int,
    batch: int,
    seconds: float,
    seed: int,
    start: Any,
    out: Any,
    trace: str | None = None,
) -> None:
    lat: list[float] = []
    errors = 0
    try:
        get = _make_get(kind, url)
        rng = np.random.default_rng(seed)
        # warm-up (connections, maps, caches): the first ~10 gets of a fresh reader at 1M users are 2-10x slower
        # than its steady state (docs/store.md, "Measured", E), so at least WARMUP_GETS gets and WARMUP_S seconds
        warm_until, n = time.perf_counter() + WARMUP_S, 0
        while n < WARMUP_GETS or time.perf_counter() < warm_until:
            get(rng.integers(0, users, batch))
            n += 1
        start.wait()
        deadline = time.perf_counter() + seconds
        while True:
            ids = rng.integers(0, users, batch)
            t0 = time.perf_counter()
            try:
                errors += get(ids)
            except Exception:  # noqa: BLE001 - counted, the run must report 0
                errors += 1
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            if t1 > deadline:
                break
    except Exception as e:  # noqa: BLE001
        out.put({"lat": lat, "errors": errors + 1, "failure": f"{type(e).__name__}: {e}"})
        return
    if trace:  # per-get latencies in order, to see when the slow ones happened
        with open(trace, "w") as f:
            json.dump({"kind": kind, "seed": seed, "lat_ms": [round(x * 1e3, 3) for x in lat]}, f)
    out.put({"lat": lat, "errors": errors})


def _load(kind: str, url: str, users: int, batch: int, clients: int, seconds: float, seed: int) -> dict[str, Any]:
    # forkserver: clients fork from a clean process (no gRPC/LMDB state inherited), with dv365 imported once
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["dv365.benchmarks.store", "dv365.store.factory", "numpy"])
    start, out = ctx.Barrier(clients + 1), ctx.Queue()
    # the trace folder is passed, not read from the environment: clients inherit the forkserver's environment,
    # which is the one of the first _load of this process
    trace = os.environ.get("DV365_BENCH_TRACE") or None
    if trace:
        os.makedirs(trace, exist_ok=True)
    procs = [
        ctx.Process(
            target=_client,
            args=(
                kind,
                url,
                users,
                batch,
                seconds,
                seed * 1000 + k,
                start,
                out,
                trace and os.path.join(trace, f"{kind}_c{clients}_client{k}.json"),
            ),
        )
        for k in range(clients)
    ]
    for p in procs:
        p.start()
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    try:
        start.wait(timeout=120)
    except Exception:  # noqa: BLE001 - a client died before the start
        pass
    cpu0 = _cpu_ticks()  # after the warm-up: the timed part only
    t0 = time.perf_counter()
    results = [out.get(timeout=seconds + 180) for _ in procs]
    wall = time.perf_counter() - t0
    cpu1 = _cpu_ticks()
    for p in procs:
        p.join(30)
    lat = np.array([x for r in results for x in r["lat"]]) * 1e3
    failures = [r["failure"] for r in results if "failure" in r]
    steal = None
    if cpu0 and cpu1 and sum(cpu1) > sum(cpu0):
        steal = round(100 * (cpu1[7] - cpu0[7]) / (sum(cpu1) - sum(cpu0)), 2)
    res = {
        "clients": clients,
        "load_1m": load,
        "steal_pct": steal,
        "requests": int(len(lat)),
        "errors": int(sum(r["errors"] for r in results)),
        "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
        "gets_per_s": round(len(lat) / wall, 1),
        "users_per_s": round(len(lat) * batch / wall),
    }
    if failures:
        res["failures"] = failures[:3]
    return res


# ---- set-up ------------------------------------------------------------------------------------------
def _start_redis(root: str) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server")
    port = _free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            root,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ],
        stdout=subprocess.DEVNULL,
    )
    _wait_redis(port)
    return proc, port


def _wait_redis(port: int) -> None:
    import redis

    r = redis.Redis(port=port)
    for _ in range(200):
        try:
            r.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    r.close()


def _start_redis_cluster(root: str) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """CLUSTER_MASTERS redis-server processes in cluster mode on 127.0.0.1 (no persistence), joined with
    ``redis-cli --cluster create``."""
    exe, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if exe is None or cli is None:
        raise FileNotFoundError("redis-server/redis-cli")
    ports: list[int] = []
    while len(ports) < CLUSTER_MASTERS:
        p = _free_port()
        if p <= 55535 and p not in ports:  # the cluster bus listens on port + 10000
            ports.append(p)
    procs = []
    for p in ports:
        d = os.path.join(root, f"cluster-{p}")
        os.makedirs(d, exist_ok=True)
        procs.append(
            subprocess.Popen(
                [exe, "--port", str(p), "--bind", "127.0.0.1", "--dir", d, "--save", "", "--appendonly", "no"]
                + ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
                stdout=subprocess.DEVNULL,
            )
        )
    for p in ports:
        _wait_redis(p)
    subprocess.run(
        [cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-yes"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    import redis

    for p in ports:
        r = redis.Redis(port=p)
        while b"cluster_state:ok" not in r.execute_command("CLUSTER", "INFO"):
            time.sleep(0.1)
        r.close()
    return procs, ports


def _start_grpc(backend: str, root: str, workers: int = 1) -> tuple[subprocess.Popen[str], int]:
    tok = os.path.join(root, "reader.tokens")
    with open(tok, "w") as f:
        f.write(TOKEN + "\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dv365.core.cli",
            "serve",
            "--backend",
            backend,
            "--port",
            "0",
            "--reader-token-file",
            tok,
            "--threads",
            "16",
            "--workers",
            str(workers),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"dv365 serve did not start: {line!r}")
    port = int(line.split("listening on ")[1].split(" ")[0].rsplit(":", 1)[1])
    return proc, port


def _raw_grpc_server() -> int:
    """``python -m dv365.benchmarks.store --raw-grpc-server``: answers RAW_METHOD with (user_bytes + 9) bytes per
    requested id (payload + checksum + present, as a Get would), from one pre-built buffer."""
    from concurrent import futures

    import grpc

    from dv365.store.grpc_common import CHANNEL_OPTIONS, retain_freed_memory

    retain_freed_memory()  # the allocator settings of a dv365 serve process, as its channel options
    per_user = RowFormat().user_bytes + 9
    blob = np.random.default_rng(0).integers(0, 256, 10_000 * per_user, dtype=np.uint8).tobytes()

    def get(request: bytes, context: Any) -> bytes:
        return blob[: len(request) // 8 * per_user]

    server = grpc.server(futures.ThreadPoolExecutor(16), options=CHANNEL_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(get)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("dv365.bench.Raw", {"Get": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"raw grpc listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dv365.store.factory import open_store
    from dv365.store.synthetic import write_synthetic_snapshot

    users = args.users or (20_000 if args.quick else 1_000_000)
    batch = args.batch_users or 1000
    seconds = float(os.environ.get("DV365_BENCH_SECONDS", 1.5 if args.quick else 6))
    default = USER_BACKENDS if batch == 1 else BATCH_BACKENDS
    backends = [b for b in _env_list("DV365_BENCH_STORE_BACKENDS", ",".join(default)) if b in ALL_BACKENDS]
    clients = [int(c) for c in _env_list("DV365_BENCH_CLIENTS", "1,16")]
    keep_dir = "DV365_BENCH_DIR" in os.environ
    root = os.environ.get("DV365_BENCH_DIR") or tempfile.mkdtemp(prefix="dv365-bench-store-")
    os.makedirs(root, exist_ok=True)
    fmt = RowFormat()
    result: dict[str, Any] = {
        "users": users,
        "batch_users": batch,
        "seconds_per_run": seconds,
        "mode": "single-user" if batch == 1 else "batch",
        "bytes_per_user": fmt.user_bytes,
        "snapshot_gb": round(users * fmt.user_bytes / 1e9, 2),
        "simulated": True,
    }
    procs: list[subprocess.Popen[Any]] = []
    try:
        snap = os.path.join(root, "snapshot")
        params = json.dumps({"users": users, "seed": args.seed, "user_bytes": fmt.user_bytes})
        marker = os.path.join(root, "snapshot.params")
        if keep_dir and os.path.exists(os.path.join(snap, "manifest.json")) and _read_text(marker) == params:
            result["snapshot_reused"] = snap  # written by an earlier run with the same parameters
            _say(f"reusing the snapshot in {snap} (same users, seed and row format)")
        else:
            if os.path.exists(marker):
                os.remove(marker)
            shutil.rmtree(snap, ignore_errors=True)  # no shard of another snapshot is left beside the new one
            _say(f"writing a SIMULATED snapshot of {users:,} users ({result['snapshot_gb']} GB) to {snap}")
            t = time.perf_counter()
            write_synthetic_snapshot(snap, "bench", np.arange(users), fmt=fmt, seed=args.seed)
            result["snapshot_write_s"] = round(time.perf_counter() - t, 1)
            _say(f"snapshot written in {result['snapshot_write_s']} s")
            with open(marker, "w") as f:
                f.write(params)
        shutil.rmtree(os.path.join(root, "lmdb"), ignore_errors=True)  # a kept dir's store from an earlier run
        lmdb_url = f"lmdb://{os.path.join(root, 'lmdb')}"
        runs: dict[str, dict[str, Any]] = {}

        def measure(kinds: list[str], urls: dict[str, str]) -> None:
            for c in clients:  # backend pairs that are compared run back to back, per concurrency
                for b in kinds:
                    if b in backends:
                        _say(f"{b}, {c} client(s): warm-up, then {seconds:g} s of gets of {batch:,} users")
                        r = runs[f"{b}_c{c}"] = _load(b, urls[b], users, batch, c, seconds, args.seed)
                        _say(
                            f"{b}, {c} client(s): p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, {r['gets_per_s']} "
                            f"gets/s, {r['errors']} errors (load {r['load_1m']}, steal {r['steal_pct']} %)"
                        )

        # phase 1: the embedded store, gRPC over it, and the bare-grpcio floor
        if {"embedded", "grpc", "grpc-raw"} & set(backends):
            # readers prefault their map (LmdbStore.prefault): a fresh client process would otherwise measure its
            # page-table warm-up (~300 faults per get at 1M users) instead of a long-running reader's steady state
            read_url = lmdb_url + "?prefault=1"
            urls: dict[str, str] = {"embedded": read_url}
            _say(f"publishing into {lmdb_url}")
            with open_store(lmdb_url) as s:
                t = time.perf_counter()
                s.publish(snap)
                result["publish_embedded_s"] = round(time.perf_counter() - t, 1)
            _say(f"published in {result['publish_embedded_s']} s; writing back dirty pages, warming the page cache")
            _settle()
            _drop_cache(snap)  # the map, not the snapshot files, should hold the page cache (clean pages only)
            store_dir = os.path.join(root, "lmdb")  # LMDB (versions) + the version's row file
            files = [os.path.join(store_dir, "data.mdb")] + sorted(glob.glob(os.path.join(store_dir, "rows", "*.rows")))
            result["store_files_gb"], result["store_warm_s"] = _warm(*files)
            result["mem_available_gb"] = _mem_available_gb()
            phase: list[subprocess.Popen[Any]] = []
            if {"grpc", "grpc-raw"} & set(backends):
                _say("starting the gRPC servers (dv365 serve over the store; the bare grpcio floor)")
            for kind, workers in (("grpc", 1), ("grpc-2w", 2)):
                if kind in backends:
                    gproc, gport = _start_grpc(read_url, root, workers)
                    phase.append(gproc)
                    urls[kind] = f"grpc://127.0.0.1:{gport}"
            if "grpc-raw" in backends:
                raw = subprocess.Popen(
                    [sys.executable, "-m", "dv365.benchmarks.store", "--raw-grpc-server"],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                phase.append(raw)
                line = raw.stdout.readline() if raw.stdout else ""
                urls["grpc-raw"] = line.strip().rsplit(" ", 1)[-1]
            procs.extend(phase)
            measure(["embedded", "grpc", "grpc-2w", "grpc-raw"], urls)
            _stop(phase)
        # phase 2: Redis (its own memory; the LMDB pages may be evicted meanwhile) and raw MGET/GET of the same
        # keys; phase 3: a Redis Cluster and raw cluster GETs. Each server is stopped after its phase (memory).
        for kinds, start in (
            (["redis", "redis-mget", "redis-get"], _start_redis),
            (["redis-cluster", "redis-cluster-get"], _start_redis_cluster),
        ):
            if not set(kinds) & set(backends):
                continue
            try:
                phase_procs, port = start(root)  # type: ignore[operator]
            except FileNotFoundError:
                result[f"{kinds[0]}_skipped"] = "redis-server/redis-cli not installed"
                continue
            phase = phase_procs if isinstance(phase_procs, list) else [phase_procs]
            procs.extend(phase)
            if kinds[0] == "redis":
                rurl = f"redis://127.0.0.1:{port}/0?prefix=bench"
            else:
                rurl = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in port) + "?prefix=bench"
            _say(f"publishing into {rurl} (throwaway servers)")
            with open_store(rurl + "&persist=none") as s:
                t = time.perf_counter()
                s.publish(snap)
                result[f"publish_{kinds[0]}_s"] = round(time.perf_counter() - t, 1)
            _say(f"published in {result[f'publish_{kinds[0]}_s']} s")
            _settle()
            _drop_cache(snap)
            urls = {k: rurl for k in kinds}
            urls["redis-mget"] = rurl.split("?")[0] + "#bench"
            measure(kinds, urls)
            _stop(phase)
        result["runs"] = runs
        result["total_errors"] = sum(r["errors"] for r in runs.values())
        result["targets"] = _targets(runs, clients, batch)
    finally:
        _stop(procs)
        if not keep_dir:
            shutil.rmtree(root, ignore_errors=True)
    return result


def _cpu_ticks() -> list[int] | None:
    """The machine's CPU time counters (``/proc/stat``: user, nice, system, idle, iowait, irq, softirq, steal;
    the guest fields after them are already counted in user/nice), or None off Linux or on an older kernel.
    ``steal`` is time the hypervisor ran something else while this VM wanted a CPU."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return ticks if len(ticks) == 8 else None


def _stop(procs: list[subprocess.Popen[Any]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pipe in (p.stdout, p.stderr):
            if pipe is not None:
                pipe.close()


def _drop_cache(folder: str) -> None:
    """Asks the kernel to drop the page cache of a folder's files (they were just written/read once)."""
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _say(msg: str) -> None:
    """One progress line on stderr (stdout's last line stays the JSON result)."""
    print(f"[bench store {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _settle() -> None:
    """Writes back every dirty page now (the snapshot just written, the published store), so that the kernel's
    background writeback of several GB does not overlap the timed gets."""
    if hasattr(os, "sync"):
        os.sync()


def _warm(*paths: str) -> tuple[float, float]:
    """Reads files once, sequentially, so a memory-mapped store starts from the page cache as in steady
    state; returns (total size GB, seconds)."""
    t = time.perf_counter()
    buf = bytearray(16 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return round(sum(os.path.getsize(p) for p in paths) / 1e9, 2), round(time.perf_counter() - t, 1)


def _mem_available_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return round(int(line.split()[1]) / 1e6, 1)
    except OSError:
        pass
    return None


def _targets(runs: dict[str, dict[str, Any]], clients: list[int], batch: int = 1000) -> dict[str, Any]:
    if batch == 1:
        return _user_targets(runs, clients)
    t: dict[str, Any] = {}
    emb, g = runs.get("embedded_c1"), runs.get("grpc_c1")
    if emb and emb["p99_ms"] is not None:
        t["embedded_p99_ms"] = emb["p99_ms"]
        t["embedded_p99_le_5ms"] = emb["p99_ms"] <= 5.0
        if g and g["p99_ms"] is not None:
            t["grpc_over_embedded_p99"] = round(g["p99_ms"] / emb["p99_ms"], 2)
            t["grpc_p99_le_2x_embedded"] = g["p99_ms"] <= 2 * emb["p99_ms"]
        raw = runs.get("grpc-raw_c1")
        if g and raw and raw["p99_ms"]:
            t["grpc_raw_floor_p50_ms"] = raw["p50_ms"]
            t["grpc_over_raw_grpcio_p50"] = round(g["p50_ms"] / raw["p50_ms"], 2)
            t["grpc_over_raw_grpcio_p99"] = round(g["p99_ms"] / raw["p99_ms"], 2)
            t["grpc_p50_le_1.3x_raw_grpcio"] = g["p50_ms"] <= 1.3 * raw["p50_ms"]
            t["grpc_p99_le_1.5x_raw_grpcio"] = g["p99_ms"] <= 1.5 * raw["p99_ms"]
    _workers_scaling(t, runs, clients)
    for c in clients:
        r, m = runs.get(f"redis_c{c}"), runs.get(f"redis-mget_c{c}")
        if r and m and m["gets_per_s"]:
            t[f"redis_over_mget_throughput_c{c}"] = round(r["gets_per_s"] / m["gets_per_s"], 2)
            t[f"redis_ge_50pct_mget_c{c}"] = r["gets_per_s"] >= 0.5 * m["gets_per_s"]
    return t


def _workers_scaling(t: dict[str, Any], runs: dict[str, dict[str, Any]], clients: list[int]) -> None:
    """users/s of ``dv365 serve --workers 2`` over one worker, per concurrency."""
    for c in clients:
        one, two = runs.get(f"grpc_c{c}"), runs.get(f"grpc-2w_c{c}")
        if one and two and one["users_per_s"]:
            t[f"grpc_2_workers_over_1_users_per_s_c{c}"] = round(two["users_per_s"] / one["users_per_s"], 2)


def _user_targets(runs: dict[str, dict[str, Any]], clients: list[int]) -> dict[str, Any]:
    """The single-user targets: embedded p99 <= 0.2 ms, gRPC p99 <= 1.5x the bare grpcio unary call, Redis and
    Redis Cluster >= 70 % of raw redis-py GET throughput (per concurrency)."""
    t: dict[str, Any] = {}
    emb = runs.get("embedded_c1")
    if emb and emb["p99_ms"] is not None:
        t["embedded_p99_ms"] = emb["p99_ms"]
        t["embedded_p99_le_0.2ms"] = emb["p99_ms"] <= 0.2
    _workers_scaling(t, runs, clients)
    for c in clients:
        g, raw = runs.get(f"grpc_c{c}"), runs.get(f"grpc-raw_c{c}")
        if g and raw and raw["p99_ms"]:
            t[f"grpc_over_raw_grpcio_p99_c{c}"] = round(g["p99_ms"] / raw["p99_ms"], 2)
            t[f"grpc_p99_le_1.5x_raw_grpcio_c{c}"] = g["p99_ms"] <= 1.5 * raw["p99_ms"]
        for store, ref in (("redis", "redis-get"), ("redis-cluster", "redis-cluster-get")):
            r, m = runs.get(f"{store}_c{c}"), runs.get(f"{ref}_c{c}")
            if r and m and m["gets_per_s"]:
                t[f"{store}_over_raw_get_throughput_c{c}"] = round(r["gets_per_s"] / m["gets_per_s"], 2)
                t[f"{store}_ge_70pct_raw_get_c{c}"] = r["gets_per_s"] >= 0.7 * m["gets_per_s"]
    return t


# ---- LMDB vs SQLite ------------------------------------------------------------------------------------
def run_kv_choice(args: argparse.Namespace) -> dict[str, Any]:
    """Same records, same checksum verification, one client: the embedded store's layouts. ``lmdb`` (one LMDB
    value per user, the ``records`` layout) vs ``sqlite`` (WAL, synchronous=FULL, mmap) for the per-user KV,
    and ``rows`` (the default: a memory-mapped row file per version, :mod:`dv365.store.backends.rowfile`)."""
    import lmdb

    from dv365.store.backends.lmdb_store import record_keys
    from dv365.store.backends.rowfile import RowFile, RowFileWriter
    from dv365.store.records import assemble, encode_records
    from dv365.store.synthetic import synthetic_payload

    users = args.users or (20_000 if args.quick else 100_000)
    batch = args.batch_users or 1000
    reps = 200 if args.quick else 1000
    fmt = RowFormat()
    rng = np.random.default_rng(args.seed)
    root = tempfile.mkdtemp(prefix="dv365-bench-kv-")
    out: dict[str, Any] = {"users": users, "batch_users": batch, "gets": reps}
    try:
        chunks = []
        for s in range(0, users, 10_000):
            ids = np.arange(s, min(users, s + 10_000), dtype=np.int64)
            chunks.append((ids, encode_records(ids, synthetic_payload(len(ids), fmt, rng))))
        # LMDB
        env = lmdb.open(os.path.join(root, "lmdb"), map_size=1 << 40, max_dbs=2, readahead=False)
        db = env.open_db(b"data")
        t = time.perf_counter()
        for ids, recs in chunks:
            with env.begin(write=True) as txn:
                txn.cursor(db=db).putmulti(zip(record_keys(1, ids), recs), append=True)
        lmdb_write = time.perf_counter() - t

        def lmdb_get(ids: np.ndarray) -> np.ndarray:
            with env.begin(buffers=True) as txn:
                g = txn.get
                return assemble((g(k, None, db) for k in record_keys(1, ids)), ids, fmt, "lmdb")[1]

        # SQLite
        con = sqlite3.connect(os.path.join(root, "emb.sqlite"), check_same_thread=False)
        con.executescript(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA mmap_size=68719476736;"
            "CREATE TABLE emb (uid INTEGER PRIMARY KEY, rec BLOB NOT NULL);"
        )
        t = time.perf_counter()
        for ids, recs in chunks:
            with con:
                con.executemany("INSERT INTO emb VALUES (?, ?)", zip(ids.tolist(), recs))
        sqlite_write = time.perf_counter() - t
        q = f"SELECT uid, rec FROM emb WHERE uid IN ({','.join('?' * batch)})"

        def sqlite_get(ids: np.ndarray) -> np.ndarray:
            found = dict(con.execute(q, ids.tolist()).fetchall())
            return assemble((found.get(u) for u in ids.tolist()), ids, fmt, "sqlite")[1]

        # row file
        t = time.perf_counter()
        writer = RowFileWriter(os.path.join(root, "v.rows"), users, fmt.user_bytes, "rows")
        for ids, recs in chunks:
            writer.append(ids, recs)
        writer.finish()
        rows_write = time.perf_counter() - t
        rf = RowFile(os.path.join(root, "v.rows"), users, fmt.user_bytes, "rows")

        def rows_get(ids: np.ndarray) -> np.ndarray:
            return rf.lookup(ids)[1]

        for name, fn, wr, path in (
            ("lmdb", lmdb_get, lmdb_write, "lmdb/data.mdb"),
            ("sqlite", sqlite_get, sqlite_write, "emb.sqlite"),
            ("rows", rows_get, rows_write, "v.rows"),
        ):
            for _ in range(20):
                fn(rng.integers(0, users, batch))
            lat = []
            for _ in range(reps):
                ids = rng.integers(0, users, batch)
                t0 = time.perf_counter()
                present = fn(ids)
                lat.append(time.perf_counter() - t0)
                assert present.all()
            a = np.array(lat) * 1e3
            out[name] = {
                "p50_ms": round(float(np.percentile(a, 50)), 3),
                "p99_ms": round(float(np.percentile(a, 99)), 3),
                "write_users_per_s": round(users / wr),
                "file_mb": round(os.path.getsize(os.path.join(root, path)) / 1e6, 1),
            }
        out["lmdb_over_sqlite_p50"] = round(out["lmdb"]["p50_ms"] / out["sqlite"]["p50_ms"], 2)
        out["rows_over_lmdb_p50"] = round(out["rows"]["p50_ms"] / out["lmdb"]["p50_ms"], 2)
        con.close()
        env.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--raw-grpc-server"]:
        raise SystemExit(_raw_grpc_server())
    raise SystemExit("usage: dv365 bench store [--json] (this module runs as a script only for --raw-grpc-server)")
