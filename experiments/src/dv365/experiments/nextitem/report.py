"""The next-item report: seed statistics, the recovered fraction R, verdicts, Markdown + PNG + JSON.

R (per seed, then mean ± std over seeds)::

    R = (M(short-K+extra) - M(short-K)) / (M(full) - M(short-K))

the share of what the long history adds to the short model (full vs short-K) that the extra recovers; undefined
for a seed where full does not beat short-K (``M(full) <= M(short-K)``), and left out there. Noise flags follow
the project's rule (:func:`dv365.train.metrics.seed_stats`): beyond noise only if |mean| > 2·std/√n.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dv365.experiments.downstream.common import plot_bars
from dv365.train.metrics import seed_stats

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


def paired_delta(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``seed_stats`` of a - b per seed."""
    return seed_stats([x - y for x, y in zip(a, b, strict=True)])


def beyond(d: Mapping[str, Any]) -> bool:
    """A positive seed-paired difference beyond noise."""
    return d.get("mean") is not None and d["mean"] > 0 and not d["noise"]


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


def summarize(res: Mapping[str, Any]) -> dict[str, Any]:
    """Per encoder and K: test metrics per arm (all / long users), deltas vs short-K, R, verdicts."""
    out: dict[str, Any] = {}
    for enc, er in res["encoders"].items():
        for k in res["short"]:
            key = f"{enc}/K={k}"
            short = f"short-{k}"
            names = ["full", short, f"{short}+mean", f"{short}+dv365"]
            arms = {n: er["arms"][n] for n in names if n in er["arms"]}
            block: dict[str, Any] = {"arms": {}, "deltas": {}, "R": {}, "verdicts": {}}
            for subset in ("all", "long"):
                m = {n: a["test"][subset if subset == "all" else f"long{k}"] for n, a in arms.items()}
                block["arms"][subset] = {n: {mt: seed_stats(v) for mt, v in mm.items()} for n, mm in m.items()}
                for extra in ("mean", "dv365"):
                    arm = f"{short}+{extra}"
                    if arm not in m or short not in m:
                        continue
                    for mt in HEADLINE:
                        block["deltas"].setdefault(subset, {}).setdefault(arm, {})[mt] = paired_delta(
                            m[arm][mt], m[short][mt]
                        )
                        if "full" in m:
                            block["R"].setdefault(subset, {}).setdefault(arm, {})[mt] = recovered_fraction(
                                m["full"][mt], m[short][mt], m[arm][mt]
                            )
                if "full" in m and short in m:
                    for mt in HEADLINE:
                        block["deltas"].setdefault(subset, {}).setdefault("full", {})[mt] = paired_delta(
                            m["full"][mt], m[short][mt]
                        )
                if f"{short}+dv365" in m and f"{short}+mean" in m:
                    for mt in HEADLINE:
                        block["deltas"][subset].setdefault("dv365-vs-mean", {})[mt] = paired_delta(
                            m[f"{short}+dv365"][mt], m[f"{short}+mean"][mt]
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
    L.append("## Verdicts (counted only beyond noise: |mean| > 2·std/√n of the seed-paired difference)\n")
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
                L.append("| comparison | Δ HR@10 | Δ NDCG@10 | R HR@10 | R NDCG@10 |")
                L.append("|---|---|---|---|---|")
                for arm, dd in d.items():
                    rr = r.get(arm, {})
                    label = f"short-{k}+dv365 − short-{k}+mean" if arm == "dv365-vs-mean" else f"{arm} − short-{k}"
                    L.append(
                        f"| {label} | {_stat(dd['HR@10'], 4)} | {_stat(dd['NDCG@10'], 4)} | "
                        f"{_stat(rr['HR@10'], 2) if rr else ''} | {_stat(rr['NDCG@10'], 2) if rr else ''} |"
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
        "does not beat short-K are left out). **bold** = beyond noise, `~` = within noise.\n",
        f"- wall time {res['seconds']:.0f} s\n",
        f"## Command\n\n```bash\n{res['command']}\n```\n",
    ]
    return "\n".join(L) + "\n"
