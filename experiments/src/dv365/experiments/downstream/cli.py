"""``dv365 eval ranking | retrieval | staleness | encoders | diagnose | all``: the paper's downstream evidence
(§3.5, Tables 3-4, App. B, App. C) on public data, and ``diagnose`` (why DV365 changes the ranker on returning
users). Registered by :mod:`dv365.experiments.cli`, whose conventions they follow.

Each experiment writes ``<out>/<experiment>-<dataset>[-quick].md`` + PNG + JSON and prints one JSON summary
line last. ``all`` runs every experiment on every data set (default ``movielens,synth``), shares the prepared
context (upstream model, snapshots) between them, writes ``<out>/all[-quick].md`` and prints one JSON line
with, per data set, the headline figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DESCRIPTIONS = {
    "ranking": "Paper Table 3: a multi-task DLRM ranker with an HSTU short-history encoder, with and without DV365 "
    "(no projection / LinearProjection / HSTUPrefix); NE delta % per task, mean +- std over seeds.",
    "retrieval": "Paper Table 4: a two-tower retrieval model with and without DV365 (linear / GateNet fusion); "
    "HR@1 and HR@10 per task (and next-item) over the whole corpus, delta % vs the control.",
    "staleness": "Paper App. B: online training over consecutive windows with embeddings refreshed every window "
    "(fresh) vs frozen at the start (stale); NE gain vs the control per window; cosine similarity "
    "between embedding versions one window apart.",
    "encoders": "Paper App. C: mean pooling vs learned position-weighted pooling vs HSTU over the same slice at "
    "history caps up to the longest history; NE and measured cost per user (time, memory) vs length.",
    "diagnose": "Why DV365 changes the ranker on returning users: the control and linear rankers, content "
    "controls (another user's rows, one user's rows for all) and candidate fixes chosen on validation; training "
    "vs validation loss on returning requests.",
    "all": "Every experiment on every data set (--datasets, default movielens,synth); one report per experiment "
    "and data set, plus <out>/all[-quick].md and one JSON summary line.",
}
COMMON = """

