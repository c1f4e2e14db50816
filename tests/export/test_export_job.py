"""``run_export`` on a tiny trained tower: the manifest, the users and their bytes, the 24 h cut, re-runs,
clear errors, and recovery from an interrupted job with a damaged shard."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dv365.core.quantize import RowFormat, dequantize_rows
from dv365.core.snapshot import SnapshotError, read_manifest
from dv365.core.timeline import TimelineDataset, Timelines
from dv365.export.encode import UserEncoder, load_tower_model
from dv365.export.errors import ExportError
from dv365.export.job import ExportConfig, run_export
from dv365.export.plan import SnapshotIndex
from dv365.export.verify import verify_snapshot
from dv365.train.errors import CheckpointError

DAY = 86_400


def _cfg(checkpoint: str, out: Path | str, **kw: object) -> ExportConfig:
    base: dict[str, object] = dict(shard_users=8, batch_users=8, progress=False, device="cpu")
    base.update(kw)
    return ExportConfig(checkpoint=checkpoint, out=str(out), **base)  # type: ignore[arg-type]


def _users_with_events_before(url: str, cut: int) -> np.ndarray:
    ds = TimelineDataset(url)
    tables = [ds.read_table(k) for k in ("explicit", "implicit")]
    u = np.concatenate([t.column("user_id").to_numpy() for t in tables])
    ts = np.concatenate([t.column("ts").to_numpy() for t in tables])
    return np.unique(u[ts <= cut])


@pytest.fixture(scope="module")
def full(checkpoint: str, tmp_path_factory: pytest.TempPathFactory, last_ts: int) -> str:
    """A full export at the dataset's newest event minus 3 days."""
    out = tmp_path_factory.mktemp("export-full") / "snap"
    run_export(_cfg(checkpoint, out, as_of=last_ts - 3 * DAY))
    return str(out)


def test_manifest_and_users(full: str, checkpoint: str, synth_url: str, last_ts: int) -> None:
    m = read_manifest(full)
    model = load_tower_model(checkpoint)
    assert m.model_version == model.model_version and m.model_version.startswith("fsa@step3:")
    assert m.data_cutoff_ts == last_ts - 3 * DAY and m.gap_hours == 24.0 and m.simulated
    assert m.row_format == RowFormat(dim=16, bits=4, rows_per_user=model.out_tokens)
    assert m.row_format.user_bytes == model.out_tokens * (16 // 2 + 4)
    assert abs(m.created_at - time.time()) < 600
    assert m.extra["parent_snapshot_id"] is None and m.extra["refresh"] == "full"
    assert m.extra["users_encoded"] == m.user_count and m.extra["users_carried"] == 0
    assert all(len(s.sha256) == 64 and s.users <= 8 for s in m.shards)
    # the users: everyone with an event at or before the cut (as-of minus the 24 h gap), each exactly once
    expected = _users_with_events_before(synth_url, m.data_cutoff_ts - DAY)
    idx = SnapshotIndex(full)
    assert np.array_equal(idx.user_ids, expected) and m.user_count == len(expected)
    rep = verify_snapshot(full)
    assert rep.users == len(expected) and rep.shards == len(m.shards)
    text = (Path(full) / "manifest.json").read_text()
    for key in (
        "snapshot_id",
        "model_version",
        "data_cutoff_ts",
        "created_at",
        "row_format",
        "bytes_per_user",
        "user_count",
        "sha256",
    ):
        assert f'"{key}"' in text


def test_bytes_decode_to_the_tower_output_at_the_cut(full: str, checkpoint: str, synth_url: str) -> None:
    m = read_manifest(full)
    idx = SnapshotIndex(full)
    users = idx.user_ids[:12]
    ds = TimelineDataset(synth_url)
    model = load_tower_model(checkpoint)
    # the reference: the tower over the same users in ONE batch of 12 (not the export's batches of 8)
    ref = UserEncoder(model, ds.vocab, m.row_format, batch_users=12).embed(ds.read_users(users), m.data_cutoff_ts)
    got = dequantize_rows(torch.from_numpy(idx.payload(users)).view(len(users), m.row_format.rows_per_user, -1))
    step = (ref.amax(-1, keepdim=True) - ref.amin(-1, keepdim=True)) / 15
    assert bool(((got - ref).abs() <= step * 0.5 + 2e-3 * ref.abs().amax(-1, keepdim=True) + 1e-6).all())
    # the 24 h gap: timelines with every event after (cut-off - 24 h) deleted give the very same output...
    import pyarrow.compute as pc

    cut = m.data_cutoff_ts - DAY
    ex, im = (ds.read_table(k, users) for k in ("explicit", "implicit"))
    assert pc.any(pc.greater(im["ts"], cut)).as_py()  # there are events after the cut to ignore
    truncated = Timelines.from_arrow(
        ex.filter(pc.less_equal(ex["ts"], cut)), im.filter(pc.less_equal(im["ts"], cut)), ds.vocab, users
    )
    enc = UserEncoder(model, ds.vocab, m.row_format, batch_users=12)
    assert torch.equal(enc.embed(truncated, m.data_cutoff_ts), ref)
    # ...while a snapshot two days later sees the newer events
    assert not torch.equal(enc.embed(ds.read_users(users), m.data_cutoff_ts + 2 * DAY), ref)


def test_rerun_is_a_no_op_and_other_settings_are_refused(full: str, checkpoint: str, last_ts: int) -> None:
    before = {p.name: p.read_bytes() for p in Path(full).glob("shard-*.parquet")}
    again = run_export(_cfg(checkpoint, full, as_of=last_ts - 3 * DAY))
    assert again.already_complete and again.shards_written == 0
    assert {p.name: p.read_bytes() for p in Path(full).glob("shard-*.parquet")} == before
    with pytest.raises(ExportError, match=r"complete snapshot .* other settings \(snapshot_id: was .*data_cutoff_ts"):
        run_export(_cfg(checkpoint, full, as_of=last_ts))
    with pytest.raises(ExportError, match=r"shard_users: was 8, now 4"):
        run_export(_cfg(checkpoint, full, as_of=last_ts - 3 * DAY, shard_users=4))


def test_overwrite_and_foreign_files(checkpoint: str, tmp_path: Path, last_ts: int) -> None:
    out = tmp_path / "snap"
    run_export(_cfg(checkpoint, out, as_of=last_ts - 3 * DAY, snapshot_id="first"))
    res = run_export(_cfg(checkpoint, out, as_of=last_ts, snapshot_id="second", overwrite=True))
    assert res.manifest is not None and read_manifest(str(out)).snapshot_id == "second"
    verify_snapshot(str(out))
    other = tmp_path / "occupied"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"did not write \(\['notes.txt'\]\)"):
        run_export(_cfg(checkpoint, other, overwrite=True))
    assert (other / "notes.txt").read_text() == "mine"


