"""The commands of dv365-export (registered through ``dv365.commands``): ``dv365 export run | merge | verify |
compare`` (snapshots, :mod:`dv365.export.job`), ``dv365 pipeline run | schedule`` and ``dv365 status`` (the
recurring job, :mod:`dv365.export.pipeline`)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from datetime import datetime, timezone
from typing import Any

DESCRIPTION = """\
Export every user's DV365 embedding (the trained user tower's N_out x D outputs, 4-bit row-wise quantized
with fbgemm: 58 x 256 -> 7,656 B per user) into a versioned snapshot folder that `dv365 store publish` loads.

  run      export a snapshot (resumable; incremental with --previous; one hash range per worker)
  merge    write the manifest of a sharded export once all workers are done (workers also do it themselves)
  verify   check a snapshot: manifest, every shard's sha256, every user's crc32
  compare  cosine similarity of the users' embeddings between two snapshots (stability, paper Fig. 4)

Examples:
  dv365 export run --checkpoint out/train/synth-fsa --out out/export/synth-v1
  dv365 export run --checkpoint out/train/synth-fsa --out out/export/synth-v2 \\
      --as-of 2025-01-08 --previous out/export/synth-v1            # re-encode active users only
  dv365 export run ... --num-workers 2 --worker-rank 0 &  dv365 export run ... --num-workers 2 --worker-rank 1
  dv365 export verify out/export/synth-v1
  dv365 export compare out/export/synth-v1 out/export/synth-v2 --out out/export/compare-v1-v2
See docs/export.md."""

RUN_DESCRIPTION = """\
Load a training checkpoint's user tower, read the users' timelines from a UniTi dataset, cut them at the
snapshot time minus the slice spec's 24 h gap (exactly as training sliced them), run the tower in batches
(CUDA when present), quantize with fbgemm and write shards, then the manifest (last: until then no reader
sees the snapshot).

