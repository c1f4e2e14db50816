"""``dv365 eval retrieval`` — paper Table 4: a two-tower retrieval model with and without DV365 (``linear``:
LinearProjection tokens into a plain MLP user tower; ``gatenet``: the same tokens through a GateNet), HR@1 and
HR@10 per task.

A task's positives are the requests whose label is 1 (``next_item``: every request — the next item the user
consumed, the HSTU paper's MovieLens protocol, here on a time split). Training: per task, in-batch + uniformly
sampled softmax (temperature τ) over the batch's target items and ``sampled_negatives`` corpus items, items
equal to the positive masked out. Evaluation: the rank of the positive among **the whole corpus** (every item
of the requests and histories); HR@K = share ranked in the top K. Early stopping on the validation mean HR@10.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dv365.experiments.downstream.common import (
    NOISE_NOTE,
    USERS_NOTE,
    banner,
    data_lines,
    epochs,
    finish_report,
    fit_dv365_stats,
    fmt_stat,
    paired_stats,
    plot_bars,
    ranker_config,
    report_paths,
    seed_all,
)
from dv365.experiments.downstream.context import Context
from dv365.experiments.downstream.models import TwoTower
from dv365.train.metrics import beyond_noise, bootstrap_interval, users_95

logger = logging.getLogger(__name__)

BASELINE = "baseline"
KS = (1, 10)
MIN_CONTROL_HITS = 10  # relative HR deltas need this many control hits in every seed


class Corpus:
    """Every item of the requests and histories: hashed media / author / topic ids (topic unknown = 0 for
    history-only items)."""

    def __init__(self, ctx: Context) -> None:
        r = ctx.req
        feats = ctx.item_features(np.arange(len(r)))
        media = np.concatenate([r.media_id, ctx.hist.media])
        author = ctx.author_code(np.concatenate([r.author_id, ctx.hist.author]))
        topic = np.concatenate([feats["topic"].numpy(), np.zeros(len(ctx.hist.media), np.int64)])
        uniq, first = np.unique(media, return_index=True)
        self.ids = uniq
        self.media = torch.from_numpy(ctx.media_code(uniq))
        self.author = torch.from_numpy(author[first])
        self.topic = torch.from_numpy(topic[first])
        self.index_of_request = np.searchsorted(uniq, r.media_id)  # [R]

    def __len__(self) -> int:
        return len(self.ids)


def positives(ctx: Context, names: list[str]) -> np.ndarray:
    """``[R, T]`` bool: request r is a positive of retrieval task t."""
    cols = []
    label_idx = {t.name: k for k, t in enumerate(ctx.tasks)}
    for n in names:
        cols.append(np.ones(len(ctx.req), bool) if n == "next_item" else ctx.req.labels[:, label_idx[n]] > 0.5)
    return np.stack(cols, axis=1)


def task_names(ctx: Context) -> list[str]:
    s = ctx.settings.retrieval
    names = (["next_item"] if s.next_item else []) + [t.removeprefix("label_") for t in s.tasks]
    known = {t.name for t in ctx.tasks}
    bad = [n for n in names if n != "next_item" and n not in known]
    if bad:
        from dv365.experiments.downstream.settings import ExperimentError

        raise ExperimentError(f"retrieval.tasks {bad}: not among downstream.tasks {sorted(known)}")
    return names


class RetrievalFit:
    def __init__(self, ctx: Context, mode: str, seed: int, names: list[str], corpus: Corpus) -> None:
        seed_all(seed)
        s = ctx.settings.retrieval
        self.ctx, self.seed, self.names, self.corpus = ctx, seed, names, corpus
        self.pos = positives(ctx, names)
        # the ranker's encoder settings with the retrieval tower's tasks, hidden layers and output width
        cfg = replace(ranker_config(ctx, mode), num_tasks=len(names), over_arch=tuple(s.hidden), out_dim=s.dim)
        self.model = TwoTower(cfg)
        fit_dv365_stats(self.model, ctx, ctx.rows["train"])
        self.opt = torch.optim.Adam(self.model.parameters(), lr=s.lr)
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))

    def _items(self, idx: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(idx)
        c = self.corpus
        return self.model.item(c.media[t], c.author[t], c.topic[t])

    def step(self, rows: np.ndarray) -> float:
        s = self.ctx.settings.retrieval
        self.model.train()
        b = self.ctx.batch(rows)
        u = self.model.user(b)  # [B, T, d]
        tgt = self.corpus.index_of_request[rows]  # [B]
        neg = self.rng.integers(0, len(self.corpus), s.sampled_negatives)
        cand = np.concatenate([tgt, neg])
        v = self._items(cand)  # [B + M, d]
        same = torch.from_numpy(tgt[:, None] == cand[None, :])  # [B, B+M]
        own = torch.zeros_like(same)
        own[torch.arange(len(rows)), torch.arange(len(rows))] = True
        mask = same & ~own
        loss = torch.zeros(())
        for t in range(len(self.names)):
            p = torch.from_numpy(self.pos[rows, t])
            if not bool(p.any()):
                continue
            logits = (u[:, t] @ v.T / s.temperature).masked_fill(mask, -1e9)  # [B, B+M]
            loss = loss + F.cross_entropy(logits[p], torch.arange(len(rows))[p])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def evaluate(self, rows: np.ndarray, bs: int = 512, subsets: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """HR@1 / HR@10 per task over the whole corpus; with ``subsets`` (boolean masks over ``rows``):
        ``{"all": ..., name: ...}`` from the same forward pass."""
        return self.evaluate_by_user(rows, bs, subsets, by_user=False)[0]

    def evaluate_by_user(
        self, rows: np.ndarray, bs: int = 512, subsets: dict[str, np.ndarray] | None = None, by_user: bool = True
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """:meth:`evaluate` and (``by_user``) per subset and task the per-user request counts and hits at each K
        (``{g: {task: {"ids", "count", "hits": [[per K] per user]}}}``): what the interval over test users
        resamples. The validation during training does not collect them."""
        self.model.eval()
        masks = {"all": np.ones(len(rows), bool), **(subsets or {})}
        hits = {g: {n: np.zeros(len(KS)) for n in self.names} for g in masks}
        counts = {g: {n: 0 for n in self.names} for g in masks}
        seen: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = {
            g: {n: [] for n in self.names} for g in masks
        }
        users = self.ctx.req.user_id
        with torch.no_grad():
            V = self._items(np.arange(len(self.corpus)))  # [C, d]
            for s in range(0, len(rows), bs):
                r = rows[s : s + bs]
                u = self.model.user(self.ctx.batch(r))  # [B, T, d]
                tgt = torch.from_numpy(self.corpus.index_of_request[r])
                for t, n in enumerate(self.names):
                    p = torch.from_numpy(self.pos[r, t])
                    if not bool(p.any()):
                        continue
                    sc = u[p, t] @ V.T  # [b, C]
                    own = sc.gather(1, tgt[p][:, None])
                    rank = (sc > own).sum(1).numpy()  # [b]
                    for g, m in masks.items():
                        sel = m[s : s + bs][p.numpy()]
                        hits[g][n] += np.array([(rank[sel] < k).sum() for k in KS])
                        counts[g][n] += int(sel.sum())
                        if by_user:
                            seen[g][n].append((users[r[p.numpy()][sel]], rank[sel]))
        res = {
            g: {
                n: {
                    f"hr@{k}": (hits[g][n][i] / counts[g][n] if counts[g][n] else float("nan"))
                    for i, k in enumerate(KS)
                }
                | {"count": counts[g][n]}
                for n in self.names
            }
            for g in masks
        }
        per_user = {g: {n: _per_user(v) for n, v in per.items()} for g, per in seen.items()} if by_user else {}
        return (res if subsets is not None else res["all"]), per_user

    def fit(self, train: np.ndarray, val: np.ndarray, steps: int, val_every: int) -> tuple[int, float]:
        s = self.ctx.settings.retrieval

        def score(m: dict[str, dict[str, float]]) -> float:
            return float(np.nanmean([v["hr@10"] for v in m.values()]))

        best = (0, score(self.evaluate(val)), copy.deepcopy(self.model.state_dict()))
        it = epochs(train, s.batch_size, self.seed)
        for step in range(1, steps + 1):
            self.step(next(it))
            if step % val_every == 0 or step == steps:
                sc = score(self.evaluate(val))
                if sc > best[1]:
                    best = (step, sc, copy.deepcopy(self.model.state_dict()))
        self.model.load_state_dict(best[2])
        return best[0], best[1]


def _per_user(parts: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Per-user request count and hits at each K of one task's evaluated requests (``(user ids, ranks)`` parts)."""
    u = np.concatenate([x[0] for x in parts]) if parts else np.zeros(0, np.int64)
    rank = np.concatenate([x[1] for x in parts]) if parts else np.zeros(0, np.int64)
    ids, inv = np.unique(u, return_inverse=True)
    hits = np.stack([np.bincount(inv, weights=(rank < k), minlength=len(ids)) for k in KS], 1)
    return {"ids": ids.tolist(), "count": np.bincount(inv, minlength=len(ids)).tolist(), "hits": hits.tolist()}


