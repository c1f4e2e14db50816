"""Slicing: both Slicer backends agree with the plain-Python reference and with each other; pooling is
exact; specs validate."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dv365.core.errors import SliceSpecError
from dv365.core.slicing import SlicedBatch, Slicer, SliceSpec, reference_slice
from dv365.core.timeline import Timelines
from dv365.core.vocab import Vocabulary

DAY = 86400
HAS_NUMBA = importlib.util.find_spec("numba") is not None
# every reference-agreement test runs on both backends; the numba one is skipped only where numba is absent
BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed"))]

# A small spec exercising every rule: action/media/surface sets, dwell and ratio bands, the debiased
# weighted feature, three windows, all id types, shared tables, a no-dedup table and a tiny cap.
SMALL_SPEC = {
    "name": "small",
    "gap_hours": 24,
    "cap": 6,
    "windows": {"3d": 72, "7d": 168, "all": None},
    "id_types": {
        "media": {"hash_size": 7, "dedup": True},
        "author": {"hash_size": 5, "dedup": False},
        "topic": {"hash_size": 11, "dedup": True},
    },
    "families": [
        {
            "name": "act",
            "source": "explicit",
            "windows": ["3d", "7d", "all"],
            "ids": ["media", "author", "topic"],
            "table": "ex_{polarity}_{id}",
            "slices": {
                "like": {"action": ["like"], "polarity": "pos"},
                "hate": {"action": "hate", "polarity": "neg"},
                "feed_like": {"action": ["like", "comment"], "surface": ["feed"], "polarity": "pos"},
            },
        },
        {
            "name": "dwell",
            "source": "implicit",
            "windows": ["3d", "all"],
            "ids": ["media", "topic"],
            "table": "im_{id}",
            "slices": {"skip": {"dwell": [0, 3]}, "long": {"dwell": [10, None], "media_type": ["video"]}},
        },
        {
            "name": "ratio",
            "source": "implicit",
            "beta": 0.5,
            "windows": ["all", "7d"],
            "ids": ["author"],
            "table": "im_{id}",
            "slices": {"lo": {"watch_ratio": [0, 1.0]}, "hi": {"watch_ratio": [1.0, None]}},
        },
        {
            "name": "deb",
            "source": "implicit",
            "weighted": True,
            "windows": ["all"],
            "ids": ["media", "topic", "author"],
            "table": "w_{id}",
            "slices": {"s": {"debiased": {"gamma": 0.5, "s0": 0.6}}},
        },
    ],
}

ACTIONS = ["like", "hate", "comment", "follow", "tag"]
SURFACES = ["feed", "reels", "explore"]
MTYPES = ["video", "image", "ad"]


def _timelines(draw_events: list[list[dict]], kind: str) -> pa.Table:
    rows = [dict(e, user_id=u) for u, evs in enumerate(draw_events) for e in evs]
    cols = ["user_id", "ts", "media_id", "author_id", "topic_ids", "media_type", "surface"]
    cols += ["action"] if kind == "explicit" else ["video_duration", "dwell_time"]
    types = {
        "video_duration": pa.float32(),
        "dwell_time": pa.float32(),
        "topic_ids": pa.list_(pa.int64()),
        "author_id": pa.int64(),
    }
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
implicit_event = st.fixed_dictionaries(
    {
        **event_common,
        "video_duration": st.one_of(st.none(), st.floats(0, 100, width=32)),
        "dwell_time": st.one_of(st.floats(0, 60, width=32), st.sampled_from([0.0, 3.0, 10.0])),
    }
)


def _no_dedup(spec: SliceSpec) -> SliceSpec:
    return SliceSpec.from_dict(
        {**spec.raw, "id_types": {k: {**v, "dedup": False} for k, v in spec.raw["id_types"].items()}}
    )


def _pairs(ids: np.ndarray, w: np.ndarray) -> tuple[list[int], np.ndarray]:
    """A bag as (id, weight) pairs sorted by id (then weight): order within a dedup'd bag is backend-specific."""
    order = np.lexsort((w, ids))
    return ids[order].tolist(), w[order].astype(np.float64)


def _assert_agree(spec: SliceSpec, tl: Timelines, req: list[int], backend: str) -> None:
    """Every bag equals the reference's: ids and weights as sorted pairs, raw occurrence counts, each
    non-empty bag's weights summing to 1, and each backend's documented order of ids within a bag."""
    batch = Slicer(spec, tl.vocab, backend=backend).slice(tl, req)
    assert batch.keys == spec.feature_names
    ref = reference_slice(spec, tl, req)
    occurrences = reference_slice(_no_dedup(spec), tl, req)
    raw = batch.raw_counts.reshape(len(batch.keys), len(req))
    for k, name in enumerate(batch.keys):
        dedup = spec.tables[spec.features[k].table].dedup
        for row in range(len(req)):
            ids, w = batch.bag(name, row)
            expected = ref[(name, row)]
            occ = [i for i, _ in occurrences[(name, row)]]
            assert raw[k, row] == len(occ), (name, row)
            if not dedup or backend == "numpy":  # every occurrence in time order / unique ids ascending
                assert ids.tolist() == [i for i, _ in expected], (name, row)
            else:  # numba: unique ids by most recent occurrence, newest first
                assert ids.tolist() == list(dict.fromkeys(reversed(occ))), (name, row)
            got_ids, got_w = _pairs(ids, w)
            exp = sorted(expected)
            assert got_ids == [i for i, _ in exp], (name, row)
            np.testing.assert_allclose(got_w, [x for _, x in exp], rtol=1e-5, atol=1e-6, err_msg=f"{name} row {row}")
            if len(ids):
                assert math.isclose(float(w.astype(np.float64).sum()), 1.0, rel_tol=1e-5)


