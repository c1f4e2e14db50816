"""Training configuration: frozen dataclasses, loaded from YAML (``dv365 train --config run.yaml``).

The YAML mirrors the dataclasses section by section::

    data:       {url, spec, hash_sizes, eval_fraction, train_range}          -> DataConfig
    tasks:      [{label, kind, weight, transform}, ...]                       -> TaskSpec (losses.py)
    model:      {kind, tower: {dim, n_out, encoder, funnel}, backbone: {...}} -> ModelConfig
    optim:      {dense, lr, sparse, sparse_lr, grad_clip}                     -> OptimConfig
    run:        {steps, batch_size, seed, device, ...}                        -> RunConfig
    checkpoint: {dir, every, keep, warm_start, warm_start_modules}            -> CheckpointConfig

Unknown keys are errors that name the key and the section (:class:`TrainConfigError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dv365.core import config as core_config
from dv365.core.config import read_yaml_mapping
from dv365.train.backbone import BackboneConfig
from dv365.train.errors import TrainConfigError
from dv365.train.fsa import EncoderConfig, FunnelConfig, TowerConfig
from dv365.train.losses import TaskSpec


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from.

    Args:
        url: a UniTi dataset with requests (``dv365 synth`` or ``dv365 import``); local path or fsspec URL.
        spec: slice spec name (``kuairand``, ``movielens``) or YAML path.
        hash_sizes: per id type, overrides the spec's ``hash_size`` (table rows), e.g. ``{media: 20011}``:
            the shipped kuairand spec has 1M-row media tables, too big for quick CPU runs.
        eval_fraction: the latest fraction of requests (by request time) is held out for evaluation.
        train_range: ``[lo, hi)`` fractions of the remaining (time-sorted) requests used for training;
            a newer model version warm-started from an older one trains on a later range.
        slicer: the ``Slicer`` backend: ``auto`` (the core default), ``numpy`` or ``numba``.
        dedup: RecD-style dedup (:mod:`~dv365.train.dedup`): rows of a batch whose user slices are identical
            (same user, same effective cut-off) are sliced, pooled and summarised once, then expanded back.
            Same outputs and gradients as without (up to float summation order).
        group_by_user: 0 (default): each epoch is a plain permutation of the requests. ``G > 0``: a user's
            time-consecutive requests stay together in groups of up to ``G`` rows (the groups are shuffled),
            so a batch holds several rows per user (more to deduplicate when their slices coincide).
        max_requests_per_user: 0 (default): every request. ``N > 0``: at most ``N`` requests of each user, drawn
            uniformly at random (seeded by ``sample_seed``, the same draw every run), before the splits: bounds
            the work and memory of impression logs with thousands of requests per user.
        sample_seed: the seed of that draw.
    """

    url: str = ""
    spec: str = "kuairand"
    hash_sizes: Mapping[str, int] = field(default_factory=dict)
    eval_fraction: float = 0.2
    train_range: tuple[float, float] = (0.0, 1.0)
    slicer: str = "auto"
    dedup: bool = True
    group_by_user: int = 0
    max_requests_per_user: int = 0
    sample_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """The model: a user tower variant (Table 1) inside the multi-task DLRM backbone.

    Args:
        kind: ``fsa`` (default), ``pass_thru``, ``lce``, ``mlp_d``, ``mlp_t``, ``tl_d``, ``tl_t``, or
            ``baseline`` (no DV365 tower: the backbone alone, the timelines are not read).
        tower: the tower's sizes; ``num_tokens`` is filled from the slice spec.
        backbone: the DLRM backbone.
    """

    kind: str = "fsa"
    tower: TowerConfig = TowerConfig()
    backbone: BackboneConfig = BackboneConfig()


@dataclass(frozen=True)
class OptimConfig:
    """Two optimizers, as torchrec splits them: sparse embedding tables vs dense parameters.

    Args:
        dense: ``adam``, ``adamw`` or ``sgd`` for every non-embedding parameter.
        lr: dense learning rate.
        sparse: ``adagrad``, ``sparse_adam`` or ``sgd`` for the embedding tables (sparse gradients:
            only the rows a batch reads are touched).
        sparse_lr: embedding learning rate.
        grad_clip: max global norm of the dense gradients (0: off).
    """

    dense: str = "adam"
    lr: float = 1e-3
    sparse: str = "adagrad"
    sparse_lr: float = 0.05
    grad_clip: float = 0.0


