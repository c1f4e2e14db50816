"""SIMULATED snapshots for demos, tests and the load test (dv365-export writes the real ones).

Payloads are random 4-bit codes with a valid fp16 scale and bias per row (so ``get_float`` gives finite
values), written with dv365-core's ``write_shard``/``write_manifest``: the same bytes an export would write.
"""

from __future__ import annotations

import time

import numpy as np

from dv365.core.quantize import RowFormat
from dv365.core.snapshot import SnapshotManifest, write_manifest, write_shard


def synthetic_payload(n: int, fmt: RowFormat, rng: np.random.Generator, fill: int | None = None) -> np.ndarray:
    """``[n, user_bytes]`` uint8: packed codes (random, or all ``fill``), scale 0.01, bias -0.08 per row."""
    rows = np.empty((n, fmt.rows_per_user, fmt.row_bytes), dtype=np.uint8)
    if fill is None:
        rows[:, :, : fmt.packed_bytes] = rng.integers(
            0, 256, size=(n, fmt.rows_per_user, fmt.packed_bytes), dtype=np.uint8
        )
    else:
        rows[:, :, : fmt.packed_bytes] = fill
    rows[:, :, fmt.packed_bytes :] = np.array([0.01, -0.08], dtype=np.float16).view(np.uint8)
    return rows.reshape(n, fmt.user_bytes)


def write_synthetic_snapshot(
    url: str,
    snapshot_id: str,
    user_ids: np.ndarray,
    *,
    fmt: RowFormat | None = None,
    seed: int = 0,
    fill: int | None = None,
    shard_users: int = 50_000,
    data_cutoff_ts: int | None = None,
) -> SnapshotManifest:
    """Writes a complete SIMULATED snapshot of ``user_ids`` (manifest last) and returns its manifest.

    Example::

        write_synthetic_snapshot("/tmp/snap-1", "snap-1", np.arange(10_000))   # 10K users, 76 MB
    """
    fmt = fmt or RowFormat()
    ids = np.sort(np.asarray(user_ids, dtype=np.int64))
    rng = np.random.default_rng(seed)
    shards = []
    for k, s in enumerate(range(0, max(len(ids), 1), shard_users)):
        chunk = ids[s : s + shard_users]
        shards.append(
            write_shard(url, f"shard-{k:05d}.parquet", chunk, synthetic_payload(len(chunk), fmt, rng, fill), fmt)
        )
    m = SnapshotManifest(
        snapshot_id=snapshot_id,
        model_version="synthetic",
        row_format=fmt,
        shards=tuple(shards),
        data_cutoff_ts=int(time.time()) - 3600 if data_cutoff_ts is None else data_cutoff_ts,
        simulated=True,
        extra={"generator": "dv365.store.synthetic", "seed": seed},
    )
    write_manifest(url, m)
    return m
