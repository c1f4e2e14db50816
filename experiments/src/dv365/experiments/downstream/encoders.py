"""``dv365 eval encoders`` — paper App. C: which sequence encoder for very long slices?

The slice: a user's ``source`` timeline (implicit impressions on synth, ratings on MovieLens) before
request − 24 h (the DV365 gap), its last ``cap`` events. Three encoders read the same slice
(:class:`~dv365.experiments.downstream.models.SliceEncoder`): mean pooling, learned position-weighted pooling and
HSTU; a small head scores the target item (one logit per task). For each cap (1K … the longest history the
data has) each encoder is trained on the earliest 70% of requests, early-stopped on the next 10% and
evaluated on the latest 20% (NE), over the seeds.

Cost per user is **measured**: the wall time of one user's forward pass (batch 1, no grad, one thread) and
the peak bytes of live tensors during it (a dispatch-level tracker that counts every tensor the forward
allocates and frees), at each of ``cost_lengths``. HSTU runs with query-chunked attention (O(chunk·L)
memory, O(L²) time); it is not run at a length whose time, extrapolated quadratically from the previous
measured length, exceeds ``cost_time_limit_s`` — the report says where and why. HSTU is trained only up to
``hstu_train_max`` (its cost; the paper scaled it to 1K only).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dv365.core.timeline import TimelineDataset
from dv365.experiments.downstream.common import banner, epochs, paired_stats, seed_all, stem
from dv365.experiments.downstream.context import Histories, gather_right_aligned, prepare_url
from dv365.experiments.downstream.hstu import HSTUConfig
from dv365.experiments.downstream.models import EncoderModel, SliceEncoder, head_bias
from dv365.experiments.downstream.settings import ExperimentError, Settings
from dv365.train.losses import MultiTaskLoss, TaskSpec
from dv365.train.metrics import MultiTaskMeter, mean_ne

logger = logging.getLogger(__name__)

KINDS = ("mean", "position", "hstu")
GAP_S = 24 * 3600


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage allocated inside the mode (each storage counted once, released when
    its tensor is garbage-collected)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ptrs: set[int] = set()

    def _free(self, ptr: int, n: int) -> None:
        if ptr in self._ptrs:
            self._ptrs.discard(ptr)
            self.live -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr, n = st.data_ptr(), st.nbytes()
                if n and ptr not in self._ptrs:
                    self._ptrs.add(ptr)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, ptr, n)
        return out


class Slices:
    """Requests and their slices (start, length into the merged ``source`` history)."""

    def __init__(self, url: str, source: str, task_names: tuple[str, ...]) -> None:
        from dv365.train.data import Requests

        ds = TimelineDataset(url)
        self.simulated = bool(ds.meta.simulated)
        self.url = url
        self.tasks = tuple(TaskSpec(f"label_{t.removeprefix('label_')}") for t in task_names)
        self.req = Requests.from_arrow(ds.requests(), self.tasks, ds.vocab)
        users = np.unique(np.asarray(ds.user_ids(), np.int64))
        self.hist = Histories.from_timelines(ds.read_users(users), sources=(source,))
        self.urow = np.searchsorted(users, self.req.user_id)
        self.start_all, self.len_all = self.hist.before(self.urow, self.req.ts, 10**9, GAP_S, strict=False)
        self.longest = int(self.len_all.max()) if len(self.len_all) else 0
        R = len(self.req)
        n_test, n_val = int(math.ceil(0.2 * R)), int(math.ceil(0.1 * R))
        ar = np.arange(R)
        self.rows = {
            "train": ar[: R - n_test - n_val],
            "val": ar[R - n_test - n_val : R - n_test],
            "test": ar[R - n_test :],
        }
        self.users, self.events = len(users), len(self.hist.ts)

    def spans(self, rows: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
        """``(start, length)`` of each row's slice capped to its latest ``cap`` events."""
        ln = np.minimum(self.len_all[rows], cap)
        return self.start_all[rows] + self.len_all[rows] - ln, ln

    def batch(self, rows: np.ndarray, cap: int, kind: str, H: int) -> dict[str, torch.Tensor]:
        out = {
            "target": torch.from_numpy(self.req.media_id[rows] % H),
            "labels": torch.from_numpy(np.ascontiguousarray(self.req.labels[rows])),
        }
        return out | self.history(*self.spans(rows, cap), kind, H)

    def history(self, st: np.ndarray, ln: np.ndarray, kind: str, H: int) -> dict[str, torch.Tensor]:
        """The encoder's input for the slices ``(st, ln)``: right-aligned [B, L] for HSTU, flat bags otherwise."""
        if kind == "hstu":
            L = max(int(ln.max()), 1)
            idx, valid = gather_right_aligned(st, ln, L)
            return {
                "seq": torch.from_numpy(np.where(valid, self.hist.media[idx] % H, 0)),
                "valid": torch.from_numpy(valid),
                "seq_ts": torch.from_numpy(np.where(valid, self.hist.ts[idx], 0)),
            }
        counts = ln.astype(np.int64)
        total = int(counts.sum())
        ends = np.cumsum(counts)
        flat = np.repeat(st - (ends - counts), counts) + np.arange(total)
        rank = np.repeat(st + counts - 1, counts) - flat  # 0 = the latest event
        return {
            "ids": torch.from_numpy(self.hist.media[flat] % H),
            "rank": torch.from_numpy(rank),
            "offsets": torch.from_numpy(np.concatenate([[0], ends]).astype(np.int64)),
        }


