"""Multi-process training: ``torchrun`` + torchrec ``DistributedModelParallel`` (DMP).

Launch (the same config as ``dv365 train``; every ``dv365 train`` option works)::

    torchrun --nproc_per_node 2 -m dv365.train.distributed --config run.yaml [--steps N] [--set KEY=VALUE]
    torchrun --nproc_per_node 2 --no-python dv365 train --config run.yaml      # the same thing

(``-m dv365.train.distributed`` runs this package's ``__main__``: the worker entry, which sits above
:mod:`~dv365.train.cli` and the trainer; this module is imported by the trainer and imports neither.)

:class:`~dv365.train.trainer.Trainer` sees ``WORLD_SIZE > 1`` in the environment (set by ``torchrun``) and
then:

* joins the process group: ``nccl`` with one GPU per process (``cuda:LOCAL_RANK``) when CUDA is available
  and ``run.device`` allows it, else ``gloo`` on the CPU (:func:`init_from_env`);
* builds the model identically on every rank (same seed), applies the head biases / warm start, then
  shards it with DMP (:func:`shard_model`): the embedding tables of both EBCs (the sliced-feature tables
  of the user tower and the backbone's item tables) follow ``run.sharding`` (``table_wise`` by default:
  each table on one rank, fbgemm's fused kernel with the sparse optimizer fused into the backward pass;
  ``data_parallel`` replicates them); every dense part is replicated with DDP (gradients averaged);
* splits every global batch of ``run.batch_size`` rows into ``world_size`` contiguous parts (a pure
  function of data, seed and step, as in one process); each rank collates (slices, RecD-dedups) only its
  part. The loss is each rank's mean; DDP averages the dense gradients and torchrec divides the pooled
  embedding gradients by the world size, so a step equals one process's step on the whole batch (tested
  with SGD against a single-process run; see docs/train.md for what is not bit-exact);
* evaluates with every rank on its part of each evaluation batch and all-reduces the NE/MSE sums;
* checkpoints: every rank takes part in gathering the sharded tables and fused-optimizer states
  (:func:`gather_state`); rank 0 writes one ordinary checkpoint (plain tensors, same keys as a
  single-process run, so ``load_user_tower`` and the exporter read it unchanged), ``metrics.json`` and the
  logs. Resume scatters the saved tensors back into the shards (:func:`scatter_state`).

torchrec 1.8 on CPU (gloo): ``table_wise`` and ``data_parallel`` work; ``row_wise`` needs CUDA.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dv365.train.errors import CheckpointError, TrainConfigError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise TrainConfigError(f"WORLD_SIZE = {os.environ['WORLD_SIZE']!r} is not an integer") from None


def select_device_and_backend(device: str, local_rank: int) -> tuple[torch.device, str]:
    """``(cuda:LOCAL_RANK, "nccl")`` when CUDA is available and ``device`` is ``auto``/``cuda``; else
    ``(cpu, "gloo")``. ``cuda:N`` is refused: under torchrun each process owns the GPU of its local rank."""
    name = str(device)
    if name.startswith("cuda:"):
        raise TrainConfigError(
            f"run.device = {name!r}: under torchrun every process uses cuda:LOCAL_RANK; use auto or cuda"
        )
    if name in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise TrainConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", local_rank), "nccl"
    if name == "cuda":
        raise TrainConfigError("run.device = 'cuda' but CUDA is not available here (use auto or cpu)")
    return torch.device("cpu"), "gloo"


def init_from_env(device: str) -> DistContext:
    """Joins (or reuses) the default process group of a ``torchrun`` job (``env://`` rendezvous)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev, backend = select_device_and_backend(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), dev)


def _sharders() -> list[Any]:
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    return [EmbeddingBagCollectionSharder()]


def _sparse_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer torchrec fuses into the backward of the sharded tables (fbgemm: exact Adagrad, Adam, SGD)."""
    return {"adagrad": torch.optim.Adagrad, "sparse_adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]


def shard_model(model: nn.Module, cfg: Any, ctx: DistContext) -> tuple[nn.Module, dict[str, torch.optim.Optimizer]]:
    """Wraps ``model`` (built identically on every rank) in DMP; returns ``(dmp, {"dense": optimizer})``.

    The sparse optimizer (``optim.sparse``) is fused into the sharded tables' backward pass (torchrec's
    ``apply_optimizer_in_backward``); it lives in ``dmp.fused_optimizer``. The initial weights of this rank's
    shards are copied from ``model`` (DMP itself would re-initialise them).
    """
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    sharding = cfg.run.sharding
    if sharding == "row_wise" and ctx.device.type != "cuda":
        raise TrainConfigError("run.sharding = 'row_wise' needs CUDA in torchrec 1.8; use table_wise or data_parallel")
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    kernel = EmbeddingComputeKernel.DENSE.value if sharding == "data_parallel" else EmbeddingComputeKernel.FUSED.value
    constraints = {
        t.name: ParameterConstraints(sharding_types=[sharding], compute_kernels=[kernel])
        for ebc in ebcs
        for t in ebc.embedding_bag_configs()
    }
    if sharding != "data_parallel":
        opt_cls = _sparse_optimizer(cfg.optim.sparse)
        for ebc in ebcs:
            apply_optimizer_in_backward(opt_cls, ebc.parameters(), {"lr": cfg.optim.sparse_lr})
    for m in model.modules():  # sharded kernels compute their own (dense or fused) gradients
        if isinstance(m, nn.EmbeddingBag):
            m.sparse = False
    pg = dist.group.WORLD
    with _quiet():
        topology = Topology(world_size=ctx.world_size, compute_device=ctx.device.type)
        plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
            model, _sharders(), pg
        )
        dmp = DistributedModelParallel(
            model, env=ShardingEnv.from_process_group(pg), device=ctx.device, plan=plan, sharders=_sharders()
        )
    scatter_state(dmp, full)
    sharded_params = {id(p) for ebc in ebcs for p in ebc.parameters()}
    if sharding == "data_parallel":  # replicated tables: trained by the sparse optimizer (dense gradients)
        tables = [p for n, p in dmp.named_parameters() if ".embedding_bags." in n]
        dense = [p for n, p in dmp.named_parameters() if ".embedding_bags." not in n]
        opts = _dense_optimizers(cfg.optim, dense)
        opts["sparse"] = _sparse_optimizer(cfg.optim.sparse)(tables, lr=cfg.optim.sparse_lr)
        return dmp, opts
    dense = [p for p in dmp.parameters() if id(p) not in sharded_params and not hasattr(p, "_in_backward_optimizers")]
    return dmp, _dense_optimizers(cfg.optim, dense)


def _dense_optimizers(cfg: Any, params: list[nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
    if not params:
        return {}
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[cfg.dense]
    return {"dense": cls(params, lr=cfg.lr)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchrec's planner prints its plan table and warns about directly built CPU topologies."""
    import logging
    import warnings

    loggers = [
        logging.getLogger(n)
        for n in (
            "torchrec.distributed.planner",
            "torchrec.distributed.planner.types",
            "torchrec.distributed.planner.storage_reservations",
            "torchrec.distributed.planner.stats",
        )
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# ------------------------------------------------------------------------------------------------------
# full (unsharded) state <-> shards
# ------------------------------------------------------------------------------------------------------
def _is_sharded(x: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(x, ShardedTensor)


def _gather_tensor(x: Any, main: bool) -> torch.Tensor | None:
    """A ShardedTensor gathered into one CPU tensor on rank 0 (``None`` elsewhere); every rank must call it."""
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = torch.empty(x.size(), dtype=x.dtype, device=dev) if main else None
    x.gather(dst=0, out=out, dtype=x.dtype)
    return out.cpu() if out is not None else None


def _sharded_leaves(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if _is_sharded(tree):
        yield path, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _sharded_leaves(v, (*path, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _sharded_leaves(v, (*path, i))


def gather_state(tree: Any, main: bool) -> Any:
    """``tree`` (a state dict, nested dicts/lists) with every ShardedTensor gathered into one CPU tensor on
    rank 0 (``None`` on the others) and every plain tensor moved to the CPU. Collective: call on all ranks.

    The ranks need not hold the same sharded leaves: a fused optimizer's ``state_dict()`` lists only the
    states of this rank's own tables (``table_wise``: rank 0 has some tables' Adagrad momenta, rank 1 the
    others'). So the ranks first exchange which ShardedTensors they hold (paths and metadata: small), then
    gather the union in one agreed order; a rank that lacks one takes part with an empty ShardedTensor of
    the same metadata. Rank 0's result is its own tree plus every sharded leaf any rank holds (only dict
    containers can be added that way); its plain leaves are rank 0's own (replicated state)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    own = dict(_sharded_leaves(tree))
    union: dict[tuple[Any, ...], Any] = {}
    for held in all_gather_objects({p: x.metadata() for p, x in own.items()}):  # same list on every rank
        for p, md in held.items():
            union.setdefault(p, md)
    full: dict[tuple[Any, ...], torch.Tensor | None] = {}
    for p, md in union.items():
        x = own.get(p)
        if x is None:  # not held here: take part with no local shard
            x = ShardedTensor._init_from_local_shards_and_global_metadata([], md, process_group=dist.group.WORLD)
        full[p] = _gather_tensor(x, main)
    if not main:
        return _replace_leaves(tree, {}, ())
    out = _replace_leaves(tree, full, ())
    for p in union:
        if p not in own:
            node = out
            for k in p[:-1]:
                if not isinstance(node, dict):
                    raise TypeError(f"gather_state: cannot add the sharded leaf {p} (not under dicts)")
                node = node.setdefault(k, {})
            node[p[-1]] = full[p]
    return out


def _replace_leaves(tree: Any, full: dict[tuple[Any, ...], Any], path: tuple[Any, ...]) -> Any:
    if _is_sharded(tree):
        return full.get(path)
    if isinstance(tree, dict):
        return {k: _replace_leaves(v, full, (*path, k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_replace_leaves(v, full, (*path, i)) for i, v in enumerate(tree))
    if torch.is_tensor(tree):
        return tree.detach().cpu()
    return tree


def _copy_into(dst: Any, src: torch.Tensor) -> None:
    if _is_sharded(dst):
        for shard in dst.local_shards():
            region = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
            shard.tensor.detach().copy_(src[region])
    else:
        dst.detach().copy_(src)


def scatter_state(dmp: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copies a full (unsharded) model state dict into ``dmp``: this rank's part of every sharded table, and
    every replicated tensor. Keys are those of the unsharded model (DMP keeps them)."""
    own = dmp.state_dict()
    missing = sorted(set(own) - set(full))
    if missing:
        raise TrainConfigError(f"cannot load into the sharded model: missing {missing[:5]}")
    with torch.no_grad():
        for k, v in own.items():
            _copy_into(v, full[k].to(v.device if not _is_sharded(v) else full[k].device))


def _tensor_leaves(tree: Any) -> Iterator[Any]:
    if _is_sharded(tree) or torch.is_tensor(tree):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensor_leaves(v)


def scatter_optimizer_state(live: Any, saved: Any, _path: str = "") -> None:
    """Copies a gathered fused-optimizer state (``gather_state(dmp.fused_optimizer.state_dict())``, every
    rank's tables) back into the live one's shards, leaf by leaf (the live ShardedTensors are views of the
    fused kernels' state). A live state the checkpoint lacks is an error, not a silent fresh start."""
    if isinstance(live, dict):
        for k, v in live.items():
            if not isinstance(saved, dict) or k not in saved:
                if not any(True for _ in _tensor_leaves(v)):  # nothing to restore (e.g. SGD: no state)
                    continue
                raise CheckpointError(f"the checkpoint's fused-optimizer state lacks {_path}/{k}")
            scatter_optimizer_state(v, saved[k], f"{_path}/{k}")
    elif _is_sharded(live) or torch.is_tensor(live):
        if not torch.is_tensor(saved) or tuple(saved.shape) != tuple(live.size()):
            raise CheckpointError(
                f"the checkpoint's fused-optimizer state {_path} does not fit: "
                f"{getattr(saved, 'shape', saved)} vs {tuple(live.size())}"
            )
        with torch.no_grad():
            _copy_into(live, saved)


def all_gather_objects(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def dense_checksum(module: nn.Module) -> float:
    """Sum of every replicated (non-sharded) parameter, in float64: equal on all ranks when DDP keeps them in sync."""
    total = 0.0
    for v in module.state_dict().values():
        if not _is_sharded(v) and torch.is_tensor(v) and v.is_floating_point():
            total += float(v.detach().double().sum())
    return total


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``t`` over ranks (on the process group's device), returned on ``t``'s device."""
    x = t.to(ctx.device)
    dist.all_reduce(x)
    return x.to(t.device)
