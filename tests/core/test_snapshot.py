"""Snapshot shards and manifest: round trip, integrity checks, atomic visibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dv365.core.quantize import RowFormat, dequantize_rows, quantize_rows
from dv365.core.snapshot import (
    SnapshotError,
    SnapshotManifest,
    read_manifest,
    read_shard,
    write_manifest,
    write_shard,
)

FMT = RowFormat(dim=16, bits=4, rows_per_user=3)


def _payload(n: int, seed: int = 0) -> np.ndarray:
    x = torch.randn(n, FMT.rows_per_user, FMT.dim, generator=torch.Generator().manual_seed(seed))
    return quantize_rows(x).reshape(n, -1).numpy()


@pytest.mark.parametrize("root", ["memory://snap-a", "local"])
def test_round_trip(root: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = str(tmp_path / "snap") if root == "local" else root
    ids = np.array([9, 3, 7], dtype=np.int64)
    pay = _payload(3)
    info = write_shard(url, "shard-00000.parquet", ids, pay, FMT)
    assert (info.users, info.first_user, info.last_user) == (3, 3, 9)
    with pytest.raises(SnapshotError, match="no complete snapshot"):
        read_manifest(url)  # invisible until the manifest is written
    m = SnapshotManifest("s1", "m1", 1_700_000_000, FMT, (info,), extra={"spec": "kuairand"})
    write_manifest(url, m)
    m2 = read_manifest(url)
    assert m2 == SnapshotManifest.from_json(m.to_json()) and m2.user_count == 3
    got_ids, got = read_shard(url, m2.shards[0], FMT)
    assert got_ids.tolist() == [3, 7, 9]
    np.testing.assert_array_equal(got, pay[[1, 2, 0]])
    x = dequantize_rows(torch.from_numpy(got.reshape(3, FMT.rows_per_user, FMT.row_bytes).copy()))
    assert x.shape == (3, 3, 16)


def test_corruption_is_detected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = str(tmp_path / "snap")
    info = write_shard(url, "s.parquet", np.arange(5), _payload(5), FMT)
    path = tmp_path / "snap" / "s.parquet"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 3] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(SnapshotError, match="sha256 mismatch"):
        read_shard(url, info, FMT)


def test_duplicate_users_and_wrong_sizes_are_refused() -> None:
    with pytest.raises(SnapshotError, match="user 4 appears more than once"):
        write_shard("memory://snap-dup", "s.parquet", np.array([4, 4]), _payload(2), FMT)
    with pytest.raises(SnapshotError, match="bytes per user"):
        write_shard("memory://snap-size", "s.parquet", np.array([1]), np.zeros((1, 10), np.uint8), FMT)


def test_manifest_validation() -> None:
    m = SnapshotManifest("s", "m", 1, FMT, ())
    with pytest.raises(SnapshotError, match="not a dv365 snapshot"):
        SnapshotManifest.from_json('{"format": "x"}')
    with pytest.raises(SnapshotError, match="malformed"):
        SnapshotManifest.from_json('{"format": "dv365.snapshot", "version": 1}')
    bad = m.to_json().replace('"user_count": 0', '"user_count": 5')
    with pytest.raises(SnapshotError, match="user_count 5"):
        SnapshotManifest.from_json(bad)
