"""The next-item report: seed statistics, the recovered fraction R, verdicts, Markdown + PNG + JSON.

R (per seed, then mean ± std over seeds)::

    R = (M(short-K+extra) - M(short-K)) / (M(full) - M(short-K))

the share of what the long history adds to the short model (full vs short-K) that the extra recovers; undefined
for a seed where full does not beat short-K (``M(full) <= M(short-K)``), and left out there.

Noise. A difference between two arms counts only when it passes both of:

* the project's seed rule (:func:`dv365.train.metrics.seed_stats`): |mean| > 2·std/√n over the seed-paired
  differences (training noise: initialisation, dropout, negatives, batch order);
* the test users: the 95 % paired-bootstrap interval over users of the per-user difference (each user's
  metric averaged over the seeds, :func:`user_interval`) excludes 0. Every seed scores the same few hundred
  or thousand test targets, so the seed rule alone cannot see how much a different draw of users would move
  the result (on ml-latest-small one user is 0.0016 of HR@10).

Reports written before the runs kept their per-user test ranks (``test_ranks``) have the seed rule only, and
say so.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dv365.experiments.downstream.common import plot_bars
from dv365.experiments.nextitem.train import per_user_metrics
from dv365.train.metrics import beyond_noise, bootstrap_interval, seed_stats

HEADLINE = ("HR@10", "NDCG@10")


def recovered_fraction(full: Sequence[float], short: Sequence[float], extra: Sequence[float]) -> dict[str, Any]:
    """Seed-paired R (module docstring): ``seed_stats`` of the per-seed ratios (undefined seeds dropped)."""
    vals = []
    for f, s, e in zip(full, short, extra, strict=True):
        gap = f - s
        vals.append((e - s) / gap if gap > 0 else math.nan)
    out = seed_stats(vals)
    out["undefined_seeds"] = sum(1 for v in vals if not math.isfinite(v))
    return out


def paired_delta(
    a: Sequence[float],
    b: Sequence[float],
    users_a: np.ndarray | None = None,
    users_b: np.ndarray | None = None,
) -> dict[str, Any]:
    """``seed_stats`` of a - b per seed; with both arms' ``[S, U]`` per-user metrics, also ``users``: the
    bootstrap interval over users (:func:`user_interval`)."""
    d = seed_stats([x - y for x, y in zip(a, b, strict=True)])
    if users_a is not None and users_b is not None and users_a.shape == users_b.shape:
        d["users"] = user_interval(users_a, users_b)
    return d


def beyond(d: Mapping[str, Any]) -> bool:
    """A positive difference beyond noise: by the seed rule and, where the per-user ranks were kept, with a
    bootstrap interval over users above 0."""
    return d.get("mean") is not None and d["mean"] > 0 and beyond_noise(d)


BOOTSTRAP = 2000  # resamples of the test users
BOOTSTRAP_SEED = 0


def per_user(runs: Sequence[Mapping[str, Any]], metric: str, mask: np.ndarray | None) -> np.ndarray | None:
    """``[S, U]`` per-user test ``metric`` of an arm's seeds (``None`` where a run has no ``test_ranks``)."""
    if not runs or any("test_ranks" not in r for r in runs):
        return None
    m = np.stack([per_user_metrics(np.asarray(r["test_ranks"]))[metric] for r in runs])
    return m if mask is None else m[:, mask]