def test_interrupted_before_merge_with_a_damaged_shard_is_repaired(
    full: str, checkpoint: str, tmp_path: Path, last_ts: int
) -> None:
    out = tmp_path / "snap"
    first = run_export(_cfg(checkpoint, out, as_of=last_ts - 3 * DAY))
    assert first.manifest is not None
    (out / "manifest.json").unlink()  # as if killed right before the merge
    with pytest.raises(SnapshotError, match="no complete snapshot"):
        read_manifest(str(out))
    shards = sorted(out.glob("shard-*.parquet"))
    good = shards[1].read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 3] ^= 0xFF
    shards[1].write_bytes(bytes(damaged))
    (out / (shards[2].name + ".tmp")).write_bytes(b"half a shard")  # a write cut short
    res = run_export(_cfg(checkpoint, out, as_of=last_ts - 3 * DAY))
    assert res.shards_written == 1 and res.shards_resumed == len(shards) - 1
    assert shards[1].read_bytes() == good
    assert res.manifest is not None and res.manifest.shards == first.manifest.shards
    verify_snapshot(str(out))


def test_corrupted_shard_is_named_with_its_user(checkpoint: str, tmp_path: Path, last_ts: int) -> None:
    out = tmp_path / "snap"
    run_export(_cfg(checkpoint, out, as_of=last_ts - 3 * DAY))
    m = read_manifest(str(out))
    info = m.shards[0]
    path = out / info.path
    blob = bytearray(path.read_bytes())
    # flip one byte inside the second user's embedding (the fixed-size binary column is stored plain)
    from dv365.core.snapshot import read_shard

    u_ids, data = read_shard(str(out), info, m.row_format)
    needle = data[1].tobytes()
    at = bytes(blob).find(needle)
    assert at > 0
    blob[at + 5] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(
        SnapshotError,
        match=rf"shard {info.path} is corrupted: the embedding of user {u_ids[1]} "
        "fails its crc32",
    ):
        verify_snapshot(str(out))
    with pytest.raises(SnapshotError, match=rf"shard {info.path} is corrupted \(sha256 mismatch"):
        read_shard(str(out), info, m.row_format)  # what dv365-store's publish runs
    from dv365.core.cli import main

    assert main(["export", "verify", str(out)]) == 1


def test_clear_errors(checkpoint: str, baseline_checkpoint: str, tmp_path: Path, last_ts: int, full: str) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        run_export(_cfg(str(tmp_path / "nope.pt"), tmp_path / "a"))
    with pytest.raises(CheckpointError, match="baseline model has no user tower"):
        run_export(_cfg(baseline_checkpoint, tmp_path / "b"))
    with pytest.raises(ExportError, match="no user has an event at or before the cut"):
        run_export(_cfg(checkpoint, tmp_path / "c", as_of=1_000_000_000))
    with pytest.raises(ExportError, match="is not before this export's"):
        run_export(_cfg(checkpoint, tmp_path / "d", as_of=last_ts - 5 * DAY, previous=full))
    with pytest.raises(SnapshotError, match="no complete snapshot here"):
        run_export(_cfg(checkpoint, tmp_path / "e", previous=str(tmp_path / "missing")))
    with pytest.raises(ExportError, match="--worker-rank 2 is not in"):
        run_export(_cfg(checkpoint, tmp_path / "f", num_workers=2, worker_rank=2))
    with pytest.raises(ExportError, match="--bits must be 4 or 8"):
        run_export(_cfg(checkpoint, tmp_path / "g", bits=2))
    assert not any((tmp_path / d / "manifest.json").exists() for d in "abcdefg")
