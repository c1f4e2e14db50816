"""A snapshot written by ``dv365 export run`` publishes unchanged into the embedded LMDB store, and every user
reads back bit-exactly: the stored bytes are the export's, and the store's floats are the export's own
de-quantized output (core's pure-PyTorch decoder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dv365.core.cli import main
from dv365.core.quantize import dequantize_rows
from dv365.core.snapshot import read_manifest
from dv365.core.synth import SynthConfig, write_synth_dataset
from dv365.examples.gr_kuairand import tiny_tower_config
from dv365.export.plan import SnapshotIndex
from dv365.store import open_store
from dv365.train.trainer import Trainer


def _tiny_tower(tmp: Path) -> tuple[str, str]:
    """A SIMULATED 24-user dataset and a 16-dim FSA trained for 2 steps on it."""
    data = tmp / "data"
    write_synth_dataset(
        SynthConfig(
            users=24,
            mean_events=200,
            max_events=500,
            days=40,
            requests_per_user=6,
            request_window_days=15,
            min_history_days=15,
            seed=11,
        ),
        str(data),
        progress=False,
        num_buckets=2,
    )
    cfg = tiny_tower_config(str(data), str(tmp / "ckpt"))
    Trainer(cfg).fit()
    return str(data), str(tmp / "ckpt")


def test_export_publish_read_back_bit_exact(tmp_path: Path) -> None:
    data, ckpt = _tiny_tower(tmp_path)
    snap = tmp_path / "snap"
    assert (
        main(
            [
                "export",
                "run",
                "--checkpoint",
                ckpt,
                "--data",
                data,
                "--out",
                str(snap),
                "--shard-users",
                "5",
                "--batch-users",
                "4",
                "--device",
                "cpu",
                "--no-progress",
                "--snapshot-id",
                "e2e-v1",
            ]
        )
        == 0
    )
    assert main(["export", "verify", str(snap)]) == 0
    m = read_manifest(str(snap))
    idx = SnapshotIndex(str(snap))
    ids = idx.user_ids
    assert m.user_count == len(ids) == 24 and len(m.shards) >= 5
    exported = idx.payload(ids)  # [U, user_bytes]
    expected = dequantize_rows(torch.from_numpy(exported).view(len(ids), m.row_format.rows_per_user, -1))

    store = open_store(f"lmdb://{tmp_path / 'store'}")
    try:
        info = store.publish(str(snap))
        assert info.version == "e2e-v1" and info.user_count == 24
        query = np.concatenate([ids[::-1], [10_000_019]])  # every user, reversed, plus an unknown one
        got = store.get(query)
        assert got.present.tolist() == [True] * len(ids) + [False] and not got.errors
        assert got.snapshot_id == "e2e-v1" and got.row_format == m.row_format
        assert np.array_equal(got.payload[:-1].reshape(len(ids), -1), exported[::-1])
        floats = store.get_float(query)
        assert torch.equal(floats.embeddings[:-1], expected.flip(0))  # bit-exact, not approximately
        assert bool((floats.embeddings[-1] == 0).all())
    finally:
        store.close()
