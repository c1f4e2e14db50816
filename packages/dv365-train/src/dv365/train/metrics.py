"""Normalized entropy (paper Eq. 12) and a streaming multi-task meter.

``NE_k = BCE_k / H(p_k)`` with ``H(p) = -[p ln p + (1 - p) ln(1 - p)]`` and ``p_k`` the task's base rate
(mean label) **on the evaluated data**. NE < 1 means the model beats always predicting the base rate.
Compare models by the relative NE delta on the same data (|delta| > 0.1% is significant at Meta's scale).
NE is undefined (NaN) when the evaluated data has no positives or no negatives; for rare labels
(follow, hate: ~0.1%) a few thousand examples give only a handful of positives, so NE is noisy there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dv365.train.losses import MultiTaskLoss, TaskSpec


def binary_entropy(p: float) -> float:
    """``H(p) = -[p ln p + (1 - p) ln(1 - p)]`` in nats; 0 at p = 0 or 1."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Eq. 12 for one task over a whole evaluation set: ``mean BCE / H(mean label)`` (NaN if H = 0)."""
    y = labels.double()
    bce = F.binary_cross_entropy_with_logits(logits.double(), y).item()
    h = binary_entropy(y.mean().item())
    return bce / h if h > 0 else math.nan


class MultiTaskMeter:
    """Accumulates per-task sums over batches; :meth:`compute` gives NE (binary) and MSE (regression).

    Args:
        tasks: the tasks, in output-column order.

    Example::

        meter = MultiTaskMeter(tasks)
        for batch in eval_batches:
            meter.update(model(...), batch.labels)      # [B, K] outputs (logits / predictions), [B, K] labels
        meter.compute()["like"]     # {"ne": 0.93, "bce": 0.12, "base_rate": 0.03, "count": 4000}
    """

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        self.tasks = tuple(tasks)
        self._loss = MultiTaskLoss(self.tasks)
        self.reset()

    def reset(self) -> None:
        K = len(self.tasks)
        self.loss_sum = torch.zeros(K, dtype=torch.float64)  # sum over examples of BCE / squared error
        self.label_sum = torch.zeros(K, dtype=torch.float64)  # sum of (transformed) labels
        self.label_sq_sum = torch.zeros(K, dtype=torch.float64)  # sum of squared (transformed) labels
        self.count = 0
        self._groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (group, loss, label) per grouped update

    def update(self, outputs: torch.Tensor, labels: torch.Tensor, groups: np.ndarray | None = None) -> None:
        """Adds a batch; with ``groups`` (``[B]``, e.g. the user of each example) the per-example sums are also
        kept per group for :meth:`group_sums`."""
        out, lab = outputs.detach().double().cpu(), labels.detach().double().cpu()
        y = self._loss.targets(lab)  # [B, K]
        per_ex = torch.where(
            self._loss.binary.cpu(), F.binary_cross_entropy_with_logits(out, y, reduction="none"), (out - y).pow(2)
        )  # [B, K]
        self.loss_sum += per_ex.sum(0)
        self.label_sum += y.sum(0)
        self.label_sq_sum += y.pow(2).sum(0)
        self.count += out.shape[0]
        if groups is not None:
            g = np.asarray(groups).reshape(-1)
            if len(g) != out.shape[0]:
                raise ValueError(f"groups: {len(g)} values for a batch of {out.shape[0]} examples")
            self._groups.append((g, per_ex.numpy(), y.numpy()))

    def group_sums(self) -> GroupSums | None:
        """The per-group sums of every grouped :meth:`update` (None if no update had groups)."""
        if not self._groups:
            return None
        g = np.concatenate([x[0] for x in self._groups])
        loss = np.concatenate([x[1] for x in self._groups])
        y = np.concatenate([x[2] for x in self._groups])
        ids, inv = np.unique(g, return_inverse=True)
        return GroupSums(
            ids,
            np.bincount(inv, minlength=len(ids)).astype(np.float64),
            *(
                np.stack([np.bincount(inv, weights=a[:, k], minlength=len(ids)) for k in range(a.shape[1])], 1)
                for a in (loss, y, y * y)
            ),
            tuple(t.kind == "binary" for t in self.tasks),
        )

    def compute(self) -> dict[str, dict[str, Any]]:
        res: dict[str, dict[str, Any]] = {}
        n = max(self.count, 1)
        for k, t in enumerate(self.tasks):
            mean_loss = float(self.loss_sum[k]) / n
            if t.kind == "binary":
                p = float(self.label_sum[k]) / n
                h = binary_entropy(p)
                res[t.name] = {
                    "ne": mean_loss / h if h > 0 else math.nan,
                    "bce": mean_loss,
                    "base_rate": p,
                    "count": self.count,
                }
            else:
                mean = float(self.label_sum[k]) / n
                var = max(float(self.label_sq_sum[k]) / n - mean * mean, 0.0)
                res[t.name] = {
                    "mse": mean_loss,
                    "nmse": mean_loss / var if var > 0 else math.nan,
                    "label_var": var,
                    "target": t.transform,
                    "count": self.count,
                }
        return res

    def mean_ne(self) -> float:
        """:func:`mean_ne` of :meth:`compute`."""
        return mean_ne(self.compute())

    def mean_normalized_loss(self) -> float:
        """:func:`mean_normalized_loss` of :meth:`compute`."""
        return mean_normalized_loss(self.compute())