Killed at any point, the same command resumes and produces the same bytes as an uninterrupted run. With
--previous, users without new activity since the previous snapshot are carried forward byte for byte.
With --num-workers N --worker-rank R (or torchrun's RANK / WORLD_SIZE), each worker exports one hash
range of users into the same folder; the last one to finish writes the manifest.

Examples:
  dv365 export run --checkpoint out/train/ml-fsa --out out/export/ml-v1
  dv365 export run --checkpoint out/train/synth-fsa --data out/data/synth-200 --as-of 2024-12-25T00:00:00Z \\
      --out out/export/synth-1225 --shard-users 64 --bits 8
  dv365 export run --checkpoint out/train/synth-fsa --out out/export/synth-0101 \\
      --previous out/export/synth-1225 --refresh activity --min-new-events 20"""


def parse_time(value: str) -> int:
    """Unix seconds from ``1735689600``, ``2025-01-01``, ``2025-01-01T06:00`` or ``...Z`` (UTC unless an offset)."""
    v = value.strip()
    if v.lstrip("-").isdigit():
        return int(v)
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not unix seconds or an ISO date/time (2025-01-01T06:00Z)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export",
        help="export every user's embedding into a versioned int4 snapshot",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    ex = p.add_subparsers(dest="export_command", metavar="<subcommand>")

    r = ex.add_parser(
        "run",
        help="export a snapshot (resumable, incremental, sharded)",
        description=RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--checkpoint", required=True, help="training checkpoint: a step_*.pt file or its folder (latest)")
    r.add_argument("--out", required=True, help="snapshot folder (local path or fsspec URL); one snapshot per folder")
    r.add_argument("--data", help="UniTi dataset to read timelines from (default: the checkpoint's data.url)")
    r.add_argument(
        "--as-of",
        type=parse_time,
        metavar="TIME",
        help="snapshot time = data cut-off (unix s or ISO, UTC); timelines are cut 24 h (the spec's gap) "
        "before it. Default: the dataset's newest event",
    )
    r.add_argument("--snapshot-id", help="snapshot name (default <as-of UTC>-<model sha256 prefix>)")
    r.add_argument(
        "--bits", type=int, choices=(4, 8), default=4, help="bits per value (default 4: 132 B per 256-dim row)"
    )
    r.add_argument(
        "--quantizer",
        choices=("fbgemm", "torch"),
        default="fbgemm",
        help="fbgemm's FloatToFusedNBitRowwiseQuantizedSBHalf (default) or core's pure-PyTorch quantizer (same format)",
    )
    r.add_argument("--shard-users", type=int, default=1024, help="users per shard, the unit of resume (default 1024)")
    r.add_argument("--batch-users", type=int, default=64, help="users per tower call (default 64)")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    r.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads of the tower (default 0: the cores left after --loader-workers, at least 1)",
    )
    r.add_argument(
        "--slicer",
        choices=("auto", "numba", "numpy"),
        default="auto",
        help="slicer backend (default auto: numba when installed; every backend gives the same bytes)",
    )
    r.add_argument(
        "--loader-workers",
        type=int,
        default=None,
        help="processes that read and slice users ahead of the tower (default: half the cores, 1 on 2 cores, "
        "0 = inline on 1 core); each holds one tower batch of users at a time",
    )
    inc = r.add_argument_group("incremental refresh")
    inc.add_argument("--previous", metavar="SNAPSHOT", help="a complete earlier snapshot of the same model to refresh")
    inc.add_argument(
        "--refresh",
        choices=("active", "activity", "all"),
        default="active",
        help="with --previous: re-encode users with any new event (active, default), with at least "
        "--min-new-events new events (activity), or everyone (all); the others keep their bytes",
    )
    inc.add_argument("--min-new-events", type=int, default=10, help="threshold of --refresh activity (default 10)")
    sh = r.add_argument_group("sharded export")
    sh.add_argument(
        "--num-workers", type=int, default=1, help="workers sharing this export (default 1, or torchrun's WORLD_SIZE)"
    )
    sh.add_argument("--worker-rank", type=int, default=0, help="this worker, 0..N-1 (default 0, or torchrun's RANK)")
    sh.add_argument("--no-merge", action="store_true", help="do not write the manifest, even when all shards are done")
    r.add_argument("--overwrite", action="store_true", help="replace a different snapshot / unfinished export in --out")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    r.set_defaults(func=_run)

    m = ex.add_parser(
        "merge",
        help="write the manifest of a sharded export whose workers are all done",
        description="Checks every planned shard against its done record (sha256) and writes "
        "manifest.json, making the snapshot visible.\n\nExample:\n  dv365 export merge out/export/synth-v1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("snapshot", help="snapshot folder of the export")
    m.set_defaults(func=_merge)

    v = ex.add_parser(
        "verify",
        help="check a snapshot's manifest, shard sha256s and user crc32s",
        description="Validates manifest.json and every shard (sha256, crc32 of every user, ids, "
        "sizes). Exit code 1 with the shard and user named when anything is wrong.\n\n"
        "Example:\n  dv365 export verify out/export/synth-v1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("snapshot", help="snapshot folder (local path or fsspec URL)")
    v.add_argument("--json", action="store_true", help="print the manifest facts as one JSON line")
    v.set_defaults(func=_verify)

    c = ex.add_parser(
        "compare",
        help="embedding stability between two snapshots (cosine per common user)",
        description="Cosine similarity of the de-quantized, flattened N_out x D embeddings of every "
        "user present in both snapshots (paper App. B / Fig. 4: > 0.9 at 7 days apart). "
        "Writes compare.json, compare.md and cosine_hist.png.\n\nExample:\n"
        "  dv365 export compare out/export/synth-v1 out/export/synth-v2 --out out/export/cmp",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("a", help="the older snapshot")
    c.add_argument("b", help="the newer snapshot")
    c.add_argument("--out", help="report folder (default: ./export-compare-<A id>-<B id>)")
    c.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    c.set_defaults(func=_compare)


def _run(args: argparse.Namespace) -> int:
    from dv365.core.logs import log_to
    from dv365.export.job import ExportConfig, iso, run_export

    cfg = ExportConfig(
        checkpoint=args.checkpoint,
        out=args.out,
        data=args.data,
        as_of=args.as_of,
        snapshot_id=args.snapshot_id,
        bits=args.bits,
        quantizer=args.quantizer,
        shard_users=args.shard_users,
        batch_users=args.batch_users,
        device=args.device,
        previous=args.previous,
        refresh=args.refresh,
        min_new_events=args.min_new_events,
        num_workers=args.num_workers,
        worker_rank=args.worker_rank,
        merge=not args.no_merge,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        threads=args.threads,
        slicer=args.slicer,
        loader_workers=args.loader_workers,
    )
    log_to(sys.stderr)
    res = run_export(cfg)
    m = res.manifest
    if res.already_complete and m is not None:
        line = f"export: snapshot {m.snapshot_id!r} is already complete in {args.out} ({m.user_count:,} users); nothing to do"
    else:
        part = (
            f"wrote {res.shards_written} shards ({res.users_written:,} users, {res.users_encoded:,} encoded) in "
            f"{res.seconds:.1f} s = {res.users_per_s:,.1f} users/s"
        )
        if res.shards_resumed:
            part += f", {res.shards_resumed} shards were already done"
        if m is None:
            line = (
                f"export: {res.snapshot_id} worker {cfg.worker_rank}/{cfg.num_workers}: {part}; other shards are "
                "not done yet (the last worker, or `dv365 export merge`, writes the manifest)"
            )
        else:
            c = res.counts
            sim = " (SIMULATED data)" if m.simulated else ""
            line = (
                f"export: snapshot {m.snapshot_id!r}{sim} complete: {m.user_count:,} users "
                f"({c.get('users_encoded', 0):,} encoded, {c.get('users_carried', 0):,} carried) in "
                f"{len(m.shards)} shards, {m.row_format.user_bytes:,} B/user, cut-off {iso(m.data_cutoff_ts)}; "
                f"{part} -> {args.out}"
            )
    print(line)
    if args.json:
        print(json.dumps(_result_json(res)))
    return 0


def _result_json(res: Any) -> dict[str, Any]:
    m = res.manifest
    return {
        "out": res.out,
        "snapshot_id": res.snapshot_id,
        "complete": m is not None,
        "already_complete": res.already_complete,
        "users": m.user_count if m else None,
        "shards_written": res.shards_written,
        "shards_resumed": res.shards_resumed,
        "users_written": res.users_written,
        "users_encoded": res.users_encoded,
        "seconds": round(res.seconds, 3),
        "users_per_s": round(res.users_per_s, 2),
        **res.counts,
    }


def _merge(args: argparse.Namespace) -> int:
    from dv365.export.job import merge_snapshot

    m = merge_snapshot(args.snapshot)
    assert m is not None
    print(
        f"export merge: snapshot {m.snapshot_id!r} complete: {m.user_count:,} users in {len(m.shards)} shards "
        f"-> {args.snapshot}"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dv365.export.verify import verify_snapshot

    rep = verify_snapshot(args.snapshot)
    print(rep.summary())
    if args.json:
        print(rep.manifest.to_json().replace("\n", " "))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from dv365.export.compare import compare_snapshots, summary_lines, write_report

    c = compare_snapshots(args.a, args.b)
    out = args.out or f"export-compare-{c.summary['a']['snapshot_id']}-{c.summary['b']['snapshot_id']}"
    paths = write_report(c, out)
    for line in summary_lines(c)[1:]:
        print(line)
    s = c.summary
    tail = f", {s['frac_gt_0.9']:.1%} of users above 0.9" if s["common_users"] else ""
    print(f"export compare: {summary_lines(c)[0]}{tail}; report: {paths['markdown']}, {paths['png']}")
    if args.json:
        print(json.dumps(s))
    return 0


# ------------------------------------------------------------------------------------------------------
# dv365 pipeline run|schedule, dv365 status (dv365.export.pipeline)
# ------------------------------------------------------------------------------------------------------
PIPELINE_HELP = """\
The recurring DV365 job (paper §2.5.2): one cycle = ingest the source's new rows -> train (warm start from the
last model) -> export (incremental: only users with new activity are re-encoded) -> publish to the store
(keeping its last K versions) -> retain (old local model / snapshot folders removed) -> run record.

