"""2 real CPU processes under torchrun (gloo, torchrec DMP table-wise sharding): they finish, agree, match
one process on the same global batches, checkpoint from rank 0, and resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "dv365.train.distributed",
        "--config",
        str(config),
        "--no-progress",
        *extra,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)


def test_two_processes_match_one_process_then_resume(
    make_config_file: Callable[..., Path], make_config: Callable[..., TrainConfig]
) -> None:
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


def _assert_same_tree(a: object, b: object, path: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=path)


def test_default_optimizers_checkpoint_fused_state_then_resume_exactly(make_config_file: Callable[..., Path]) -> None:
    """Adam (dense) + Adagrad fused into the table-wise shards (the defaults): each rank's fused-optimizer
    state_dict lists only its own tables, so rank 0's checkpoint needs every rank's momenta gathered in one
    agreed order (a mismatch used to abort gloo: "Received data size doesn't match expected size")."""
    every = {"run.steps": 5, "checkpoint.every": 3}
    straight_file = make_config_file("adagrad", **every)
    done = _torchrun(straight_file)  # 5 steps straight, checkpoints at 3 and 5
    assert done.returncode == 0, done.stderr[-3000:]
    straight = straight_file.parent / "adagrad"
    d = json.loads((straight / "metrics.json").read_text())["distributed"]
    assert len(d["dense_checksums"]) == 2 and d["dense_checksums"][0] == d["dense_checksums"][1]  # ranks agree
    assert [p.name for p in list_checkpoints(straight)] == ["step_000000003.pt", "step_000000005.pt"]

    ck3 = load_checkpoint(straight / "step_000000003.pt")
    fused = ck3["optimizers"]["fused"]["state"]
    tables = {k: v for k, v in ck3["model"].items() if ".embedding_bags." in k}
    assert set(fused) == set(tables) and len(tables) > 2  # every rank's tables, not just rank 0's
    for k, states in fused.items():
        assert states, k
        for name, v in states.items():
            assert torch.is_tensor(v) and not getattr(v, "local_shards", None), name  # plain, gathered
            assert v.shape[0] == tables[k].shape[0] and torch.isfinite(v).all(), name
    assert sum(int((v != 0).sum()) for s in fused.values() for v in s.values()) > 0  # trained Adagrad sums
    assert ck3["optimizers"]["dense"]["state"]  # Adam's moments of the replicated parameters

    # resume that step-3 checkpoint in another folder (3 -> 5): the same weights and optimizer states as the
    # straight run, which a fresh (unrestored) Adagrad or Adam state would not give
    resume_file = make_config_file("adagrad-resume", **every)
    resumed = resume_file.parent / "adagrad-resume"
    resumed.mkdir()
    shutil.copy(straight / "step_000000003.pt", resumed)
    done = _torchrun(resume_file)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps 3->5 resumed at step 3" in done.stdout
    a, b = load_checkpoint(straight / "step_000000005.pt"), load_checkpoint(resumed / "step_000000005.pt")
    _assert_same_tree(a["model"], b["model"], "model")
    _assert_same_tree(a["optimizers"]["fused"], b["optimizers"]["fused"], "fused")
    _assert_same_tree(a["optimizers"]["dense"]["state"], b["optimizers"]["dense"]["state"], "dense")


def test_backend_follows_the_device() -> None:
    dev, backend = select_device_and_backend("cpu", 0)
    assert (dev.type, backend) == ("cpu", "gloo")
    dev, backend = select_device_and_backend("auto", 0)
    assert (dev.type, backend) == (("cuda", "nccl") if torch.cuda.is_available() else ("cpu", "gloo"))
    with pytest.raises(TrainConfigError, match="LOCAL_RANK"):
        select_device_and_backend("cuda:1", 0)
