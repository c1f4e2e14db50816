"""``dv365 synth``: writes a SIMULATED long-history UniTi dataset on the real KuaiRand-Pure catalog.

Only ``argparse`` is imported at module level so that ``dv365 --help`` stays fast; the handler imports
numpy/pyarrow lazily.
"""

from __future__ import annotations

import argparse
import sys

_DESCRIPTION = """\
Generate a SIMULATED long-history dataset (UniTi format) whose users reach the paper's sizes:
explicit + implicit timelines of ~40K events per user on average (max 70K; 35K per timeline), spread
over 400 days, plus labelled training requests (label_like, label_follow, ..., label_watch_time).

Items come from the REAL KuaiRand-Pure catalog (7,583 videos: ids, authors, tags, types, durations);
users, impressions, dwell times, actions and labels are drawn from the documented generative model
(docs/synth.md): stable long-term interests + drifting short-term interests, sessions, a watch-ratio
model and affinity-driven actions. Deterministic by --seed; user u's data does not depend on --users.
The dataset is labelled simulated (source synth:kuairand-pure). Do not report it as real-user data.

Example:
  dv365 synth --out data/synth-1k --users 1000          # ~40M events, a few minutes on 2 cores
  dv365 synth --out /tmp/tiny --users 20 --mean-events 2000 --max-events 4000 --days 120
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "synth",
        help="generate a SIMULATED long-history dataset on the real KuaiRand-Pure catalog",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output dataset URL (local path or fsspec URL, e.g. memory://x)")
    p.add_argument("--users", type=int, default=100, help="number of users (ids 0..N-1; default 100)")
    p.add_argument(
        "--mean-events", type=int, default=40_000, help="mean events per user, explicit + implicit (default 40000)"
    )
    p.add_argument("--max-events", type=int, default=70_000, help="cap on events per user (default 70000)")
    p.add_argument("--days", type=int, default=400, help="history span in days, ending 2025-01-01 UTC (default 400)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument(
        "--requests-per-user",
        type=int,
        default=20,
        help="labelled training requests per user, in the last 60 days (default 20)",
    )
    p.add_argument(
        "--short-term-weight",
        type=float,
        default=0.3,
        help="weight of the drifting short-term interests vs the stable long-term ones (default 0.3)",
    )
    p.add_argument(
        "--catalog",
        default=None,
        help="folder with video_features_basic_pure.csv (default: the shipped KuaiRand-Pure catalog)",
    )
    p.add_argument("--buckets", type=int, default=16, help="user hash buckets of the dataset (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from dv365.core.catalog import load_kuairand_catalog
    from dv365.core.synth.assemble import write_synth_dataset
    from dv365.core.synth.config import SynthConfig

    try:
        cfg = SynthConfig(
            users=args.users,
            mean_events=args.mean_events,
            max_events=args.max_events,
            days=args.days,
            seed=args.seed,
            requests_per_user=args.requests_per_user,
            short_term_weight=args.short_term_weight,
            min_events=min(SynthConfig.min_events, max(args.mean_events, 1)),
        )
    except ValueError as e:
        print(f"dv365 synth: error: {e}", file=sys.stderr)
        return 2
    if args.users < 1 or args.buckets < 1:
        print("dv365 synth: error: --users and --buckets must be >= 1", file=sys.stderr)
        return 2
    problem = _unsafe_output(args.out)
    if problem:
        print(f"dv365 synth: error: {problem}", file=sys.stderr)
        return 2
    catalog = load_kuairand_catalog(args.catalog)
    where = "the shipped KuaiRand-Pure catalog" if args.catalog is None else f"the catalog {args.catalog}"
    print(
        f"dv365 synth: generating SIMULATED data for {cfg.users:,} users (seed {cfg.seed}) on real items of "
        f"{where} ({len(catalog):,} items) -> {args.out}"
    )
    meta = write_synth_dataset(cfg, args.out, catalog, progress=not args.no_progress, num_buckets=args.buckets)
    print(format_stats(meta.stats, meta.extra))
    import gc

    gc.collect()  # release Arrow objects while Arrow is alive (apache/arrow#34314: rare abort at exit)
    return 0


def _unsafe_output(url: str) -> str:
    """Why writing to ``url`` could destroy files (a non-empty folder that is not a dv365 dataset), or ''."""
    from dv365.core.fsio import url_to_fs

    fs, path = url_to_fs(url)
    if not fs.exists(path) or fs.exists(path.rstrip("/") + "/_dataset.json"):
        return ""  # new folder, or an existing dataset (the writer refuses to overwrite it)
    if not fs.isdir(path):
        return f"{url} exists and is not a folder"
    entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    foreign = [e for e in entries if e not in ("explicit", "implicit", "requests")]
    if foreign:
        return (
            f"{url} is a non-empty folder that is not a dv365 dataset (contains {sorted(foreign)[:3]}); "
            "choose a new or empty --out"
        )
    return ""  # leftovers of an interrupted dv365 write: the writer replaces them


def format_stats(stats: dict, extra: dict) -> str:  # type: ignore[type-arg]
    """The summary printed by ``dv365 synth`` (every line says the data is SIMULATED)."""
    users = int(stats.get("users", 0))
    ex, im = int(stats.get("explicit_events", 0)), int(stats.get("implicit_events", 0))
    total = max(ex + im, 1)
    lines = [
        "SIMULATED dataset (source synth:kuairand-pure; real catalog, simulated users) -- not real-user data",
        f"  users               {users:,}",
        f"  events per user     mean {stats.get('mean_events', 0):,.0f}, median {stats.get('median_events', 0):,.0f}, "
        f"max {int(stats.get('max_events', 0)):,}",
        f"  span                {stats.get('span_days', 0):.1f} days",
        f"  explicit / implicit {ex:,} ({ex / total:.1%}) / {im:,} ({im / total:.1%})",
        f"  requests            {int(extra.get('requests', 0)):,} with labels {', '.join(extra.get('labels', []))}",
        f"dv365 synth: wrote {ex + im:,} SIMULATED events of {users:,} users in {extra.get('generation_s', 0):.1f} s",
    ]
    return "\n".join(lines)