Every step is idempotent and resumable: a cycle killed at any step and started again skips finished steps,
resumes the interrupted one, and publishes the same version an uninterrupted cycle would. A lock file in the
workdir keeps two cycles of one pipeline from overlapping.

examples:
  dv365 pipeline run --config examples/configs/pipeline-movielens.yaml --as-of 2018-06-01
  dv365 pipeline run --config examples/configs/pipeline-movielens.yaml     # up to the newest data
  dv365 pipeline schedule --config examples/configs/pipeline-movielens.yaml --every 6h
  dv365 status --config examples/configs/pipeline-movielens.yaml

Orchestrators (cron, systemd timers, Airflow-style schedulers) call `dv365 pipeline run --config F` once per
period: it is a single cycle, exits 0 when done or when there is nothing new, 1 with a message on an error,
and refuses to start while another cycle holds the lock. docs/pipeline.md has the details."""


def register_pipeline(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "pipeline",
        help="the recurring job: ingest -> train -> export -> publish, one cycle or scheduled",
        description=PIPELINE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ps = p.add_subparsers(dest="pipeline_command", metavar="<run|schedule|check|abort>")
    r = ps.add_parser(
        "run",
        help="run (or finish) one cycle",
        description=PIPELINE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _pipeline_common(r)
    r.add_argument(
        "--as-of",
        help="the cycle's data cut-off: unix seconds or an ISO date (default: the newest "
        "event of the source); an unfinished cycle is always finished first",
    )
    r.set_defaults(func=_pipeline_run)
    s = ps.add_parser(
        "schedule",
        help="run a cycle every period (a long-running loop)",
        description="Runs `pipeline run` now and then every --every (e.g. 30m, 6h, 1d) until stopped "
        "(SIGTERM / Ctrl-C stop it between cycles; a running cycle is finished first). "
        "Each cycle takes the source up to its newest event.",
    )
    _pipeline_common(s)
    s.add_argument("--every", required=True, help="period: a number with s, m, h or d (e.g. 6h)")
    s.add_argument("--max-cycles", type=int, default=0, help="stop after this many cycles (0: never)")
    s.set_defaults(func=_pipeline_schedule)
    k = ps.add_parser(
        "check",
        help="validate a pipeline config without running anything",
        description="Checks what can be checked without running a cycle (run and schedule do the same first): "
        "the config's keys and numbers, that the workdir is a folder or can be created, that the source is a "
        "readable UniTi dataset, that the train config loads with train.set, that the store URL names an "
        "installed backend. Exits 0 when all is well, 1 with every problem listed.",
    )
    k.add_argument("--config", required=True, help="the pipeline config (YAML, see docs/pipeline.md)")
    k.set_defaults(func=_pipeline_check)
    a = ps.add_parser(
        "abort",
        help="abandon the unfinished cycle so that the next run starts a fresh one",
        description="Abandons the pipeline's unfinished cycle (e.g. one that keeps failing, or whose --as-of was "
        "wrong): under the lock, removes what it made (its rows in the pipeline's dataset, its model and "
        "snapshot folders, a half-published store version) and marks its folder abandoned.json; the next "
        "`pipeline run` starts a new cycle with a new number. A cycle that has published is not abandoned.",
    )
    a.add_argument("--config", required=True, help="the pipeline config (YAML, see docs/pipeline.md)")
    a.set_defaults(func=_pipeline_abort)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def register_status(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "status",
        help="published versions, their age and users, and the last cycle's figures",
        description="Shows a pipeline's store versions (age = now - data cut-off, users covered, "
        "which is active), its cycles (complete or where an unfinished one stopped) "
        "and the last complete cycle's run record.",
    )
    p.add_argument("--config", required=True, help="the pipeline config (YAML)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_status)


def _pipeline_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the pipeline config (YAML, see docs/pipeline.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the run record as one JSON line last")


def parse_period(text: str) -> float:
    from dv365.export.pipeline import PipelineError

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise PipelineError(f"--every {text!r}: use a positive number with s, m, h or d, e.g. 6h")
    return value


def _print_record(record: dict[str, Any] | None, as_json: bool) -> None:
    if record is None:
        if as_json:
            print(json.dumps({"cycle": None, "note": "nothing new"}))
        return
    f = record["figures"]
    print(
        f"cycle {record['cycle']} of {record['pipeline']} complete (as of {record['as_of_utc']}): "
        f"snapshot {record['snapshot_id']} ({f.get('users')} users, {f.get('bytes_per_user')} B/user, "
        f"{f.get('export_counts')}), published {record.get('published_version')} to {record.get('store')}; "
        f"eval mean NE {f.get('eval_mean_ne')}; step seconds {record['durations_s']}"
    )
    if as_json:
        print(json.dumps(record, sort_keys=True, default=str))


def _pipeline_run(args: argparse.Namespace) -> int:
    from dv365.core.logs import log_to
    from dv365.export.pipeline import Pipeline, PipelineConfig, parse_time

    log_to(sys.stdout)
    p = Pipeline(PipelineConfig.load(args.config), progress=not args.no_progress)
    _print_record(p.run_cycle(parse_time(args.as_of)), args.json)
    return 0


def _pipeline_check(args: argparse.Namespace) -> int:
    from dv365.export.pipeline import Pipeline, PipelineConfig

    p = Pipeline(PipelineConfig.load(args.config), progress=False)
    problems = p.check()
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"dv365 pipeline check: {len(problems)} problem(s) in {args.config}", file=sys.stderr)
        return 1
    print(f"dv365 pipeline check: {args.config} ok (workdir, source, train config, store)")
    return 0


def _pipeline_abort(args: argparse.Namespace) -> int:
    from dv365.export.pipeline import Pipeline, PipelineConfig

    info = Pipeline(PipelineConfig.load(args.config), progress=False).abort()
    print(
        f"dv365 pipeline abort: cycle {info['cycle']} abandoned (steps done: {', '.join(info['steps_done']) or 'none'}); "
        f"removed: {', '.join(info['removed']) or 'nothing'}"
    )
    return 0


def _pipeline_schedule(args: argparse.Namespace) -> int:
    from dv365.core.logs import log_to
    from dv365.core.process import exit_without_teardown
    from dv365.export.pipeline import Pipeline, PipelineConfig, PipelineError

    log_to(sys.stdout)
    period = parse_period(args.every)
    p = Pipeline(PipelineConfig.load(args.config), progress=not args.no_progress)
    p.check_or_raise()  # a broken config fails at once, not at every tick
    stop = {"now": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["now"] = True
        print(f"dv365 pipeline schedule: signal {signum}: stopping after the current cycle", file=sys.stderr)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    cycles = 0
    next_at = time.time()
    while not stop["now"]:
        print(f"dv365 pipeline schedule: cycle at {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        try:
            _print_record(p.run_cycle(None), args.json)
        except PipelineError as e:  # e.g. another cycle holds the lock: skip this tick, keep the schedule
            print(f"dv365 pipeline schedule: skipped: {e}", file=sys.stderr, flush=True)
        cycles += 1
        if args.max_cycles and cycles >= args.max_cycles:
            break
        next_at += period
        while not stop["now"] and time.time() < next_at:
            time.sleep(min(1.0, max(0.0, next_at - time.time())))
    # under load, tearing down the native thread pools loaded over the cycles has aborted the finished
    # scheduler (exit -6), which a supervisor reads as a crash
    exit_without_teardown(0)


def _status(args: argparse.Namespace) -> int:
    from dv365.export.pipeline import PipelineConfig, status

    st = status(PipelineConfig.load(args.config))
    if args.json:
        print(json.dumps(st, sort_keys=True, default=str))
        return 0
    print(f"pipeline {st['pipeline']} (workdir {st['workdir']}), store {st['store']}")
    versions = st.get("versions")
    if isinstance(versions, str) or versions is None:
        print(f"  versions: {versions or 'no store configured'}")
    else:
        print(f"  {len(versions)} version(s) published:")
        for v in versions:
            print(
                f"    {'*' if v['active'] else ' '} {v['version']:<28} {v['state']:<8} users {v['user_count']:>9,}  "
                f"age {v['age_h']:>8.1f} h  published {v['published_utc']}  model {v['model_version']}"
                f"{'  SIMULATED' if v.get('simulated') else ''}"
            )
    for c in st["cycles"][-5:]:
        print(
            f"  cycle {c['cycle']}: as of {c['as_of_utc']}, {'ABANDONED' if c.get('abandoned') else 'complete' if c['complete'] else 'UNFINISHED'} "
            f"(steps done: {', '.join(c['steps_done']) or 'none'})"
        )
    rec = st.get("last_cycle")
    if rec:
        f = rec["figures"]
        print(
            f"  last cycle {rec['cycle']}: eval mean NE {f.get('eval_mean_ne')}, {f.get('users')} users exported "
            f"({f.get('export_counts')}), new rows {f.get('new_rows')}, seconds {rec['durations_s']}"
        )
    else:
        print("  no complete cycle yet: dv365 pipeline run --config ...")
    return 0
