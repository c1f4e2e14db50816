"""``dv365 eval diagnose``: why DV365 changes the ranker on returning users, measured, with fixes chosen on
validation.

On MovieLens the ranking experiment makes returning users (those with an embedding) *worse* beyond noise. This
experiment trains the control ranker and the ``linear`` DV365 ranker of the ranking experiment, plus:

* **content controls** (same training, different DV365 rows): ``shuffled`` — every present user reads another
  present user's rows of the same snapshot (same distribution, wrong user); ``constant`` — every present user
  reads the same rows (only presence and age are left);
* **candidate fixes** (``diagnose.candidates``: downstream overrides such as ``dv365_dropout: 0.25``,
  ``standardize_dv365: true``, ``proj_tokens: 1``).

For every model and seed it measures the mean normalised loss (NE; MSE / Var for the regression task, as in
early stopping) on a fixed sample of the **training** split's returning requests, on the validation split and
its returning requests, and on the test split. The reading rules are fixed in the code, before any run:

* *overfitting*: DV365 lowers the training loss on returning users beyond noise but raises the validation
  loss on them beyond noise;
* *content*: the real rows do no better than shuffled rows on validation (seed-paired, within noise or worse)
  -> the user-specific content carries nothing that holds on later requests;
* *fix*: among ``linear`` and the candidates, the lowest mean validation loss on returning users is chosen;
  it counts as a fix only if it is not worse than the control there beyond noise. Test figures are shown
  for the control, ``linear`` and the chosen one, nothing else is read from the test split.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dv365.experiments.downstream.common import RankerFit, banner, data_lines, finish_report, report_paths
from dv365.experiments.downstream.context import Context
from dv365.train.metrics import mean_normalized_loss, seed_stats

logger = logging.getLogger(__name__)

SPLITS = ("train_ret", "val", "val_ret", "test", "test_ret")


def _label(overrides: dict[str, Any]) -> str:
    return "linear " + ", ".join(f"{k}={v}" for k, v in overrides.items())


def content_control(ctx: Context, how: str, seed: int = 1) -> Context:
    """``ctx`` whose present users read another present user's rows (``shuffled``) or one user's rows
    (``constant``), snapshot by snapshot; presence and age stay as they are."""
    payload = ctx.snap_payload.copy()
    rng = np.random.default_rng(seed)
    for w in range(payload.shape[0]):
        idx = np.flatnonzero(ctx.snap_present[w])
        if len(idx) == 0:
            continue
        payload[w, idx] = payload[w, rng.permutation(idx)] if how == "shuffled" else payload[w, idx[0]]
    return replace(ctx, snap_payload=payload)


def models_of(ctx: Context) -> list[tuple[str, str, Context]]:
    """``(name, DV365 mode, context)`` of every model the experiment trains."""
    s = ctx.settings
    out = [("control", "none", ctx), ("linear", "linear", ctx)]
    out += [(f"linear {how}", "linear", content_control(ctx, how)) for how in s.diagnose.controls]
    for cand in s.diagnose.candidates:
        c = replace(ctx, settings=replace(s, downstream=replace(s.downstream, **dict(cand))))
        out.append((_label(dict(cand)), "linear", c))
    return out


def run_diagnose(ctx: Context, seeds: int) -> dict[str, Any]:
    s, d = ctx.settings, ctx.settings.downstream
    rows = ctx.rows
    train, val, test = rows["train"], rows["val"], rows["test"]
    rng = np.random.default_rng(0)
    ret_train = ctx.returning(train)
    sample = np.sort(rng.choice(ret_train, min(len(ret_train), s.diagnose.train_sample), replace=False))
    masks = {"val": np.isin(val, ctx.returning(val)), "test": np.isin(test, ctx.returning(test))}
    runs = []
    for seed in range(seeds):
        for name, mode, c in models_of(ctx):
            t0 = time.perf_counter()
            fit = RankerFit(c, mode, seed, train)
            step, _, _ = fit.fit(train, val, d.steps, d.val_every)
            v = fit.evaluate_subsets(val, {"ret": masks["val"]})
            t = fit.evaluate_subsets(test, {"ret": masks["test"]})
            loss = {
                "train_ret": mean_normalized_loss(fit.evaluate(sample)),
                "val": mean_normalized_loss(v["all"]),
                "val_ret": mean_normalized_loss(v["ret"]),
                "test": mean_normalized_loss(t["all"]),
                "test_ret": mean_normalized_loss(t["ret"]),
            }
            runs.append({"model": name, "seed": seed, "best_step": step, "loss": loss})
            logger.info(
                f"  diagnose {ctx.dataset} seed {seed} {name:32s} step {step:4d} "
                + " ".join(f"{k} {x:.4f}" for k, x in loss.items())
                + f" ({time.perf_counter() - t0:.0f} s)"
            )
    return summarize(runs, {k: int(m.sum()) for k, m in masks.items()} | {"train_ret": len(sample)})


def summarize(runs: list[dict[str, Any]], counts: dict[str, int]) -> dict[str, Any]:
    """Per model: each loss mean ± std over seeds and its seed-paired delta (%) vs the control; the verdicts."""
    names = list(dict.fromkeys(r["model"] for r in runs))
    by = {(r["model"], r["seed"]): r["loss"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    table: dict[str, Any] = {}
    for n in names:
        table[n] = {}
        for sp in SPLITS:
            vals = [by[(n, x)][sp] for x in seeds]
            base = [by[("control", x)][sp] for x in seeds]
            table[n][sp] = {
                "loss": seed_stats(vals),
                "delta_pct": seed_stats([100 * (a / b - 1) for a, b in zip(vals, base)]) if n != "control" else None,
            }
    return {"runs": runs, "models": names, "table": table, "counts": counts, "verdicts": verdicts(table)}


def _beyond(stat: dict[str, Any] | None, sign: int) -> bool:
    """The delta is beyond noise with the given sign (-1: lower loss, +1: higher loss)."""
    return bool(stat and stat["mean"] is not None and not stat["noise"] and sign * stat["mean"] > 0)


def verdicts(table: dict[str, Any]) -> dict[str, Any]:
    lin = table.get("linear")
    out: dict[str, Any] = {}
    if lin is None:
        return out
    out["regression_on_validation"] = _beyond(lin["val_ret"]["delta_pct"], +1)
    out["overfits"] = _beyond(lin["train_ret"]["delta_pct"], -1) and out["regression_on_validation"]
    if "linear shuffled" in table:
        real = lin["val_ret"]["loss"]["values"]
        shuf = table["linear shuffled"]["val_ret"]["loss"]["values"]
        paired = seed_stats([100 * (a / b - 1) for a, b in zip(real, shuf)])
        out["real_vs_shuffled_val_ret_pct"] = paired
        out["content_helps"] = _beyond(paired, -1)
    if "linear constant" in table:
        out["presence_only_val_ret_pct"] = table["linear constant"]["val_ret"]["delta_pct"]
    options = [n for n in table if n == "linear" or n.startswith("linear ") and "=" in n]
    chosen = min(options, key=lambda n: table[n]["val_ret"]["loss"]["mean"])
    out["chosen"] = chosen
    out["chosen_fixes_it"] = not _beyond(table[chosen]["val_ret"]["delta_pct"], +1)
    return out


def compact(res: dict[str, Any]) -> dict[str, Any]:
    """The JSON-line part: per model, the validation-returning and test-returning deltas; the verdicts."""
    t = res["table"]
    return {
        "delta_val_ret_pct": {n: t[n]["val_ret"]["delta_pct"] for n in res["models"] if n != "control"},
        "verdicts": {k: v for k, v in res["verdicts"].items() if not isinstance(v, dict)},
    }


def _cell(v: dict[str, Any] | None) -> str:
    if not v or v.get("mean") is None:
        return "–"
    s = f"{v['mean']:+.2f} ± {v['std'] if v['std'] is not None else float('nan'):.2f}"
    return s + (" ~" if v["noise"] else "")


def write_report(ctx: Context, res: dict[str, Any], out_dir: Path, quick: bool, command: str) -> dict[str, str]:
    md, png, js = report_paths(out_dir, "diagnose", ctx.dataset, quick)
    t, v, c = res["table"], res["verdicts"], res["counts"]
    d = ctx.settings.downstream
    L = [f"# dv365 eval diagnose: {ctx.dataset}{' (quick)' if quick else ''}\n", banner(ctx.simulated, ctx.dataset)]
    L.append(
        "Why does DV365 change the ranker on returning users (requests whose user has an embedding)? The ranking "
        f"experiment's control and `linear` rankers (short history: the last {d.history} events), plus content "
        "controls and candidate fixes, each trained on the same split and seeds. Cells: the mean normalised loss "
        "(NE, MSE / Var for regression; lower is better) as the seed-paired delta % vs the control, mean ± std; "
        "`~` = within noise. Reading rules and the choice are fixed in the code (module docstring); the choice "
        "reads the validation split only.\n"
    )
    L.append(
        f"Returning requests: {c['train_ret']:,} sampled from the training split, {c['val']:,} in validation, "
        f"{c['test']:,} in test.\n"
    )
    L.append("| model | train, returning | validation | validation, returning |\n|---|---:|---:|---:|")
    for n in res["models"]:
        if n == "control":
            row = [f"{t[n][sp]['loss']['mean']:.4f} (loss)" for sp in ("train_ret", "val", "val_ret")]
        else:
            row = [_cell(t[n][sp]["delta_pct"]) for sp in ("train_ret", "val", "val_ret")]
        L.append(f"| {n} | " + " | ".join(row) + " |")
    L.append("\n## What the numbers say\n")
    yes = lambda b: "**yes**" if b else "**no**"  # noqa: E731
    L.append(
        f"- DV365 (`linear`) worse than the control on validation returning requests, beyond noise: {yes(v['regression_on_validation'])}."
    )
    L.append(
        f"- Overfitting (lower training loss on returning users beyond noise, higher validation loss beyond "
        f"noise): {yes(v['overfits'])}."
    )
    if "content_helps" in v:
        L.append(
            f"- The real rows beat another user's rows (shuffled) on validation returning requests, beyond noise: "
            f"{yes(v['content_helps'])} (real vs shuffled {_cell(v['real_vs_shuffled_val_ret_pct'])} %)."
        )
    if "presence_only_val_ret_pct" in v:
        L.append(
            "- Presence and age alone (every present user reads the same rows) vs the control on validation "
            f"returning requests: {_cell(v['presence_only_val_ret_pct'])} %."
        )
    L.append(
        f"- Chosen on validation (lowest loss on returning requests): `{v['chosen']}`; not worse than the control "
        f"there beyond noise: {yes(v['chosen_fixes_it'])}."
    )
    L.append("\n## Test (control, linear and the chosen model only)\n")
    L.append("| model | test | test, returning |\n|---|---:|---:|")
    for n in dict.fromkeys(["linear", v["chosen"]]):
        L.append(f"| {n} | {_cell(t[n]['test']['delta_pct'])} | {_cell(t[n]['test_ret']['delta_pct'])} |")
    L.append("\n## Data and setting\n")
    L += data_lines(ctx)
    L.append(
        f"- candidates: {list(map(dict, ctx.settings.diagnose.candidates))}; controls: {list(ctx.settings.diagnose.controls)}"
    )
    return finish_report(ctx, res, L, md, js, png, False, command)
