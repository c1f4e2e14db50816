"""``dv365 demo``: the README's main job.

With the whole workspace installed (``bash tools/setup.sh``) it runs the recurring pipeline end to end
(:mod:`dv365.examples.demo`): import the shipped MovieLens data and generate a small SIMULATED long-history set,
train -> export -> publish into embedded stores (two MovieLens cycles: the second is incremental), serve over
gRPC on 127.0.0.1, fetch embeddings through the client, write a report. With dv365-core alone it imports
MovieLens and slices it (what core can do by itself), and says what to install for the rest.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path


def _full_stack() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("dv365.export.pipeline", "dv365.store", "dv365.train"))


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo",
        help="run the main job end to end on the shipped data (data -> train -> export -> publish -> serve)",
        description=(
            "Fresh machine -> result. With every dv365 package installed: import the shipped MovieLens "
            "ml-latest-small ratings (REAL users) and generate a small SIMULATED long-history set, run the recurring "
            "pipeline on both (train the DV365 user tower, export int4 snapshots, publish them into embedded LMDB "
            "stores; MovieLens runs two cycles, the second appends newer ratings, warm-starts and re-exports only "
            "active users), start `dv365 serve` on 127.0.0.1, fetch a few users' embeddings through the gRPC "
            "client, and write <out>/REPORT.md. Takes a few minutes on 2 CPU cores; reruns reuse finished work. "
            "With dv365-core alone: import and slice MovieLens."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default=None, help="MovieLens folder (default: the shipped shared/data copy)")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--user", type=int, default=1, help="(core-only demo) user whose per-feature counts are printed")
    p.add_argument("--core-only", action="store_true", help="only the dv365-core part (import + slice)")
    p.add_argument("--ml-steps", type=int, default=150, help="training steps per MovieLens cycle (default 150)")
    p.add_argument("--synth-users", type=int, default=60, help="users of the generated set (default 60)")
    p.add_argument("--synth-events", type=int, default=3000, help="mean events per generated user (default 3000)")
    p.add_argument("--synth-steps", type=int, default=60, help="training steps of the synth cycle (default 60)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if not args.core_only and _full_stack():
        from dv365.examples.demo import run

        return run(
            out=args.out,
            movielens=args.data,
            synth_users=args.synth_users,
            synth_events=args.synth_events,
            ml_steps=args.ml_steps,
            synth_steps=args.synth_steps,
        )
    if not args.core_only:
        print(
            "dv365 demo: dv365-train / dv365-export / dv365-store are not installed: running the dv365-core part "
            "only (bash tools/setup.sh installs everything)"
        )
    return _core_demo(args)


def _core_demo(args: argparse.Namespace) -> int:
    from dv365.core.catalog import default_data_dir
    from dv365.core.cli import main

    src = Path(args.data) if args.data else default_data_dir() / "movielens-latest-small"
    out = Path(args.out)
    ds = out / "movielens"
    t0 = time.perf_counter()
    steps = [
        ("1/3 import MovieLens (real data)", ["import", "movielens", str(src), "--out", str(ds), "--overwrite"]),
        ("2/3 slice every user (movielens spec, 24 h gap)", ["slice", str(ds), "--all"]),
        (f"3/3 per-feature counts of user {args.user}", ["slice", str(ds), "--user", str(args.user)]),
    ]
    for title, argv in steps:
        print(f"\n== {title}: dv365 {' '.join(argv)}")
        rc = main(argv)
        if rc:
            return rc
    print(
        f"\ndemo done in {time.perf_counter() - t0:.1f} s; dataset at {ds} "
        f"(next: `dv365 slice {ds} --user 42`, `dv365 synth --out {out}/synth --users 20`)"
    )
    return 0
