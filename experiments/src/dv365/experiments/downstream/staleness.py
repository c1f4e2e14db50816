"""``dv365 eval staleness`` — paper App. B (Fig. 3-4): fresh vs frozen DV365 embeddings over time.

Online protocol over the downstream windows (``split.windows``, equal request counts, by time): for each
window w, the model is first **evaluated on window w** (progressive validation: it has not seen it), then
trained ``passes`` epochs on it. Three models per seed, same batches: the control (no DV365), ``fresh`` (each
request reads the snapshot exported at its window's start, so its age is at most one window) and ``stale``
(every request reads the first window's snapshot: the age grows window after window). Reported: NE gain %
vs the control per window (``100·(1 − NE/NE_control)``, mean over the binary tasks; positive = better), the
stale/fresh ratio of the mean gain, and the cosine similarity between a user's embedding versions one window
apart (de-quantized, flattened).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dv365.core.quantize import dequantize_rows
from dv365.experiments.downstream.common import (
    RankerFit,
    banner,
    data_lines,
    epochs,
    finish_report,
    paired_stats,
    report_paths,
)
from dv365.experiments.downstream.context import Context
from dv365.train.metrics import mean_ne

logger = logging.getLogger(__name__)

MODELS = ("baseline", "fresh", "stale")


def run_staleness(ctx: Context, seeds: int) -> dict[str, Any]:
    s = ctx.settings
    W = len(ctx.window_bounds)
    ne = {m: np.full((seeds, W), np.nan) for m in MODELS}
    for seed in range(seeds):
        t0 = time.perf_counter()
        first = np.arange(*ctx.window_bounds[0])
        fits = {
            m: RankerFit(
                ctx,
                "none" if m == "baseline" else s.staleness.variant,
                seed,
                first,
                schedule="stale" if m == "stale" else "fresh",
            )
            for m in MODELS
        }
        for w, (lo, hi) in enumerate(ctx.window_bounds):
            rows = np.arange(lo, hi)
            for m, fit in fits.items():
                if w > 0:
                    ne[m][seed, w] = mean_ne(fit.evaluate(rows))
                it = epochs(rows, s.downstream.batch_size, seed * 1000 + w)
                for _ in range(s.staleness.passes * max(len(rows) // s.downstream.batch_size, 1)):
                    fit.step(next(it))
        logger.info(
            f"  staleness {ctx.dataset} seed {seed}: "
            + "; ".join(f"{m} NE " + " ".join(f"{x:.4f}" for x in ne[m][seed, 1:]) for m in MODELS)
            + f" ({time.perf_counter() - t0:.0f} s)"
        )
    gain = {m: 100.0 * (1.0 - ne[m] / ne["baseline"]) for m in ("fresh", "stale")}  # [seeds, W]
    per_window = {m: [paired_stats(gain[m][:, w]) for w in range(1, W)] for m in gain}
    mean_gain = {m: paired_stats(np.nanmean(gain[m][:, 1:], axis=1)) for m in gain}
    f, st = mean_gain["fresh"]["mean"], mean_gain["stale"]["mean"]
    ratio = (st / f) if (f is not None and st is not None and f > 0) else None
    cos = version_cosines(ctx)
    ages = window_ages_days(ctx)
    return {
        "ne": {m: v.tolist() for m, v in ne.items()},
        "gain_pct_per_window": per_window,
        "mean_gain_pct": mean_gain,
        "stale_fresh_gain_ratio": None if ratio is None else round(ratio, 4),
        "fresh_gain_positive": bool(f is not None and f > 0),
        "cosine": cos,
        "age_days": ages,
    }


def version_cosines(ctx: Context) -> dict[str, Any]:
    """Cosine similarity of each user's de-quantized embedding between snapshots w and w + 1 (users in both),
    and between the first and the last snapshot."""
    fmt = ctx.row_format
    P, present = ctx.snap_payload, ctx.snap_present

    def flat(w: int, users: np.ndarray) -> torch.Tensor:
        return dequantize_rows(torch.from_numpy(P[w, users]), fmt.bits).reshape(len(users), -1).float()

    def cos(a: int, b: int) -> np.ndarray:
        users = np.flatnonzero(present[a] & present[b])
        if len(users) == 0:
            return np.zeros(0)
        return torch.nn.functional.cosine_similarity(flat(a, users), flat(b, users), dim=1).numpy()

    W = P.shape[0]
    adj = np.concatenate([cos(w, w + 1) for w in range(W - 1)]) if W > 1 else np.zeros(0)
    ends = cos(0, W - 1)

    def q(a: np.ndarray) -> dict[str, Any]:
        if len(a) == 0:
            return {"n": 0}
        return {
            "n": int(len(a)),
            "median": round(float(np.median(a)), 4),
            "p10": round(float(np.quantile(a, 0.1)), 4),
            "share_gt_0.9": round(float(np.mean(a > 0.9)), 4),
            "mean": round(float(a.mean()), 4),
        }

    return {
        "adjacent": q(adj),
        "first_last": q(ends),
        "values_adjacent": [round(float(x), 4) for x in adj],
        "values_first_last": [round(float(x), 4) for x in ends],
    }


def window_ages_days(ctx: Context) -> dict[str, list[float]]:
    """Mean embedding age (request time − snapshot as_of) per window, days, for both schedules."""
    out: dict[str, list[float]] = {"fresh": [], "stale": []}
    for lo, hi in ctx.window_bounds:
        rows = np.arange(lo, hi)
        for sch in out:
            s = ctx.snapshot_index(rows, sch)
            out[sch].append(round(float(np.mean(ctx.req.ts[rows] - ctx.snap_as_of[s])) / 86400, 2))
    return out


def compact(res: dict[str, Any]) -> dict[str, Any]:
    return {
        "stale_fresh_gain_ratio": res["stale_fresh_gain_ratio"],
        "mean_gain_pct": {
            m: {"mean": v["mean"], "std": v["std"], "noise": v["noise"]} for m, v in res["mean_gain_pct"].items()
        },
        "fresh_gain_positive": res["fresh_gain_positive"],
        "median_version_cosine": res["cosine"]["adjacent"].get("median"),
        "median_cosine_first_last": res["cosine"]["first_last"].get("median"),
    }


def plot(ctx: Context, res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    W = len(ctx.window_bounds)
    x = np.arange(1, W)
    for m in ("fresh", "stale"):
        v = res["gain_pct_per_window"][m]
        mean = np.array([s["mean"] if s["mean"] is not None else np.nan for s in v])
        std = np.array([s["std"] or 0.0 for s in v])
        a1.errorbar(
            x, mean, yerr=std, marker="o", capsize=3, label=f"{m} (mean age {np.mean(res['age_days'][m][1:]):.1f} d)"
        )
    a1.axhline(0, color="black", lw=0.8)
    a1.set_xlabel("window (time →)")
    a1.set_ylabel("NE gain vs control (%)  ↑ better")
    a1.set_title("NE gain over time (Fig. 3 analogue)", fontsize=9)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    vals = res["cosine"]["values_adjacent"]
    if vals:
        a2.hist(vals, bins=40, alpha=0.7, label="one window apart")
    if res["cosine"]["values_first_last"]:
        a2.hist(res["cosine"]["values_first_last"], bins=40, alpha=0.5, label="first vs last snapshot")
    a2.set_xlabel("cosine similarity between embedding versions")
    a2.set_title("embedding version similarity (Fig. 4 analogue)", fontsize=9)
    a2.legend(fontsize=8)
    sim = "SIMULATED" if ctx.simulated else "real data"
    fig.suptitle(f"dv365 eval staleness — {ctx.dataset} ({sim})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(ctx: Context, res: dict[str, Any], out_dir: Path, quick: bool, command: str) -> dict[str, str]:
    md, png, js = report_paths(out_dir, "staleness", ctx.dataset, quick)
    has_png = plot(ctx, res, png)
    sim = "SIMULATED" if ctx.simulated else "real data"
    L = [
        f"# dv365 eval staleness (paper App. B): {ctx.dataset}{' (quick)' if quick else ''} — {sim}\n",
        banner(ctx.simulated, ctx.dataset),
    ]
    L.append(
        "Online training over consecutive windows: each model is evaluated on window w before it trains on it "
        f"({ctx.settings.staleness.passes} pass(es)). `fresh` reads the snapshot exported at its window's start; "
        "`stale` reads the first window's snapshot throughout; the control has no DV365 "
        f"(`{ctx.settings.staleness.variant}` integration otherwise). NE gain % = 100·(1 − NE/NE_control), mean over "
        "the binary tasks; positive = better; mean ± std over seeds.\n"
    )
    W = len(ctx.window_bounds)
    L.append("| window | mean age fresh (d) | mean age stale (d) | gain fresh % | gain stale % |")
    L.append("|---:|---:|---:|---:|---:|")
    g = res["gain_pct_per_window"]
    for w in range(1, W):

        def c(v: dict[str, Any]) -> str:
            return (
                "n/a"
                if v["mean"] is None
                else f"{v['mean']:+.3f}" + (f" ± {v['std']:.3f}" if v["std"] is not None else "")
            )

        L.append(
            f"| {w} | {res['age_days']['fresh'][w]:.1f} | {res['age_days']['stale'][w]:.1f} | "
            f"{c(g['fresh'][w - 1])} | {c(g['stale'][w - 1])} |"
        )
    mg = res["mean_gain_pct"]
    L.append(
        f"\nMean gain over windows: fresh {mg['fresh']['mean']}% (std {mg['fresh']['std']}), stale "
        f"{mg['stale']['mean']}% (std {mg['stale']['std']}). **Stale / fresh gain ratio: "
        f"{res['stale_fresh_gain_ratio']}**"
        + (
            ""
            if res["fresh_gain_positive"]
            else " (not defined: the fresh embedding gives no positive mean gain here, so the ratio is not meaningful)"
        )
        + ".\n"
    )
    c = res["cosine"]
    L.append(
        f"Cosine similarity between a user's embedding versions one window apart: median "
        f"**{c['adjacent'].get('median')}**, 10th percentile {c['adjacent'].get('p10')}, share > 0.9: "
        f"{c['adjacent'].get('share_gt_0.9')} ({c['adjacent'].get('n')} user-pairs); first vs last snapshot: median "
        f"{c['first_last'].get('median')}, share > 0.9: {c['first_last'].get('share_gt_0.9')}. (Paper: > 0.9 for "
        "nearly all users 7 days apart.)\n"
    )
    L.append(f"![staleness]({png.name})\n" if has_png else "(No plot: matplotlib is not installed.)\n")
    L += ["## Data and setting\n", *data_lines(ctx)]
    L.append(
        f"- windows start at {', '.join(time.strftime('%Y-%m-%d', time.gmtime(int(t))) for t in ctx.snap_as_of)} "
        "(UTC); the online protocol uses every downstream request (train, val and test parts) in time order; "
        "nothing is chosen on it"
    )
    return finish_report(ctx, res, L, md, js, png, has_png, command)
