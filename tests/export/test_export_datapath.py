"""The export on the one data path (dv365.train.features): the bytes do not depend on the slicer backend, on
the loader workers or on the tower's thread count, and they are the bytes of the reference path (the numpy
slicer over timelines read whole, in the export's batches) -- the export's bytes before this path existed.
Stage timings are reported; an error in a loader worker reaches the caller as itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dv365.core.errors import DatasetError
from dv365.core.slicing import resolve_backend
from dv365.core.snapshot import read_manifest
from dv365.core.timeline import TimelineDataset
from dv365.export.encode import UserEncoder, load_tower_model
from dv365.export.job import ExportConfig, run_export
from dv365.export.plan import SnapshotIndex
from dv365.train.features import STAGES, UserFeatures, tower_batches

DAY = 86_400


def _export(checkpoint: str, out: Path, as_of: int, **kw: object) -> SnapshotIndex:
    cfg = dict(shard_users=8, batch_users=8, progress=False, device="cpu", as_of=as_of)
    cfg.update(kw)
    res = run_export(ExportConfig(checkpoint=checkpoint, out=str(out), **cfg))  # type: ignore[arg-type]
    assert set(res.stage_seconds) == {*STAGES, "pool", "fsa", "quantize", "write", "wait", "warm_up"}
    assert all(v >= 0 for v in res.stage_seconds.values()) and res.stage_seconds["slice"] > 0
    assert res.first_batch is not None and 0 < res.first_batch[0] <= res.seconds and res.first_batch[1] > 0
    assert res.users_per_s_steady >= 0
    return SnapshotIndex(str(out))


@pytest.mark.skipif(resolve_backend("auto") != "numba", reason="numba is not installed")
def test_bytes_are_the_reference_paths_whatever_the_backend_workers_and_threads(
    checkpoint: str, synth_url: str, last_ts: int, tmp_path: Path
) -> None:
    as_of = last_ts - 2 * DAY
    ref = _export(checkpoint, tmp_path / "numpy-inline", as_of, slicer="numpy", loader_workers=0, threads=1)
    # the reference path, by hand: every user's timelines read whole, the numpy slicer, the export's batches
    m = read_manifest(str(tmp_path / "numpy-inline"))
    ds = TimelineDataset(synth_url)
    enc = UserEncoder(load_tower_model(checkpoint), ds.vocab, m.row_format, batch_users=8, backend="numpy")
    payload = ref.payload(ref.user_ids)
    for slicer, workers, threads in (("numba", 1, 1), ("auto", 0, 2), ("numba", 2, 0)):
        got = _export(
            checkpoint,
            tmp_path / f"{slicer}-{workers}-{threads}",
            as_of,
            slicer=slicer,
            loader_workers=workers,
            threads=threads,
        )
        assert np.array_equal(got.user_ids, ref.user_ids)
        assert np.array_equal(got.payload(got.user_ids), payload), (slicer, workers, threads)
    # the reference encoder over whole timelines gives the same bytes (a fixed batch size makes a user's bytes
    # independent of the users that share its batch)
    first = ref.user_ids[:8]
    floats = enc.embed(ds.read_users(first), m.data_cutoff_ts)
    assert np.array_equal(enc.quantize(floats, first), ref.payload(first))


def test_tower_batches_stream_what_the_inline_path_gives_and_pad_short_batches(
    checkpoint: str, synth_url: str, last_ts: int
) -> None:
    model = load_tower_model(checkpoint)
    ds = TimelineDataset(synth_url)
    feats = UserFeatures(model.spec, ds.vocab, canonical=True)
    users = ds.user_ids()[:11]
    batches = [users[:4], users[4:8], users[8:]]  # the last one short: padded to 4 rows
    cut = last_ts - DAY
    inline = list(tower_batches(synth_url, feats, batches, cutoff_ts=cut, batch_users=4, workers=0))
    streamed = list(tower_batches(synth_url, feats, batches, cutoff_ts=cut, batch_users=4, workers=1))
    assert [b.n for b in streamed] == [4, 4, 3]
    for a, b in zip(inline, streamed):
        assert np.array_equal(a.user_ids, b.user_ids)
        assert a.kjt.stride() == b.kjt.stride() == 4
        assert torch.equal(a.kjt.values(), b.kjt.values()) and torch.equal(a.kjt.weights(), b.kjt.weights())
        assert torch.equal(a.kjt.lengths(), b.kjt.lengths())
        assert set(b.seconds) == set(STAGES)
    # the same KJT as UserFeatures.kjt over the batch's users read whole (the padding repeats the first user)
    padded = np.concatenate([users[8:], users[8:9]])
    ref = feats.kjt(ds.read_users(padded), cut)
    assert torch.equal(ref.values(), streamed[2].kjt.values()) and torch.equal(ref.lengths(), streamed[2].kjt.lengths())
    # per-user cut-offs travel with their batch
    per_user = [np.full(len(b), cut - i * DAY) for i, b in enumerate(batches)]
    got = list(tower_batches(synth_url, feats, batches, cutoff_ts=per_user, batch_users=4, workers=1))
    ref1 = feats.kjt(ds.read_users(batches[1]), cut - DAY)
    assert torch.equal(ref1.values(), got[1].kjt.values())


def test_reader_errors_reach_the_caller_as_themselves(checkpoint: str, synth_url: str, tmp_path: Path) -> None:
    import shutil

    model = load_tower_model(checkpoint)
    ds = TimelineDataset(synth_url)
    feats = UserFeatures(model.spec, ds.vocab)
    broken = tmp_path / "ds"
    shutil.copytree(synth_url, broken)
    part = sorted((broken / "implicit").rglob("*.parquet"))[0]
    part.write_bytes(b"not parquet at all")
    users = ds.user_ids()
    with pytest.raises(Exception) as e_inline:
        list(tower_batches(str(broken), feats, [users[:4], users[4:8]], cutoff_ts=0, batch_users=4, workers=0))
    with pytest.raises(type(e_inline.value)) as e_worker:
        list(tower_batches(str(broken), feats, [users[:4], users[4:8]], cutoff_ts=0, batch_users=4, workers=1))
    assert str(e_worker.value) == str(e_inline.value)
    with pytest.raises(ValueError, match="batch 1 has 5 users"):
        list(tower_batches(synth_url, feats, [users[:4], users[4:9]], cutoff_ts=0, batch_users=4))


def test_a_dataset_error_from_a_worker_keeps_its_type(checkpoint: str, synth_url: str) -> None:
    model = load_tower_model(checkpoint)
    ds = TimelineDataset(synth_url)
    feats = UserFeatures(model.spec, ds.vocab)
    feats.max_rows = 1  # every id is now "outside the tables": the slicer check raises a DatasetError
    users = ds.user_ids()
    with pytest.raises(DatasetError, match="outside"):
        list(tower_batches(synth_url, feats, [users[:4], users[4:8]], cutoff_ts=2**40, batch_users=4, workers=1))


def test_slicing_in_chunks_gives_the_same_batch(checkpoint: str, synth_url: str, last_ts: int) -> None:
    model = load_tower_model(checkpoint)
    ds = TimelineDataset(synth_url)
    feats = UserFeatures(model.spec, ds.vocab, canonical=True)
    users = ds.user_ids()[:13]
    tl = ds.read_users(users)
    cuts = last_ts - np.arange(13) * DAY
    whole, parts = feats.slice(tl, cuts), feats.slice(tl, cuts, chunk=4)
    assert parts.batch_size == whole.batch_size == 13 and parts.keys == whole.keys
    for name in ("values", "weights", "lengths", "raw_counts", "request_ts", "user_ids"):
        assert np.array_equal(getattr(parts, name), getattr(whole, name)), name


def _stream_in_daemon(args: tuple[str, str, int]) -> int:
    checkpoint, url, cut = args
    model = load_tower_model(checkpoint)
    ds = TimelineDataset(url)
    users = ds.user_ids()
    feats = UserFeatures(model.spec, ds.vocab)
    return sum(b.n for b in tower_batches(url, feats, [users[:4], users[4:7]], cutoff_ts=cut, batch_users=4, workers=1))


def test_a_pool_worker_streams_inline(checkpoint: str, synth_url: str, last_ts: int) -> None:
    """A daemonic process may not start the loader's workers: the batches are made inline there."""
    import multiprocessing as mp

    with mp.get_context("fork").Pool(1) as pool:
        assert pool.map(_stream_in_daemon, [(checkpoint, synth_url, last_ts)]) == [7]


def test_bad_loader_settings_are_named(checkpoint: str, tmp_path: Path) -> None:
    from dv365.export.errors import ExportError

    for kw, msg in (({"loader_workers": -1}, "--loader-workers must be 0"), ({"slicer": "fast"}, "--slicer must be")):
        with pytest.raises(ExportError, match=msg):
            run_export(ExportConfig(checkpoint=checkpoint, out=str(tmp_path / "x"), progress=False, **kw))  # type: ignore[arg-type]
        assert not (tmp_path / "x").exists()