Data sets: movielens = REAL MovieLens ml-latest-small (imported on first use); synth = SIMULATED long histories
(dv365 synth; stable long-term interests by construction); kuairand = a KuaiRand-1K/27K import
(--set data_url=<folder written by `dv365 import kuairand`>, with --config kuairand).
Splits by request time (upstream | downstream train | validation | test); the DV365 model is trained with
dv365-train on the upstream part and exported with dv365-export at the start of each downstream window.
Settings: the shipped <dataset>[-quick] config (experiments/src/dv365/experiments/configs/downstream/; --config\nNAME|PATH, --set key=value)."""


def _common(p: argparse.ArgumentParser, all_: bool = False) -> None:
    from dv365.experiments.cli import add_common_arguments

    add_common_arguments(p, ("movielens", "synth", "kuairand"), default_dataset="movielens")
    if all_:
        p.add_argument(
            "--datasets", default="movielens,synth", help="comma-separated data sets (default movielens,synth)"
        )
        p.add_argument(
            "--experiments",
            default="ranking,retrieval,staleness,encoders",
            help="comma-separated experiments (default all four)",
        )
        p.add_argument(
            "--from-reports",
            action="store_true",
            help="train nothing: build <out>/all[-quick].md and the JSON line from the per-experiment "
            "reports already in --out (e.g. experiments run separately, with different --seeds)",
        )
        p.add_argument(
            "--jobs",
            type=int,
            default=0,
            help="data sets run at a time, each in its own process (default 0 = one per CPU core, at most "
            "one per data set); every model seeds itself, so the results do not depend on it",
        )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def _register(name: str) -> Callable[[Any], None]:
    def register(esub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        p = esub.add_parser(
            name,
            help=DESCRIPTIONS[name].split(":")[0].replace("%", "%%"),
            description=DESCRIPTIONS[name] + COMMON,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(p, all_=name == "all")
        p.set_defaults(func=lambda args: _handler(name, args))

    return register


register_ranking = _register("ranking")
register_diagnose = _register("diagnose")
register_retrieval = _register("retrieval")
register_staleness = _register("staleness")
register_encoders = _register("encoders")
register_all = _register("all")


def _command(name: str) -> str:
    argv = sys.argv[1:]
    tail = argv[argv.index(name) + 1 :] if name in argv else argv
    return ("dv365 eval " + name + " " + " ".join(shlex.quote(a) for a in tail)).strip()


def _handler(name: str, args: argparse.Namespace) -> int:
    import torch

    _quiet_logs()
    from dv365.experiments.cli import overrides, print_summary

    if args.threads:
        torch.set_num_threads(args.threads)
    from dv365.core.logs import log_to

    log_to(sys.stderr)
    over = overrides(args.set)
    command = _command(name)
    if name == "all":
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
        exps = [e.strip() for e in args.experiments.split(",") if e.strip()]
    else:
        datasets, exps = [args.dataset], [name]
    if name == "all" and args.from_reports:
        from dv365.experiments.downstream.summary import from_reports, write_all_report

        summary = from_reports(exps, datasets, Path(args.out), args.quick)
        summary["report"] = write_all_report(summary, Path(args.out), args.quick, command)
        print_summary(summary)
        return 0
    jobs = getattr(args, "jobs", 1) or (os.cpu_count() or 1)
    summary = run(
        exps,
        datasets,
        quick=args.quick,
        seeds=args.seeds,
        config=args.config,
        over=over,
        data_dir=Path(args.data_dir),
        out=Path(args.out),
        device=args.device,
        progress=not args.no_progress,
        command=command,
        write_all=name == "all",
        jobs=jobs,
        threads=args.threads,
    )
    print_summary(summary)
    return 0


def run(
    experiments: list[str],
    datasets: list[str],
    *,
    quick: bool,
    seeds: int | None,
    config: str | None,
    over: dict[str, Any],
    data_dir: Path,
    out: Path,
    device: str,
    progress: bool,
    command: str,
    write_all: bool,
    jobs: int = 1,
    threads: int = 1,
) -> dict[str, Any]:
    """Runs ``experiments`` on ``datasets``; returns the JSON summary (per data set when several).

    ``jobs > 1`` runs that many data sets at a time, each in a fresh (spawned) process that builds its own
    context; every model seeds itself, so the figures are those of a serial run. Settings are loaded and
    checked for every data set before anything starts."""
    from dv365.experiments.datasets import resolve_dataset
    from dv365.experiments.downstream.settings import (
        DATASETS,
        EXPERIMENTS,
        ExperimentError,
        default_config,
        load_settings,
    )

    bad = [e for e in experiments if e not in EXPERIMENTS]
    if bad:
        raise ExperimentError(f"--experiments {bad}: use {list(EXPERIMENTS)}")
    t_all = time.perf_counter()
    per: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    prepared = []  # (data set, settings, seeds): every config / --set / --seeds checked before any data set runs
    names = []
    for arg in datasets:
        # a built-in name, or a dataset folder: its source picks the shipped config, its folder is the data
        choice = resolve_dataset(arg, ExperimentError) if arg != "kuairand" else None
        kind = choice.kind if choice is not None else arg
        if config is None and kind not in DATASETS:
            raise ExperimentError(
                f"--dataset {arg}: no shipped config fits its source {choice.source!r}: pass --config"
            )
        cfg_path = config or default_config(kind, quick)
        settings = load_settings(cfg_path, over)
        if choice is not None and choice.url is not None:
            settings = replace(settings, data_url=choice.url)
        elif settings.dataset != arg:
            raise ExperimentError(f"{cfg_path}: dataset {settings.dataset!r} does not match --dataset {arg!r}")
        ds = choice.name if choice is not None else arg
        names.append(ds)
        n_seeds = seeds if seeds is not None else settings.seeds
        if n_seeds < 1:
            where = "--seeds" if seeds is not None else f"{cfg_path}: seeds"
            raise ExperimentError(f"{where} = {n_seeds}: must be >= 1")
        prepared.append((ds, settings, n_seeds))
    job = dict(
        experiments=experiments,
        quick=quick,
        data_dir=data_dir,
        out=out,
        device=device,
        progress=progress,
        command=command,
    )
    jobs = max(1, min(int(jobs), len(datasets)))
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        logger.info(f"running {len(datasets)} data sets, {jobs} at a time (spawned processes)")
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_dataset_in_worker, p, job, threads) for p in prepared]
            results = [f.result() for f in futures]
    else:
        results = [_run_dataset(ds, settings, n, **job) for ds, settings, n in prepared]  # type: ignore[arg-type]
    for ds, (entry, rep) in zip(names, results):
        per[ds] = entry
        reports.update(rep)
    summary: dict[str, Any] = {
        "experiment": "all" if write_all else experiments[0],
        "quick": quick,
        "seeds": seeds,
        "datasets": per,
        "reports": reports,
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    if write_all:
        from dv365.experiments.downstream.summary import write_all_report

        summary["report"] = write_all_report(summary, out, quick, command)
    elif len(names) == 1:
        summary = {
            "experiment": experiments[0],
            "dataset": names[0],
            "quick": quick,
            **per[names[0]],
            "report": reports.get(f"{experiments[0]}-{names[0]}"),
            "seconds": summary["seconds"],
        }
    return summary


def _quiet_logs() -> None:
    import logging
    import warnings

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def _dataset_in_worker(
    prepared: tuple[str, Any, int], job: dict[str, Any], threads: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    _quiet_logs()
    if threads:
        torch.set_num_threads(threads)
    ds, settings, n_seeds = prepared
    from dv365.core.logs import log_to

    log_to(sys.stderr, prefix=f"[{ds}] ")  # this process runs one data set
    return _run_dataset(ds, settings, n_seeds, **job)


def _run_dataset(
    ds: str,
    settings: Any,
    n_seeds: int,
    *,
    experiments: list[str],
    quick: bool,
    data_dir: Path,
    out: Path,
    device: str,
    progress: bool,
    command: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every experiment of one data set (``settings``: its loaded, checked config): (its summary entry,
    {"<experiment>-<dataset>": report path})."""
    import importlib

    from dv365.experiments.downstream.context import build_context
    from dv365.experiments.downstream.summary import DATA_FACTS

    reports: dict[str, Any] = {}
    entry: dict[str, Any] = {}
    ctx = None
    if any(e != "encoders" for e in experiments):
        ctx = build_context(ds, settings, data_dir, progress=progress, device=device)
        entry["simulated"] = ctx.simulated
        entry["data"] = {k: ctx.facts[k] for k in DATA_FACTS}
    for exp in experiments:
        mod = importlib.import_module(f"dv365.experiments.downstream.{exp}")
        t0 = time.perf_counter()
        logger.info(f"== {exp} on {ds} ==")
        if exp == "encoders":  # its own data set (the longest histories): no shared context
            res = mod.run_encoders(ds, settings, data_dir, n_seeds, progress)
        else:
            res = getattr(mod, f"run_{exp}")(ctx, n_seeds)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        if exp == "encoders":
            paths = mod.write_report(ds, settings, res, out, quick, command)
            entry.setdefault("simulated", res["simulated"])
        else:
            paths = mod.write_report(ctx, res, out, quick, command)
        entry[exp] = mod.compact(res)
        entry[exp]["seconds"] = res["seconds"]
        reports[f"{exp}-{ds}"] = paths["markdown"]
        logger.info(f"   {exp} on {ds}: {res['seconds']:.0f} s -> {paths['markdown']}")
    return entry, reports
