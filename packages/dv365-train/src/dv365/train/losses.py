"""The backbone's multi-task loss (paper Eq. 7-8): ``L = sum_k BCE_k + a * MSE(watch time)``.

Each task is one label column of the requests (``label_*``) and one output of the backbone:

* ``binary``: the output is a logit; ``BCE_k`` is Eq. 7 with ``y_hat = sigmoid(logit)`` (computed with
  ``binary_cross_entropy_with_logits``, the numerically stable form of the same value).
* ``regression``: the output predicts ``transform(label)``; ``MSE`` as in the paper. ``transform: log1p``
  (the default for watch time) trains on ``log(1 + seconds)``, which tames the heavy tail of dwell times.

``weight`` multiplies each term: 1 for the BCE terms and ``a`` for the MSE term in Eq. 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dv365.train.errors import TrainConfigError

TASK_KINDS = ("binary", "regression")
TRANSFORMS = ("none", "log1p")


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task of the backbone.

    Args:
        label: the requests column (``label_like``, ``label_watch_time``, ``label_rating``...).
        kind: ``binary`` (BCE on a logit) or ``regression`` (MSE).
        weight: the term's weight in the total loss (``a`` of Eq. 8 for the regression task).
        transform: regression target transform: ``none`` or ``log1p``.
    """

    label: str
    kind: str = "binary"
    weight: float = 1.0
    transform: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise TrainConfigError(f"task {self.label!r}: kind {self.kind!r} must be one of {TASK_KINDS}")
        if self.transform not in TRANSFORMS:
            raise TrainConfigError(f"task {self.label!r}: transform {self.transform!r} must be one of {TRANSFORMS}")
        if self.kind == "binary" and self.transform != "none":
            raise TrainConfigError(f"task {self.label!r}: binary tasks take no transform")
        if self.weight < 0:
            raise TrainConfigError(f"task {self.label!r}: weight {self.weight} must be >= 0")

    @property
    def name(self) -> str:
        """The label without its ``label_`` prefix (``like``, ``watch_time``)."""
        return self.label.removeprefix("label_")


def bce(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 7 as written: ``-1/B sum [y ln y_hat + (1 - y) ln(1 - y_hat)]`` on probabilities (a reference)."""
    return -(labels * torch.log(probs) + (1 - labels) * torch.log1p(-probs)).mean()


def regression_target(task: TaskSpec, labels: torch.Tensor) -> torch.Tensor:
    """The value a regression head predicts: ``log1p(label)`` or the label."""
    return torch.log1p(labels.clamp_min(0)) if task.transform == "log1p" else labels


class MultiTaskLoss(nn.Module):
    """``sum_k weight_k * loss_k`` over binary (BCE on logits) and regression (MSE) tasks (Eq. 8).

    Args:
        tasks: one :class:`TaskSpec` per output column, in the backbone's head order.

    Example::

        loss_fn = MultiTaskLoss([TaskSpec("label_like"), TaskSpec("label_watch_time", "regression", 0.5, "log1p")])
        total, per_task = loss_fn(outputs, labels)     # outputs, labels: [B, K]; total: [], per_task: [K]
    """

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        binary = torch.tensor([t.kind == "binary" for t in self.tasks])
        self.register_buffer("binary", binary, persistent=False)
        self.register_buffer(
            "weights", torch.tensor([t.weight for t in self.tasks], dtype=torch.float32), persistent=False
        )
        self._log1p = [i for i, t in enumerate(self.tasks) if t.transform == "log1p"]

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels with the regression transforms applied, ``[B, K]``."""
        if not self._log1p:
            return labels
        out = labels.clone()
        out[:, self._log1p] = torch.log1p(labels[:, self._log1p].clamp_min(0))
        return out

    def forward(self, outputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.targets(labels)  # [B, K]
        bce_k = F.binary_cross_entropy_with_logits(outputs, y, reduction="none").mean(0)  # [K]
        mse_k = (outputs - y).pow(2).mean(0)  # [K]
        per_task = torch.where(self.binary, bce_k, mse_k)  # [K]
        return (per_task * self.weights).sum(), per_task.detach()
