"""``dv365 demo`` with the whole stack installed: data -> train -> export -> publish -> serve -> fetch.

:mod:`dv365.examples.cli` calls :func:`run` when dv365-export (and dv365-store) are installed. It runs the
recurring pipeline (:mod:`dv365.export.pipeline`) on the shipped MovieLens ratings (REAL users; two cycles:
the second appends newer ratings, warm-starts and re-exports only active users) and on a small generated
long-history set (SIMULATED), publishes both into embedded LMDB stores, starts ``dv365 serve`` on 127.0.0.1,
fetches a few users' embeddings through the gRPC client, and writes ``<out>/REPORT.md``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

MOVIELENS_SPLIT = "2017-01-01"  # cycle 1 of the MovieLens pipeline sees ratings up to here, cycle 2 the rest


def _say(msg: str) -> None:
    print(msg, flush=True)


def _train_configs(out: Path) -> tuple[Path, Path]:
    """The quick training configs shipped with dv365-train, sized for a few minutes on 2 CPU cores."""
    from dv365.train.config import config_path

    ml = yaml.safe_load(config_path("movielens-quick").read_text())
    ml["run"].update({"log_every": 50, "progress": True})
    ml["checkpoint"].update({"every": 100})
    sy = yaml.safe_load(config_path("synth-quick").read_text())
    sy["run"].update({"batch_size": 64, "log_every": 25, "progress": True})
    sy["checkpoint"].update({"every": 50})
    paths = out / "configs" / "train-movielens.yaml", out / "configs" / "train-synth.yaml"
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for p, d in zip(paths, (ml, sy)):
        p.write_text(yaml.safe_dump(d, sort_keys=False))
    return paths


def _pipeline_config(out: Path, name: str, source: Path, train: Path, steps: int) -> Path:
    work = out / "pipeline" / name
    cfg = {
        "name": name,
        "workdir": str(work),
        "source": str(source),
        "train": {"config": str(train), "steps": steps},
        "export": {"refresh": "active", "shard_users": 1024, "batch_users": 128},
        "store": {"url": f"lmdb://{work / 'store'}", "keep": 3},
        "retain": {"models": 2, "snapshots": 2},
    }
    path = out / "configs" / f"pipeline-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _data(out: Path, movielens: Path, synth_users: int, synth_events: int) -> tuple[Path, Path]:
    from dv365.core.cli import main as dv365
    from dv365.core.errors import Dv365Error
    from dv365.core.timeline import TimelineDataset

    ml, sy = out / "data" / "movielens", out / "data" / "synth"
    for path, argv, what in (
        (
            ml,
            ["import", "movielens", str(movielens), "--out", str(ml), "--overwrite"],
            "import the shipped MovieLens ml-latest-small ratings (REAL users)",
        ),
        (
            sy,
            [
                "synth",
                "--out",
                str(sy),
                "--users",
                str(synth_users),
                "--mean-events",
                str(synth_events),
                "--requests-per-user",
                "30",
            ],
            f"generate a SIMULATED long-history set ({synth_users} users x ~{synth_events:,} events)",
        ),
    ):
        try:
            TimelineDataset(str(path))
            _say(f"   {path}: already there (delete it to {what.split(' ')[0]} again)")
            continue
        except Dv365Error:
            pass
        _say(f"   {what}: dv365 {' '.join(argv)}")
        if dv365(argv):
            raise SystemExit(f"dv365 demo: `dv365 {' '.join(argv)}` failed")
    return ml, sy


def _serve_and_fetch(store_url: str, users: list[int], out: Path) -> dict[str, Any]:
    """Starts ``dv365 serve`` on 127.0.0.1 (a free port, a reader token) and fetches ``users`` through the client."""
    from dv365.store import open_store

    token = secrets.token_hex(16)
    tok = out / "configs" / "reader.token"
    tok.write_text(token + "\n")
    tok.chmod(0o600)
    cmd = [
        sys.executable,
        "-m",
        "dv365.core.cli",
        "serve",
        "--backend",
        store_url,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--reader-token-file",
        str(tok),
        "--grace",
        "2",
    ]
    _say(f"   starting: dv365 serve --backend {store_url} --host 127.0.0.1 --port 0 --reader-token-file {tok}")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        assert proc.stdout is not None
        line = ""
        deadline = time.monotonic() + 120
        while "listening on" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dv365 demo: the gRPC server did not start: {line.strip()}")
        _say(f"   {line.strip()}")
        port = int(line.split("listening on 127.0.0.1:")[1].split(" ")[0])
        client = open_store(f"grpc://127.0.0.1:{port}", token=token)
        try:
            t = time.perf_counter()
            raw = client.get(users)
            ms = (time.perf_counter() - t) * 1e3
            flt = client.get_float(users)
        finally:
            client.close()
        fetched = {
            "port": port,
            "users": users,
            "present": raw.present.tolist(),
            "snapshot_id": raw.snapshot_id,
            "age_h": round(raw.age_s / 3600, 1),
            "payload_shape": list(raw.payload.shape),
            "float_shape": list(flt.embeddings.shape),
            "get_ms": round(ms, 1),
            "first_values": {
                u: [round(float(v), 4) for v in flt.embeddings[i, 0, :4]] for i, u in enumerate(users) if raw.present[i]
            },
        }
        _say(
            f"   client.get({users}) over gRPC in {ms:.1f} ms: version {raw.snapshot_id}, "
            f"present {raw.present.tolist()}, int4 payload {tuple(raw.payload.shape)} uint8 "
            f"({raw.payload.shape[2]} B per row: {flt.embeddings.shape[2] // 2} B of 4-bit codes + fp16 scale + "
            "fp16 bias; the paper's 58 x 256 tower gives 132 B rows, 7,656 B per user)"
        )
        _say(
            f"   client.get_float(...) de-quantized: {tuple(flt.embeddings.shape)} float32; user {users[0]} token 0 "
            f"starts {fetched['first_values'].get(users[0])}; missing users get zeros + present=False"
        )
        return fetched
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(
    out: str = "out/demo",
    movielens: str | None = None,
    synth_users: int = 60,
    synth_events: int = 3000,
    ml_steps: int = 150,
    synth_steps: int = 60,
) -> int:
    from dv365.core.catalog import default_data_dir
    from dv365.core.logs import log_to
    from dv365.export.pipeline import Pipeline, PipelineConfig, parse_time, status

    log_to(sys.stdout)  # the pipeline's step lines go with the demo's own

    t0 = time.perf_counter()
    root = Path(out).resolve()  # the pipeline configs it writes hold absolute paths
    root.mkdir(parents=True, exist_ok=True)
    src = Path(movielens) if movielens else default_data_dir() / "movielens-latest-small"
    durations: dict[str, float] = {}

    _say("== 1/4 data")
    t = time.perf_counter()
    ml_data, synth_data = _data(root, src, synth_users, synth_events)
    durations["data"] = time.perf_counter() - t
    ml_train, synth_train = _train_configs(root)
    records: dict[str, list[dict[str, Any]]] = {}

    _say(
        f"\n== 2/4 pipeline on MovieLens (REAL): cycle 1 up to {MOVIELENS_SPLIT}, cycle 2 appends the rest "
        "(warm start, only active users re-exported)"
    )
    t = time.perf_counter()
    ml_cfg = PipelineConfig.load(_pipeline_config(root, "movielens", ml_data, ml_train, ml_steps))
    p = Pipeline(ml_cfg)
    records["movielens"] = []
    for as_of in (parse_time(MOVIELENS_SPLIT), None):
        rec = p.run_cycle(as_of)
        if rec is None:  # an earlier demo already ran this cycle
            rec = p.records()[-1] if p.records() else None
        if rec:
            records["movielens"].append(rec)
            _say(
                f"   -> cycle {rec['cycle']}: {rec['published_version']} published, "
                f"{rec['figures']['users']} users ({rec['figures']['export_counts']})\n"
            )
    durations["pipeline_movielens"] = time.perf_counter() - t

    _say("\n== 3/4 pipeline on the generated long-history set (SIMULATED): one cycle")
    t = time.perf_counter()
    sy_cfg = PipelineConfig.load(_pipeline_config(root, "synth", synth_data, synth_train, synth_steps))
    ps = Pipeline(sy_cfg)
    rec = ps.run_cycle(None) or (ps.records()[-1] if ps.records() else None)
    records["synth"] = [rec] if rec else []
    durations["pipeline_synth"] = time.perf_counter() - t

    _say("\n== 4/4 serve: gRPC server on 127.0.0.1 in front of the MovieLens store; fetch users through the client")
    t = time.perf_counter()
    assert ml_cfg.store_url is not None
    fetched = _serve_and_fetch(ml_cfg.store_url, [1, 42, 610, 999_999], root)
    durations["serve_and_fetch"] = time.perf_counter() - t
    durations["total"] = time.perf_counter() - t0

    report = root / "REPORT.md"
    report.write_text(_report(records, {"movielens": status(ml_cfg), "synth": status(sy_cfg)}, fetched, durations))
    _say(f"\ndemo done in {durations['total']:.0f} s. What happened:")
    for name, recs in records.items():
        for r in recs:
            f = r["figures"]
            _say(
                f"  {name:9} cycle {r['cycle']} (as of {r['as_of_utc']}): trained {r['model']} "
                f"(eval mean NE {_fmt(f.get('eval_mean_ne'))}), exported {f['users']} users at {f['bytes_per_user']} B "
                f"each ({f['export_counts']}), published {r['published_version']}"
            )
    _say(
        f"  served over gRPC on 127.0.0.1:{fetched['port']} and fetched users {fetched['users']} "
        f"(present {fetched['present']})"
    )
    _say(f"Report: {report}   Status: dv365 status --config {root / 'configs' / 'pipeline-movielens.yaml'}")
    _say(
        f"Next: dv365 pipeline run --config {root / 'configs' / 'pipeline-movielens.yaml'} (nothing new until the "
        "source grows); docs/pipeline.md"
    )
    print(
        json.dumps(
            {
                "demo": "ok",
                "seconds": round(durations["total"], 1),
                "report": str(report),
                "versions": {k: [r["published_version"] for r in v] for k, v in records.items()},
            }
        )
    )
    return 0


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else str(x)


def _report(
    records: dict[str, list[dict[str, Any]]],
    statuses: dict[str, dict[str, Any]],
    fetched: dict[str, Any],
    durations: dict[str, float],
) -> str:
    lines = [
        "# dv365 demo report",
        "",
        f"Generated by `dv365 demo` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')} ({os.cpu_count()} CPUs). "
        "MovieLens = real ratings (ml-latest-small); synth = SIMULATED long histories (docs/synth.md). "
        "The models are quick, small configurations: the figures show the system working, not model quality "
        "(see `dv365 eval` for that).",
        "",
        "## Cycles",
        "",
        "| pipeline | cycle | as of | new rows | eval mean NE | users | encoded / carried / new | B/user | published | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, recs in records.items():
        for r in recs:
            f = r["figures"]
            c = f.get("export_counts") or {}
            rows = sum((f.get("new_rows") or {}).values())
            secs = sum(v for v in r["durations_s"].values() if v)
            lines.append(
                f"| {name} | {r['cycle']} | {r['as_of_utc']} | {rows:,} | {_fmt(f.get('eval_mean_ne'))} | "
                f"{f['users']} | {c.get('users_encoded')} / {c.get('users_carried')} / {c.get('users_new')} | "
                f"{f['bytes_per_user']} | {r['published_version']} | {secs:.0f} |"
            )
    lines += ["", "## Store versions", ""]
    for name, st in statuses.items():
        vs = st.get("versions")
        if isinstance(vs, list):
            for v in vs:
                lines.append(
                    f"- {name}: `{v['version']}` {'(active) ' if v['active'] else ''}{v['user_count']} users, "
                    f"data age {v['age_h']} h, model `{v['model_version']}`{' SIMULATED' if v['simulated'] else ''}"
                )
    lines += [
        "",
        "## Served over gRPC",
        "",
        f"`dv365 serve` on 127.0.0.1:{fetched['port']}; `client.get({fetched['users']})` -> present "
        f"{fetched['present']}, version `{fetched['snapshot_id']}`, int4 payload {fetched['payload_shape']}, "
        f"de-quantized {fetched['float_shape']}, {fetched['get_ms']} ms.",
        "",
        "## Durations (s)",
        "",
        "| step | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in durations.items()]
    return "\n".join(lines) + "\n"