def evaluate(m: EncoderModel, sl: Slices, rows: np.ndarray, cap: int, kind: str, H: int) -> dict[str, Any]:
    """Test/validation metrics of ``m`` on ``rows``, encoding each distinct history slice once.

    The user vector depends only on the slice ``(start, length)``, and requests share slices (MovieLens rates in
    bursts: its 10,084 validation requests have 657 distinct gapped histories), so the distinct slices are
    encoded once, in batches of similar length (HSTU pads to the batch's longest), and expanded back to the
    requests (RecD-style dedup). Same metrics as encoding per request, up to float rounding.
    """
    key, inv = np.unique(np.stack(sl.spans(rows, cap), axis=1), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.argsort(key[:, 1], kind="stable")
    lens = np.maximum(key[order, 1], 1)  # ascending
    # HSTU's scores are [B, heads, chunk, L]: a batch is bounded by count x its longest, not by its count
    budget = 16 * int(lens[-1]) if kind == "hstu" and len(lens) else 1 << 62
    meter = MultiTaskMeter(sl.tasks)
    m.eval()
    with torch.no_grad():
        u = torch.empty(len(key), m.dim)
        s = 0
        while s < len(order):
            k = min(4096, len(order) - s)  # sorted: the j-th candidate's length is the batch's longest
            e = s + max(1, int(np.count_nonzero(np.arange(1, k + 1) * lens[s : s + k] <= budget)))
            part = order[s:e]
            u[torch.from_numpy(part)] = m.encoder(sl.history(key[part, 0], key[part, 1], kind, H))
            s = e
        for s in range(0, len(rows), 4096):
            r = rows[s : s + 4096]
            target = torch.from_numpy(sl.req.media_id[r] % H)
            meter.update(
                m.score(u[torch.from_numpy(inv[s : s + 4096])], target),
                torch.from_numpy(np.ascontiguousarray(sl.req.labels[r])),
            )
    return meter.compute()


def _model(kind: str, cap: int, es: Any, hstu: HSTUConfig, n_tasks: int, H: int) -> EncoderModel:
    return EncoderModel(SliceEncoder(kind, es.dim, H, cap, hstu), es.dim, n_tasks)


def train_eval(sl: Slices, kind: str, cap: int, seed: int, settings: Settings, H: int) -> dict[str, Any]:
    es = settings.encoders
    seed_all(seed)
    hstu = _hstu(settings, es.hstu_chunk)
    m = _model(kind, cap, es, hstu, len(sl.tasks), H)
    m.init_head_bias(head_bias(torch.from_numpy(sl.req.labels[sl.rows["train"]]), sl.tasks))
    opt = torch.optim.Adam(m.parameters(), lr=es.lr)
    loss_fn = MultiTaskLoss(sl.tasks)

    def evaluate_rows(rows: np.ndarray) -> dict[str, Any]:
        return evaluate(m, sl, rows, cap, kind, H)

    best = (0, mean_ne(evaluate_rows(sl.rows["val"])), copy.deepcopy(m.state_dict()))
    it = epochs(sl.rows["train"], es.batch_size, seed)
    t0 = time.perf_counter()
    for step in range(1, es.steps + 1):
        m.train()
        b = sl.batch(next(it), cap, kind, H)
        loss, _ = loss_fn(m(b), b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % es.val_every == 0 or step == es.steps:
            ne = mean_ne(evaluate_rows(sl.rows["val"]))
            if ne < best[1]:
                best = (step, ne, copy.deepcopy(m.state_dict()))
    train_s = time.perf_counter() - t0
    m.load_state_dict(best[2])
    test = evaluate_rows(sl.rows["test"])
    return {
        "test_ne": round(mean_ne(test), 5),
        "test": test,
        "best_step": best[0],
        "train_s_per_step": round(train_s / max(es.steps, 1), 4),
    }


def _hstu(settings: Settings, chunk: int) -> HSTUConfig:
    h = settings.downstream.hstu
    return HSTUConfig(
        dim=settings.encoders.dim,
        num_layers=settings.encoders.hstu_layers,
        num_heads=h.heads,
        qk_dim=h.qk_dim,
        v_dim=h.v_dim,
        chunk=chunk,
    )


def measure_cost(sl: Slices, settings: Settings, H: int) -> list[dict[str, Any]]:
    """Per-user forward time and peak tensor memory of each encoder at each length (module docstring)."""
    es = settings.encoders
    lengths = sorted({(sl.longest if L == 0 else min(L, sl.longest)) for L in es.cost_lengths})
    row = np.array([int(np.argmax(sl.len_all))])  # the request with the longest history
    out = []
    last_hstu: tuple[int, float] | None = None
    for L in lengths:
        for kind in KINDS:
            rec: dict[str, Any] = {"length": L, "encoder": kind}
            if kind == "hstu" and last_hstu is not None:
                projected = last_hstu[1] * (L / last_hstu[0]) ** 2
                if projected > es.cost_time_limit_s:
                    rec.update(
                        status="not run",
                        reason=f"projected {projected:.1f} s per user (quadratic from "
                        f"{last_hstu[1]:.2f} s measured at {last_hstu[0]:,}) > limit {es.cost_time_limit_s} s",
                    )
                    out.append(rec)
                    continue
            m = _model(kind, L, es, _hstu(settings, es.hstu_chunk), len(sl.tasks), H).eval()
            b = sl.batch(row, L, kind, H)
            try:
                with torch.no_grad():
                    m(b)  # warm-up
                    reps, t0 = 0, time.perf_counter()
                    while reps < 3 and (reps == 0 or time.perf_counter() - t0 < 0.5):
                        m(b)
                        reps += 1
                    secs = (time.perf_counter() - t0) / reps
                    with PeakMemory() as pm:
                        m(b)
                rec.update(status="ok", seconds=round(secs, 5), peak_mb=round(pm.peak / 2**20, 3))
                if kind == "hstu":
                    last_hstu = (L, secs)
            except (RuntimeError, MemoryError) as e:  # out of memory: recorded, not hidden
                rec.update(status="failed", reason=f"{type(e).__name__}: {str(e)[:200]}")
            out.append(rec)
        logger.info(
            "  encoders cost at "
            + f"{L:,}: "
            + ", ".join(
                f"{r['encoder']} "
                + (
                    f"{1000 * r['seconds']:.1f} ms / {r['peak_mb']:.1f} MB"
                    if r.get("status") == "ok"
                    else r.get("status", "?")
                )
                for r in out
                if r["length"] == L
            )
        )
    return out


def run_encoders(dataset: str, settings: Settings, data_dir: Path, seeds: int, progress: bool) -> dict[str, Any]:
    es = settings.encoders
    synth = es.synth if (es.synth is not None and dataset == "synth") else settings.synth
    url = prepare_url(dataset, synth, settings.data_url if es.synth is None else None, data_dir, progress)
    names = es.tasks or tuple(t["label"] for t in settings.downstream.tasks if t.get("kind", "binary") == "binary")
    sl = Slices(url, es.source, tuple(names))
    if sl.longest == 0:
        raise ExperimentError(f"{url}: no request has a {es.source} history before request - 24 h")
    H = settings.downstream.item_hash_size
    caps = sorted({sl.longest if c == 0 else min(c, sl.longest) for c in es.caps})
    logger.info(
        f"encoders {dataset}: {sl.users} users, {sl.events:,} {es.source} events, longest slice {sl.longest:,}, "
        f"caps {caps}" + (" [SIMULATED]" if sl.simulated else "")
    )
    quality: dict[str, dict[str, Any]] = {}
    for cap in caps:
        for kind in KINDS:
            if kind == "hstu" and cap > es.hstu_train_max:
                quality.setdefault(kind, {})[str(cap)] = {
                    "status": "not trained",
                    "reason": f"cap {cap:,} > hstu_train_max {es.hstu_train_max:,}",
                }
                continue
            t0 = time.perf_counter()
            rs = [train_eval(sl, kind, cap, seed, settings, H) for seed in range(seeds)]
            st = paired_stats([r["test_ne"] for r in rs])
            quality.setdefault(kind, {})[str(cap)] = {
                "status": "ok",
                "ne": st,
                "train_s_per_step": float(np.mean([r["train_s_per_step"] for r in rs])),
                "runs": rs,
            }
            logger.info(
                f"  encoders {dataset} cap {cap:,} {kind:8s} test NE {st['mean']} ± {st['std']} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    # delta vs mean pooling at the same cap, seed-paired
    for kind in ("position", "hstu"):
        for cap, q in quality.get(kind, {}).items():
            base = quality["mean"][cap]
            if q["status"] == "ok":
                q["delta_vs_mean_pct"] = paired_stats(
                    [100 * (a["test_ne"] / b["test_ne"] - 1) for a, b in zip(q["runs"], base["runs"])]
                )
    cost = measure_cost(sl, settings, H)
    return {
        "url": url,
        "simulated": sl.simulated,
        "users": sl.users,
        "events": sl.events,
        "longest": sl.longest,
        "caps": caps,
        "source": es.source,
        "tasks": list(names),
        "quality": quality,
        "cost": cost,
        "requests": {k: int(len(v)) for k, v in sl.rows.items()},
    }


def compact(res: dict[str, Any]) -> dict[str, Any]:
    table = [{k: r.get(k) for k in ("length", "encoder", "status", "seconds", "peak_mb")} for r in res["cost"]]
    ne = {
        kind: {cap: (q["ne"]["mean"] if q["status"] == "ok" else None) for cap, q in caps.items()}
        for kind, caps in res["quality"].items()
    }
    return {"longest": res["longest"], "ne": ne, "cost_table": table}


def write_report(
    dataset: str, settings: Settings, res: dict[str, Any], out_dir: Path, quick: bool, command: str
) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = stem("encoders", dataset, quick)
    md, png, js = out_dir / f"{name}.md", out_dir / f"{name}.png", out_dir / f"{name}.json"
    has_png = plot(dataset, res, png)
    sim = "SIMULATED" if res["simulated"] else "real data"
    L = [
        f"# dv365 eval encoders (paper App. C): {dataset}{' (quick)' if quick else ''} — {sim}\n",
        banner(res["simulated"], dataset),
    ]
    L.append(
        f"Mean pooling vs learned position-weighted pooling vs HSTU over the same slice (the `{res['source']}` "
        f"timeline before request − 24 h, its last `cap` events), at caps {res['caps']} (longest history in the "
        f"data: {res['longest']:,}). Test NE (mean over tasks {res['tasks']}), mean ± std over seeds; Δ vs mean "
        "pooling at the same cap, seed-paired (negative = better than mean pooling).\n"
    )
    L.append("| cap | mean NE | position NE | Δ position % | HSTU NE | Δ HSTU % |")
    L.append("|---:|---:|---:|---:|---:|---:|")
    q = res["quality"]

    def ne(kind: str, cap: str) -> str:
        x = q.get(kind, {}).get(cap, {})
        if x.get("status") != "ok":
            return x.get("status", "n/a")
        return f"{x['ne']['mean']:.4f}" + (f" ± {x['ne']['std']:.4f}" if x["ne"]["std"] is not None else "")

    def dl(kind: str, cap: str) -> str:
        x = q.get(kind, {}).get(cap, {}).get("delta_vs_mean_pct")
        if not x or x["mean"] is None:
            return "n/a"
        s = f"{x['mean']:+.3f}" + (f" ± {x['std']:.3f}" if x["std"] is not None else "")
        return f"{s} ~" if x["noise"] else f"**{s}**"

    for cap in map(str, res["caps"]):
        L.append(
            f"| {int(cap):,} | {ne('mean', cap)} | {ne('position', cap)} | {dl('position', cap)} | {ne('hstu', cap)} | "
            f"{dl('hstu', cap)} |"
        )
    L.append("\n## Measured cost per user (forward, batch 1, 1 thread)\n")
    L.append("| length | encoder | status | time (ms) | peak tensor memory (MB) | note |")
    L.append("|---:|---|---|---:|---:|---|")
    for r in res["cost"]:
        ms = "" if r.get("seconds") is None else f"{1000 * r['seconds']:.2f}"
        mb = "" if r.get("peak_mb") is None else f"{r['peak_mb']:.2f}"
        L.append(f"| {r['length']:,} | {r['encoder']} | {r['status']} | {ms} | {mb} | {r.get('reason', '')} |")
    L.append(
        "\nHSTU's attention is computed in query chunks (O(chunk·L) memory) but its time grows as L²: the "
        "table shows the growth as measured; a length it was not run at is marked with the reason.\n"
    )
    L.append(f"![encoders]({png.name})\n" if has_png else "(No plot: matplotlib is not installed.)\n")
    es = settings.encoders
    L.append("## Setting\n")
    L.append(
        f"- data set `{res['url']}`{' (**SIMULATED**)' if res['simulated'] else ''}: {res['users']} users, "
        f"{res['events']:,} {res['source']} events; requests train/val/test {res['requests']} by time"
    )
    L.append(
        f"- D = {es.dim}; HSTU {settings.downstream.hstu} (chunk {es.hstu_chunk}); Adam lr {es.lr}, batch "
        f"{es.batch_size}, at most {es.steps} steps, validation every {es.val_every}; HSTU trained up to cap "
        f"{es.hstu_train_max:,}"
    )
    L.append(f"\n## Command\n\n```bash\n{command}\n```\n")
    md.write_text("\n".join(L) + "\n")
    js.write_text(json.dumps({"dataset": dataset, **res}, indent=1, default=str) + "\n")
    return {"markdown": str(md), "json": str(js), **({"png": str(png)} if has_png else {})}


def plot(dataset: str, res: dict[str, Any], path: Path) -> bool:
    """One chart: NE vs cap (left axis) and measured time per user vs length (right axis, log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax2 = ax.twinx()
    colors = {"mean": "C0", "position": "C1", "hstu": "C2"}
    for kind in KINDS:
        pts = [
            (int(c), q["ne"]["mean"], q["ne"]["std"] or 0)
            for c, q in res["quality"].get(kind, {}).items()
            if q["status"] == "ok"
        ]
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", color=colors[kind], label=f"{kind}: test NE", capsize=3)
        cp = [(r["length"], 1000 * r["seconds"]) for r in res["cost"] if r["encoder"] == kind and r["status"] == "ok"]
        if cp:
            x, y = zip(*cp)
            ax2.plot(x, y, ls="--", marker="s", color=colors[kind], alpha=0.6, label=f"{kind}: ms / user")
    ax.set_xscale("log")
    ax2.set_yscale("log")
    ax.set_xlabel("history cap / length (events)")
    ax.set_ylabel("test NE (↓ better)")
    ax2.set_ylabel("forward time per user (ms, log)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    sim = "SIMULATED" if res["simulated"] else "real data"
    ax.set_title(f"dv365 eval encoders — {dataset} ({sim}): quality and cost vs length", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
