"""Tests of the long-history generator (dv365.core.synth). Output is SIMULATED; the catalog is the real one."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dv365.core.catalog import load_kuairand_catalog
from dv365.core.cli import main
from dv365.core.synth import (
    SOURCE,
    SynthConfig,
    generate,
    generate_requests,
    generate_timelines,
    generate_user,
    universe_for,
    write_synth_dataset,
)
from dv365.core.synth.universe import _alias_draw, alias_table
from dv365.core.synth.user import clipped_lognormal_mean, events_mu, split_counts
from dv365.core.timeline import EventTable, TimelineDataset, Timelines
from dv365.core.validation import validate_table
from dv365.core.vocab import Vocabulary

VOCAB = Vocabulary()
SMALL = SynthConfig(users=20, mean_events=2_000, max_events=4_000, days=120, requests_per_user=10)


@pytest.fixture(scope="module")
def catalog():
    return load_kuairand_catalog()


@pytest.fixture(scope="module")
def universe(catalog):
    return universe_for(SMALL, catalog)


@pytest.fixture(scope="module")
def stats_data(universe):
    cfg = SynthConfig(users=200, mean_events=2_000, max_events=4_000, days=120, requests_per_user=5)
    return cfg, generate_timelines(cfg, universe)


def _assert_tables_equal(a: EventTable, b: EventTable) -> None:
    for name in (
        "user_ids",
        "offsets",
        "ts",
        "media_id",
        "author_id",
        "topic_offsets",
        "topic_values",
        "media_type",
        "surface",
        "action",
        "value",
        "video_duration",
        "dwell_time",
    ):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def _user_rows(t: EventTable, row: int) -> slice:
    return slice(int(t.offsets[row]), int(t.offsets[row + 1]))


# ---------------------------------------------------------------------------------------------------------
# determinism and independence
# ---------------------------------------------------------------------------------------------------------
def test_same_seed_same_output(universe):
    tl1, rq1 = generate(SMALL, universe)
    tl2, rq2 = generate(SMALL, universe)
    _assert_tables_equal(tl1.explicit, tl2.explicit)
    _assert_tables_equal(tl1.implicit, tl2.implicit)
    assert rq1.equals(rq2)


def test_different_seed_different_output(catalog):
    a = generate_timelines(SynthConfig(users=3, mean_events=1_000, days=60, seed=1), catalog)
    b = generate_timelines(SynthConfig(users=3, mean_events=1_000, days=60, seed=2), catalog)
    assert a.implicit.num_events != b.implicit.num_events or not np.array_equal(
        a.implicit.media_id, b.implicit.media_id
    )


def test_user_independent_of_user_count(universe):
    few = generate_timelines(SMALL, universe, user_ids=[3])
    many = generate_timelines(dataclasses.replace(SMALL, users=50), universe)
    row = int(np.flatnonzero(many.user_ids == 3)[0])
    for kind in ("explicit", "implicit"):
        a, b = getattr(few, kind), getattr(many, kind)
        sa, sb = _user_rows(a, 0), _user_rows(b, row)
        np.testing.assert_array_equal(a.ts[sa], b.ts[sb])
        np.testing.assert_array_equal(a.media_id[sa], b.media_id[sb])
    r1 = generate_requests(SMALL, universe, user_ids=[3])
    r2 = generate_requests(SMALL, universe, user_ids=[7, 3])
    assert r1.equals(r2.filter(pa.compute.equal(r2.column("user_id"), 3)))


# ---------------------------------------------------------------------------------------------------------
# sizes, time span, order
# ---------------------------------------------------------------------------------------------------------
def test_stats_match_request(stats_data):
    cfg, tl = stats_data
    n = tl.lengths()
    assert len(n) == 200
    assert abs(n.mean() - cfg.mean_events) < 0.1 * cfg.mean_events
    assert n.max() <= cfg.max_events and n.min() >= 1
    ex_share = tl.explicit.num_events / tl.num_events
    assert 0.18 < ex_share < 0.33


def test_span_and_sorted(stats_data):
    cfg, tl = stats_data
    for row in range(len(tl)):
        ts = np.concatenate(
            [tl.explicit.ts[_user_rows(tl.explicit, row)], tl.implicit.ts[_user_rows(tl.implicit, row)]]
        )
        assert (ts.max() - ts.min()) / 86_400 >= 0.9 * cfg.days
        assert ts.min() >= cfg.start_ts and ts.max() < cfg.end_ts
        for t in (tl.explicit, tl.implicit):
            assert np.all(np.diff(t.ts[_user_rows(t, row)]) >= 0)


def test_paper_sizes_by_default(catalog):
    cfg = SynthConfig(users=4, requests_per_user=2)
    assert (cfg.mean_events, cfg.max_events, cfg.max_implicit, cfg.max_explicit, cfg.days) == (
        40_000,
        70_000,
        35_000,
        35_000,
        400,
    )
    tl = generate_timelines(cfg, catalog, user_ids=[1, 4, 18, 1000])  # 4: a heavy user (70K events)
    n = tl.lengths()
    assert n.max() <= 70_000 and n.mean() > 20_000
    assert tl.implicit.lengths.max() <= 35_000 and tl.explicit.lengths.max() <= 35_000
    assert (tl.explicit.ts.max() - tl.explicit.ts.min()) / 86_400 >= 365


def test_heavy_user_keeps_most_recent_impressions(catalog):
    cfg = SynthConfig(
        users=1, mean_events=60_000, max_events=70_000, min_events=59_000, events_sigma=0.01, requests_per_user=0
    )
    h = generate_user(cfg, catalog, user_id=0)
    assert len(h.imp_ts) == cfg.max_implicit and h.profile.n_impressions > cfg.max_implicit
    assert len(h.imp_ts) + len(h.exp_ts) == pytest.approx(h.profile.n_events, rel=0.02)
    assert h.exp_ts.min() < h.imp_ts.min()  # explicit history reaches further back than the capped implicit one


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 70_000), share=st.floats(0.02, 0.8), cap_i=st.integers(1, 35_000), cap_e=st.integers(0, 35_000))
def test_split_counts_invariants(n, share, cap_i, cap_e):
    n = min(n, cap_i + cap_e)
    n_im, n_ex, n_full = split_counts(n, share, cap_i, cap_e)
    assert 1 <= n_im <= cap_i and 0 <= n_ex <= cap_e
    assert n_im + n_ex == n
    assert n_im <= n_full <= max(4 * cap_i, n_im)


def test_event_count_distribution_mean():
    mu = events_mu(40_000.0, 0.3, 100.0, 70_000.0)
    assert clipped_lognormal_mean(mu, 0.3, 100.0, 70_000.0) == pytest.approx(40_000.0, rel=1e-6)
    z = np.random.default_rng(0).standard_normal(400_000)
    assert np.clip(np.exp(mu + 0.3 * z), 100, 70_000).mean() == pytest.approx(40_000.0, rel=0.005)


# ---------------------------------------------------------------------------------------------------------
# items come from the real catalog
# ---------------------------------------------------------------------------------------------------------
def test_items_from_real_catalog(stats_data, catalog):
    _, tl = stats_data
    for t in (tl.explicit, tl.implicit):
        rows = catalog.index_of(t.media_id)
        assert np.all(rows >= 0)
        np.testing.assert_array_equal(t.author_id, catalog.author_id[rows])
        lens = np.diff(t.topic_offsets)
        np.testing.assert_array_equal(lens, np.diff(catalog.tag_offsets)[rows])
        is_ad = catalog.video_type[rows] == "AD"
        no_dur = np.isnan(catalog.duration_s[rows])
        expect = np.where(
            is_ad,
            VOCAB.code("media_types", "ad"),
            np.where(no_dur, VOCAB.code("media_types", "image"), VOCAB.code("media_types", "video")),
        )
        np.testing.assert_array_equal(t.media_type, expect)
    im = tl.implicit
    rows = catalog.index_of(im.media_id)
    np.testing.assert_array_equal(im.video_duration, catalog.duration_s[rows].astype(np.float32))  # NaN == NaN
    sample = np.random.default_rng(0).choice(len(rows), 500, replace=False)
    for i in sample:  # topic ids are the catalog's tags
        got = im.topic_values[im.topic_offsets[i] : im.topic_offsets[i + 1]]
        want = catalog.tag_values[catalog.tag_offsets[rows[i]] : catalog.tag_offsets[rows[i] + 1]]
        np.testing.assert_array_equal(got, want)
    assert len(np.unique(im.media_id)) > 3_000  # the generator uses much of the catalog
    assert np.all(im.dwell_time > 0) and np.all(np.isfinite(im.dwell_time))
    surfaces = {VOCAB.surfaces[c] for c in np.unique(im.surface)}
    assert surfaces == {"feed", "explore", "reels", "profile", "search"}


def test_explicit_events_follow_an_impression(stats_data):
    _, tl = stats_data
    ex, im = tl.explicit, tl.implicit
    for row in range(0, len(tl), 10):
        se, si = _user_rows(ex, row), _user_rows(im, row)
        key_i = im.media_id[si] * (1 << 31) + im.ts[si]
        order = np.argsort(key_i)
        key_e = ex.media_id[se] * (1 << 31) + ex.ts[se]
        pos = np.searchsorted(key_i[order], key_e, side="right") - 1
        assert np.all(pos >= 0)
        j = order[pos]
        assert np.array_equal(im.media_id[si][j], ex.media_id[se])
        gap = ex.ts[se] - im.ts[si][j]
        assert np.all((gap >= 0) & (gap <= np.ceil(im.dwell_time[si][j]) + 1))


# ---------------------------------------------------------------------------------------------------------
# behaviour model
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def behaviour(universe):
    cfg = SynthConfig(users=40, mean_events=8_000, max_events=16_000, days=120, requests_per_user=200)
    return cfg, [generate_user(cfg, universe, u) for u in range(cfg.users)]


def test_action_rates_plausible(behaviour):
    _, hs = behaviour
    impressions = sum(h.profile.n_impressions for h in hs)
    counts = np.bincount(np.concatenate([h.exp_action for h in hs]), minlength=len(VOCAB.actions))
    rate = {a: counts[VOCAB.code("actions", a)] / impressions for a in VOCAB.actions}
    assert 0.025 < rate["like"] < 0.06
    assert 0.001 < rate["follow"] < 0.006
    assert 0.002 < rate["comment"] < 0.01
    assert 0.001 < rate["forward"] < 0.008
    assert 0.0005 < rate["hate"] < 0.005
    assert 0.001 < rate["save"] < 0.01
    assert 0.01 < rate["profile_enter"] < 0.05
    assert 0.12 < rate["long_view"] < 0.35
    assert counts[[VOCAB.code("actions", a) for a in ("rate_high", "rate_mid", "rate_low", "tag")]].sum() == 0
    skip = np.mean(np.concatenate([h.imp_dwell for h in hs]) < 3.0)
    assert 0.15 < skip < 0.5  # skips (< 3 s) are common


def test_dwell_increases_with_affinity(behaviour):
    _, hs = behaviour
    aff = np.concatenate([h.imp_affinity for h in hs])
    dwell = np.concatenate([h.imp_dwell for h in hs])
    assert np.corrcoef(aff, np.log1p(dwell))[0, 1] > 0.2
    q = np.quantile(aff, [0.25, 0.75])
    low, high = dwell[aff <= q[0]], dwell[aff >= q[1]]
    assert np.median(high) > 2 * np.median(low)
    assert np.mean(low < 3) > np.mean(high < 3) + 0.15  # skips concentrate on low-affinity items


def test_likes_and_hates_follow_affinity(behaviour, universe):
    _, hs = behaviour
    like, hate = VOCAB.code("actions", "like"), VOCAB.code("actions", "hate")
    aff_like, aff_hate, aff_all = [], [], []
    for h in hs:
        epoch = h.profile.epoch_of_day[(h.exp_ts - SynthConfig(days=120).start_ts) // 86_400]
        from dv365.core.synth import affinity

        a = affinity(behaviour[0], universe, h.profile, h.exp_item, epoch)
        aff_like.append(a[h.exp_action == like])
        aff_hate.append(a[h.exp_action == hate])
        aff_all.append(h.imp_affinity)
    assert np.mean(np.concatenate(aff_like)) > np.mean(np.concatenate(aff_all)) + 0.1
    assert np.mean(np.concatenate(aff_hate)) < np.mean(np.concatenate(aff_all))


def test_request_labels_follow_long_term_interests(behaviour, universe):
    """Stable long-term interests exist by construction: targets on a user's top long-term topics get
    more likes / long views / watch time than other targets, and histories show those topics."""
    cfg, hs = behaviour
    top_like, other_like, top_lv, other_lv, top_wt, other_wt = [], [], [], [], [], []
    history_share, base_share = [], []
    for h in hs:
        top = set(h.profile.top_topics(universe, 3).tolist())
        cat = universe.catalog
        on_top = np.array(
            [bool(top & set(cat.tag_values[cat.tag_offsets[r] : cat.tag_offsets[r + 1]].tolist())) for r in h.req_item]
        )
        lab = h.req_labels
        top_like.append(lab["label_like"][on_top])
        other_like.append(lab["label_like"][~on_top])
        top_lv.append(lab["label_long_view"][on_top])
        other_lv.append(lab["label_long_view"][~on_top])
        top_wt.append(lab["label_watch_time"][on_top])
        other_wt.append(lab["label_watch_time"][~on_top])
        top_dense = np.isin(universe.item_topics, np.searchsorted(universe.topics, sorted(top))).any(axis=1)
        history_share.append(top_dense[h.imp_item].mean())
        base_share.append(top_dense[universe.explore_rows].mean())
    m = lambda xs: float(np.mean(np.concatenate(xs)))  # noqa: E731
    assert m(top_like) > 1.5 * m(other_like)
    assert m(top_lv) > m(other_lv) + 0.05
    assert m(top_wt) > 1.3 * m(other_wt)
    assert np.mean(history_share) > np.mean(base_share) + 0.2  # the history reveals the long-term topics


def test_short_term_interests_drift(behaviour):
    cfg, hs = behaviour
    for h in hs[:5]:
        th = h.profile.theta_short
        assert th.shape[0] >= cfg.days / cfg.short_term_days / 2
        assert np.abs(th[0] - th[-1]).sum() > 0.2  # drifted
        np.testing.assert_allclose(th.sum(axis=1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(h.profile.theta_long.sum(), 1.0, rtol=1e-6)


def test_requests_schema_times_and_labels(behaviour, universe):
    cfg, hs = behaviour
    from dv365.core.synth import requests_table

    t = requests_table(hs, universe, cfg)
    assert t.num_rows == cfg.users * cfg.requests_per_user
    for name in (
        "label_like",
        "label_follow",
        "label_comment",
        "label_forward",
        "label_hate",
        "label_long_view",
        "label_watch_time",
    ):
        assert t.schema.field(name).type == pa.float32()
    for name in ("label_like", "label_follow", "label_comment", "label_forward", "label_hate", "label_long_view"):
        assert set(np.unique(t.column(name).to_numpy())) <= {0.0, 1.0}
    assert (t.column("label_watch_time").to_numpy() > 0).all()
    ts = t.column("ts").to_numpy()
    lo, hi = cfg.request_window()
    assert ts.min() >= lo >= cfg.start_ts + 30 * 86_400 and ts.max() < hi
    validate_table(t, "requests", VOCAB)  # raises on any bad record
    assert 0.02 < t.column("label_like").to_numpy().mean() < 0.08


def test_alias_table_matches_weights():
    w = np.array([5.0, 1.0, 0.0, 3.0, 1.0])
    prob, alias = alias_table(w)
    u = np.random.default_rng(0).random(200_000)
    freq = np.bincount(_alias_draw(prob, alias, 0, len(w), u), minlength=len(w)) / len(u)
    np.testing.assert_allclose(freq, w / w.sum(), atol=0.005)


def test_config_validation():
    with pytest.raises(ValueError, match="mean_events"):
        SynthConfig(mean_events=80_000)
    with pytest.raises(ValueError, match="min_history_days"):
        SynthConfig(days=20)
    with pytest.raises(ValueError, match="short_term_weight"):
        SynthConfig(short_term_weight=1.5)
    SynthConfig(days=20, requests_per_user=0)  # no requests: short spans are fine


# ---------------------------------------------------------------------------------------------------------
# dataset on disk and the CLI
# ---------------------------------------------------------------------------------------------------------
def test_written_dataset_validates_and_is_simulated(tmp_path, universe):
    cfg = SynthConfig(users=12, mean_events=1_500, max_events=3_000, days=90, requests_per_user=4)
    url = str(tmp_path / "synth")
    meta = write_synth_dataset(cfg, url, universe, progress=False, num_buckets=4, chunk_events=5_000)
    ds = TimelineDataset(url)
    assert ds.meta.simulated is True and ds.meta.source == SOURCE == "synth:kuairand-pure"
    assert "SIMULATED" in ds.meta.extra["simulated"]
    assert ds.meta.extra["synth_config"]["seed"] == cfg.seed and ds.meta.extra["requests"] == 48
    assert meta.stats["users"] == 12 and meta.stats["span_days"] >= 0.9 * cfg.days
    tl_mem, req_mem = generate(cfg, universe)
    tl_disk = ds.read_users(tl_mem.user_ids)
    for kind in ("explicit", "implicit"):  # the Arrow round trip (with validation) gives back the same data
        _assert_tables_equal(getattr(tl_disk, kind), getattr(tl_mem, kind))
    req_disk = ds.requests().sort_by([("user_id", "ascending"), ("ts", "ascending")])
    assert req_disk.num_rows == req_mem.num_rows
    for name in req_mem.column_names:
        if name != "topic_ids":
            np.testing.assert_array_equal(
                req_disk.column(name).to_numpy(zero_copy_only=False),
                req_mem.column(name).to_numpy(zero_copy_only=False),
                err_msg=name,
            )
    again = Timelines.from_arrow(ds.read_table("explicit"), ds.read_table("implicit"), ds.vocab)  # validates
    assert again.num_events == tl_mem.num_events


def test_cli_smoke(tmp_path, capsys):
    out = tmp_path / "cli-synth"
    rc = main(
        [
            "synth",
            "--out",
            str(out),
            "--users",
            "6",
            "--mean-events",
            "1000",
            "--max-events",
            "2000",
            "--days",
            "60",
            "--requests-per-user",
            "3",
            "--buckets",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "SIMULATED" in text
    for word in ("users", "events per user", "span", "explicit / implicit", "requests"):
        assert word in text
    ds = TimelineDataset(str(out))
    assert ds.meta.simulated and ds.meta.stats["users"] == 6
    assert ds.requests().num_rows == 18


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["synth", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "SIMULATED" in text and "--mean-events" in text and "KuaiRand" in text


def test_cli_bad_config(tmp_path, capsys):
    rc = main(["synth", "--out", str(tmp_path / "x"), "--mean-events", "90000", "--no-progress"])
    assert rc == 2
    assert "mean_events" in capsys.readouterr().err


def test_timelines_fast_enough_smoke(universe):
    """Not a benchmark: generating one 40K-event user must not take seconds (measured: ~20 ms)."""
    import time

    cfg = SynthConfig(users=1, min_events=39_999, mean_events=40_000, events_sigma=0.01, requests_per_user=0)
    generate_timelines(cfg, universe)
    t = time.perf_counter()
    tl = generate_timelines(cfg, universe)
    assert tl.num_events == pytest.approx(40_000, rel=0.02)
    assert time.perf_counter() - t < 1.0
    assert math.isfinite(float(tl.implicit.dwell_time.sum()))


def test_cli_refuses_to_overwrite_a_foreign_folder(tmp_path, capsys):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    rc = main(["synth", "--out", str(folder), "--users", "2", "--mean-events", "500", "--days", "60", "--no-progress"])
    assert rc == 2 and "not a dv365 dataset" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "keep me"
