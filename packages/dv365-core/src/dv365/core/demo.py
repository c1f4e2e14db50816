"""``dv365 demo``: the README's main job. Today: import the shipped MovieLens data and slice it.

It grows as the other packages land (train -> export -> publish -> serve, see the project issues).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo", help="run the main job end to end on the shipped data",
        description=("Import the shipped MovieLens ml-latest-small data (REAL users) into a UniTi dataset, "
                     "slice every user into the movielens spec's features at the snapshot time (24 h gap), "
                     "and show one user's per-feature counts. Outputs go under --out."))
    p.add_argument("--data", default=None, help="MovieLens folder (default: the shipped shared/data copy)")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--user", type=int, default=1, help="user whose per-feature counts are printed")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
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
    print(f"\ndemo done in {time.perf_counter() - t0:.1f} s; dataset at {ds} "
          f"(next: `dv365 slice {ds} --user 42`, `dv365 synth --out {out}/synth --users 20`)")
    return 0
