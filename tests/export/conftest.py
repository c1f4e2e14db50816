"""Fixtures of the dv365.export tests: a tiny SIMULATED dataset and tiny trained towers (D = 16).

Everything is session-scoped and small (40 users x ~300 events, a 16-dim FSA trained for 3 steps) so the
whole tests/export folder runs in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dv365.core.synth import SynthConfig, write_synth_dataset
from dv365.train.config import TrainConfig
from dv365.train.trainer import Trainer

SYNTH = SynthConfig(
    users=40,
    mean_events=300,
    max_events=800,
    days=60,
    requests_per_user=6,
    request_window_days=20,
    min_history_days=20,
    seed=7,
)
NUM_BUCKETS = 4
DIM = 16
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="package")
def one_cpu_thread() -> Any:
    """Small tensors on a shared 2-core machine: one intra-op thread is fastest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 users, ~300 events each, 4 hash buckets (SIMULATED), with requests (to train on)."""
    out = tmp_path_factory.mktemp("export-synth") / "ds"
    write_synth_dataset(SYNTH, str(out), progress=False, num_buckets=NUM_BUCKETS)
    return str(out)


def train_config(url: str, ckpt: Path, kind: str = "fsa", steps: int = 3) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "data": {
                "url": url,
                "spec": "kuairand",
                "hash_sizes": {"media": 499, "author": 499, "topic": 97},
                "eval_fraction": 0.2,
                "slicer": "numpy",
            },
            "model": {
                "kind": kind,
                "tower": {"dim": DIM, "encoder": {"num_heads": 2, "head_dim": 8, "ff_mult": 2, "num_layers": 1}},
                "backbone": {"embedding_dim": 8, "item_hash_size": 499, "over_arch": [32, 16]},
            },
            "optim": {"lr": 3e-3, "sparse_lr": 0.05},
            "run": {
                "steps": steps,
                "batch_size": 16,
                "seed": 0,
                "device": "cpu",
                "log_every": 1,
                "progress": False,
                "eval_batch_size": 64,
            },
            "checkpoint": {"dir": str(ckpt), "every": steps},
        }
    )


@pytest.fixture(scope="session")
def checkpoint(synth_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 16-dim FSA user tower trained for 3 steps (its folder)."""
    ckpt = tmp_path_factory.mktemp("export-ckpt") / "fsa"
    Trainer(train_config(synth_url, ckpt)).fit()
    return str(ckpt)


@pytest.fixture(scope="session")
def baseline_checkpoint(synth_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A baseline model (no user tower), trained for 1 step."""
    ckpt = tmp_path_factory.mktemp("export-ckpt") / "baseline"
    Trainer(train_config(synth_url, ckpt, kind="baseline", steps=1)).fit()
    return str(ckpt)


@pytest.fixture(scope="session")
def last_ts(synth_url: str) -> int:
    return int(json.loads((Path(synth_url) / "_dataset.json").read_text())["stats"]["last_ts"])


def dv365_cmd(*args: str) -> list[str]:
    """The real ``dv365`` console script of this environment."""
    return [str(Path(sys.executable).with_name("dv365")), *args]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(dv365_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli
