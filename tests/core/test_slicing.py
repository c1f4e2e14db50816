"""Slicing: the vectorised Slicer agrees with the plain-Python reference; pooling is exact; specs validate."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dv365.core.errors import SliceSpecError
from dv365.core.slicing import Slicer, SliceSpec, reference_slice
from dv365.core.timeline import Timelines
from dv365.core.vocab import Vocabulary

DAY = 86400

# A small spec exercising every rule: action/media/surface sets, dwell and ratio bands, the debiased
# weighted feature, three windows, all id types, shared tables, a no-dedup table and a tiny cap.
SMALL_SPEC = {
    "name": "small",
    "gap_hours": 24,
    "cap": 6,
    "windows": {"3d": 72, "7d": 168, "all": None},
    "id_types": {"media": {"hash_size": 7, "dedup": True}, "author": {"hash_size": 5, "dedup": False},
                 "topic": {"hash_size": 11, "dedup": True}},
    "families": [
        {"name": "act", "source": "explicit", "windows": ["3d", "7d", "all"], "ids": ["media", "author", "topic"],
         "table": "ex_{polarity}_{id}",
         "slices": {"like": {"action": ["like"], "polarity": "pos"}, "hate": {"action": "hate", "polarity": "neg"},
                    "feed_like": {"action": ["like", "comment"], "surface": ["feed"], "polarity": "pos"}}},
        {"name": "dwell", "source": "implicit", "windows": ["3d", "all"], "ids": ["media", "topic"],
         "table": "im_{id}", "slices": {"skip": {"dwell": [0, 3]}, "long": {"dwell": [10, None], "media_type": ["video"]}}},
        {"name": "ratio", "source": "implicit", "beta": 0.5, "windows": ["all", "7d"], "ids": ["author"],
         "table": "im_{id}", "slices": {"lo": {"watch_ratio": [0, 1.0]}, "hi": {"watch_ratio": [1.0, None]}}},
        {"name": "deb", "source": "implicit", "weighted": True, "windows": ["all"], "ids": ["media", "topic", "author"],
         "table": "w_{id}", "slices": {"s": {"debiased": {"gamma": 0.5, "s0": 0.6}}}},
    ],
}

ACTIONS = ["like", "hate", "comment", "follow", "tag"]
SURFACES = ["feed", "reels", "explore"]
MTYPES = ["video", "image", "ad"]


def _timelines(draw_events: list[list[dict]], kind: str) -> pa.Table:
    rows = [dict(e, user_id=u) for u, evs in enumerate(draw_events) for e in evs]
    cols = ["user_id", "ts", "media_id", "author_id", "topic_ids", "media_type", "surface"]
    cols += ["action"] if kind == "explicit" else ["video_duration", "dwell_time"]
    types = {"video_duration": pa.float32(), "dwell_time": pa.float32(), "topic_ids": pa.list_(pa.int64()),
             "author_id": pa.int64()}
    return pa.table({c: pa.array([r[c] for r in rows], type=types.get(c)) for c in cols})


event_common = {
    "ts": st.integers(0, 12 * DAY),
    "media_id": st.integers(0, 40),
    "author_id": st.one_of(st.none(), st.integers(0, 12)),
    "topic_ids": st.lists(st.integers(0, 30), max_size=3),
    "media_type": st.sampled_from(MTYPES),
    "surface": st.sampled_from(SURFACES),
}
explicit_event = st.fixed_dictionaries({**event_common, "action": st.sampled_from(ACTIONS)})
implicit_event = st.fixed_dictionaries({
    **event_common,
    "video_duration": st.one_of(st.none(), st.floats(0, 100, width=32)),
    "dwell_time": st.one_of(st.floats(0, 60, width=32), st.sampled_from([0.0, 3.0, 10.0])),
})


def _assert_agree(spec: SliceSpec, tl: Timelines, req: list[int]) -> None:
    batch = Slicer(spec, tl.vocab).slice(tl, req)
    ref = reference_slice(spec, tl, req)
    for name in batch.keys:
        for row in range(len(req)):
            ids, w = batch.bag(name, row)
            expected = ref[(name, row)]
            assert ids.tolist() == [i for i, _ in expected], (name, row)
            np.testing.assert_allclose(w, [x for _, x in expected], rtol=1e-5, atol=1e-6, err_msg=f"{name} row {row}")
            if len(ids):
                assert math.isclose(float(w.astype(np.float64).sum()), 1.0, rel_tol=1e-5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    ex=st.lists(st.lists(explicit_event, max_size=14), min_size=1, max_size=3),
    im_extra=st.lists(st.lists(implicit_event, max_size=14), min_size=3, max_size=3),
    req=st.lists(st.integers(0, 14 * DAY), min_size=3, max_size=3),
)
def test_vectorised_matches_reference(ex: list[list[dict]], im_extra: list[list[dict]], req: list[int]) -> None:
    im = im_extra[: len(ex)]
    tl = Timelines.from_arrow(_timelines(ex, "explicit"), _timelines(im, "implicit"), Vocabulary(),
                              user_ids=list(range(len(ex))))
    _assert_agree(SliceSpec.from_dict(SMALL_SPEC), tl, req[: len(ex)])


def test_default_specs_agree_with_reference_on_random_data() -> None:
    rng = np.random.default_rng(3)
    n = 400
    toff = np.concatenate([[0], np.cumsum(rng.integers(0, 3, n))])
    topics = pa.ListArray.from_arrays(pa.array(toff.astype(np.int32)), pa.array(rng.integers(0, 50, toff[-1])))
    base = dict(user_id=rng.integers(0, 4, n), ts=rng.integers(0, 30 * DAY, n), media_id=rng.integers(0, 10**9, n),
                author_id=rng.integers(0, 10**7, n), topic_ids=topics,
                media_type=rng.choice(["video", "image", "ad"], n), surface=rng.choice(["feed", "reels", "search"], n))
    ex = pa.table({**base, "action": rng.choice(["like", "hate", "follow", "rate_high", "rate_low", "tag"], n)})
    im = pa.table({**base, "video_duration": rng.uniform(0, 90, n).astype(np.float32),
                   "dwell_time": rng.exponential(20, n).astype(np.float32)})
    tl = Timelines.from_arrow(ex, im)
    req = [30 * DAY, 20 * DAY, 31 * DAY, 3 * DAY]
    for name in ("kuairand", "movielens"):
        _assert_agree(SliceSpec.load_default(name), tl, req)


def test_gap_and_windows_exact_boundaries() -> None:
    """Events exactly at request-24h are kept, one second later are not; window edges are inclusive."""
    r = 100 * DAY
    ts = [r - DAY + 1, r - DAY, r - 3 * DAY, r - 3 * DAY - 1, r - 7 * DAY, r - 50 * DAY]
    ex = pa.table({"user_id": [1] * 6, "ts": ts, "media_id": [1, 2, 3, 4, 5, 6], "action": ["like"] * 6})
    tl = Timelines.from_arrow(ex, None)
    spec = SliceSpec.load_default("kuairand")
    b = Slicer(spec, tl.vocab).slice(tl, [r])
    assert b.bag("act.like.3d.media", 0)[0].tolist() == [2, 3]
    assert b.bag("act.like.7d.media", 0)[0].tolist() == [2, 3, 4, 5]
    assert b.bag("act.like.all.media", 0)[0].tolist() == [2, 3, 4, 5, 6]
    assert b.bag("act.hate.all.media", 0)[0].tolist() == []


def test_cap_keeps_most_recent() -> None:
    n = 50
    ex = pa.table({"user_id": [7] * n, "ts": np.arange(n) * 10, "media_id": np.arange(n), "action": ["like"] * n})
    spec_d = dict(SMALL_SPEC, cap=6)
    tl = Timelines.from_arrow(ex, None)
    b = Slicer(SliceSpec.from_dict(spec_d), tl.vocab).slice(tl, [n * 10 + DAY])
    ids, w = b.bag("act.like.all.media", 0)
    assert sorted(ids.tolist()) == sorted(x % 7 for x in range(44, 50))
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)


def test_mean_pooling_equals_weighted_sum_of_unique_ids_in_ebc() -> None:
    """EBC(SUM) over the dedup'd, count-weighted KJT == plain mean of the raw bag's embedding rows."""
    torch = pytest.importorskip("torch")
    from torchrec import EmbeddingBagCollection

    from dv365.core.kjt import embedding_bag_configs

    rng = np.random.default_rng(0)
    n = 600
    ex = pa.table({"user_id": rng.integers(0, 5, n), "ts": rng.integers(0, 20 * DAY, n),
                   "media_id": rng.integers(0, 30, n), "topic_ids": [[int(x)] for x in rng.integers(0, 20, n)],
                   "action": rng.choice(["rate_high", "rate_mid", "rate_low", "tag"], n)})
    tl = Timelines.from_arrow(ex, None)
    spec = SliceSpec.load_default("movielens")
    req = [21 * DAY] * len(tl)
    batch = Slicer(spec, tl.vocab).slice(tl, req)
    assert batch.raw_counts.sum() > batch.lengths.sum()  # dedup actually removed row reads
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=embedding_bag_configs(spec, 8), is_weighted=True)
    pooled = ebc(batch.to_kjt()).to_dict()
    raw_spec = SliceSpec.from_dict({**spec.raw, "id_types": {k: {**v, "dedup": False} for k, v in spec.raw["id_types"].items()}})
    raw = reference_slice(raw_spec, tl, req)
    weights = {t.name: ebc.embedding_bags[t.name].weight.detach() for t in spec.tables.values()}
    for f in spec.features:
        for row in range(len(tl)):
            occ = [i for i, _ in raw[(f.name, row)]]
            expect = weights[f.table][occ].mean(0) if occ else torch.zeros(8)
            torch.testing.assert_close(pooled[f.name][row], expect, rtol=1e-5, atol=1e-6)


def test_default_kuairand_spec_has_200_plus_features_and_shared_tables() -> None:
    spec = SliceSpec.load_default("kuairand")
    assert len(spec.features) >= 200
    assert len(spec.tables) < len(spec.features) / 5
    for t in spec.tables.values():
        assert {spec.features[spec.feature_names.index(f)].id_type for f in t.features} == {t.id_type}
    assert spec.gap_s == 24 * 3600 and spec.cap == 35_000


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"families": [{"name": "x", "source": "explicit", "ids": ["media"], "slices": {"a": {"dwell": [0, 3]}}}]},
         "use source implicit"),
        ({"families": [{"name": "x", "source": "implicit", "ids": ["media"], "slices": {"a": {"dwell": [5, 3]}}}]},
         "must exceed lower bound"),
        ({"families": [{"name": "x", "source": "implicit", "ids": ["media"], "windows": ["1y"], "slices": {"a": {}}}]},
         "unknown window '1y'"),
        ({"families": [{"name": "x", "source": "implicit", "ids": ["media", "topic"], "table": "t", "slices": {"a": {}}}]},
         "would mix id types"),
        ({"families": [{"name": "x", "source": "implicit", "ids": ["media"], "slices": {"a": {"colour": ["red"]}}}]},
         "unknown slice keys"),
        ({"families": [{"name": "x", "source": "implicit", "ids": ["media"], "weighted": True, "slices": {"a": {}}}]},
         "weighted family"),
        ({"id_types": {"media": {"hash_size": 0}}}, "hash_size"),
    ],
)
def test_bad_specs_name_the_feature_and_key(patch: dict, message: str) -> None:
    with pytest.raises(SliceSpecError, match=message):
        SliceSpec.from_dict({**SMALL_SPEC, **patch})


def test_spec_actions_must_be_in_vocabulary() -> None:
    d = {**SMALL_SPEC, "families": [{"name": "x", "source": "explicit", "ids": ["media"], "slices": {"a": {"action": ["wink"]}}}]}
    with pytest.raises(SliceSpecError, match="'wink' is not in the dataset vocabulary"):
        Slicer(SliceSpec.from_dict(d), Vocabulary())


def test_request_ts_length_must_match() -> None:
    tl = Timelines.from_arrow(pa.table({"user_id": [1], "ts": [5], "media_id": [1], "action": ["like"]}), None)
    with pytest.raises(ValueError, match="request_ts has 2 entries for 1 timelines"):
        Slicer(SliceSpec.load_default("kuairand"), tl.vocab).slice(tl, [1, 2])


def test_kjt_layout() -> None:
    tl = Timelines.from_arrow(pa.table({"user_id": [1, 1, 2], "ts": [0, 5, 9], "media_id": [3, 3, 4],
                                        "action": ["rate_high"] * 3}), None)
    spec = SliceSpec.load_default("movielens")
    b = Slicer(spec, tl.vocab).slice(tl, [10 * DAY, 10 * DAY])
    kjt = b.to_kjt()
    assert kjt.keys() == spec.feature_names and kjt.stride() == 2
    jt = kjt["rate.high.all.media"]
    assert jt.lengths().tolist() == [1, 1]
    assert jt.values().tolist() == [3, 4] and jt.weights().tolist() == [1.0, 1.0]
