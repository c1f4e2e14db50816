"""``dv365 eval ranking`` — paper Table 3: a multi-task DLRM ranker with an HSTU short-history encoder, with
and without DV365 (``no_projection``, ``linear`` = LinearProjection, ``hstu_prefix`` = HSTUPrefix).

Per seed, the control (``baseline``: no DV365) and every variant are trained on the same downstream-train
requests (same seed, same batches), early-stopped on validation and evaluated once on test. Reported: NE
delta % per task (MSE delta % for the regression task) vs the control of the same seed, mean ± std over
seeds, on all test requests and on returning users.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from dv365.experiments.downstream.common import (
    NOISE_NOTE,
    USERS_NOTE,
    RankerFit,
    banner,
    data_lines,
    finish_report,
    fmt_stat,
    paired_stats,
    plot_bars,
    report_paths,
    user_intervals,
)
from dv365.experiments.downstream.context import Context
from dv365.train.metrics import beyond_noise, mean_ne, users_95

logger = logging.getLogger(__name__)

BASELINE = "baseline"


def metric(m: dict[str, Any]) -> float:
    return float(m["ne"]) if "ne" in m else float(m["mse"])


def run_ranking(ctx: Context, seeds: int) -> dict[str, Any]:
    s = ctx.settings
    d = s.downstream
    rows = ctx.rows
    test_rows = rows["test"]
    is_ret = np.isin(test_rows, ctx.returning(test_rows))
    val = rows["val"]
    if len(val) > 3000:  # validation NE on an evenly spaced subset (speed); the test split is used whole
        val = val[np.linspace(0, len(val) - 1, 3000).astype(np.int64)]
    runs = []
    for seed in range(seeds):
        for kind in (BASELINE, *s.ranking.variants):
            t0 = time.perf_counter()
            fit = RankerFit(ctx, "none" if kind == BASELINE else kind, seed, rows["train"])
            best_step, best_val, curve = fit.fit(rows["train"], val, d.steps, d.val_every)
            ev, sums = fit.evaluate_subsets_by_user(test_rows, {"returning": is_ret})  # one forward pass for both
            test, test_ret = ev["all"], ev["returning"]
            runs.append(
                {
                    "kind": kind,
                    "seed": seed,
                    "best_step": best_step,
                    "best_val": round(best_val, 5),
                    "test": test,
                    "test_returning": test_ret,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "val_curve": curve,
                    "test_users": sums["all"].to_json() if sums["all"] is not None else None,
                    "test_returning_users": sums["returning"].to_json() if sums["returning"] is not None else None,
                }
            )
            logger.info(
                f"  ranking {ctx.dataset} seed {seed} {kind:13s} step {best_step:4d} val {best_val:.4f} "
                f"test mean NE {mean_ne(test):.4f} ({time.perf_counter() - t0:.0f} s)"
            )
    return summarize(ctx, runs)


def deltas(runs: list[dict[str, Any]], subset: str) -> dict[str, dict[str, dict[str, Any]]]:
    base = {r["seed"]: r[subset] for r in runs if r["kind"] == BASELINE}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in dict.fromkeys(r["kind"] for r in runs if r["kind"] != BASELINE):
        per: dict[str, list[float]] = {}
        for r in runs:
            if r["kind"] != kind or not r[subset] or r["seed"] not in base:
                continue
            for task, m in r[subset].items():
                x, b = metric(m), metric(base[r["seed"]][task])
                if math.isfinite(x) and math.isfinite(b) and b > 0:
                    per.setdefault(task, []).append(100.0 * (x / b - 1.0))
        out[kind] = {t: paired_stats(v) for t, v in per.items()}
        avg = [float(np.mean([per[t][i] for t in per])) for i in range(min((len(v) for v in per.values()), default=0))]
        out[kind]["_mean_over_tasks"] = paired_stats(avg)
        first = next((r[subset] for r in runs if r["kind"] == kind and r[subset]), {})
        iv = user_intervals(runs, subset, kind, BASELINE, list(first))
        for t, u in (iv or {}).items():
            if t in out[kind] and out[kind][t].get("mean") is not None:
                out[kind][t]["users"] = u
    return out


def summarize(ctx: Context, runs: list[dict[str, Any]]) -> dict[str, Any]:
    d_all = deltas(runs, "test")
    out: dict[str, Any] = {"delta_ne_pct": d_all, "runs": runs}
    if ctx.facts["test_missing_share"] > 0:
        out["delta_ne_pct_returning"] = deltas(runs, "test_returning")
    # a verdict counts only deltas beyond noise: a negative mean within noise is not a gain
    out["all_negative"] = {
        k: all((v["mean"] or 0) < 0 and beyond_noise(v) for t, v in ts.items() if t != "_mean_over_tasks")
        for k, ts in d_all.items()
    }
    return out


def compact(res: dict[str, Any]) -> dict[str, Any]:
    """The JSON-line part: ``{variant: {task: {mean, std, noise}}}``."""

    def c(d: dict[str, Any]) -> dict[str, Any]:
        return {
            k: {
                t: {"mean": v["mean"], "std": v["std"], "noise": not beyond_noise(v)}
                | ({"users_95": users_95(v)} if "users" in v else {})
                for t, v in ts.items()
            }
            for k, ts in d.items()
        }

    out = {"delta_ne_pct": c(res["delta_ne_pct"]), "all_negative": res["all_negative"]}
    if "delta_ne_pct_returning" in res:
        out["delta_ne_pct_returning"] = c(res["delta_ne_pct_returning"])
    return out


_RAW = {"interact": "each dotted with the ranker's own fields", "flatten": "flattened after the interaction"}


def _table(d: dict[str, dict[str, Any]], tasks: list[str], kinds: list[str]) -> str:
    lines = ["| task | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for t in [*tasks, "_mean_over_tasks"]:
        lines.append(
            f"| {'*mean over tasks*' if t == '_mean_over_tasks' else t} | "
            + " | ".join(fmt_stat(d.get(k, {}).get(t, {})) for k in kinds)
            + " |"
        )
    return "\n".join(lines)


def write_report(ctx: Context, res: dict[str, Any], out_dir: Path, quick: bool, command: str) -> dict[str, str]:
    md, png, js = report_paths(out_dir, "ranking", ctx.dataset, quick)
    kinds = [k for k in ctx.settings.ranking.variants]
    tasks = [t.name for t in ctx.tasks]
    sim = "SIMULATED" if ctx.simulated else "real data"
    has_png = plot_bars(
        png,
        f"dv365 eval ranking — {ctx.dataset} ({sim}): NE (MSE) delta % vs no-DV365 control, test",
        tasks,
        {k: [res["delta_ne_pct"][k].get(t, {}) for t in tasks] for k in kinds},
        "Δ vs control (%)  ← better",
    )
    L = [
        f"# dv365 eval ranking (paper Table 3): {ctx.dataset}{' (quick)' if quick else ''} — {sim}\n",
        banner(ctx.simulated, ctx.dataset),
    ]
    L.append(
        "A multi-task DLRM ranker whose short history (the last K events, no gap) is encoded by HSTU together "
        "with the target item, trained **with and without DV365** embeddings: `no_projection` (the de-quantized "
        f"rows themselves, {_RAW[ctx.settings.downstream.no_projection]}), `linear` (dv365-adapters `LinearProjection` tokens in the dot "
        "interaction), `hstu_prefix` (`HSTUPrefix`: tokens prepended to the HSTU sequence). NE delta % per task "
        "vs the control of the same seed (MSE delta % for the regression task); negative = better. "
        + NOISE_NOTE
        + " "
        + USERS_NOTE
        + "\n"
    )
    L.append("## All test requests\n")
    L.append(_table(res["delta_ne_pct"], tasks, kinds) + "\n")
    if "delta_ne_pct_returning" in res:
        L.append(f"## Returning users ({ctx.facts['test_returning']:,} of {ctx.facts['test']:,} test requests)\n")
        L.append(_table(res["delta_ne_pct_returning"], tasks, kinds) + "\n")
    L.append(
        f"Every task's delta negative beyond noise: {', '.join(f'{k}: **{yes(v)}**' for k, v in res['all_negative'].items())}.\n"
    )
    L.append(f"![NE delta per task]({png.name})\n" if has_png else "(No plot: matplotlib is not installed.)\n")
    L.append("## Absolute test metrics (mean over seeds)\n")
    L.append("| model | " + " | ".join(tasks) + " | best steps |")
    L.append("|---|" + "---:|" * len(tasks) + "---|")
    for k in (BASELINE, *kinds):
        rs = [r for r in res["runs"] if r["kind"] == k]
        L.append(
            f"| {k} | "
            + " | ".join(f"{np.mean([metric(r['test'][t]) for r in rs]):.4f}" for t in tasks)
            + " | "
            + ", ".join(str(r["best_step"]) for r in rs)
            + " |"
        )
    L.append("\n(NE for binary tasks, MSE for regression.)\n")
    L += ["## Data and setting\n", *data_lines(ctx)]
    d = ctx.settings.downstream
    L.append(
        f"- ranker: E = {d.embedding_dim}, HSTU {d.hstu}, over-arch {list(d.over_arch)}, DV365 projection tokens "
        f"{d.proj_tokens}; Adam lr {d.lr}, batch {d.batch_size}, at most {d.steps} steps "
        f"({d.steps * d.batch_size / max(len(ctx.rows['train']), 1):.2f} passes over the training split), "
        f"validation every {d.val_every}; snapshot schedule: fresh (latest snapshot before the request)"
    )
    return finish_report(ctx, res, L, md, js, png, has_png, command)


def yes(v: bool) -> str:
    return "yes" if v else "no"
