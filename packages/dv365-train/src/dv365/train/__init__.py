"""dv365.train: the DV365 model (paper §2.3) and its training loop.

* :mod:`~dv365.train.pooling` -- ``SlicedPooling``: weighted EBC over the sliced KJT -> ``[B, N, D]``.
* :mod:`~dv365.train.fsa` -- the user tower's summarization arch: FSA (Alg. 1 + LCE) and every Table-1
  variant behind ``build_user_tower(kind, cfg)``.
* :mod:`~dv365.train.backbone` -- the multi-task DLRM backbone (dot or DCN-v2 interaction, one head per task).
* :mod:`~dv365.train.losses` / :mod:`~dv365.train.metrics` -- Eq. 7-8 loss, Eq. 12 normalized entropy.
* :mod:`~dv365.train.data` / :mod:`~dv365.train.trainer` / :mod:`~dv365.train.checkpoint` -- requests
  joined with timelines sliced at each request's time, seeded training, exact resume, warm start.
* ``dv365 train --config run.yaml`` (:mod:`~dv365.train.cli` parses, :mod:`~dv365.train.launch` runs);
  ``torchrun ... -m dv365.train.distributed`` on several processes (:mod:`~dv365.train.distributed`).

Names load lazily (PEP 562), so the CLI's ``register`` does not import torchrec.
"""

from __future__ import annotations

import importlib
from typing import Any

from dv365.train.__about__ import __version__

_LAZY = {
    "SlicedPooling": "pooling",
    "TOWER_KINDS": "fsa",
    "TowerConfig": "fsa",
    "EncoderConfig": "fsa",
    "FunnelConfig": "fsa",
    "build_user_tower": "fsa",
    "token_split": "fsa",
    "funnel_pool": "fsa",
    "FunnelSummarization": "fsa",
    "BackboneConfig": "backbone",
    "MultiTaskDLRM": "backbone",
    "TaskSpec": "losses",
    "MultiTaskLoss": "losses",
    "MultiTaskMeter": "metrics",
    "normalized_entropy": "metrics",
    "DV365Model": "model",
    "DV365UserTower": "model",
    "build_model": "model",
    "TrainConfig": "config",
    "DataConfig": "config",
    "ModelConfig": "config",
    "OptimConfig": "config",
    "RunConfig": "config",
    "CheckpointConfig": "config",
    "ExampleSource": "data",
    "Batch": "data",
    "Trainer": "trainer",
    "TrainResult": "trainer",
    "load_user_tower": "checkpoint",
    "TrainConfigError": "errors",
    "CheckpointError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'dv365.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dv365.train.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