def _item_attributes(events: list[dict]) -> list[dict]:
    """Author and topics as functions of the item (as in real catalogs): the numba backend then derives
    author / topic bags from media bags; some authors unknown, some items without topics."""
    out = []
    for e in events:
        m = e["media_id"]
        out.append(dict(e, author_id=None if m % 5 == 0 else m % 7, topic_ids=[(m * 3 + j) % 31 for j in range(m % 4)]))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    ex=st.lists(st.lists(explicit_event, max_size=14), min_size=1, max_size=3),
    im_extra=st.lists(st.lists(implicit_event, max_size=14), min_size=3, max_size=3),
    req=st.lists(st.integers(0, 14 * DAY), min_size=3, max_size=3),
    per_item=st.booleans(),
)
def test_vectorised_matches_reference(
    backend: str, ex: list[list[dict]], im_extra: list[list[dict]], req: list[int], per_item: bool
) -> None:
    im = im_extra[: len(ex)]
    if per_item:
        ex, im = [_item_attributes(e) for e in ex], [_item_attributes(e) for e in im]
    tl = Timelines.from_arrow(
        _timelines(ex, "explicit"), _timelines(im, "implicit"), Vocabulary(), user_ids=list(range(len(ex)))
    )
    _assert_agree(SliceSpec.from_dict(SMALL_SPEC), tl, req[: len(ex)], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_specs_agree_with_reference_on_random_data(backend: str) -> None:
    rng = np.random.default_rng(3)
    n = 400
    toff = np.concatenate([[0], np.cumsum(rng.integers(0, 3, n))])
    topics = pa.ListArray.from_arrays(pa.array(toff.astype(np.int32)), pa.array(rng.integers(0, 50, toff[-1])))
    base = dict(
        user_id=rng.integers(0, 4, n),
        ts=rng.integers(0, 30 * DAY, n),
        media_id=rng.integers(0, 10**9, n),
        author_id=rng.integers(0, 10**7, n),
        topic_ids=topics,
        media_type=rng.choice(["video", "image", "ad"], n),
        surface=rng.choice(["feed", "reels", "search"], n),
    )
    ex = pa.table({**base, "action": rng.choice(["like", "hate", "follow", "rate_high", "rate_low", "tag"], n)})
    im = pa.table(
        {
            **base,
            "video_duration": rng.uniform(0, 90, n).astype(np.float32),
            "dwell_time": rng.exponential(20, n).astype(np.float32),
        }
    )
    tl = Timelines.from_arrow(ex, im)
    req = [30 * DAY, 20 * DAY, 31 * DAY, 3 * DAY]
    for name in ("kuairand", "movielens"):
        _assert_agree(SliceSpec.load_default(name), tl, req, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gap_and_windows_exact_boundaries(backend: str) -> None:
    """Events exactly at request-24h are kept, one second later are not; window edges are inclusive."""
    r = 100 * DAY
    ts = [r - DAY + 1, r - DAY, r - 3 * DAY, r - 3 * DAY - 1, r - 7 * DAY, r - 50 * DAY]
    ex = pa.table({"user_id": [1] * 6, "ts": ts, "media_id": [1, 2, 3, 4, 5, 6], "action": ["like"] * 6})
    tl = Timelines.from_arrow(ex, None)
    spec = SliceSpec.load_default("kuairand")
    b = Slicer(spec, tl.vocab, backend=backend).slice(tl, [r])
    assert sorted(b.bag("act.like.3d.media", 0)[0].tolist()) == [2, 3]
    assert sorted(b.bag("act.like.7d.media", 0)[0].tolist()) == [2, 3, 4, 5]
    assert sorted(b.bag("act.like.all.media", 0)[0].tolist()) == [2, 3, 4, 5, 6]
    assert b.bag("act.hate.all.media", 0)[0].tolist() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_cap_keeps_most_recent(backend: str) -> None:
    n = 50
    ex = pa.table({"user_id": [7] * n, "ts": np.arange(n) * 10, "media_id": np.arange(n), "action": ["like"] * n})
    spec_d = dict(SMALL_SPEC, cap=6)
    tl = Timelines.from_arrow(ex, None)
    b = Slicer(SliceSpec.from_dict(spec_d), tl.vocab, backend=backend).slice(tl, [n * 10 + DAY])
    ids, w = b.bag("act.like.all.media", 0)
    assert sorted(ids.tolist()) == sorted(x % 7 for x in range(44, 50))
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_pooling_equals_weighted_sum_of_unique_ids_in_ebc(backend: str) -> None:
    """EBC(SUM) over the dedup'd, count-weighted KJT == plain mean of the raw bag's embedding rows."""
    torch = pytest.importorskip("torch")
    from torchrec import EmbeddingBagCollection

    from dv365.core.kjt import embedding_bag_configs

    rng = np.random.default_rng(0)
    n = 600
    ex = pa.table(
        {
            "user_id": rng.integers(0, 5, n),
            "ts": rng.integers(0, 20 * DAY, n),
            "media_id": rng.integers(0, 30, n),
            "topic_ids": [[int(x)] for x in rng.integers(0, 20, n)],
            "action": rng.choice(["rate_high", "rate_mid", "rate_low", "tag"], n),
        }
    )
    tl = Timelines.from_arrow(ex, None)
    spec = SliceSpec.load_default("movielens")
    req = [21 * DAY] * len(tl)
    batch = Slicer(spec, tl.vocab, backend=backend).slice(tl, req)
    assert batch.raw_counts.sum() > batch.lengths.sum()  # dedup actually removed row reads
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=embedding_bag_configs(spec, 8), is_weighted=True)
    pooled = ebc(batch.to_kjt()).to_dict()
    raw_spec = SliceSpec.from_dict(
        {**spec.raw, "id_types": {k: {**v, "dedup": False} for k, v in spec.raw["id_types"].items()}}
    )
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
        (
            {"families": [{"name": "x", "source": "explicit", "ids": ["media"], "slices": {"a": {"dwell": [0, 3]}}}]},
            "use source implicit",
        ),
        (
            {"families": [{"name": "x", "source": "implicit", "ids": ["media"], "slices": {"a": {"dwell": [5, 3]}}}]},
            "must exceed lower bound",
        ),
        (
            {
                "families": [
                    {"name": "x", "source": "implicit", "ids": ["media"], "windows": ["1y"], "slices": {"a": {}}}
                ]
            },
            "unknown window '1y'",
        ),
        (
            {
                "families": [
                    {"name": "x", "source": "implicit", "ids": ["media", "topic"], "table": "t", "slices": {"a": {}}}
                ]
            },
            "would mix id types",
        ),
        (
            {"families": [{"name": "x", "source": "implicit", "ids": ["media"], "slices": {"a": {"colour": ["red"]}}}]},
            "unknown slice keys",
        ),
        (
            {
                "families": [
                    {"name": "x", "source": "implicit", "ids": ["media"], "weighted": True, "slices": {"a": {}}}
                ]
            },
            "weighted family",
        ),
        ({"id_types": {"media": {"hash_size": 0}}}, "hash_size"),
    ],
)
def test_bad_specs_name_the_feature_and_key(patch: dict, message: str) -> None:
    with pytest.raises(SliceSpecError, match=message):
        SliceSpec.from_dict({**SMALL_SPEC, **patch})


