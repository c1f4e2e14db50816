"""``dv365 eval all``: the overview report ``<out>/all[-quick].md`` built from the per-experiment summaries,
next to the paper's figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PAPER = {
    "ranking": "NE −0.4% on average (linear projection −0.18% … −1.15% per task; no projection −0.08% … −0.74%)",
    "retrieval": "HR@1 +3.8% … +7.9%, HR@10 +0.5% … +3.9% (GateNet: +4.5% … +7.5% / +1.3% … +3.9%)",
    "staleness": "fresh ≈ stale ≈ −0.35% NE over 7 days; cosine between versions 7 days apart > 0.9 for nearly all users",
    "encoders": "position-weighted pooling and HSTU add nothing over mean pooling once histories reach ~35K "
    "(HSTU scaled to 1K only)",
}


DATA_FACTS = (
    "users",
    "requests",
    "test",
    "test_returning",
    "test_missing_share",
    "max_events_per_user",
)  # per data set


def _f(v: Any) -> str:
    if isinstance(v, dict):
        if v.get("mean") is None:
            return "n/a"
        s = f"{v['mean']:+.3f}" + (f" ± {v['std']:.3f}" if v.get("std") is not None else "")
        return s + (" ~" if v.get("noise") else "")
    return "n/a" if v is None else str(v)


def write_all_report(summary: dict[str, Any], out: Path, quick: bool, command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    name = f"all{'-quick' if quick else ''}"
    L = [
        f"# dv365 eval all{' (quick)' if quick else ''}: the paper's downstream evidence on public data\n",
        "Per data set, the headline figures of every experiment, next to the paper's. MovieLens is real data; "
        "**synth is SIMULATED** (stable long-term interests by construction: it checks the implementation and "
        "exercises the long-history regime). `~` = within noise over the seeds. The per-experiment reports have the "
        "details, the settings and the returning-user breakdowns.\n",
    ]
    for ds, e in summary["datasets"].items():
        sim = " — SIMULATED" if e.get("simulated") else " — real data"
        L.append(f"## {ds}{sim}\n")
        if "ranking" in e:
            r = e["ranking"]["delta_ne_pct"]
            L.append(f"**Ranking** (NE Δ %, negative = better; paper: {PAPER['ranking']})\n")
            tasks = [t for t in next(iter(r.values()))] if r else []
            L.append("| variant | " + " | ".join(t.replace("_mean_over_tasks", "mean") for t in tasks) + " |")
            L.append("|---|" + "---:|" * len(tasks))
            for k, ts in r.items():
                L.append(f"| {k} | " + " | ".join(_f(ts[t]) for t in tasks) + " |")
            L.append("")
        if "retrieval" in e:
            r = e["retrieval"]["delta_hr_pct"]
            L.append(f"**Retrieval** (HR Δ %, positive = better; paper: {PAPER['retrieval']})\n")
            keys = [t for t in next(iter(r.values()))] if r else []
            L.append("| variant | " + " | ".join(keys) + " |")
            L.append("|---|" + "---:|" * len(keys))
            for k, ts in r.items():
                L.append(f"| {k} | " + " | ".join(_f(ts[t]) for t in keys) + " |")
            L.append("")
        if "staleness" in e:
            s = e["staleness"]
            L.append(
                f"**Staleness** (paper: {PAPER['staleness']}): mean NE gain fresh {_f(s['mean_gain_pct']['fresh'])}%, "
                f"stale {_f(s['mean_gain_pct']['stale'])}%; stale/fresh gain ratio **{s['stale_fresh_gain_ratio']}**; "
                f"median cosine between versions one window apart **{s['median_version_cosine']}** "
                f"(first vs last: {s['median_cosine_first_last']})\n"
            )
        if "encoders" in e:
            c = e["encoders"]
            L.append(
                f"**Encoders** (paper: {PAPER['encoders']}); longest history {c['longest']:,}; test NE by cap: "
                + "; ".join(
                    f"{k}: " + ", ".join(f"{cap}→{v if v is None else round(v, 4)}" for cap, v in caps.items())
                    for k, caps in c["ne"].items()
                )
                + "\n"
            )
            L.append("| length | encoder | status | ms / user | peak MB |")
            L.append("|---:|---|---|---:|---:|")
            for r in c["cost_table"]:
                ms = "" if r.get("seconds") is None else f"{1000 * r['seconds']:.2f}"
                mb = "" if r.get("peak_mb") is None else f"{r['peak_mb']:.2f}"
                L.append(f"| {r['length']:,} | {r['encoder']} | {r['status']} | {ms} | {mb} |")
            L.append("")
    L.append("## Reports\n")
    for k, p in summary["reports"].items():
        L.append(f"- {k}: [{Path(p).name}]({Path(p).name})")
    if summary.get("commands"):  # assembled from reports made by separate runs: each one's own command
        L.append(
            f"\nBuilt from the JSON of those reports (no model trained by this command). Their experiments took "
            f"{summary['seconds'] / 60:.1f} min in all (a sum: runs may have overlapped); they were made by:\n\n```bash"
        )
        L += sorted(set(summary["commands"].values()))
        L.append(f"```\n\n## Command\n\n```bash\n{command}\n```\n")
    else:
        L.append(f"\nWall time {summary['seconds'] / 60:.1f} min.\n\n## Command\n\n```bash\n{command}\n```\n")
    md = out / f"{name}.md"
    md.write_text("\n".join(L) + "\n")
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return str(md)


def from_reports(experiments: list[str], datasets: list[str], out: Path, quick: bool) -> dict[str, Any]:
    """The ``eval all`` summary of per-experiment reports already in ``out`` (``<experiment>-<dataset>[-quick]``
    .json and .md, e.g. made by separate runs with different ``--seeds``), each with the command that made it.

    Raises:
        ExperimentError: a report is missing or is not an experiment report (names the file).
    """
    import importlib

    from dv365.experiments.downstream.settings import ExperimentError

    per: dict[str, Any] = {}
    reports: dict[str, str] = {}
    commands: dict[str, str] = {}
    total = 0.0
    for ds in datasets:
        entry: dict[str, Any] = {}
        for exp in experiments:
            stem = out / f"{exp}-{ds}{'-quick' if quick else ''}"
            js, md = stem.with_suffix(".json"), stem.with_suffix(".md")
            if not js.exists() or not md.exists():
                raise ExperimentError(
                    f"{js}: no {exp} report for {ds} in {out} (run `dv365 eval {exp} --dataset {ds}"
                    f"{' --quick' if quick else ''} --out {out}` first)"
                )
            try:
                res = json.loads(js.read_text())
                compact = importlib.import_module(f"dv365.experiments.downstream.{exp}").compact(res)
            except (ValueError, KeyError, TypeError) as e:
                raise ExperimentError(f"{js}: not a {exp} report ({type(e).__name__}: {e})") from e
            entry.setdefault("simulated", bool(res.get("simulated")))
            if "facts" in res and "data" not in entry:
                entry["data"] = {k: res["facts"][k] for k in DATA_FACTS}
            entry[exp] = compact | {"seconds": res.get("seconds")}
            total += float(res.get("seconds") or 0.0)
            reports[f"{exp}-{ds}"] = str(md)
            text = md.read_text()
            cmd = text.rsplit("```bash\n", 1)[-1].split("\n```", 1)[0].strip() if "```bash\n" in text else "(unknown)"
            commands[f"{exp}-{ds}"] = cmd
        per[ds] = entry
    return {
        "experiment": "all",
        "quick": quick,
        "seeds": None,
        "datasets": per,
        "reports": reports,
        "commands": commands,
        "seconds": round(total, 1),
    }
