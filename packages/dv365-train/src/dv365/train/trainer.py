"""The training loop: seeded, resumable bit-exactly, warm-startable.

:class:`Trainer` ties the pieces together: :class:`~dv365.train.data.ExampleSource` (requests joined with
timelines sliced at each request's time), :func:`~dv365.train.model.build_model`, the Eq. 8 loss, two
optimizers (sparse embedding tables / dense parameters), tqdm progress with the running loss and NE,
checkpoints and evaluation.

Exact resume: a checkpoint holds the model, both optimizers, every RNG state and the step (the data
position: a step's batch is a pure function of data, seed and step). Training N steps straight and
training N/2, dropping the process, and resuming for N/2 more give bit-identical weights (on the same
device and thread count), with ``torch.use_deterministic_algorithms`` on during training.

Warm start: a fresh run (no checkpoint in its folder) with ``checkpoint.warm_start`` loads the user tower
(sliced-feature embeddings + summarization arch) and optionally the backbone of a previous model version,
then trains on its own (newer) data with fresh optimizers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dv365.train.checkpoint import (
    capture_rng_state,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    load_module_state,
    restore_rng_state,
    save_checkpoint,
)
from dv365.train.config import OptimConfig, TrainConfig
from dv365.train.data import NUM_DENSE, Batch, ExampleSource, TrainBatches, load_spec
from dv365.train.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    dense_checksum,
    env_world_size,
    gather_state,
    init_from_env,
    scatter_optimizer_state,
    scatter_state,
    shard_model,
)
from dv365.train.errors import CheckpointError, TrainConfigError
from dv365.train.losses import MultiTaskLoss, TaskSpec
from dv365.train.metrics import MultiTaskMeter
from dv365.train.model import BASELINE, DV365Model, build_model
from dv365.train.pooling import embedding_bags, use_sparse_gradients

# config sections that must not change when a run resumes (they define the model and the data order)
_RESUME_KEYS = (("data",), ("tasks",), ("model",), ("optim",), ("run", "batch_size"), ("run", "seed"))


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto``/``None`` -> CUDA when available, else CPU; anything else as given."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError(f"run.device = {str(name)!r} but CUDA is not available here (use auto or cpu)")
    return dev


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the block, restored after (it is process-global). On CUDA
    it warns instead of failing for an op without a deterministic kernel, and cuBLAS gets a fixed workspace."""
    prev, prev_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if enabled:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(embedding-table parameters, every other parameter)."""
    sparse_ids = {id(b.weight) for b in embedding_bags(model)}
    sparse = [p for p in model.parameters() if id(p) in sparse_ids]
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    return sparse, dense


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> dict[str, torch.optim.Optimizer]:
    """``{"sparse": ..., "dense": ...}``: torchrec's split (fused row-wise optimizers replace the sparse one
    under DMP). The embedding tables are switched to sparse gradients."""
    use_sparse_gradients(model)
    sparse, dense = split_parameters(model)
    opts: dict[str, torch.optim.Optimizer] = {}
    if dense:
        opts["dense"] = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[cfg.dense](
            dense, lr=cfg.lr
        )
    if sparse:
        opts["sparse"] = {
            "adagrad": torch.optim.Adagrad,
            "sparse_adam": torch.optim.SparseAdam,
            "sgd": torch.optim.SGD,
        }[cfg.sparse](sparse, lr=cfg.sparse_lr)
    return opts


def optimizer_step(loss: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer], grad_clip: float = 0.0) -> None:
    """zero_grad -> backward -> (clip the dense parameters' gradient norm to ``grad_clip`` when > 0) -> step."""
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0 and "dense" in optimizers:
        params = [p for g in optimizers["dense"].param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for opt in optimizers.values():
        opt.step()


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did."""

    start_step: int
    steps: int
    seconds: float  # training wall time (checkpoint saves included, evaluations excluded)
    examples_per_s: float
    train_loss: float  # mean loss of the last (possibly partial) logging window (NaN if no step ran)
    eval: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    resumed_from: str | None = None
    warm_started_from: str | None = None


class Trainer:
    """Trains a :class:`~dv365.train.model.DV365Model` as configured; resumes from ``checkpoint.dir``.

    Args:
        cfg: the run.
        device: overrides ``cfg.run.device`` (``"cpu"``, ``"cuda"``, ``"auto"``).
        progress: overrides ``cfg.run.progress``.

    Example::

        trainer = Trainer(TrainConfig.load("synth-quick"), device="cpu")
        result = trainer.fit()                    # resumes if the checkpoint folder has a checkpoint
        result.eval["mean_ne"], result.checkpoint
    """

    def __init__(
        self, cfg: TrainConfig, device: str | torch.device | None = None, progress: bool | None = None
    ) -> None:
        self.cfg = cfg
        # under torchrun (WORLD_SIZE > 1): join the process group, one device per process (dv365.train.distributed)
        self.dist: DistContext | None = None
        if env_world_size() > 1:
            self.dist = init_from_env(str(device) if device is not None else cfg.run.device)
            if cfg.run.batch_size % self.dist.world_size:
                raise TrainConfigError(
                    f"run.batch_size = {cfg.run.batch_size} must be a multiple of the "
                    f"world size {self.dist.world_size} (each rank reads an equal part)"
                )
            self.device = self.dist.device
        else:
            self.device = resolve_device(device if device is not None else cfg.run.device)
        self.is_main = self.dist is None or self.dist.is_main
        self.progress = (cfg.run.progress if progress is None else progress) and self.is_main
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed)
        self.spec = load_spec(cfg.data) if cfg.model.kind != BASELINE else None
        self.source = ExampleSource(cfg.data, cfg.tasks, self.spec, cfg.model.backbone.item_hash_size)
        self.tasks: tuple[TaskSpec, ...] = self.source.tasks
        self.model: DV365Model = build_model(cfg.model, self.spec, self.tasks, NUM_DENSE, self.device)
        self.loss_fn = MultiTaskLoss(self.tasks).to(self.device)
        part = (self.dist.rank, self.dist.world_size) if self.dist is not None else (0, 1)
        self.batches = TrainBatches(self.source, cfg.run.batch_size, cfg.run.seed, part=part)
        self.step = 0
        self.meter = MultiTaskMeter(self.tasks)  # the running window shown in the progress bar
        self._window_loss = [0.0, 0]
        self.ckpt_dir = Path(cfg.checkpoint.dir)
        self.resumed_from: str | None = None
        self.warm_started_from: str | None = None
        latest = latest_checkpoint(self.ckpt_dir)
        if latest is None:  # a fresh run: head biases from the data, then the previous version's tower
            self.model.backbone.init_head_bias(self.source.head_bias())
            if cfg.checkpoint.warm_start:
                self.warm_start(cfg.checkpoint.warm_start, cfg.checkpoint.warm_start_modules)
        # `net` runs the forward pass: the model itself, or its DMP wrapper (sharded tables + DDP)
        self.net: nn.Module = self.model
        if self.dist is not None:
            self.net, self.optimizers = shard_model(self.model, cfg, self.dist)
        else:
            self.optimizers = build_optimizers(self.model, cfg.optim)
        if latest is not None:
            self.load(latest)

    # -- training ------------------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch already on the device; returns (loss, outputs [B, K]), detached."""
        out = self.net(batch.user_kjt, batch.item_kjt, batch.dense)  # [B, K] (this rank's part under torchrun)
        loss, _ = self.loss_fn(out, batch.labels)
        optimizer_step(loss, self.optimizers, self.cfg.optim.grad_clip)
        return loss.detach(), out.detach()

    def _batches(self, start: int, stop: int) -> Iterator[Batch]:
        if self.cfg.run.num_workers <= 0:
            return (self.batches[s] for s in range(start, stop))
        loader = torch.utils.data.DataLoader(
            self.batches,
            batch_size=None,
            sampler=range(start, stop),
            num_workers=self.cfg.run.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        return iter(loader)

    def fit(self) -> TrainResult:
        """Trains from the current step up to ``run.steps``, checkpoints, then evaluates."""
        from tqdm.auto import tqdm

        run, start = self.cfg.run, self.step
        t0 = time.perf_counter()
        last_loss, saved = math.nan, None
        with deterministic_algorithms(run.deterministic, self.device):
            self.net.train()
            bar = tqdm(
                total=run.steps,
                initial=start,
                unit="step",
                desc=f"train {self.cfg.model.kind}",
                disable=not self.progress,
                dynamic_ncols=True,
            )
            for batch in self._batches(start, run.steps):
                batch = batch.to(self.device, non_blocking=True)
                loss, out = self.train_step(batch)
                self.step += 1
                self.meter.update(out, batch.labels)
                self._window_loss[0] += float(loss)
                self._window_loss[1] += 1
                bar.update(1)
                if self.step % run.log_every == 0:  # on multiples only: a resumed run logs the same lines
                    last_loss = self._log(bar)
                every = self.cfg.checkpoint.every
                if every and self.step % every == 0 and self.step < run.steps:
                    saved = self.save()
                if run.eval_every and self.step % run.eval_every == 0 and self.step < run.steps:
                    t_eval = time.perf_counter()
                    self._log_eval(self.evaluate())
                    t0 += time.perf_counter() - t_eval  # the throughput counts training time only
            if self._window_loss[1]:  # a partial window at the end: report it, keep it for a resume
                last_loss = self._window_loss[0] / self._window_loss[1]
                bar.set_postfix(loss=f"{last_loss:.4f}", ne=f"{self.meter.mean_ne():.4f}")
            bar.close()
            if self.step > start:
                saved = self.save()
        seconds = time.perf_counter() - t0
        done = self.step - start
        ev = self.evaluate() if len(self.source.eval_rows) else {}
        if ev and run.eval_every and self.step > start:
            self._log_eval(ev)
        result = TrainResult(
            start,
            self.step,
            seconds,
            done * run.batch_size / seconds if done else 0.0,
            last_loss,
            ev,
            saved or latest_checkpoint(self.ckpt_dir),
            self.resumed_from,
            self.warm_started_from,
        )
        self._write_metrics(result)
        return result

    def _log(self, bar: Any) -> float:
        if self.dist is not None:  # the window over every rank's rows (sums), then only rank 0 writes
            self._reduce_meter(self.meter)
            self._window_loss[0] = (
                float(all_reduce_sum(torch.tensor([self._window_loss[0]], dtype=torch.float64), self.dist))
                / self.dist.world_size
            )
        loss = self._window_loss[0] / max(self._window_loss[1], 1)
        metrics = self.meter.compute()
        ne = self.meter.mean_ne()
        bar.set_postfix(loss=f"{loss:.4f}", ne=f"{ne:.4f}")
        self.meter.reset()
        self._window_loss = [0.0, 0]
        if not self.is_main:
            return loss
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        line = {
            "step": self.step,
            "loss": loss,
            "mean_ne": ne,
            "ne": {k: v["ne"] for k, v in metrics.items() if "ne" in v},
            "mse": {k: v["mse"] for k, v in metrics.items() if "mse" in v},
        }
        with open(self.ckpt_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(line, allow_nan=True) + "\n")
        return loss

    def _reduce_meter(self, meter: MultiTaskMeter) -> None:
        """Sums a meter over the ranks (NE / MSE are ratios of sums: the result is the global one)."""
        assert self.dist is not None
        meter.loss_sum = all_reduce_sum(meter.loss_sum, self.dist)
        meter.label_sum = all_reduce_sum(meter.label_sum, self.dist)
        meter.count = int(all_reduce_sum(torch.tensor([meter.count], dtype=torch.float64), self.dist))

    def _log_eval(self, ev: dict[str, Any]) -> None:
        """Appends one evaluation to ``eval_log.jsonl`` (evaluation uses no RNG: resume stays exact)."""
        if not self.is_main:
            return
        line = {
            "step": self.step,
            "examples": ev["examples"],
            "mean_ne": ev["mean_ne"],
            "ne": {k: v["ne"] for k, v in ev["tasks"].items() if "ne" in v},
            "mse": {k: v["mse"] for k, v in ev["tasks"].items() if "mse" in v},
        }
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        with open(self.ckpt_dir / "eval_log.jsonl", "a") as f:
            f.write(json.dumps(line, allow_nan=True) + "\n")

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """NE per binary task (base rate of the evaluation set), MSE per regression task, on the eval split."""
        from tqdm.auto import tqdm

        meter = MultiTaskMeter(self.tasks)
        was_training = self.net.training
        self.net.eval()
        bs = self.cfg.run.eval_batch_size
        total = math.ceil(len(self.source.eval_rows) / bs)
        for batch, n in tqdm(
            self._eval_batches(bs),
            total=total,
            unit="batch",
            desc="eval",
            disable=not self.progress,
            dynamic_ncols=True,
            leave=False,
        ):
            b = batch.to(self.device)
            out = self.net(b.user_kjt, b.item_kjt, b.dense)
            if n:
                meter.update(out[:n], b.labels[:n])
        if self.dist is not None:
            self._reduce_meter(meter)
        self.net.train(was_training)
        return {"examples": meter.count, "mean_ne": meter.mean_ne(), "tasks": meter.compute()}

    def _eval_batches(self, bs: int) -> Iterator[tuple[Batch, int]]:
        """(batch, rows to count): the whole evaluation batches, or under torchrun this rank's part of each
        (a rank whose part is empty runs one row without counting it: sharded forwards are collective)."""
        if self.dist is None:
            for batch in self.source.eval_batches(bs):
                yield batch, batch.batch_size
            return
        rows = self.source.eval_rows
        for s in range(0, len(rows), bs):
            part = np.array_split(rows[s : s + bs], self.dist.world_size)[self.dist.rank]
            yield (self.source.collate(part), len(part)) if len(part) else (self.source.collate(rows[s : s + 1]), 0)

    # -- checkpoints ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The checkpoint payload. Under torchrun a collective (every rank gathers its shards to rank 0);
        only rank 0's result is complete."""
        epoch, b = self.batches.position(self.step)
        extra: dict[str, Any] = {}
        if self.dist is not None:
            main = self.dist.is_main
            model_state = gather_state(self.net.state_dict(), main)
            optims = {k: o.state_dict() for k, o in self.optimizers.items()}
            optims["fused"] = gather_state(self.net.fused_optimizer.state_dict(), main)  # type: ignore[operator]
            rng = capture_rng_state()
            extra["distributed"] = {
                "world_size": self.dist.world_size,
                "backend": self.dist.backend,
                "sharding": self.cfg.run.sharding,
                "rng_per_rank": all_gather_objects(rng),
                "dense_checksums": all_gather_objects(dense_checksum(self.net)),
            }
        else:
            model_state, rng = self.model.state_dict(), capture_rng_state()
            optims = {k: o.state_dict() for k, o in self.optimizers.items()}
        return {
            "epoch": epoch,
            "batch_in_epoch": b,
            "config": self.cfg.to_dict(),
            "tasks": [t.label for t in self.tasks],
            "model": model_state,
            "optimizers": optims,
            "rng": rng,
            **extra,
            "meter": {
                "loss_sum": self.meter.loss_sum,
                "label_sum": self.meter.label_sum,
                "count": self.meter.count,
                "window_loss": self._window_loss[0],
                "window_steps": self._window_loss[1],
            },
        }

    def save(self) -> Path:
        state = self.state()
        path = checkpoint_path(self.ckpt_dir, self.step)
        if self.is_main:
            path = save_checkpoint(self.ckpt_dir, self.step, state, keep=self.cfg.checkpoint.keep)
            self._dist_info = state.get("distributed")
        if self.dist is not None:
            dist_barrier()  # the checkpoint exists for every rank once save() returns
        return path

    def load(self, path: str | Path) -> None:
        """Resumes from a checkpoint of this run (same model / data / tasks / optimizer / batch size / seed)."""
        ckpt = load_checkpoint(path)
        here, there = self.cfg.to_dict(), _normalised(ckpt["config"])
        changed = [".".join(k) for k in _RESUME_KEYS if _get(here, k) != _get(there, k)]
        if changed:
            raise CheckpointError(
                f"{ckpt['path']}: cannot resume: this run's {changed} differ from the checkpoint's; "
                "use another checkpoint.dir (and checkpoint.warm_start to start from it)"
            )
        if self.dist is None:
            self.model.load_state_dict(ckpt["model"])
        else:
            scatter_state(self.net, ckpt["model"])
            scatter_optimizer_state(
                self.net.fused_optimizer.state_dict(),  # type: ignore[operator]
                ckpt["optimizers"].get("fused", {}),
            )
        for k, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][k])
        per_rank = (ckpt.get("distributed") or {}).get("rng_per_rank")
        if self.dist is not None and per_rank and len(per_rank) == self.dist.world_size:
            restore_rng_state(per_rank[self.dist.rank])
        else:
            restore_rng_state(ckpt["rng"])
        m = ckpt["meter"]
        self.meter.loss_sum, self.meter.label_sum, self.meter.count = m["loss_sum"], m["label_sum"], int(m["count"])
        self._window_loss = [float(m["window_loss"]), int(m["window_steps"])]
        self.step = int(ckpt["step"])
        self.resumed_from = ckpt["path"]

    def warm_start(self, path: str | Path, modules: tuple[str, ...] = ("user_tower",)) -> None:
        """Loads ``modules`` (``user_tower``: sliced-feature tables + summarization arch; ``backbone``) from a
        previous model version's checkpoint (a file or a checkpoint folder)."""
        ckpt = load_checkpoint(path)
        for name in modules:
            module = getattr(self.model, name, None)
            if module is None:
                raise TrainConfigError(
                    f"checkpoint.warm_start_modules: this model has no {name!r} (model.kind: {self.cfg.model.kind})"
                )
            load_module_state(module, ckpt["model"], name, ckpt["path"])
        self.warm_started_from = ckpt["path"]

    def _write_metrics(self, result: TrainResult) -> None:
        if not self.is_main:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        info = {
            "model": self.cfg.model.kind,
            "dataset": self.cfg.data.url,
            "simulated": self.source.simulated,
            "device": str(self.device),
            "steps": result.steps,
            "start_step": result.start_step,
            "batch_size": self.cfg.run.batch_size,
            "seconds": round(result.seconds, 3),
            "examples_per_s": round(result.examples_per_s, 1),
            "train_loss_last_window": result.train_loss,
            "train_examples": int(len(self.source.train_rows)),
            "eval": result.eval,
            "resumed_from": result.resumed_from,
            "warm_started_from": result.warm_started_from,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        }
        if self.dist is not None:
            d = dict(getattr(self, "_dist_info", None) or {})
            d.pop("rng_per_rank", None)
            info["distributed"] = {
                "world_size": self.dist.world_size,
                "backend": self.dist.backend,
                "sharding": self.cfg.run.sharding,
                **d,
            }
        (self.ckpt_dir / "metrics.json").write_text(json.dumps(info, indent=2, allow_nan=True) + "\n")


def dist_barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _normalised(d: dict[str, Any]) -> dict[str, Any]:
    """A stored config with today's defaults filled in (keys added since it was written compare equal)."""
    try:
        return TrainConfig.from_dict(d).to_dict()
    except TrainConfigError:
        return d


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        d = d.get(p, {}) if isinstance(d, dict) else {}
    return d
