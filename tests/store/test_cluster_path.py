"""The "beyond one machine" path of docs/pipeline.md, end to end with real processes: training under torchrun
(2 processes, gloo, torchrec DMP), the export sharded over 2 concurrent worker processes, the snapshot
published into a real redis-server (the shared store) and read back by a reader client, bit-exact."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from dv365.core.snapshot import read_manifest, read_shard
from dv365.core.synth import SynthConfig, write_synth_dataset
from dv365.store import open_store

from .conftest import RedisServer

SYNTH = SynthConfig(
    users=10,
    mean_events=400,
    max_events=700,
    days=40,
    requests_per_user=8,
    request_window_days=15,
    min_history_days=15,
    seed=11,
)  # SIMULATED
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
DV365 = [sys.executable, "-m", "dv365.core.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ok(p: subprocess.CompletedProcess[str] | subprocess.Popen[str], out: str = "", err: str = "") -> None:
    assert p.returncode == 0, (out or getattr(p, "stdout", ""))[-2000:] + (err or getattr(p, "stderr", ""))[-3000:]


def test_torchrun_training_sharded_export_redis_store(tmp_path: Path, redis_server: RedisServer) -> None:
    data = tmp_path / "data"
    write_synth_dataset(SYNTH, str(data), progress=False, num_buckets=4)
    ckpt = tmp_path / "model"
    cfg = {
        "data": {"url": str(data), "spec": "kuairand", "hash_sizes": {"media": 499, "author": 499, "topic": 97}},
        "model": {
            "kind": "fsa",
            "tower": {"dim": 8, "encoder": {"num_heads": 2, "head_dim": 8, "ff_mult": 2, "num_layers": 1}},
            "backbone": {"embedding_dim": 8, "item_hash_size": 499, "over_arch": [16]},
        },
        "run": {"steps": 3, "batch_size": 16, "seed": 0, "device": "cpu", "log_every": 1, "progress": False},
        "checkpoint": {"dir": str(ckpt)},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))

    # 1. training: 2 processes under torchrun; rank 0 writes the checkpoint
    train = subprocess.run(
        [
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
            str(tmp_path / "train.yaml"),
            "--no-progress",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    _ok(train)
    assert (ckpt / "latest").exists()

    # 2. export: 2 worker processes at the same time, each a hash range of the shard list; one manifest
    snap = tmp_path / "snapshot"
    workers = [
        subprocess.Popen(
            DV365
            + [
                "export",
                "run",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(snap),
                "--snapshot-id",
                "cluster-v1",
                "--shard-users",
                "2",
                "--batch-users",
                "2",
                "--num-workers",
                "2",
                "--worker-rank",
                str(r),
                "--no-progress",
            ],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for w in workers:
        out, err = w.communicate(timeout=240)
        _ok(w, out, err)
    m = read_manifest(str(snap))
    assert m.snapshot_id == "cluster-v1" and m.user_count == SYNTH.users
    want = {}
    for s in m.shards:
        ids, payload = read_shard(str(snap), s, m.row_format)
        want.update({int(u): payload[i] for i, u in enumerate(ids)})

    # 3. publish into Redis with the writer's credentials; a reader client on another connection reads it
    prefix = f"cluster{os.getpid()}"
    pub = subprocess.run(
        DV365 + ["store", "--store", redis_server.url("writer", prefix), "publish", str(snap)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    _ok(pub)
    reader = open_store(redis_server.url("reader", prefix))
    try:
        users = np.array(sorted(want) + [10**9], np.int64)
        r = reader.get(users)
        assert r.snapshot_id == "cluster-v1" and r.present.tolist() == [True] * len(want) + [False]
        got = r.payload[:-1].reshape(len(want), -1)  # [U, rows, row bytes] -> [U, user bytes] as in the shards
        np.testing.assert_array_equal(got, np.stack([want[int(u)] for u in users[:-1]]))
    finally:
        reader.close()