def user_interval(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """Paired bootstrap over users of ``mean(a - b)``: ``a``, ``b`` ``[S, U]`` per-user metrics of two arms on the
    same seeds; each user's difference is averaged over the seeds, users are resampled with replacement
    (:data:`BOOTSTRAP` times, a fixed seed: :func:`dv365.train.metrics.bootstrap_interval`) and the ``level``
    percentile interval of the mean is returned with the number of users."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean(0)
    n = len(diff)
    if n == 0:
        return {"mean": None, "low": math.nan, "high": math.nan, "users": 0}
    lo, hi = bootstrap_interval(n, lambda w: (w @ diff) / n, BOOTSTRAP, BOOTSTRAP_SEED, level)
    return {"mean": round(float(diff.mean()), 5), "low": round(float(lo), 5), "high": round(float(hi), 5), "users": n}


def _ms(v: Sequence[float]) -> str:
    s = seed_stats(v)
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["std"] is not None else "")


def _stat(v: Mapping[str, Any], digits: int = 3) -> str:
    undefined = f" ({v['undefined_seeds']} seed(s) undefined)" if v.get("undefined_seeds") else ""
    if v.get("mean") is None:
        return "n/a" + undefined
    s = f"{v['mean']:+.{digits}f}" + (f" ± {v['std']:.{digits}f}" if v.get("std") is not None else "")
    return (f"{s} ~" if v.get("noise") else f"**{s}**") + undefined


def _compare(
    arms: Mapping[str, Any], m: Mapping[str, Any], a: str, b: str, mt: str, mask: np.ndarray | None, known: bool
) -> dict[str, Any]:
    """:func:`paired_delta` of arms ``a`` - ``b`` on metric ``mt`` (``m``: the subset's per-seed means; ``mask``:
    its users, None = all; ``known``: whether the subset's users are known, i.e. the user interval can be
    computed)."""
    ua = per_user(arms[a].get("runs", []), mt, mask) if known else None
    ub = per_user(arms[b].get("runs", []), mt, mask) if known else None
    return paired_delta(m[a][mt], m[b][mt], ua, ub)


def _users(v: Mapping[str, Any]) -> str:
    u = v.get("users")
    if not u or u.get("mean") is None:
        return "–"
    inside = u["low"] <= 0 <= u["high"]
    txt = f"[{u['low']:+.4f}, {u['high']:+.4f}]"
    return f"{txt} ~" if inside else f"**{txt}**"


def summarize(res: Mapping[str, Any]) -> dict[str, Any]:
    """Per encoder and K: test metrics per arm (all / long users), deltas vs short-K (seed rule and user
    interval), R, verdicts."""
    out: dict[str, Any] = {}
    lengths = np.asarray(res["user_lengths"]) if res.get("user_lengths") is not None else None
    for enc, er in res["encoders"].items():
        for k in res["short"]:
            key = f"{enc}/K={k}"
            short = f"short-{k}"
            names = ["full", short, f"{short}+mean", f"{short}+dv365"]
            arms = {n: er["arms"][n] for n in names if n in er["arms"]}
            block: dict[str, Any] = {"arms": {}, "deltas": {}, "R": {}, "verdicts": {}}
            for subset in ("all", "long"):
                m = {n: a["test"][subset if subset == "all" else f"long{k}"] for n, a in arms.items()}
                mask = None if subset == "all" or lengths is None else lengths > k + res["long_margin"]
                # delta(a, b, metric): a - b on this subset (its users are known unless an old JSON's long subset)
                delta = functools.partial(_compare, arms, m, mask=mask, known=subset == "all" or mask is not None)

                block["arms"][subset] = {n: {mt: seed_stats(v) for mt, v in mm.items()} for n, mm in m.items()}
                for extra in ("mean", "dv365"):
                    arm = f"{short}+{extra}"
                    if arm not in m or short not in m:
                        continue
                    for mt in HEADLINE:
                        block["deltas"].setdefault(subset, {}).setdefault(arm, {})[mt] = delta(arm, short, mt)
                        if "full" in m:
                            block["R"].setdefault(subset, {}).setdefault(arm, {})[mt] = recovered_fraction(
                                m["full"][mt], m[short][mt], m[arm][mt]
                            )
                if "full" in m and short in m:
                    for mt in HEADLINE:
                        block["deltas"].setdefault(subset, {}).setdefault("full", {})[mt] = delta("full", short, mt)
                if f"{short}+dv365" in m and f"{short}+mean" in m:
                    for mt in HEADLINE:
                        block["deltas"][subset].setdefault("dv365-vs-mean", {})[mt] = delta(
                            f"{short}+dv365", f"{short}+mean", mt
                        )
            d = block["deltas"].get("all", {})
            v = block["verdicts"]
            for mt in HEADLINE:
                if "full" in d:  # R is only meaningful where the long history helps beyond noise
                    v[f"full beats {short} ({mt})"] = beyond(d["full"][mt])
                if f"{short}+dv365" in d:
                    v[f"{short}+dv365 beats {short} ({mt})"] = beyond(d[f"{short}+dv365"][mt])
                if f"{short}+mean" in d:
                    v[f"{short}+mean beats {short} ({mt})"] = beyond(d[f"{short}+mean"][mt])
                if "dv365-vs-mean" in d:
                    v[f"{short}+dv365 beats {short}+mean ({mt})"] = beyond(d["dv365-vs-mean"][mt])
            out[key] = block
    return out


def report_stem(res: Mapping[str, Any]) -> str:
    """``nextitem-<dataset>[-quick][-<profile>]``: the profile is the rest of a shipped config's name given with
    ``--config`` (``movielens-medium`` -> ``nextitem-movielens-medium``), so runs of different shipped configs do
    not overwrite each other's report; a config given as a file path adds nothing."""
    stem = f"nextitem-{res['dataset']}{'-quick' if res['quick'] else ''}"
    profile = res.get("profile") or ""
    return stem if profile in ("", "quick" if res["quick"] else "") else f"{stem}-{profile}"


def write_report(res: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """``<out>/<report_stem(res)>.md / .png / .json``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(res)
    md, png, js = out / f"{stem}.md", out / f"{stem}.png", out / f"{stem}.json"
    summary = summarize(res)
    res["summary"] = summary
    groups, series = [], {}
    for key, block in summary.items():
        groups.append(key)
        for n, st in block["arms"]["all"].items():
            label = "full" if n == "full" else n.split("-", 1)[1].split("+", 1)[-1] if "+" in n else "short"
            series.setdefault(label, []).append(st["HR@10"])
    has_png = plot_bars(png, f"next-item test HR@10 ({res['dataset']}, {res['label']})", groups, series, "HR@10")
    md.write_text(markdown(res, summary, png.name if has_png else None))
    js.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return {"markdown": str(md), "json": str(js), **({"png": str(png)} if has_png else {})}


def markdown(res: Mapping[str, Any], summary: Mapping[str, Any], png: str | None) -> str:
    f = res["facts"]
    L = [f"# Next-item retrieval with DV365 distant history — {res['dataset']} ({res['label']})\n"]
    if res["label"] == "SIMULATED":
        L.append(
            "> **SIMULATED data** (`dv365 synth`): long-term interests exist by construction. This run checks the "
            "implementation, not the method.\n"
        )
    else:
        L.append("> **REAL data** (the data set's metadata says it is not simulated). Results as measured.\n")
    L += [
        "## Set-up\n",
        f"- data set `{res['url']}`: {f['users']:,} users with >= {f['min_items']} items "
        f"({f['dropped_users']:,} dropped), {f['items']:,} items, {f['events']:,} events "
        f"(mean {f['mean_len']:.1f}, median {f['median_len']:.0f}, max {f['max_len']:,} per user); sequence = "
        f"`{f['source']}` events of actions {f['actions'] or 'all'}",
        "- leave-one-out: last item = test target, second-to-last = validation target, every earlier item a "
        "training target; models are trained without the validation item; model selection (step, fusion mode) "
        "on validation HR@10; test evaluated once per model with the history before the test target",
        "- exhaustive ranking over every item (seen items included); HR@K / NDCG@K averaged over users",
        f"- encoders {list(res['encoders'])}: d = {res['model']['dim']}, {res['model']['blocks']} blocks, "
        f"{res['model']['heads']} head, dropout {res['model']['dropout']}; sampled softmax "
        f"({res['train']['negatives']} uniform negatives per position), temperature {res['train']['temperature']}, "
        f"AdamW lr {res['train']['lr']}, batch {res['train']['batch_size']}, up to {res['train']['epochs']} epochs "
        + (f"(full arm: {res['train']['full_epochs']}) " if res["train"].get("full_epochs") else "")
        + f"(validation every {res['train']['val_every']} steps, patience {res['train']['patience']})",
        f"- arms: full (last {res['max_len']} items) | short-K (last K) | short-K+mean (mean of the model's item "
        "embeddings of every item older than the window) | short-K+dv365 (the DV365 embedding of every event older "
        "than the window: cut at the window's first item). Training windows: consecutive chunks of K (full: "
        f"{res['max_len']}) items; a chunk's distant history is cut at its first item",
        f"- DV365 provider: {res['provider']['desc']}; built in {res['provider']['seconds']:.0f} s (seed "
        f"{res['provider']['seed']}, frozen), embeddings cached in {res['provider']['cache_seconds']:.1f} s; "
        f"[{res['provider']['out_tokens']}, {res['provider']['dim']}] per user"
        + (
            f", {res['provider']['stored_bytes']:,} B as stored (int4 rows)"
            if res["provider"].get("stored_bytes")
            else ""
        )
        + "; share of windows with an embedding (present): "
        + ", ".join(f"K={k}: {v:.2f}" for k, v in res["provider"]["present_share"].items()),
        f"- seeds {res['seeds']}; long-history users: more than K + {res['long_margin']} items; models trained on "
        f"`{res.get('device', 'cpu')}`, serving cost measured on the CPU",
        "",
    ]
    if png:
        L.append(f"![HR@10 per arm]({png})\n")
    has_users = any(
        "users" in dd[mt]
        for block in summary.values()
        for d in block["deltas"].values()
        for dd in d.values()
        for mt in dd
    )
    if has_users:
        L.append(
            "## Verdicts (counted only beyond noise: |mean| > 2·std/√n of the seed-paired difference, and the 95 % "
            f"paired-bootstrap interval over test users ({BOOTSTRAP:,} resamples) above 0)\n"
        )
    else:
        L.append("## Verdicts (counted only beyond noise: |mean| > 2·std/√n of the seed-paired difference)\n")
        L.append(
            "This run's JSON has no per-user test ranks (written before they were kept), so the interval over test "
            "users is not computed: the seed rule alone does not count how few test users there are.\n"
        )
    L.append(
        "R is read only where `full beats short-K` is yes: otherwise the long history adds nothing measurable "
        "to recover (e.g. under-trained quick models).\n"
    )
    for key, block in summary.items():
        for name, ok in block["verdicts"].items():
            L.append(f"- {key}: {name} beyond noise: **{'yes' if ok else 'no'}**")
    L.append("")
    for key, block in summary.items():
        enc = key.split("/")[0]
        L.append(f"## {key}\n")
        fus = res["encoders"][enc]["fusion"]
        k = int(key.split("=")[1])
        for extra in ("mean", "dv365"):
            sel = fus.get(f"{k}/{extra}")
            if sel:
                vals = ", ".join(f"{m} {v:.4f}" for m, v in sel["val_hr10"].items())
                why = f"validation HR@10 over the first seeds: {vals}" if vals else "the only mode configured"
                L.append(f"- fusion for +{extra}: **{sel['chosen']}** ({why})")
        L.append("")
        for subset, title in (("all", "all users"), ("long", f"users with more than {k + res['long_margin']} items")):
            arms = block["arms"][subset]
            n_users = res["encoders"][enc]["subset_users"].get(f"long{k}") if subset == "long" else f["users"]
            L.append(f"### Test, {title} ({n_users:,} users), mean ± std over seeds\n")
            metrics = list(next(iter(arms.values())).keys())
            L.append("| arm | " + " | ".join(metrics) + " |")
            L.append("|---|" + "---|" * len(metrics))
            for n in arms:
                vals = res["encoders"][enc]["arms"][n]["test"]["all" if subset == "all" else f"long{k}"]
                L.append(f"| {n} | " + " | ".join(_ms(vals[m]) for m in metrics) + " |")
            L.append("")
            d = block["deltas"].get(subset, {})
            r = block["R"].get(subset, {})
            if d:
                L.append(
                    "| comparison | Δ HR@10 (seeds) | 95 % over users | Δ NDCG@10 (seeds) | 95 % over users | R HR@10 | "
                    "R NDCG@10 |"
                )
                L.append("|---|---|---|---|---|---|---|")
                for arm, dd in d.items():
                    rr = r.get(arm, {})
                    label = f"short-{k}+dv365 − short-{k}+mean" if arm == "dv365-vs-mean" else f"{arm} − short-{k}"
                    L.append(
                        f"| {label} | {_stat(dd['HR@10'], 4)} | {_users(dd['HR@10'])} | {_stat(dd['NDCG@10'], 4)} | "
                        f"{_users(dd['NDCG@10'])} | {_stat(rr['HR@10'], 2) if rr else ''} | "
                        f"{_stat(rr['NDCG@10'], 2) if rr else ''} |"
                    )
                L.append("")
        L.append("Training length per seed (model selection on validation HR@10: the best step's state is kept):\n")
        L.append("| arm | best step | steps run / cap | validation HR@10 | seconds |")
        L.append("|---|---|---|---|---|")
        for n in block["arms"]["all"]:
            runs = res["encoders"][enc]["arms"][n].get("runs", [])
            if runs:
                best = ", ".join(str(r["best_step"]) for r in runs)
                ran = ", ".join(
                    f"{r['steps']}/{r['max_steps']}" if r.get("max_steps") else str(r["steps"]) for r in runs
                )
                val = _ms(res["encoders"][enc]["arms"][n]["val"]["HR@10"])
                L.append(f"| {n} | {best} | {ran} | {val} | {sum(r['seconds'] for r in runs):.0f} |")
        L.append("")
        L.append("Serving cost per user (batch 1, forward of the encoder and fusion; scoring excluded):\n")
        L.append("| arm | ms / user | peak KiB of tensors | input KiB |")
        L.append("|---|---|---|---|")
        for n in block["arms"]["all"]:
            c = res["encoders"][enc]["arms"][n].get("cost")
            if c:
                L.append(f"| {n} | {c['ms_per_user']:.2f} | {c['peak_kib']:.0f} | {c['input_kib']:.1f} |")
        L.append("")
    L += [
        "R = (M(short-K+extra) − M(short-K)) / (M(full) − M(short-K)), per seed then mean ± std (seeds where full "
        "does not beat short-K are left out). **bold** = beyond noise, `~` = within noise. Δ (seeds): mean ± std "
        "of the seed-paired differences, `~` when |mean| <= 2·std/√n; 95 % over users: the paired-bootstrap "
        "interval of the mean difference when the test users are resampled (each user's metric averaged over "
        "the seeds), `~` when it contains 0. A verdict needs both.\n",
        f"- wall time {res['seconds']:.0f} s\n",
        f"## Command\n\n```bash\n{res['command']}\n```\n",
    ]
    return "\n".join(L) + "\n"
