"""Fixtures of the dv365.train tests: a tiny SIMULATED synth dataset and small training configs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dv365.core.slicing import Slicer
from dv365.core.synth import SynthConfig, write_synth_dataset
from dv365.train.config import TrainConfig, apply_overrides

# 16 users x ~600 events, 12 requests each (192 requests: 153 train, 39 eval at eval_fraction 0.2)
TINY_SYNTH = SynthConfig(
    users=16,
    mean_events=600,
    max_events=1200,
    days=90,
    requests_per_user=12,
    request_window_days=30,
    min_history_days=30,
    seed=3,
)
TINY_HASH = {"media": 499, "author": 499, "topic": 97}
# The train tests slice with core's numpy backend (checked against the plain-Python reference in
# tests/core); test_data.py also runs the request/timeline join on the default backend ("auto").
SLICER = "numpy" if "backend" in inspect.signature(Slicer).parameters else "auto"


@pytest.fixture(autouse=True, scope="package")
def one_cpu_thread() -> Any:
    """Small tensors on a shared 2-core machine: one intra-op thread is several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny synth dataset (SIMULATED) with requests, written once per session."""
    out = tmp_path_factory.mktemp("synth") / "tiny"
    write_synth_dataset(TINY_SYNTH, str(out), progress=False, num_buckets=2)
    return str(out)


def tiny_config_dict(url: str, ckpt: Path, **sections: Any) -> dict[str, Any]:
    """A small, fast kuairand-spec FSA config (D = 8) on ``url``; ``sections`` are dotted overrides."""
    d: dict[str, Any] = {
        "data": {"url": url, "spec": "kuairand", "hash_sizes": dict(TINY_HASH), "eval_fraction": 0.2, "slicer": SLICER},
        "model": {
            "kind": "fsa",
            "tower": {"dim": 8, "encoder": {"num_heads": 2, "head_dim": 8, "ff_mult": 2, "num_layers": 1}},
            "backbone": {"embedding_dim": 8, "item_hash_size": 499, "over_arch": [32, 16]},
        },
        "optim": {"lr": 3e-3, "sparse_lr": 0.05},
        "run": {
            "steps": 6,
            "batch_size": 16,
            "seed": 0,
            "device": "cpu",
            "log_every": 2,
            "progress": False,
            "eval_batch_size": 64,
        },
        "checkpoint": {"dir": str(ckpt)},
    }
    return apply_overrides(d, sections)


@pytest.fixture
def make_config(synth_url: str, tmp_path: Path) -> Callable[..., TrainConfig]:
    """``make_config(name="a", **{"run.steps": 4})`` -> a tiny TrainConfig checkpointing to tmp_path/name."""

    def make(name: str = "run", **overrides: Any) -> TrainConfig:
        return TrainConfig.from_dict(tiny_config_dict(synth_url, tmp_path / name, **overrides))

    return make


@pytest.fixture
def make_config_file(synth_url: str, tmp_path: Path) -> Callable[..., Path]:
    """``make_config_file(name, **overrides)`` -> a tiny config written as YAML (checkpoints in tmp_path/name)."""
    import yaml

    def make(name: str = "run", **overrides: Any) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_config_dict(synth_url, tmp_path / name, **overrides)))
        return path

    return make
