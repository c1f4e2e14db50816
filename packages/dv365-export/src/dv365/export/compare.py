"""``dv365 export compare A B``: how stable are user embeddings between two snapshots? (paper App. B, Fig. 4)

For every user in both snapshots, both embeddings are de-quantized with core's pure-PyTorch
:func:`~dv365.core.quantize.dequantize_rows` and compared by the cosine similarity of the *flattened*
``N_out x D`` vectors (one number per user; the paper reports > 0.9 for nearly all users at 7 days apart).
Per-row cosines (``N_out`` per user) are summarised too, as their per-user mean.

Writes ``compare.json`` (summary + the histogram counts), ``cosine_hist.png`` (matplotlib, with an inset on
[0.9, 1] like Fig. 4) and ``compare.md`` into the output folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dv365.core.quantize import dequantize_rows
from dv365.core.snapshot import SnapshotError
from dv365.export.plan import SnapshotIndex

BINS = np.linspace(-1.0, 1.0, 201)  # 0.01 wide


@dataclass(frozen=True)
class Comparison:
    """Cosines of the common users (ascending ids) and the summary."""

    user_ids: np.ndarray
    cosine: np.ndarray  # [U] flattened-vector cosine
    row_cosine_mean: np.ndarray  # [U] mean over the N_out rows
    summary: dict[str, Any]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of ``[..., K]`` tensors in float64; a zero vector against itself is 1."""
    a, b = a.double(), b.double()
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    same = (a == b).all(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(same, 1.0, 0.0))


def compare_snapshots(a_url: str, b_url: str) -> Comparison:
    """Cosine similarity between snapshots ``a`` and ``b`` for their common users."""
    a, b = SnapshotIndex(a_url), SnapshotIndex(b_url)
    fa, fb = a.fmt, b.fmt
    if (fa.dim, fa.rows_per_user) != (fb.dim, fb.rows_per_user):
        raise SnapshotError(
            f"cannot compare {a_url} ({fa.rows_per_user} x {fa.dim}) with {b_url} "
            f"({fb.rows_per_user} x {fb.dim}): different embedding shapes"
        )
    ids_out, cos_out, rowcos_out = [], [], []
    for _, ids in a.iter_shards():
        common = ids[b.contains(ids)]
        if not len(common):
            continue
        xa = dequantize_rows(torch.from_numpy(a.payload(common)).view(len(common), fa.rows_per_user, -1), fa.bits)
        xb = dequantize_rows(torch.from_numpy(b.payload(common)).view(len(common), fb.rows_per_user, -1), fb.bits)
        ids_out.append(common)
        cos_out.append(_cos(xa.reshape(len(common), -1), xb.reshape(len(common), -1)).numpy())
        rowcos_out.append(_cos(xa, xb).mean(dim=1).numpy())
    ids = np.concatenate(ids_out + [np.zeros(0, np.int64)])
    order = np.argsort(ids)
    ids = ids[order]
    cos = np.concatenate(cos_out + [np.zeros(0)])[order]
    rowcos = np.concatenate(rowcos_out + [np.zeros(0)])[order]
    ma, mb = a.manifest, b.manifest
    summary: dict[str, Any] = {
        "a": {
            "url": a_url,
            "snapshot_id": ma.snapshot_id,
            "model_version": ma.model_version,
            "data_cutoff_ts": ma.data_cutoff_ts,
            "users": ma.user_count,
            "simulated": ma.simulated,
        },
        "b": {
            "url": b_url,
            "snapshot_id": mb.snapshot_id,
            "model_version": mb.model_version,
            "data_cutoff_ts": mb.data_cutoff_ts,
            "users": mb.user_count,
            "simulated": mb.simulated,
        },
        "days_apart": round((mb.data_cutoff_ts - ma.data_cutoff_ts) / 86400.0, 3),
        "common_users": int(len(ids)),
        "only_in_a": int(ma.user_count - len(ids)),
        "only_in_b": int(mb.user_count - len(ids)),
        "measure": "cosine of the flattened N_out x D de-quantized embedding",
    }
    if len(ids):
        summary.update(
            {
                "mean": float(cos.mean()),
                "min": float(cos.min()),
                "p5": float(np.percentile(cos, 5)),
                "p50": float(np.percentile(cos, 50)),
                "p95": float(np.percentile(cos, 95)),
                "frac_gt_0.9": float((cos > 0.9).mean()),
                "frac_gt_0.99": float((cos > 0.99).mean()),
                "row_cosine_mean": float(rowcos.mean()),
            }
        )
    return Comparison(ids, cos, rowcos, summary)


