"""2 real CPU processes under torchrun (gloo, torchrec DMP table-wise sharding): they finish, agree, match
one process on the same global batches, checkpoint from rank 0, and resume."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from dv365.train.checkpoint import list_checkpoints, load_checkpoint, load_user_tower
from dv365.train.config import TrainConfig
from dv365.train.distributed import select_device_and_backend
from dv365.train.errors import TrainConfigError
from dv365.train.trainer import Trainer

# SGD everywhere: the fused table optimizer (fbgemm exact SGD) and torch's SGD are the same update, so
# 2 processes x 8 rows must match 1 process x 16 rows up to float summation order
SGD = {"optim.dense": "sgd", "optim.sparse": "sgd", "optim.lr": 0.05, "run.log_every": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dv365.train.distributed", "--config", str(config),
           "--no-progress", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)


def test_two_processes_match_one_process_then_resume(make_config_file: Callable[..., Path],
                                                     make_config: Callable[..., TrainConfig]) -> None:
    cfg_file = make_config_file("ddp", **{**SGD, "run.steps": 4})
    ckpt_dir = cfg_file.parent / "ddp"
    done = _torchrun(cfg_file)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("dv365 train: fsa") == 1  # rank 0 prints the summary, rank 1 stays quiet
    metrics = json.loads((ckpt_dir / "metrics.json").read_text())
    d = metrics["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and d["sharding"] == "table_wise"
    assert len(d["dense_checksums"]) == 2 and d["dense_checksums"][0] == d["dense_checksums"][1]  # ranks agree
    assert math.isfinite(metrics["train_loss_last_window"]) and metrics["eval"]["examples"] == 39
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step_000000004.pt"]
    assert not list(ckpt_dir.glob("*.tmp"))

    # one process, the same 16-row global batches: same weights (the checkpoint holds plain, gathered tensors)
    single = Trainer(make_config("single", **{**SGD, "run.steps": 4}))
    single.fit()
    two = load_checkpoint(ckpt_dir)["model"]
    one = single.model.state_dict()
    assert two.keys() == one.keys()
    for k in one:
        assert not getattr(two[k], "local_shards", None)  # a plain tensor, not a ShardedTensor
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
    assert load_user_tower(ckpt_dir) is not None  # the exporter's entry point reads it

    # resume under torchrun: 4 -> 6 steps, still equal to one process trained 6 steps
    done = _torchrun(cfg_file, "--steps", "6")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps 4->6 resumed at step 4" in done.stdout
    single6 = Trainer(make_config("single", **{**SGD, "run.steps": 6}))
    assert single6.step == 4
    single6.fit()
    two = load_checkpoint(ckpt_dir)["model"]
    for k, v in single6.model.state_dict().items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_backend_follows_the_device() -> None:
    dev, backend = select_device_and_backend("cpu", 0)
    assert (dev.type, backend) == ("cpu", "gloo")
    dev, backend = select_device_and_backend("auto", 0)
    assert (dev.type, backend) == (("cuda", "nccl") if torch.cuda.is_available() else ("cpu", "gloo"))
    with pytest.raises(TrainConfigError, match="LOCAL_RANK"):
        select_device_and_backend("cuda:1", 0)
