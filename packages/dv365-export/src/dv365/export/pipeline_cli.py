"""``dv365 pipeline run|schedule`` and ``dv365 status`` (see :mod:`dv365.export.pipeline`)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

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


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "pipeline",
        help="the recurring job: ingest -> train -> export -> publish, one cycle or scheduled",
        description=PIPELINE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ps = p.add_subparsers(dest="pipeline_command", metavar="<run|schedule>")
    r = ps.add_parser(
        "run",
        help="run (or finish) one cycle",
        description=PIPELINE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(r)
    r.add_argument(
        "--as-of",
        help="the cycle's data cut-off: unix seconds or an ISO date (default: the newest "
        "event of the source); an unfinished cycle is always finished first",
    )
    r.set_defaults(func=_run)
    s = ps.add_parser(
        "schedule",
        help="run a cycle every period (a long-running loop)",
        description="Runs `pipeline run` now and then every --every (e.g. 30m, 6h, 1d) until stopped "
        "(SIGTERM / Ctrl-C stop it between cycles; a running cycle is finished first). "
        "Each cycle takes the source up to its newest event.",
    )
    _common(s)
    s.add_argument("--every", required=True, help="period: a number with s, m, h or d (e.g. 6h)")
    s.add_argument("--max-cycles", type=int, default=0, help="stop after this many cycles (0: never)")
    s.set_defaults(func=_schedule)
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


def _common(p: argparse.ArgumentParser) -> None:
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


def _run(args: argparse.Namespace) -> int:
    from dv365.core.cli import log_to
    from dv365.export.pipeline import Pipeline, PipelineConfig, parse_time

    log_to(sys.stdout)
    p = Pipeline(PipelineConfig.load(args.config), progress=not args.no_progress)
    _print_record(p.run_cycle(parse_time(args.as_of)), args.json)
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from dv365.core.cli import log_to
    from dv365.export.pipeline import Pipeline, PipelineConfig, PipelineError

    log_to(sys.stdout)
    period = parse_period(args.every)
    p = Pipeline(PipelineConfig.load(args.config), progress=not args.no_progress)
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
    return 0


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
            f"  cycle {c['cycle']}: as of {c['as_of_utc']}, {'complete' if c['complete'] else 'UNFINISHED'} "
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
