"""Training checkpoints: model + optimizers + RNG states + data position, written atomically.

A checkpoint is one ``torch.save`` file ``<dir>/step_<000123>.pt`` holding::

    format      "dv365.train.checkpoint/1"
    step        optimizer steps done (the data position: the next batch is batch ``step``, see data.py)
    epoch, batch_in_epoch   the same position, for people
    config      the TrainConfig as a dict (model / data / tasks are checked on resume)
    tasks       the task labels (output columns)
    model       model.state_dict()
    optimizers  {"dense": ..., "sparse": ...} optimizer state dicts
    rng         torch CPU + every CUDA device + numpy global + python ``random`` states
    meter       the running-metric sums, so progress numbers continue too

It is written to ``<file>.tmp`` and renamed (an interrupted save never leaves a truncated checkpoint), then
``<dir>/latest`` names it. Files load with ``weights_only=True`` (plain tensors, numbers and strings).
:func:`load_user_tower` rebuilds the exported part (``eta``) from a checkpoint, for the exporter.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dv365.core.fsio import open_atomic, url_to_fs, write_bytes_atomic
from dv365.train.errors import CheckpointError

FORMAT = "dv365.train.checkpoint/1"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, init, anything using numpy / random)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": _to_lists(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(_to_tuples(state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:09d}.pt"


def save_checkpoint(directory: str | Path, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Writes ``payload`` (plus ``format``/``step``) atomically; keeps the ``keep`` newest step files."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(d, step)
    fs, _ = url_to_fs(d)
    with open_atomic(fs, str(path)) as f:
        torch.save({"format": FORMAT, "step": step, **payload}, f)
    write_bytes_atomic(fs, str(d / "latest"), (path.name + "\n").encode())
    for old in list_checkpoints(d)[: -max(keep, 1)]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Step checkpoints of a folder, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint named by ``<dir>/latest`` (else the highest step file), or ``None``."""
    d = Path(directory)
    pointer = d / "latest"
    if pointer.exists():
        p = d / pointer.read_text().strip()
        if p.exists():
            return p
    found = list_checkpoints(d)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the latest one of a checkpoint folder."""
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"{p}: no checkpoint (step_*.pt) in this folder")
        return found
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    p = resolve_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling error means an unusable file
        raise CheckpointError(f"{p}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a dv365 training checkpoint (format {FORMAT!r} expected)")
    ckpt["path"] = str(p)
    return ckpt


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str, source: str) -> int:
    """Loads the ``prefix.*`` entries of a model state dict into ``module``; every key must match in name
    and shape (a clear :class:`CheckpointError` otherwise). Returns the number of tensors loaded."""
    sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if not sub:
        raise CheckpointError(f"{source}: holds no {prefix!r} weights (was it trained with model.kind: baseline?)")
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sub)), sorted(set(sub) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: {prefix} weights do not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (different tower kind or slice spec?)"
        )
    for k, v in sub.items():
        if own[k].shape != v.shape:
            raise CheckpointError(
                f"{source}: {prefix}.{k} has shape {tuple(v.shape)}, this model needs "
                f"{tuple(own[k].shape)} (different dims, n_out or hash sizes?)"
            )
    module.load_state_dict(sub)
    return len(sub)


def load_user_tower(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The exported part of a trained model: ``eta`` (sliced-feature tables + summarization arch), in eval mode.

    Example::

        tower = load_user_tower("out/train/synth-fsa")          # a folder (latest) or a step file
        tower(sliced.to_kjt()).shape                              # [B, 58, D]
    """
    from dv365.train.config import TrainConfig
    from dv365.train.data import load_spec
    from dv365.train.fsa import build_user_tower
    from dv365.train.model import BASELINE, DV365UserTower
    from dv365.train.pooling import SlicedPooling

    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    if cfg.model.kind == BASELINE:
        raise CheckpointError(f"{ckpt['path']}: a baseline model has no user tower")
    spec = load_spec(cfg.data)
    tcfg = cfg.model.tower.with_tokens(len(spec.features))
    tower = DV365UserTower(SlicedPooling(spec, tcfg.dim), build_user_tower(cfg.model.kind, tcfg))
    load_module_state(tower, ckpt["model"], "user_tower", ckpt["path"])
    return tower.to(device).eval()
