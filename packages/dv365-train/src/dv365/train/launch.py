"""One ``dv365 train`` run: config (+ overrides) -> :class:`~dv365.train.trainer.Trainer` -> train or evaluate ->
the one-line summary.

:mod:`dv365.train.cli` parses the command line and calls :func:`train`; under torchrun every rank does so
through the worker entry ``python -m dv365.train.distributed``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dv365.train.config import TrainConfig
from dv365.train.errors import CheckpointError
from dv365.train.trainer import Trainer, TrainResult


def train(config: str | Path, overrides: Mapping[str, Any] | None = None, *, eval_only: bool = False) -> str | None:
    """Trains from the latest checkpoint of ``checkpoint.dir`` up to ``run.steps`` (``eval_only``: only evaluates
    that checkpoint) and returns the one-line summary; ``None`` after training on a rank other than 0 of a
    torchrun job (``RANK``), where only rank 0 reports.

    Example::

        line = train("packages/dv365-train/configs/synth-quick.yaml", {"run.steps": 100, "run.device": "cpu"})
    """
    cfg = TrainConfig.load(config, dict(overrides or {}))
    trainer = Trainer(cfg)
    if eval_only:
        if trainer.resumed_from is None:
            raise CheckpointError(f"--eval-only: no checkpoint in {cfg.checkpoint.dir}")
        return summary(trainer, None, trainer.evaluate())
    result = trainer.fit()
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return summary(trainer, result, result.eval)


def summary(trainer: Trainer, result: TrainResult | None, ev: dict[str, Any]) -> str:
    """The final one-line summary."""
    cfg = trainer.cfg
    sim = "SIMULATED " if trainer.source.simulated else ""
    parts = [f"dv365 train: {cfg.model.kind} on {sim}data {cfg.data.url} ({trainer.device})"]
    if result is not None:
        how = f" resumed at step {result.start_step}" if result.resumed_from else ""
        how += " warm-started" if result.warm_started_from else ""
        parts.append(
            f"steps {result.start_step}->{result.steps}{how} in {result.seconds:.1f} s "
            f"({result.examples_per_s:,.0f} examples/s), last train loss {result.train_loss:.4f}"
        )
    if ev:
        tasks = ev["tasks"]
        nes = ", ".join(f"{k} {v['ne']:.4f}" for k, v in tasks.items() if "ne" in v and not math.isnan(v["ne"]))
        mses = ", ".join(f"{k} MSE {v['mse']:.4f}" for k, v in tasks.items() if "mse" in v)
        parts.append(
            f"eval on {ev['examples']:,} requests: mean NE {ev['mean_ne']:.4f} ({nes})" + (f"; {mses}" if mses else "")
        )
    ckpt = result.checkpoint if result is not None else None
    if ckpt:
        parts.append(f"checkpoint {ckpt}")
    return "; ".join(parts)