@dataclass
class GroupSums:
    """Per-group sufficient statistics of one evaluation (:meth:`MultiTaskMeter.group_sums`): enough to recompute
    each task's NE (binary) or MSE (regression) over any reweighting of the groups, e.g. a bootstrap over users.

    ``ids [G]``, ``count [G]``; ``loss``, ``label``, ``label_sq`` ``[G, K]`` sums of the per-example BCE /
    squared error, of the (transformed) label and of its square; ``binary [K]``.
    """

    ids: np.ndarray
    count: np.ndarray
    loss: np.ndarray
    label: np.ndarray
    label_sq: np.ndarray
    binary: tuple[bool, ...]

    def metric(self, weights: np.ndarray) -> np.ndarray:
        """``[R, K]`` NE (binary tasks) / MSE (regression) under ``weights [R, G]`` (each row: how many times each
        group is counted; a row of ones gives the plain metric). NaN where a binary task's base rate is 0 or 1."""
        w = np.asarray(weights, np.float64)
        n = np.maximum(w @ self.count, 1e-12)[:, None]
        mean_loss = (w @ self.loss) / n
        p = np.clip((w @ self.label) / n, 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -(np.where(p > 0, p * np.log(p), 0.0) + np.where(p < 1, (1 - p) * np.log(1 - p), 0.0))
            ne = np.where(h > 0, mean_loss / h, np.nan)
        return np.where(np.asarray(self.binary)[None, :], ne, mean_loss)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GroupSums:
        """The inverse of :meth:`to_json` (a report's JSON rows)."""
        k = len(d["binary"])

        def arr(key: str) -> np.ndarray:
            return np.asarray(d[key], np.float64).reshape(-1, k)

        return cls(
            np.asarray(d["ids"]),
            np.asarray(d["count"], np.float64),
            arr("loss"),
            arr("label"),
            arr("label_sq"),
            tuple(bool(b) for b in d["binary"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ids": self.ids.tolist(),
            "count": self.count.tolist(),
            "loss": self.loss.tolist(),
            "label": self.label.tolist(),
            "label_sq": self.label_sq.tolist(),
            "binary": list(self.binary),
        }


def bootstrap_interval(
    groups: int,
    stat: Callable[[np.ndarray], np.ndarray],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``level`` percentile interval of ``stat`` when ``groups`` groups (users) are resampled with
    replacement: ``stat(weights [R, G]) -> [R, ...]`` (each row of weights counts how often each group is
    drawn). Returns ``(low, high)`` of shape ``[...]``; NaN draws are left out (NaN where every draw is NaN).
    Fixed ``seed``: the same inputs give the same interval."""
    rng = np.random.default_rng(seed)
    draws = []
    for s in range(0, resamples, 500):  # bounded memory: 500 x G weights at a time
        r = min(500, resamples - s)
        w = rng.multinomial(groups, np.full(groups, 1.0 / groups), size=r).astype(np.float64)
        draws.append(np.asarray(stat(w), np.float64))
    d = np.concatenate(draws)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: NaN bounds
        lo, hi = np.nanquantile(d, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def bootstrap_delta_pct(
    variant: Sequence[GroupSums],
    baseline: Sequence[GroupSums],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """The ``level`` interval of the seed-averaged NE (MSE) delta % of ``variant`` vs ``baseline`` when the groups
    (users) are resampled with replacement, per task and for the mean over tasks. ``variant[i]`` and
    ``baseline[i]`` are the same seed's runs on the same evaluation rows; every resample draws one set of users
    and applies it to every seed (:func:`bootstrap_interval`).

    Returns ``{"tasks": [{"low", "high", "groups"}] (task order), "mean": {"low", "high", "groups"}}`` (NaN
    bounds where every resample leaves a task undefined; the mean is over the tasks defined in a resample)."""
    if not variant or len(variant) != len(baseline):
        raise ValueError(f"bootstrap_delta_pct: {len(variant)} variant runs for {len(baseline)} baseline runs")
    ids = variant[0].ids
    for gs in (*variant, *baseline):
        if not np.array_equal(gs.ids, ids):
            raise ValueError("bootstrap_delta_pct: the runs were evaluated on different users")

    def stat(w: np.ndarray) -> np.ndarray:  # [R, K + 1]: per task, then the mean over tasks
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # every task undefined in a draw: NaN mean
            d = np.mean([100.0 * (v.metric(w) / b.metric(w) - 1.0) for v, b in zip(variant, baseline, strict=True)], 0)
            return np.concatenate([d, np.nanmean(d, axis=1, keepdims=True)], axis=1)

    lo, hi = bootstrap_interval(len(ids), stat, resamples, seed, level)
    iv = [{"low": round(float(a), 4), "high": round(float(b), 4), "groups": len(ids)} for a, b in zip(lo, hi)]
    return {"tasks": iv[:-1], "mean": iv[-1]}


def mean_ne(metrics: Mapping[str, Mapping[str, Any]]) -> float:
    """Mean NE over the binary tasks of ``metrics`` (:meth:`MultiTaskMeter.compute`) with a defined NE (NaN if
    none)."""
    nes = [v["ne"] for v in metrics.values() if "ne" in v and not math.isnan(v["ne"])]
    return sum(nes) / len(nes) if nes else math.nan


def mean_normalized_loss(metrics: Mapping[str, Mapping[str, Any]]) -> float:
    """Mean over every task of its normalised loss: NE for a binary task, ``MSE / Var(label)`` for a
    regression task (both are 1.0 for a model that predicts the evaluated data's mean label, lower is better).

    Early stopping on this weighs each task equally, so a step that gains on the binary tasks while the watch-time
    head gets worse is not chosen for free (the binary-only mean NE ignores regression heads). Tasks whose value is
    undefined (no positives, or constant labels) are left out; NaN if none is defined.
    """
    vals = [v["ne"] if "ne" in v else v.get("nmse", math.nan) for v in metrics.values()]
    vals = [x for x in vals if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else math.nan


def seed_stats(values: Sequence[float]) -> dict[str, Any]:
    """mean, std (ddof 1), n, values and ``noise`` over seed-paired deltas (non-finite values dropped).

    ``noise``: |mean| <= 2·std/√n, or fewer than two values. The boundary counts as noise (with a relative
    tolerance for rounding): deltas that are all ±x or 0, as from one hit more or less per seed, sit exactly
    on it. Shared by ``dv365 eval upstream`` and the downstream experiments.
    """
    a = np.asarray([v for v in values if math.isfinite(v)], np.float64)
    if len(a) == 0:
        return {"mean": None, "std": None, "n": 0, "values": [], "noise": True}
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if len(a) > 1 else math.nan
    noise = bool(len(a) < 2 or abs(mean) <= 2 * std / math.sqrt(len(a)) * (1 + 1e-9))
    return {
        "mean": round(mean, 4),
        "std": round(std, 4) if math.isfinite(std) else None,
        "n": int(len(a)),
        "values": [round(float(v), 4) for v in a],
        "noise": noise,
    }


def beyond_noise(v: Mapping[str, Any]) -> bool:
    """A seed-paired delta (:func:`seed_stats`, optionally with ``users``: its interval over test users from
    :func:`bootstrap_interval`) beyond noise: |mean| > 2·std/√n and, where the interval was computed, the
    interval on one side of 0. The sign is the caller's to check."""
    if v.get("mean") is None or v.get("noise", True):
        return False
    u = v.get("users")
    return u is None or u["high"] < 0 or u["low"] > 0


def users_95(v: Mapping[str, Any]) -> list[float] | None:
    """``[low, high]`` of a delta's interval over test users, for a JSON summary line (None if not computed)."""
    u = v.get("users")
    return [u["low"], u["high"]] if u else None
