"""A published snapshot, served by the real embedded store, read by the downstream adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dv365.adapters import DV365Input, LinearProjection
from dv365.adapters.fetch import fetch_dv365
from dv365.core.quantize import RowFormat, dequantize_rows, quantize_rows
from dv365.core.snapshot import SnapshotManifest, write_manifest, write_shard
from dv365.store import open_store


def test_store_to_adapter_round_trip(tmp_path: Path) -> None:
    fmt = RowFormat()
    users = np.array([5, 11, 42, 1000], dtype=np.int64)
    x = torch.randn(len(users), fmt.rows_per_user, fmt.dim, generator=torch.Generator().manual_seed(0))
    payload = quantize_rows(x)  # [4, 58, 132]
    snap = str(tmp_path / "snap")
    info = write_shard(snap, "shard-00000.parquet", users, payload.reshape(len(users), -1).numpy(), fmt)
    write_manifest(snap, SnapshotManifest("snap-1", "tower-v1", 1_700_000_000, fmt, (info,)))

    store = open_store(f"lmdb://{tmp_path / 'store'}")
    store.publish(snap)
    batch = fetch_dv365(store, torch.tensor([42, 7, 5, 42]), expected_format=fmt)
    assert batch.present.tolist() == [True, False, True, True]

    dv_in = DV365Input()
    out = dv_in(*batch)
    expect = dequantize_rows(payload)
    torch.testing.assert_close(out.tokens[0], expect[2], rtol=0, atol=0)  # user 42, bit-exact
    torch.testing.assert_close(out.tokens[2], expect[0], rtol=0, atol=0)  # user 5
    assert out.missing.tolist() == [False, True, False, False]
    proj = LinearProjection(num_tokens=4, embedding_dim=16)
    assert proj(out.tokens).shape == (4, 4, 16)
    store.close()
