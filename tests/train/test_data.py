"""Examples: requests joined with timelines sliced at each row's own request time; order; splits; item ids."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from dv365.core.slicing import Slicer
from dv365.core.timeline import DatasetWriter
from dv365.train.backbone import ITEM_FEATURES
from dv365.train.config import DataConfig
from dv365.train.data import ExampleSource, TrainBatches, dense_features, load_spec
from dv365.train.errors import TrainConfigError
from dv365.train.losses import TaskSpec

H = 3600
T = 1_700_000_000
SLICER = "numpy" if "backend" in inspect.signature(Slicer).parameters else "auto"  # as in conftest.py


@pytest.fixture
def hand_url(tmp_path: Path, make_events) -> str:
    """User 1 liked media 10 at T-25h and media 11 at T-23h; requests at T and T+2h (and one for user 2)."""
    url = str(tmp_path / "hand")
    explicit = make_events(
        "explicit",
        [
            {"user_id": 1, "ts": T - 25 * H, "media_id": 10, "author_id": 7, "topic_ids": [3]},
            {"user_id": 1, "ts": T - 23 * H, "media_id": 11, "author_id": 8, "topic_ids": [4, 5]},
            {"user_id": 2, "ts": T - 30 * H, "media_id": 12},
        ],
    )
    requests = make_events(
        "requests",
        [
            {"user_id": 1, "ts": T, "media_id": 20, "author_id": 9, "topic_ids": [1, 2], "label_like": 1.0},
            {"user_id": 1, "ts": T + 2 * H, "media_id": 21, "author_id": None, "topic_ids": [], "label_like": 0.0},
            {
                "user_id": 2,
                "ts": T + 1,
                "media_id": 22,
                "media_type": "image",
                "video_duration": None,
                "label_like": 0.0,
            },
        ],
    )
    with DatasetWriter(url, source="test", num_buckets=2) as w:
        w.add(explicit=explicit, requests=requests)
    return url


@pytest.mark.parametrize("slicer", sorted({SLICER, "auto"}))
def test_each_request_sees_its_users_history_up_to_its_own_time_minus_24h(hand_url: str, slicer: str) -> None:
    cfg = DataConfig(
        url=hand_url,
        spec="kuairand",
        hash_sizes={"media": 101, "author": 101, "topic": 11},
        eval_fraction=0.0,
        slicer=slicer,
    )
    src = ExampleSource(cfg, [TaskSpec("label_like")], load_spec(cfg), 1009)
    assert src.requests.ts.tolist() == [T, T + 1, T + 2 * H]  # time-sorted
    batch = src.collate(np.array([0, 2, 1]))  # rows: (user 1 @ T), (user 1 @ T+2h), (user 2 @ T+1)
    bags = batch.user_kjt.to_dict()
    like = bags["act.like.all.media"]
    per_row = [sorted(like.values()[a:b].tolist()) for a, b in zip(like.offsets()[:-1], like.offsets()[1:])]
    assert per_row == [[10], [10, 11], [12]]  # media 11 is inside the 24 h gap at T, outside it at T + 2h
    assert bags["act.like.3d.topic"].lengths().tolist() == [1, 3, 0]
    assert batch.labels[:, 0].tolist() == [1.0, 0.0, 0.0]
    assert batch.dense.shape == (3, 6)


def test_item_kjt_holds_the_target_item_ids(hand_url: str) -> None:
    src = ExampleSource(DataConfig(url=hand_url, eval_fraction=0.0), [TaskSpec("label_like")], None, 1009)
    assert src.timelines is None  # the baseline reads no timelines
    item = src.collate(np.array([0, 2, 1])).item_kjt.to_dict()
    assert list(item) == list(ITEM_FEATURES)
    assert item["item.media"].values().tolist() == [20, 21, 22]
    assert item["item.author"].lengths().tolist() == [1, 0, 0]  # unknown authors: empty bags
    assert item["item.topic"].values().tolist() == [1, 2]
    dense = dense_features(np.array([0, 6 * H]), np.array([np.nan, 30.0]))
    assert dense[:, 1].tolist() == [0.0, 1.0] and dense[0, 0] == 0.0
    assert dense[1, 2:4] == pytest.approx([1.0, 0.0], abs=1e-6)  # 06:00 UTC is a quarter turn


def test_batch_order_is_a_function_of_seed_and_step(synth_url: str) -> None:
    src = ExampleSource(DataConfig(url=synth_url), (), None, 1009)
    a, b, c = TrainBatches(src, 16, seed=0), TrainBatches(src, 16, seed=0), TrainBatches(src, 16, seed=1)
    n = a.batches_per_epoch
    assert n == len(src.train_rows) // 16
    for step in (0, 3, n, n + 2):
        assert np.array_equal(a.rows(step), b.rows(step))
    assert not np.array_equal(a.rows(0), c.rows(0))
    epoch0 = np.concatenate([a.rows(s) for s in range(n)])
    assert len(np.unique(epoch0)) == len(epoch0) == n * 16  # each example at most once per epoch
    assert not np.array_equal(a.rows(0), a.rows(n))  # a new permutation each epoch
    with pytest.raises(TrainConfigError, match="batch_size"):
        TrainBatches(src, 10_000, seed=0)


def test_splits_are_by_request_time(synth_url: str) -> None:
    full = ExampleSource(DataConfig(url=synth_url, eval_fraction=0.2), (), None, 1009)
    ts = full.requests.ts
    assert len(full.eval_rows) == int(np.ceil(0.2 * len(ts)))
    assert ts[full.train_rows].max() <= ts[full.eval_rows].min()
    late = ExampleSource(DataConfig(url=synth_url, eval_fraction=0.2, train_range=(0.5, 1.0)), (), None, 1009)
    early = ExampleSource(DataConfig(url=synth_url, eval_fraction=0.2, train_range=(0.0, 0.5)), (), None, 1009)
    assert np.array_equal(np.concatenate([early.train_rows, late.train_rows]), full.train_rows)
    assert np.array_equal(late.eval_rows, full.eval_rows)
    # tasks inferred from the label columns: 0/1 labels are binary, watch time is a log1p regression
    kinds = {t.label: (t.kind, t.transform) for t in full.tasks}
    assert kinds["label_like"] == ("binary", "none")
    assert kinds["label_watch_time"] == ("regression", "log1p")
    with pytest.raises(TrainConfigError, match="label_click"):
        ExampleSource(DataConfig(url=synth_url), (TaskSpec("label_click"),), None, 1009)


def test_sample_per_user_keeps_at_most_n_rows_of_each_user_in_order() -> None:
    import pyarrow as pa

    from dv365.train.data import sample_per_user

    users = [1, 2, 1, 1, 3, 2, 1, 2, 2, 2]
    t = pa.table({"user_id": users, "ts": list(range(len(users)))})
    s = sample_per_user(t, 2, 0)
    got = s.column("user_id").to_pylist()
    assert {u: got.count(u) for u in set(got)} == {1: 2, 2: 2, 3: 1}
    assert s.column("ts").to_pylist() == sorted(s.column("ts").to_pylist())  # original order kept
    assert s.equals(sample_per_user(t, 2, 0)) and sample_per_user(t, 9, 0).equals(t)


def test_small_tables_for_a_dense_dataset_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A dataset imported with --dense-ids knows how many rows each id type needs; training with a smaller
    table warns (ids would share rows), with the key to set; a table big enough says nothing."""
    import logging

    from dv365.core.cli import main
    from dv365.core.timeline import TimelineDataset
    from dv365.train.data import _warn_small_dense_tables

    out = str(tmp_path / "ml")
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "movielens-100k"
    assert main(["import", "movielens", str(fixture), "--out", out, "--dense-ids"]) == 0
    ds = TimelineDataset(out)
    n = len(ds.id_map("media"))
    log = logging.getLogger("dv365.train.data")
    log.addHandler(caplog.handler)  # the import command routed dv365's loggers to its own output
    try:
        with caplog.at_level(logging.WARNING, logger="dv365.train.data"):
            _warn_small_dense_tables(
                ds, load_spec(DataConfig(url=out, spec="movielens", hash_sizes={"media": n - 1})), out
            )
            assert f"{n:,} dense media ids but the media table has {n - 1:,} rows" in caplog.text
            assert f"data.hash_sizes.media >= {n:,}" in caplog.text
            caplog.clear()
            _warn_small_dense_tables(ds, load_spec(DataConfig(url=out, spec="movielens", hash_sizes={"media": n})), out)
            assert caplog.text == ""
    finally:
        log.removeHandler(caplog.handler)
