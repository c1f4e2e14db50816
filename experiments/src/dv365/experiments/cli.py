"""``dv365 eval <experiment>``: offline experiments that train models and write a report.

Built in (:data:`EXPERIMENTS`): ``upstream`` (:mod:`dv365.experiments.upstream`, the paper's Table 2: every
Table-1 user tower vs the baseline without DV365 timelines) and the downstream experiments ``ranking``,
``retrieval``, ``staleness``, ``encoders``, ``all`` (:mod:`dv365.experiments.downstream`). Other installed
packages can add experiments through the entry-point group ``dv365.experiments``; the value is a
``module:function`` with the signature ``function(subparsers) -> None``. The function adds one parser to
``subparsers`` (the experiment's name), calls :func:`add_common_arguments` on it, and sets
``set_defaults(func=handler)``. ``handler(args) -> int`` returns the exit code and raises a
``dv365.core.errors.Dv365Error`` for user errors. A built-in name wins over a plug-in of the same name; a
plug-in that fails to load is left out with a warning. Heavy imports belong in the handler, so that
``dv365 --help`` stays fast.

Conventions every experiment follows: the common flags (:func:`add_common_arguments`: ``--dataset``,
``--quick``, ``--seeds``, ``--out``, ``--data-dir``, ``--no-progress``, ``--device``, ``--config``,
``--set``). The report goes to ``<out>/<experiment>-<dataset>[-quick].md``, with its PNG plot(s) beside it.
The handler prints one JSON summary line **last** on stdout (:func:`print_summary`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from dv365.core.plugins import iter_plugins, load_ref

logger = logging.getLogger(__name__)

#: name -> ``module:function`` registering each built-in experiment
EXPERIMENTS: dict[str, str] = {
    "upstream": "dv365.experiments.cli:register_upstream",
    "nextitem": "dv365.experiments.cli:register_nextitem",
    "ranking": "dv365.experiments.downstream.cli:register_ranking",
    "diagnose": "dv365.experiments.downstream.cli:register_diagnose",
    "retrieval": "dv365.experiments.downstream.cli:register_retrieval",
    "staleness": "dv365.experiments.downstream.cli:register_staleness",
    "encoders": "dv365.experiments.downstream.cli:register_encoders",
    "all": "dv365.experiments.downstream.cli:register_all",
}
ENTRY_POINT_GROUP = "dv365.experiments"

DESCRIPTION = """\
Run an offline experiment: prepare its data sets (created under --data-dir on first use), train the
models, and write a report (Markdown + PNG plots + JSON) to --out. The last line on stdout is one JSON
object that summarises the experiment.

Experiments: nextitem (next-item retrieval: a short-history SASRec / HSTU with the DV365 embedding of the
older history), upstream (Table 2 of the paper, every user tower variant vs the baseline without DV365
timelines), ranking, retrieval, staleness, encoders (Tables 3-4, App. B-C) and all; others come from
installed packages (entry-point group dv365.experiments).
Run `dv365 eval <experiment> --help` for each."""


def add_common_arguments(
    p: argparse.ArgumentParser, datasets: Sequence[str], default_dataset: str | None = None
) -> None:
    """The flags every ``dv365 eval`` experiment takes; ``--dataset`` is one of ``datasets`` or a dataset folder."""
    p.add_argument(
        "--dataset",
        default=default_dataset or datasets[0],
        metavar="NAME|PATH",
        help=f"data set: {', '.join(datasets)} (default {default_dataset or datasets[0]}), or the folder of any dataset "
        "written by `dv365 import movielens|kuairand|generic` or `dv365 synth` (its metadata says REAL or SIMULATED, "
        "its source picks the shipped config)",
    )
    p.add_argument("--quick", action="store_true", help="the small configuration (minutes on 2 CPU cores)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1; default from the config)")
    p.add_argument("--out", default="reports", help="report folder (default reports/)")
    p.add_argument(
        "--data-dir", default="out/eval/data", help="where data sets are created and reused (default out/eval/data)"
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="NAME|PATH",
        help="experiment config: a YAML path or the name of a shipped one, e.g. `--config movielens-medium` for "
        "nextitem (default: the shipped one for the data set and --quick)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.run.steps=100 (repeatable)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", ...]`` -> ``{"a.b": 1}`` (values parsed as YAML)."""
    from dv365.core.config import parse_overrides
    from dv365.experiments.upstream import EvalError

    return parse_overrides(items, EvalError)


def print_summary(summary: dict[str, Any]) -> None:
    """The experiment's last stdout line: one JSON object (NaN written as null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    sys.stdout.flush()
    print(json.dumps(clean(summary), separators=(",", ":")), flush=True)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "eval",
        help="offline experiments with reports (the paper's Tables 2-4, App. B-C)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    esub = p.add_subparsers(dest="experiment", metavar="<experiment>")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    for ref in EXPERIMENTS.values():
        load_ref(ref)(esub)
    for _name, register_plugin in iter_plugins(ENTRY_POINT_GROUP, skip=set(EXPERIMENTS)):
        register_plugin(esub)


# ------------------------------------------------------------------------------------------------------
# upstream
# ------------------------------------------------------------------------------------------------------
UPSTREAM_DESCRIPTION = """\
Paper Table 2 on our data: train the backbone without DV365 timelines (baseline) and with every user
tower variant of Table 1 (pass_thru, LCE, MLP_d, MLP_t, T-L_d, T-L_t, FSA) on the same examples, for
several seeds, and report the NE delta % per task of each variant against the baseline of the same seed
(MSE delta % for regression tasks), mean +- std over the seeds.