def summary_lines(c: Comparison) -> list[str]:
    s = c.summary
    head = (
        f"{s['a']['snapshot_id']} -> {s['b']['snapshot_id']} ({s['days_apart']:g} days apart): "
        f"{s['common_users']:,} common users ({s['only_in_a']:,} only in A, {s['only_in_b']:,} only in B)"
    )
    if not s["common_users"]:
        return [head, "no common users: nothing to compare"]
    return [
        head,
        f"cosine (flattened): mean {s['mean']:.4f}  p5 {s['p5']:.4f}  p50 {s['p50']:.4f}  p95 {s['p95']:.4f}  "
        f"min {s['min']:.4f}",
        f"share of users with cosine > 0.9: {s['frac_gt_0.9']:.1%}   > 0.99: {s['frac_gt_0.99']:.1%}   "
        f"(per-row cosine, mean: {s['row_cosine_mean']:.4f})",
    ]


def plot_histogram(c: Comparison, path: Path) -> None:
    """Histogram of the per-user cosines with a [0.9, 1] inset (paper Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = c.summary
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    lo = min(0.0, float(np.floor(c.cosine.min() * 10) / 10)) if len(c.cosine) else 0.0
    ax.hist(c.cosine, bins=np.linspace(lo, 1.0, int(round((1 - lo) / 0.01)) + 1), color="#3b6ea8")
    ax.set_xlabel("cosine similarity between the two versions of a user's embedding")
    ax.set_ylabel("users")
    sim = " (SIMULATED data)" if s["a"]["simulated"] or s["b"]["simulated"] else ""
    ax.set_title(f"{s['a']['snapshot_id']} vs {s['b']['snapshot_id']}, {s['days_apart']:g} days apart{sim}", fontsize=9)
    if len(c.cosine):
        ax.axvline(0.9, color="#c44", lw=1, ls="--")
        ax.text(
            0.02,
            0.95,
            f"{s['common_users']:,} users\nmean {s['mean']:.3f}, p5 {s['p5']:.3f}\n> 0.9: {s['frac_gt_0.9']:.1%}",
            transform=ax.transAxes,
            va="top",
            fontsize=8,
        )
        inset = ax.inset_axes([0.12, 0.35, 0.4, 0.4])
        inset.hist(c.cosine[c.cosine >= 0.9], bins=np.linspace(0.9, 1.0, 51), color="#3b6ea8")
        inset.set_xlim(0.9, 1.0)
        inset.tick_params(labelsize=7)
        inset.set_title("[0.9, 1]", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(c: Comparison, out_dir: str | Path) -> dict[str, str]:
    """Writes compare.json, compare.md and cosine_hist.png; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts, _ = np.histogram(c.cosine, bins=BINS)
    paths = {
        "json": str(out / "compare.json"),
        "markdown": str(out / "compare.md"),
        "png": str(out / "cosine_hist.png"),
    }
    Path(paths["json"]).write_text(
        json.dumps(
            {**c.summary, "histogram": {"bin_edges": BINS.round(2).tolist(), "counts": counts.tolist()}}, indent=2
        )
    )
    plot_histogram(c, Path(paths["png"]))
    lines = [
        "# DV365 embedding stability",
        "",
        *[f"- {x}" for x in summary_lines(c)],
        "",
        "![cosine histogram](cosine_hist.png)",
        "",
    ]
    Path(paths["markdown"]).write_text("\n".join(lines))
    return paths