def hr_intervals(variant: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Per K: the 95 % interval of the seed-averaged relative HR delta % (variant vs baseline, same seeds) when the
    task's test users are resampled (:func:`dv365.train.metrics.bootstrap_interval`); None if the runs saw
    different users or none."""
    ids = variant[0]["ids"]
    if not ids or any(x["ids"] != ids for x in (*variant, *baseline)):
        return None
    hv = [np.asarray(x["hits"], np.float64) for x in variant]  # [U, len(KS)] per seed
    hb = [np.asarray(x["hits"], np.float64) for x in baseline]

    def stat(w: np.ndarray) -> np.ndarray:  # [R, len(KS)]: the request counts cancel in the ratio
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.mean([100.0 * ((w @ v) / (w @ b) - 1.0) for v, b in zip(hv, hb, strict=True)], 0)

    lo, hi = bootstrap_interval(len(ids), stat)
    return [{"low": round(float(a), 3), "high": round(float(b), 3), "groups": len(ids)} for a, b in zip(lo, hi)]


def run_retrieval(ctx: Context, seeds: int) -> dict[str, Any]:
    s = ctx.settings.retrieval
    names = task_names(ctx)
    corpus = Corpus(ctx)
    rows = ctx.rows
    val = rows["val"]
    if len(val) > 3000:  # validation HR on an evenly spaced subset (speed); the test split is used whole
        val = val[np.linspace(0, len(val) - 1, 3000).astype(np.int64)]
    test_rows = rows["test"]
    is_ret = np.isin(test_rows, ctx.returning(test_rows))
    runs = []
    for seed in range(seeds):
        for kind in (BASELINE, *s.variants):
            t0 = time.perf_counter()
            fit = RetrievalFit(ctx, "none" if kind == BASELINE else kind, seed, names, corpus)
            best_step, best_val = fit.fit(rows["train"], val, s.steps, s.val_every)
            ev, per_user = fit.evaluate_by_user(test_rows, subsets={"returning": is_ret})  # one forward pass for both
            test = ev["all"]
            runs.append(
                {
                    "kind": kind,
                    "seed": seed,
                    "best_step": best_step,
                    "best_val_hr10": round(best_val, 5),
                    "test": test,
                    "test_returning": ev["returning"] if is_ret.any() else {},
                    "test_users": per_user["all"],
                    "test_returning_users": per_user["returning"] if is_ret.any() else {},
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            logger.info(
                f"  retrieval {ctx.dataset} seed {seed} {kind:8s} step {best_step:4d} val HR@10 {best_val:.4f} "
                "test HR@10 " + ", ".join(f"{n} {v['hr@10']:.4f}" for n, v in test.items()) + f" "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    out: dict[str, Any] = {
        "tasks": names,
        "corpus": len(corpus),
        "runs": runs,
        "hr": absolute(runs, "test"),
        "delta_hr_pct": deltas(runs, "test"),
    }
    if ctx.facts["test_missing_share"] > 0:
        out["hr_returning"] = absolute(runs, "test_returning")
        out["delta_hr_pct_returning"] = deltas(runs, "test_returning")
    return out


def absolute(runs: list[dict[str, Any]], subset: str) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in dict.fromkeys(r["kind"] for r in runs):
        rs = [r[subset] for r in runs if r["kind"] == kind and r[subset]]
        out[kind] = {f"{n}@{k}": paired_stats([m[n][f"hr@{k}"] for m in rs]) for n in (rs[0] if rs else {}) for k in KS}
    return out


def deltas(
    runs: list[dict[str, Any]], subset: str, min_hits: int = MIN_CONTROL_HITS
) -> dict[str, dict[str, dict[str, Any]]]:
    """Relative HR delta % vs the control of the same seed (positive = better).

    A relative delta is a ratio of hit counts, so a cell is only reported when the control has at least
    ``min_hits`` hits in *every* seed; otherwise its mean is ``None`` (``n/a`` in the report, with
    ``min_control_hits`` saying how many the worst seed had) and the absolute HR columns are what to read.
    """
    base_runs = {r["seed"]: r for r in runs if r["kind"] == BASELINE}
    base = {s: r[subset] for s, r in base_runs.items()}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in dict.fromkeys(r["kind"] for r in runs if r["kind"] != BASELINE):
        per: dict[str, list[float]] = {}
        fewest: dict[str, int] = {}
        for r in runs:
            if r["kind"] != kind or not r[subset]:
                continue
            for n, m in r[subset].items():
                b_m = base[r["seed"]][n]
                for k in KS:
                    t = f"{n}@{k}"
                    x, b = m[f"hr@{k}"], b_m[f"hr@{k}"]
                    hits = control_hits(b, b_m["count"])
                    fewest[t] = min(fewest.get(t, hits), hits)
                    per.setdefault(t, []).append(100.0 * (x / b - 1.0) if b > 0 else float("nan"))
        out[kind] = {}
        for t, v in per.items():
            st = paired_stats(v) | {"min_control_hits": fewest[t]}
            if fewest[t] < min_hits:
                st |= {"mean": None, "std": None, "noise": True}
            out[kind][t] = st
        # the interval over test users, per task and K (runs written before they kept per-user hits: none)
        key = f"{subset}_users"
        pairs = [(r, base_runs[r["seed"]]) for r in runs if r["kind"] == kind and r["seed"] in base_runs]
        if pairs and all(a.get(key) and b.get(key) for a, b in pairs):
            for n in pairs[0][0][key]:
                iv = hr_intervals([a[key][n] for a, _ in pairs], [b[key][n] for _, b in pairs])
                for i, k in enumerate(KS):
                    cell = out[kind].get(f"{n}@{k}")
                    if iv is not None and cell is not None and cell.get("mean") is not None:
                        cell["users"] = iv[i]
    return out


def control_hits(hr: float, count: int) -> int:
    """Hits behind a hit rate over ``count`` requests (0 for an undefined rate)."""
    return int(round(hr * count)) if math.isfinite(hr) else 0


def compact(res: dict[str, Any]) -> dict[str, Any]:
    def c(d: dict[str, Any]) -> dict[str, Any]:
        return {
            k: {
                t: {"mean": v["mean"], "std": v["std"], "noise": not beyond_noise(v)}
                | ({"min_control_hits": v["min_control_hits"]} if "min_control_hits" in v else {})
                | ({"users_95": users_95(v)} if "users" in v else {})
                for t, v in ts.items()
            }
            for k, ts in d.items()
        }

    out = {
        "delta_hr_pct": c(res["delta_hr_pct"]),
        "hr_baseline": {t: v["mean"] for t, v in res["hr"].get(BASELINE, {}).items()},
    }
    if "delta_hr_pct_returning" in res:
        out["delta_hr_pct_returning"] = c(res["delta_hr_pct_returning"])
    return out


def write_report(ctx: Context, res: dict[str, Any], out_dir: Path, quick: bool, command: str) -> dict[str, str]:
    md, png, js = report_paths(out_dir, "retrieval", ctx.dataset, quick)
    kinds = list(ctx.settings.retrieval.variants)
    keys = [f"{n}@{k}" for n in res["tasks"] for k in KS]
    sim = "SIMULATED" if ctx.simulated else "real data"
    has_png = plot_bars(
        png,
        f"dv365 eval retrieval — {ctx.dataset} ({sim}): HR delta % vs no-DV365 control, test",
        keys,
        {k: [res["delta_hr_pct"][k].get(t, {}) for t in keys] for k in kinds},
        "HR Δ vs control (%)  better →",
    )
    L = [
        f"# dv365 eval retrieval (paper Table 4): {ctx.dataset}{' (quick)' if quick else ''} — {sim}\n",
        banner(ctx.simulated, ctx.dataset),
    ]
    L.append(
        "Two-tower retrieval, user tower = HSTU over the short history + request context, **with and without "
        "DV365**: `linear` (LinearProjection tokens, plain MLP tower) and `gatenet` (the same tokens through a "
        "GateNet: embedding gate + hidden gates). HR@K over the whole corpus "
        f"({res['corpus']:,} items); `next_item` = every request's item (the HSTU paper's MovieLens protocol, on "
        "a time split). Relative HR delta % vs the control of the same seed, positive = better. "
        + NOISE_NOTE
        + " "
        + USERS_NOTE
        + f" A relative delta is a ratio of hit counts: it is shown only where the control has at least "
        f"{MIN_CONTROL_HITS} hits in every seed, otherwise `n/a (h)` with h = the fewest control hits of a seed; "
        "read the HR columns there.\n"
    )

    def table(ab: dict[str, Any], dl: dict[str, Any]) -> str:
        lines = [
            "| task@K | HR control | " + " | ".join(f"HR {k} | Δ% {k}" for k in kinds) + " |",
            "|---|---:|" + "---:|---:|" * len(kinds),
        ]
        for t in keys:
            b = ab.get(BASELINE, {}).get(t, {})
            cells = [f"{b.get('mean', float('nan')):.4f}"]
            for k in kinds:
                cells += [
                    f"{ab.get(k, {}).get(t, {}).get('mean', float('nan')):.4f}",
                    fmt_stat(dl.get(k, {}).get(t, {})),
                ]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    L += ["## All test requests\n", table(res["hr"], res["delta_hr_pct"]) + "\n"]
    if "hr_returning" in res:
        L += [
            f"## Returning users ({ctx.facts['test_returning']:,} of {ctx.facts['test']:,} test requests)\n",
            table(res["hr_returning"], res["delta_hr_pct_returning"]) + "\n",
        ]
    L.append(f"![HR delta per task]({png.name})\n" if has_png else "(No plot: matplotlib is not installed.)\n")
    L += ["## Data and setting\n", *data_lines(ctx)]
    s = ctx.settings.retrieval
    L.append(
        f"- two-tower: d = {s.dim}, user MLP {list(s.hidden)}, τ = {s.temperature}, {s.sampled_negatives} sampled "
        f"negatives + in-batch, Adam lr {s.lr}, batch {s.batch_size}, at most {s.steps} steps, validation HR@10 "
        f"every {s.val_every}"
    )
    return finish_report(ctx, res, L, md, js, png, has_png, command)
