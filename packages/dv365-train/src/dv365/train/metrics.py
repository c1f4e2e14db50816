"""Normalized entropy (paper Eq. 12) and a streaming multi-task meter.

``NE_k = BCE_k / H(p_k)`` with ``H(p) = -[p ln p + (1 - p) ln(1 - p)]`` and ``p_k`` the task's base rate
(mean label) **on the evaluated data**. NE < 1 means the model beats always predicting the base rate.
Compare models by the relative NE delta on the same data (|delta| > 0.1% is significant at Meta's scale).
NE is undefined (NaN) when the evaluated data has no positives or no negatives; for rare labels
(follow, hate: ~0.1%) a few thousand examples give only a handful of positives, so NE is noisy there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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

    def update(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        out, lab = outputs.detach().double().cpu(), labels.detach().double().cpu()
        y = self._loss.targets(lab)  # [B, K]
        per_ex = torch.where(
            self._loss.binary.cpu(), F.binary_cross_entropy_with_logits(out, y, reduction="none"), (out - y).pow(2)
        )  # [B, K]
        self.loss_sum += per_ex.sum(0)
        self.label_sum += y.sum(0)
        self.label_sq_sum += y.pow(2).sum(0)
        self.count += out.shape[0]

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