def test_spec_actions_must_be_in_vocabulary() -> None:
    d = {
        **SMALL_SPEC,
        "families": [{"name": "x", "source": "explicit", "ids": ["media"], "slices": {"a": {"action": ["wink"]}}}],
    }
    with pytest.raises(SliceSpecError, match="'wink' is not in the dataset vocabulary"):
        Slicer(SliceSpec.from_dict(d), Vocabulary())


@pytest.mark.parametrize("backend", BACKENDS)
def test_request_ts_length_must_match(backend: str) -> None:
    tl = Timelines.from_arrow(pa.table({"user_id": [1], "ts": [5], "media_id": [1], "action": ["like"]}), None)
    with pytest.raises(ValueError, match="request_ts has 2 entries for 1 timelines"):
        Slicer(SliceSpec.load_default("kuairand"), tl.vocab, backend=backend).slice(tl, [1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kjt_layout(backend: str) -> None:
    tl = Timelines.from_arrow(
        pa.table({"user_id": [1, 1, 2], "ts": [0, 5, 9], "media_id": [3, 3, 4], "action": ["rate_high"] * 3}), None
    )
    spec = SliceSpec.load_default("movielens")
    b = Slicer(spec, tl.vocab, backend=backend).slice(tl, [10 * DAY, 10 * DAY])
    kjt = b.to_kjt()
    assert kjt.keys() == spec.feature_names and kjt.stride() == 2
    jt = kjt["rate.high.all.media"]
    assert jt.lengths().tolist() == [1, 1]
    assert jt.values().tolist() == [3, 4] and jt.weights().tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------------------------
# numpy and numba backends agree with each other on larger random data
# ------------------------------------------------------------------------------------------------------
def _assert_same_bags(a: SlicedBatch, b: SlicedBatch) -> None:
    """Same keys, lengths, raw counts and bags (each bag as sorted (id, weight) pairs; weights allclose)."""
    assert a.keys == b.keys and a.batch_size == b.batch_size
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.raw_counts, b.raw_counts)
    seg = np.repeat(np.arange(len(a.lengths)), a.lengths)
    oa, ob = np.lexsort((a.weights, a.values, seg)), np.lexsort((b.weights, b.values, seg))
    np.testing.assert_array_equal(a.values[oa], b.values[ob])
    np.testing.assert_allclose(a.weights[oa], b.weights[ob], rtol=1e-5, atol=1e-7)
    assert a.weights.dtype == b.weights.dtype == np.float32 and a.values.dtype == b.values.dtype == np.int64
    sums = np.bincount(seg, weights=a.weights.astype(np.float64), minlength=len(a.lengths))
    np.testing.assert_allclose(sums[a.lengths > 0], 1.0, rtol=1e-5)


def _random_timelines(seed: int, users: int = 300, topics: bool = True) -> tuple[Timelines, np.ndarray]:
    """Users with empty / explicit-only / implicit-only timelines; items whose author and topics are item
    attributes (most users) or drawn per event; unknown authors, events without topics, non-videos (NaN
    duration), zero durations and dwell, dwell / watch-ratio / debiased-score values exactly on band edges,
    events exactly on the 24 h gap and on window starts, and long histories that hit a small cap.
    ``topics=False``: no event has a topic (an empty topic-id column)."""
    rng = np.random.default_rng(seed)
    r = np.full(users, 40 * DAY, np.int64)
    tables = []
    for kind in ("explicit", "implicit"):
        n_u = rng.integers(0, 70, users)
        n_u[rng.random(users) < 0.15] = 0  # explicit-only / implicit-only / empty users
        n_u[rng.random(users) < 0.05] = 400  # long histories: the cap (300 below) applies
        uid = np.repeat(np.arange(users), n_u)
        n = len(uid)
        ts = r[uid] - rng.integers(0, 30 * DAY, n)
        edge = rng.random(n)
        for lo_, hi_, delta in (
            (0.0, 0.03, DAY),
            (0.03, 0.05, DAY - 1),
            (0.05, 0.08, DAY + 3 * DAY),
            (0.08, 0.1, 7 * DAY),
            (0.1, 0.12, 7 * DAY + 1),
        ):
            sel = (edge >= lo_) & (edge < hi_)
            ts[sel] = r[uid[sel]] - delta
        media = rng.integers(0, 400, n)
        per_event = rng.random(users)[uid] < 0.2  # these users' events draw author / topics per event
        author = np.where(per_event, rng.integers(0, 50, n), media % 37)
        author = np.where((media % 11 == 0) | (per_event & (rng.random(n) < 0.1)), -1, author)
        ntop = np.where(per_event, rng.integers(0, 4, n), media % 4) * topics
        toff = np.concatenate([[0], np.cumsum(ntop)]).astype(np.int32)
        first = np.repeat(media, ntop) * 7 + (np.arange(toff[-1]) - np.repeat(toff[:-1], ntop)) * 13
        tv = np.where(np.repeat(per_event, ntop), rng.integers(0, 60, toff[-1]), first % 60)
        cols = dict(
            user_id=uid,
            ts=ts,
            media_id=media,
            author_id=pa.array(author, mask=author < 0),
            topic_ids=pa.ListArray.from_arrays(pa.array(toff), pa.array(tv, pa.int64())),
            media_type=rng.choice(["video", "image", "ad", "live"], n),
            surface=rng.choice(["feed", "reels", "explore", "profile", "search", "web"], n),
        )
        if kind == "explicit":
            cols["action"] = rng.choice(
                ["like", "hate", "follow", "comment", "save", "long_view", "rate_high", "tag"], n
            )
        else:
            dur = rng.choice([3.0, 15.0, 1.0, 4.0, 0.0, np.nan, 60.0], n)
            dur = np.where(rng.random(n) < 0.5, rng.uniform(0, 120, n), dur).astype(np.float32)
            dwell = rng.choice([0.0, 1.0, 2.0, 3.0, 15.0, 60.0], n)
            dwell = np.where(rng.random(n) < 0.5, rng.exponential(20, n), dwell).astype(np.float32)
            cols.update(video_duration=pa.array(dur, mask=np.isnan(dur)), dwell_time=dwell)
        tables.append(pa.table(cols))
    tl = Timelines.from_arrow(tables[0], tables[1], Vocabulary(), user_ids=list(range(users)))
    return tl, r


def _variants() -> list[SliceSpec]:
    kuai = SliceSpec.load_default("kuairand")
    huge = {k: {**v, "hash_size": 2**40 + 15} for k, v in kuai.raw["id_types"].items()}  # hash-table path
    # media and author with one hash size (as dv365-train's configs set them): each id type must still get
    # its own direct-mapped code table (a shared one mixed media and author codes: out-of-range ids)
    same = {k: {**v, "hash_size": 20011 if k in ("media", "author") else 1009} for k, v in kuai.raw["id_types"].items()}
    # two watch-ratio exponents and two debiased gammas: several ratio / score bins per event
    fams = [f for f in kuai.raw["families"] if f["name"] in ("ratio", "debiased")]
    more = [
        {**fams[0], "name": "ratio2", "beta": 0.5},
        {**fams[1], "name": "deb2", "slices": {"g05": {"debiased": {"gamma": 0.5, "s0": 0.7}}}},
    ]
    return [
        kuai,
        SliceSpec.from_dict({**kuai.raw, "families": kuai.raw["families"] + more}),
        SliceSpec.from_dict({**kuai.raw, "cap": 300, "id_types": huge}),
        SliceSpec.load_default("movielens"),
        SliceSpec.from_dict(SMALL_SPEC),
        _no_dedup(kuai),
        SliceSpec.from_dict({**kuai.raw, "id_types": same}),
    ]


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("seed", [0, 1])
def test_numba_backend_matches_numpy_backend(seed: int) -> None:
    from dv365.core.slicing.numba_backend import NumbaSlicer

    tl, r = _random_timelines(seed)
    for spec in _variants():
        expect = Slicer(spec, tl.vocab, backend="numpy").slice(tl, r)
        fast = Slicer(spec, tl.vocab, backend="numba")
        _assert_same_bags(expect, fast.slice(tl, r))
        _assert_same_bags(expect, fast.slice(tl, r))  # reused per-thread buffers and caches
        assert isinstance(fast._impl, NumbaSlicer)
        fast._impl.derive = False  # every author / topic bag counted from its occurrences
        _assert_same_bags(expect, fast.slice(tl, r))


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
def test_numba_backend_matches_numpy_without_any_topic() -> None:
    """A batch whose topic column is empty (no event has a topic): the topic-list packing reads nothing."""
    tl, r = _random_timelines(2, users=60, topics=False)
    assert tl.implicit.topic_values.size == tl.explicit.topic_values.size == 0
    for spec in (SliceSpec.load_default("kuairand"), SliceSpec.from_dict(SMALL_SPEC)):
        _assert_same_bags(
            Slicer(spec, tl.vocab, backend="numpy").slice(tl, r), Slicer(spec, tl.vocab, backend="numba").slice(tl, r)
        )


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("cache_slots", [None, 2])
def test_numba_backend_matches_numpy_on_generated_long_histories(
    cache_slots: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catalog-consistent SIMULATED users (author / topics are item attributes: the derived bags), rows
    longer than one kernel block; with a 2-slot duration cache, items evict each other's entries."""
    import dv365.core.slicing.numba_backend as numba_backend
    from dv365.core.synth import SynthConfig, generate_timelines

    if cache_slots:
        monkeypatch.setattr(numba_backend, "_DURATION_CACHE", cache_slots)
    tl = generate_timelines(SynthConfig(users=6, mean_events=3000, seed=1))
    last = np.array(
        [
            max(int(t.ts[t.offsets[i + 1] - 1]) if t.lengths[i] else 0 for t in (tl.explicit, tl.implicit))
            for i in range(len(tl))
        ]
    )
    spec = SliceSpec.load_default("kuairand")
    for req in (last + spec.gap_s, last - 5 * DAY):
        _assert_same_bags(
            Slicer(spec, tl.vocab, backend="numpy").slice(tl, req),
            Slicer(spec, tl.vocab, backend="numba").slice(tl, req),
        )


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
def test_debiased_score_on_its_threshold_decides_like_numpy() -> None:
    """``s = ln(1 + dwell) / ln(1 + duration)`` exactly 0.5 (dwell 1, duration 3; dwell 3, duration 15) is not
    ``> 0.5``: the numba backend's fast log must not flip such events; a ratio exactly on a band edge too."""
    n = 6
    im = pa.table(
        {
            "user_id": [1] * n,
            "ts": np.arange(n),
            "media_id": np.arange(n),
            "video_duration": np.array([3, 15, 3, 15, 4, 1], np.float32),
            "dwell_time": np.array([1, 3, 1.0001, 3.0001, 2, 1], np.float32),
        }
    )
    tl = Timelines.from_arrow(None, im)
    spec = SliceSpec.load_default("kuairand")
    a = Slicer(spec, tl.vocab, backend="numpy").slice(tl, [10 * DAY])
    b = Slicer(spec, tl.vocab, backend="numba").slice(tl, [10 * DAY])
    _assert_same_bags(a, b)
    assert sorted(b.bag("debiased.s05.all.media", 0)[0].tolist()) == [2, 3, 4, 5]
    small = SliceSpec.from_dict(SMALL_SPEC)  # ratio band edge 1.0 with beta 0.5: dwell 2 / sqrt(4) = 1.0
    _assert_same_bags(
        Slicer(small, tl.vocab, backend="numpy").slice(tl, [10 * DAY]),
        Slicer(small, tl.vocab, backend="numba").slice(tl, [10 * DAY]),
    )


def test_backend_choice_and_missing_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SliceSpec.load_default("movielens")
    assert Slicer(spec, Vocabulary(), backend="numpy").backend == "numpy"
    assert Slicer(spec, Vocabulary()).backend == ("numba" if HAS_NUMBA else "numpy")  # default: auto
    assert Slicer(spec, Vocabulary(), backend="auto").backend == ("numba" if HAS_NUMBA else "numpy")
    with pytest.raises(ValueError, match="backend must be one of"):
        Slicer(spec, Vocabulary(), backend="cuda")
    monkeypatch.setitem(sys.modules, "dv365.core.slicing.numba_backend", None)  # as if numba were not installed
    assert Slicer(spec, Vocabulary(), backend="auto").backend == "numpy"
    with pytest.raises(ImportError, match=r"pip install 'dv365-core\[fast\]'"):
        Slicer(spec, Vocabulary(), backend="numba")


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
def test_numba_slicer_pickles() -> None:
    """A Slicer travels to DataLoader worker processes (its per-thread scratch does not)."""
    import pickle

    tl, r = _random_timelines(5, users=20)
    spec = SliceSpec.load_default("kuairand")
    fast = Slicer(spec, tl.vocab, backend="numba")
    fast.slice(tl, r)
    again = pickle.loads(pickle.dumps(fast))
    assert again.backend == "numba"
    _assert_same_bags(fast.slice(tl, r), again.slice(tl, r))


# one order inside dedup'd bags (dv365.core.slicing.canonical): numba's output becomes bit-identical to numpy's
def _mixed_dedup(spec: SliceSpec) -> SliceSpec:
    """Media bags dedup'd, author / topic bags every occurrence in time order."""
    ids = {k: {**v, "dedup": k == "media"} for k, v in spec.raw["id_types"].items()}
    return SliceSpec.from_dict({**spec.raw, "id_types": ids})


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("with_numba_sort", [True, False])
def test_canonical_order_makes_numba_bit_identical_to_numpy(
    with_numba_sort: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dv365.core.slicing.canonical as canonical

    if not with_numba_sort:  # the numpy fallback (no numba) sorts the same way
        monkeypatch.setattr(canonical, "_sort_bags_numba", None)
    tl, r = _random_timelines(3)
    kuai = SliceSpec.load_default("kuairand")
    huge = {k: {**v, "hash_size": 2**40 + 15} for k, v in kuai.raw["id_types"].items()}
    specs = [kuai, _mixed_dedup(kuai), SliceSpec.from_dict({**kuai.raw, "id_types": huge}), _no_dedup(kuai)]
    for spec in specs:
        expect = Slicer(spec, tl.vocab, backend="numpy").slice(tl, r)
        got = Slicer(spec, tl.vocab, backend="numba").slice(tl, r)
        mask = canonical.dedup_keys(spec)
        assert mask.tolist() == [spec.tables[f.table].dedup for f in spec.features]
        before = got.values.copy()
        assert canonical.canonical_order(got, mask) is got
        assert np.array_equal(got.lengths, expect.lengths)
        assert np.array_equal(got.values, expect.values), spec.name
        assert np.array_equal(got.weights.view(np.int32), expect.weights.view(np.int32)), spec.name
        if not mask.any():  # nothing to sort: time-ordered bags are untouched
            assert np.array_equal(before, got.values)
    with pytest.raises(ValueError, match="dedup mask has 3 entries"):
        canonical.canonical_order(got, np.ones(3, bool))
