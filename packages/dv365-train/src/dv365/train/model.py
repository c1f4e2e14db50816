"""The whole training model (paper Eq. 10): ``y_hat = Phi_phi(eta(E^-24h), x, c)``.

:class:`DV365UserTower` is ``eta``: sparse lookup + pooling of the sliced features
(:class:`~dv365.train.pooling.SlicedPooling`) followed by a summarization arch (FSA or a Table-1 variant,
:func:`~dv365.train.fsa.build_user_tower`). It is the only part exported: everything in
:class:`~dv365.train.backbone.MultiTaskDLRM` is training scaffolding. ``DV365Model.user_tower`` is ``None``
for the baseline (``model.kind: baseline``).

With ``model.backbone.share_item_tables`` the target item's media / author / topic ids are looked up in the
tower's history tables (:meth:`~dv365.train.pooling.SlicedPooling.item_embeddings`) and handed to the
backbone; the tables stay inside the tower (one parameter, two readers), so the exported tower is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dv365.core.slicing import SliceSpec
from dv365.train.backbone import SHARED_ITEM_FEATURES, MultiTaskDLRM
from dv365.train.config import ModelConfig
from dv365.train.dedup import expand, strip_inverse
from dv365.train.errors import TrainConfigError
from dv365.train.fsa import UserTowerArch, build_user_tower
from dv365.train.losses import TaskSpec
from dv365.train.pooling import SlicedPooling, shared_item_tables

BASELINE = "baseline"


class DV365UserTower(nn.Module):
    """``eta``: sliced KJT -> user embeddings ``[B, N_out, D]`` (what the exporter runs over all users).

    A KJT with torchrec ``inverse_indices`` (a RecD-deduplicated batch: ``U`` unique user rows, ``B`` batch
    rows; :mod:`~dv365.train.dedup`) is pooled and summarised on its ``U`` rows, and the output is expanded
    to ``[B, N_out, D]`` by ``index_select`` at the end.

    Args:
        pooling: the sliced-feature tables and pooling, ``KJT -> [B, N, D]``.
        arch: the summarization arch, ``[B, N, D] -> [B, N_out, D]``.

    Example::

        tower = DV365UserTower(SlicedPooling(spec, 256), build_user_tower("fsa", TowerConfig(num_tokens=201)))
        tower(sliced.to_kjt()).shape     # [B, 58, 256]
    """

    def __init__(self, pooling: SlicedPooling, arch: UserTowerArch) -> None:
        super().__init__()
        self.pooling, self.arch = pooling, arch
        self.out_tokens, self.dim = arch.out_tokens, pooling.dim

    def forward(self, kjt: Any) -> torch.Tensor:
        unique, inverse = strip_inverse(kjt)  # U rows (= B without dedup), inverse [B] or None
        return expand(self.arch(self.pooling(unique)), inverse)  # [U, N, D] -> [U, N_out, D] -> [B, N_out, D]


class DV365Model(nn.Module):
    """User tower (optional) + multi-task DLRM backbone.

    Args:
        user_tower: ``eta``, or ``None`` for the baseline without DV365 timelines.
        backbone: ``Phi_phi``.

    Example::

        model = build_model(cfg.model, spec, tasks)
        out = model(batch.user_kjt, batch.item_kjt, batch.dense)    # [B, K]
    """

    def __init__(self, user_tower: DV365UserTower | None, backbone: MultiTaskDLRM) -> None:
        super().__init__()
        self.user_tower, self.backbone = user_tower, backbone

    def forward(self, user_kjt: Any | None, item_kjt: Any, dense: torch.Tensor) -> torch.Tensor:
        tokens = self.user_tower(user_kjt) if self.user_tower is not None else None  # [B, N_out, D]
        shared = None
        if self.user_tower is not None and self.backbone.shared_lookups:  # the target's ids in the tower's tables
            shared = self.user_tower.pooling.item_embeddings(item_kjt, self.backbone.shared_lookups)  # [B, S, D]
        return self.backbone(item_kjt, dense, tokens, shared)  # [B, K]


def build_model(
    cfg: ModelConfig,
    spec: SliceSpec | None,
    tasks: Sequence[TaskSpec],
    num_dense: int,
    device: torch.device | str | None = None,
) -> DV365Model:
    """Builds the model of ``cfg`` (``spec`` may be ``None`` only for the baseline), on ``device``."""
    if not tasks:
        raise TrainConfigError("no tasks: list label columns under `tasks:` (or let the trainer infer them)")
    tower = None
    if cfg.kind != BASELINE:
        if spec is None:
            raise TrainConfigError(f"model.kind = {cfg.kind!r} needs a slice spec")
        tcfg = cfg.tower
        if tcfg.num_tokens not in (0, len(spec.features)):
            raise TrainConfigError(
                f"model.tower.num_tokens = {tcfg.num_tokens} but spec {spec.name!r} has "
                f"{len(spec.features)} features (leave num_tokens out)"
            )
        tcfg = tcfg.with_tokens(len(spec.features))
        tower = DV365UserTower(SlicedPooling(spec, tcfg.dim), build_user_tower(cfg.kind, tcfg))
    shape = (tower.out_tokens, tower.dim) if tower is not None else None
    shared: list[tuple[str, str]] = []
    if (
        tower is not None and spec is not None
    ):  # the target item's ids looked up in the tower's tables (share_item_tables)
        known = set(SHARED_ITEM_FEATURES.values())
        shared = [(i, t) for i, t in shared_item_tables(spec, cfg.backbone.share_item_tables) if i in known]
    model = DV365Model(tower, MultiTaskDLRM(cfg.backbone, num_dense, tasks, shape, shared))
    return model.to(device) if device is not None else model