@dataclass(frozen=True)
class RunConfig:
    """How long and where to train.

    Args:
        steps: total optimizer steps (a resumed run continues up to this number).
        batch_size: training examples per step (the last partial batch of an epoch is dropped).
        seed: seeds parameter init, dropout and the data order (a pure function of seed, epoch, step).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        deterministic: ``torch.use_deterministic_algorithms`` during training (bit-exact resume).
        eval_batch_size: examples per evaluation batch.
        eval_every: steps between evaluations during training (0: only at the end); each one appends
            a line to ``eval_log.jsonl`` in the checkpoint folder.
        log_every: steps between progress-bar / ``train_log.jsonl`` updates of the running loss and NE.
        num_workers: DataLoader worker processes slicing batches ahead (0: in the training process).
        threads: CPU intra-op threads (``torch.set_num_threads``; 0: torch's default). On a small shared
            machine 1 thread can be several times faster than 2 that fight for the cores.
        progress: show tqdm bars.
        sharding: embedding-table sharding when run under ``torchrun`` (``WORLD_SIZE`` > 1, see
            :mod:`~dv365.train.distributed`): ``table_wise`` (each table on one rank, fbgemm fused kernel and
            optimizer), ``row_wise`` (rows split over ranks; CUDA only in torchrec 1.8) or
            ``data_parallel`` (replicated tables, gradients all-reduced).
    """

    steps: int = 100
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    deterministic: bool = True
    eval_batch_size: int = 1024
    eval_every: int = 0
    log_every: int = 10
    num_workers: int = 0
    threads: int = 0
    progress: bool = True
    sharding: str = "table_wise"


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (model + optimizers + RNG states + data position) and warm start.

    Args:
        dir: checkpoint folder (also gets ``metrics.json`` and ``train_log.jsonl``); a run resumes from
            the latest checkpoint found here.
        every: steps between checkpoints (0: only at the end).
        keep: how many step checkpoints to keep (older ones are deleted).
        warm_start: a checkpoint of a previous model version: when this run starts fresh, its
            ``warm_start_modules`` weights are loaded (then training continues on this run's data).
        warm_start_modules: ``user_tower`` (tower + sliced-feature embeddings), ``backbone``.
    """

    dir: str = "out/train"
    every: int = 0
    keep: int = 2
    warm_start: str | None = None
    warm_start_modules: tuple[str, ...] = ("user_tower",)


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run. Build with :meth:`from_dict` / :meth:`load` (YAML).

    Example::

        cfg = TrainConfig.load("synth-quick")
        cfg = TrainConfig.from_dict({"data": {"url": "data/synth"}, "run": {"steps": 50}})
        cfg.model.tower.n_out     # 58
    """

    data: DataConfig = DataConfig()
    tasks: tuple[TaskSpec, ...] = ()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        cfg = _build(cls, d, "config")
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """Reads a YAML file, or a config shipped in ``dv365/train/configs`` by name (``"synth-quick"``);
        ``overrides`` maps dotted keys (``run.steps``) to values."""
        p = config_path(path)
        d = read_yaml_mapping(p, TrainConfigError, "training config")
        return cls.from_dict(apply_overrides(d, overrides or {}))

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)  # type: ignore[no-any-return]

    def validate(self) -> None:
        r, d = self.run, self.data
        _need(r.steps >= 0, "run.steps", r.steps, "must be >= 0")
        _need(r.batch_size >= 1, "run.batch_size", r.batch_size, "must be >= 1")
        _need(r.eval_batch_size >= 1, "run.eval_batch_size", r.eval_batch_size, "must be >= 1")
        _need(r.log_every >= 1, "run.log_every", r.log_every, "must be >= 1")
        _need(r.eval_every >= 0, "run.eval_every", r.eval_every, "must be >= 0")
        _need(
            r.threads >= 0 and r.num_workers >= 0,
            "run.threads / run.num_workers",
            (r.threads, r.num_workers),
            "must be >= 0",
        )
        _need(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", d.eval_fraction, "must be in [0, 1)")
        _need(d.slicer in ("auto", "numpy", "numba"), "data.slicer", d.slicer, "use auto, numpy or numba")
        _need(d.group_by_user >= 0, "data.group_by_user", d.group_by_user, "must be >= 0 (0: off)")
        _need(
            d.max_requests_per_user >= 0, "data.max_requests_per_user", d.max_requests_per_user, "must be >= 0 (0: all)"
        )
        _need(
            r.sharding in ("table_wise", "row_wise", "data_parallel"),
            "run.sharding",
            r.sharding,
            "use table_wise, row_wise or data_parallel",
        )
        lo, hi = d.train_range
        _need(0.0 <= lo < hi <= 1.0, "data.train_range", d.train_range, "must be [lo, hi) with 0 <= lo < hi <= 1")
        _need(self.optim.lr > 0 and self.optim.sparse_lr > 0, "optim.lr", self.optim.lr, "learning rates must be > 0")
        _need(self.optim.dense in ("adam", "adamw", "sgd"), "optim.dense", self.optim.dense, "use adam, adamw or sgd")
        _need(
            self.optim.sparse in ("adagrad", "sparse_adam", "sgd"),
            "optim.sparse",
            self.optim.sparse,
            "use adagrad, sparse_adam or sgd",
        )
        for m in self.checkpoint.warm_start_modules:
            _need(m in ("user_tower", "backbone"), "checkpoint.warm_start_modules", m, "use user_tower and/or backbone")
        labels = [t.label for t in self.tasks]
        _need(len(set(labels)) == len(labels), "tasks", labels, "labels must be unique")


def _need(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise TrainConfigError(f"{key} = {value!r}: {why}")


def apply_overrides(d: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``d`` with dotted keys set: ``{"model.kind": "lce"}`` sets ``d["model"]["kind"]``."""
    return core_config.apply_overrides(d, overrides, TrainConfigError)


def config_path(path: str | Path) -> Path:
    """``path`` itself when it exists, else the shipped config of that name (``synth-quick``, ...)."""
    return core_config.resolve_config(path, "dv365.train", "configs", TrainConfigError)


def _build(tp: Any, value: Any, where: str) -> Any:
    return core_config.build_dataclass(tp, value, where, TrainConfigError)


def _plain(x: Any) -> Any:
    return core_config.to_plain(x)


__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EncoderConfig",
    "FunnelConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TaskSpec",
    "TowerConfig",
    "TrainConfig",
    "TrainConfigError",
    "apply_overrides",
    "config_path",
]
