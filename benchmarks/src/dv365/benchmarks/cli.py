"""``dv365 bench <name> [--json]``: named benchmarks; the last line printed is one JSON object.

:data:`BENCHMARKS` lists the benchmarks of the dv365 packages; other installed packages add theirs through
the ``dv365.benchmarks`` entry-point group (values: callables ``run(args: argparse.Namespace) -> dict``).
Figures depend on the machine: every result records the host's CPU count and the torch/numpy versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

from dv365.core.plugins import iter_plugins, load_ref

BenchFn = Callable[[argparse.Namespace], dict[str, Any]]

#: name -> ``module:function`` of the benchmarks of the dv365 packages
BENCHMARKS = {
    "slicing": "dv365.benchmarks.slicing:run",
    "fsa": "dv365.benchmarks.train:run_fsa",
    "dedup": "dv365.benchmarks.train:run_dedup",
    "tower": "dv365.benchmarks.train:run_tower",
    "export": "dv365.benchmarks.export:run",
    "store": "dv365.benchmarks.store:run",
    "store-kv": "dv365.benchmarks.store:run_kv_choice",
}


def _registry() -> dict[str, BenchFn | str]:
    reg: dict[str, BenchFn | str] = dict(BENCHMARKS)
    reg.update(iter_plugins("dv365.benchmarks", skip=set(BENCHMARKS)))
    return reg


def machine_info() -> dict[str, Any]:
    import numpy

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        pass
    return info


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    reg = _registry()
    p = sub.add_parser(
        "bench",
        help="run a named benchmark",
        description=(
            "Run a named benchmark and print its figures; with --json the last line is one JSON object.\n"
            f"Available: {', '.join(sorted(reg))}. Figures are machine-dependent: compare ratios."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=sorted(reg), help="benchmark to run")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quick", action="store_true", help="smaller sizes (for CI smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--users", type=int, default=None, help="number of users to generate (benchmark-specific default)")
    p.add_argument("--mean-events", type=int, default=40_000, help="mean events per user of the generated profile")
    p.add_argument("--batch-users", type=int, default=None, help="users per slicing batch (benchmark-specific default)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    entry = _registry()[args.name]
    fn: BenchFn = load_ref(entry) if isinstance(entry, str) else entry
    result = fn(args)
    result = {"benchmark": args.name, **result, "machine": machine_info()}
    if not args.json:
        for k, v in result.items():
            if k != "machine":
                print(f"{k:>28}: {v}")
    print(json.dumps(result, sort_keys=False))
    sys.stdout.flush()
    return 0