Data sets: synth = SIMULATED long histories from `dv365 synth` (stable long-term interests exist by
construction: the run checks the implementation, not the method); movielens = the REAL MovieLens
ml-latest-small ratings (tasks rating >= 4, = 5, <= 2, rating regression), also reported on the test
requests whose user has a non-empty history after the 24 h gap.

Splits by request time: test = the latest 20% (evaluated once per model), validation = the latest part
before it (early stopping), training = the rest. Output: <out>/upstream-<dataset>[-quick].md / .png /
.json; the last stdout line is a JSON summary."""


def register_upstream(esub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = esub.add_parser(
        "upstream",
        help="Table 2: every user tower variant vs the baseline (NE delta %%)",
        description=UPSTREAM_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(p, ("synth", "movielens"))
    p.add_argument(
        "--variants", default=None, help="comma-separated tower kinds (default: all of Table 1), e.g. fsa,mlp_d"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch default)")
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="models trained at a time on CPU, in forked workers (default 0 = one per CPU core); the "
        "results do not depend on it",
    )
    p.set_defaults(func=_upstream)


def _upstream(args: argparse.Namespace) -> int:
    import logging
    import warnings

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    from dv365.experiments.upstream import run_upstream, write_report

    command = "dv365 eval upstream " + " ".join(shlex.quote(a) for a in _argv_tail())
    variants = [v for v in args.variants.split(",") if v.strip()] if args.variants else None
    from dv365.core.logs import log_to

    log_to(sys.stderr)
    rep = run_upstream(
        args.dataset,
        quick=args.quick,
        seeds=args.seeds,
        config=args.config,
        overrides=overrides(args.set),
        variants=variants,
        data_dir=args.data_dir,
        device=args.device,
        threads=args.threads or None,
        progress=not args.no_progress,
        command=command.strip(),
        jobs=args.jobs or (os.cpu_count() or 1),
    )
    paths = write_report(rep, args.out)
    summary = rep.summary()
    summary["report"] = paths
    logger.info(f"dv365 eval upstream: report {paths['markdown']}")
    print_summary(summary)
    return 0


def _argv_tail() -> list[str]:
    argv = sys.argv[1:]
    return argv[argv.index("upstream") + 1 :] if "upstream" in argv else argv


# ------------------------------------------------------------------------------------------------------
# nextitem
# ------------------------------------------------------------------------------------------------------
NEXTITEM_DESCRIPTION = """\
Next-item retrieval (HSTU paper protocol: leave-one-out, exhaustive ranking over all items, HR/NDCG@10/50/200)
where a SHORT-history sequence model (SASRec, HSTU) gets the DV365 embedding of the user's OLDER history.
Arms per encoder: full (last 200 items), short-K (last K), short-K+mean (mean item embedding of the older
items), short-K+dv365 (DV365 embedding of every event before the window's first item); fusion prefix / linear /
gate chosen on validation HR@10. Report: every metric per arm (mean +- std over seeds), the recovered fraction
R = (short-K+dv365 - short-K) / (full - short-K), verdicts counted beyond noise only, serving cost per user.

Data sets: movielens = REAL MovieLens ml-latest-small ratings; synth = SIMULATED (dv365 synth); or the PATH of
any UniTi folder (e.g. MovieLens-1M: `dv365 import movielens <ml-1m folder> --out <folder>`, docs/nextitem.md).
Configs (--config NAME): movielens-quick (= --quick: SASRec + HSTU, K = 20, 3 seeds, training length chosen on
validation; <= 15 min on 2 CPU cores), movielens-medium (the same with K = 10 / 20 and a longer patience; ~20 min),
movielens (the published settings: 101 epochs, K = 10 / 20 / 50, 3 fusion modes; a GPU job), synth.
Output: <out>/nextitem-<dataset>[-quick][-<profile>].md / .png / .json (profile: the rest of a shipped config's
name, e.g. nextitem-movielens-medium); the last stdout line is a JSON summary."""


def register_nextitem(esub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = esub.add_parser(
        "nextitem",
        help="next-item retrieval: short-history SASRec / HSTU + DV365 of the older history",
        description=NEXTITEM_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(p, ("movielens", "synth"))
    p.set_defaults(func=_nextitem)


def _nextitem(args: argparse.Namespace) -> int:
    from dv365.core.logs import log_to
    from dv365.experiments.nextitem.report import write_report
    from dv365.experiments.nextitem.run import run_nextitem, summary_line

    log_to(sys.stderr)
    argv = sys.argv[1:]
    tail = argv[argv.index("nextitem") + 1 :] if "nextitem" in argv else argv
    res = run_nextitem(
        args.dataset,
        quick=args.quick,
        seeds=args.seeds,
        config=args.config,
        overrides=overrides(args.set),
        data_dir=args.data_dir,
        device=args.device,
        progress=not args.no_progress,
        command=("dv365 eval nextitem " + " ".join(shlex.quote(a) for a in tail)).strip(),
    )
    paths = write_report(res, args.out)
    summary = summary_line(res)
    summary["report"] = paths
    logger.info(f"dv365 eval nextitem: report {paths['markdown']}")
    print_summary(summary)
    return 0
