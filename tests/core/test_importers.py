"""Importers: MovieLens (real ml-latest-small + classic-layout fixtures), KuaiRand (fixture log joined with
the real catalog), generic CSV/Parquet, their errors, and ``dv365 import`` end to end."""

from __future__ import annotations

import csv
import math
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dv365.core.catalog import default_data_dir, load_kuairand_catalog
from dv365.core.errors import DatasetError, TimelineError
from dv365.core.importers import MappingError, import_generic, import_kuairand, import_movielens
from dv365.core.importers.kuairand import DEFAULT_TAB_SURFACES, FLAG_ACTIONS
from dv365.core.importers.movielens import GENRES, MovieLensSummary, detect_movielens_layout
from dv365.core.timeline import TimelineDataset
from dv365.core.validation import ValidationPolicy

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
KUAIRAND_LOG = FIXTURES / "kuairand-log" / "log_fixture.csv"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return default_data_dir()


def _mem_url() -> str:
    return f"memory://dv365-test-importers/{uuid.uuid4().hex}"


@pytest.fixture
def mem() -> Iterator[str]:
    """A fresh ``memory://`` dataset URL, removed afterwards."""
    url = _mem_url()
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def _rows(url: str, kind: str) -> list[dict[str, Any]]:
    """Every row of ``kind``, sorted so that datasets can be compared."""
    t = TimelineDataset(url).read_table(kind)
    return sorted(t.to_pylist(), key=lambda r: (r["user_id"], r["ts"], r["media_id"], r.get("action") or ""))


def _genre_id(name: str) -> int:
    return GENRES.index(name)


# ------------------------------------------------------------------------------------------------------
# MovieLens: the real ml-latest-small
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml_small(data_dir: Path) -> Iterator[tuple[MovieLensSummary, str]]:
    url = _mem_url()
    summary = import_movielens(data_dir / "movielens-latest-small", url)
    yield summary, url
    fsspec.filesystem("memory").rm(url, recursive=True)


def test_movielens_latest_small_counts(ml_small: tuple[MovieLensSummary, str]) -> None:
    s, url = ml_small
    assert (s.users, s.ratings, s.tags) == (610, 100_836, 3_683)
    assert (s.movies, s.unknown_movies, s.layout) == (9_742, 0, "latest")
    assert (s.explicit_events, s.implicit_events, s.requests) == (104_519, 0, 100_836)
    assert "explicit 104,519/104,519 records kept" in s.validation
    line = s.line()
    assert "610 users" in line and "100,836 ratings" in line and "3,683 tags" in line
    meta = TimelineDataset(url).meta
    assert meta.simulated is False and meta.source == "movielens:movielens-latest-small"
    assert meta.extra["layout"] == "latest" and meta.extra["genres"] == list(GENRES)
    assert meta.extra["genres"][0] == "(no genres listed)" and len(GENRES) == 20
    assert meta.stats["users"] == 610


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_movielens_user_timeline_read_back(ml_small: tuple[MovieLensSummary, str], data_dir: Path) -> None:
    _, url = ml_small
    src = data_dir / "movielens-latest-small"
    ratings = [r for r in _csv_rows(src / "ratings.csv") if r["userId"] == "1"]
    genres = {int(m["movieId"]): m["genres"].split("|") for m in _csv_rows(src / "movies.csv")}
    ds = TimelineDataset(url)
    tl = ds.read_users([1])
    ex = tl.explicit
    assert ex.num_events == len(ratings)  # user 1 has no tags
    assert np.all(np.diff(ex.ts) >= 0)
    t = ds.read_table("explicit", [1])
    by_key = {(int(r["movieId"]), int(r["timestamp"])): float(r["rating"]) for r in ratings}
    for row in t.to_pylist():
        rating = by_key[(row["media_id"], row["ts"])]
        assert row["value"] == rating
        band = "rate_high" if rating >= 4 else "rate_low" if rating <= 2 else "rate_mid"
        assert row["action"] == band
        assert row["topic_ids"] == sorted(_genre_id(g) for g in genres[row["media_id"]])
        assert (row["author_id"], row["media_type"], row["surface"]) == (None, "movie", "web")
    req = ds.requests([1]).to_pylist()
    assert len(req) == len(ratings)
    for r in req:
        rating = r["label_rating"]
        assert r["label_rate_ge4"] == float(rating >= 4) and r["label_rate_le2"] == float(rating <= 2)
        assert r["label_rate_5"] == float(rating == 5) and r["video_duration"] is None


def test_movielens_tags_become_tag_events(ml_small: tuple[MovieLensSummary, str], data_dir: Path) -> None:
    _, url = ml_small
    tags = [r for r in _csv_rows(data_dir / "movielens-latest-small" / "tags.csv") if r["userId"] == "2"]
    t = TimelineDataset(url).read_table("explicit", [2]).to_pylist()
    tag_events = [r for r in t if r["action"] == "tag"]
    assert len(tag_events) == len(tags) > 0
    assert all(r["value"] is None for r in tag_events)
    assert Counter(r["media_id"] for r in tag_events) == Counter(int(r["movieId"]) for r in tags)


# ------------------------------------------------------------------------------------------------------
# MovieLens: classic layouts (fixtures) == the same data in the modern layout
# ------------------------------------------------------------------------------------------------------
# The content of tests/fixtures/movielens-100k and movielens-1m, in modern genre spelling.
MOVIES = {
    1: ("Toy Story (1995)", ["Animation", "Children", "Comedy"]),
    2: ("GoldenEye (1995)", ["Action", "Adventure", "Thriller"]),
    29: ("Cité des enfants perdus, La (1995)", ["Adventure", "Sci-Fi"]),
    50: ("Star Wars: Episode IV - A New Hope (1977)", ["Action", "Adventure", "Romance", "Sci-Fi", "War"]),
    100: ("Fargo (1996)", ["Crime", "Drama", "Thriller"]),
    267: ("unknown", ["(no genres listed)"]),
    1252: ("Chinatown (1974)", ["Film-Noir", "Mystery", "Thriller"]),
}
RATINGS = [  # (user, movie, rating, ts); movie 9999 is rated but not in the movies file
    (1, 1, 5, 874965758),
    (1, 2, 3, 874965802),
    (1, 50, 4, 874966001),
    (1, 100, 2, 875071561),
    (1, 29, 1, 875072111),
    (1, 1252, 4, 876893171),
    (2, 1, 4, 888550871),
    (2, 267, 3, 888551001),
    (2, 100, 5, 888552084),
    (2, 9999, 2, 888553000),
    (2, 50, 5, 888600000),
    (3, 2, 1, 889236938),
    (3, 29, 5, 889237004),
    (3, 1252, 3, 889237122),
    (3, 1, 2, 889237455),
    (3, 50, 4, 889238000),
    (3, 100, 4, 889300000),
    (4, 100, 5, 892002353),
    (4, 50, 5, 892003000),
    (4, 2, 3, 892003619),
    (4, 267, 1, 892004000),
    (4, 1, 4, 892100000),
    (5, 1252, 2, 875635740),
    (5, 29, 4, 875636053),
    (5, 2, 5, 875636198),
    (5, 1, 3, 875637000),
    (5, 50, 1, 875638000),
    (5, 100, 3, 875700000),
    (5, 267, 4, 875700001),
    (5, 9999, 5, 875800000),
]


def _write_modern(d: Path, ratings: list[tuple[Any, ...]] = RATINGS, tags: list[tuple[Any, ...]] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    with (d / "movies.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["movieId", "title", "genres"])
        w.writerows([m, title, "|".join(g)] for m, (title, g) in MOVIES.items())
    with (d / "ratings.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        w.writerows(ratings)
    if tags is not None:
        with (d / "tags.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["userId", "movieId", "tag", "timestamp"])
            w.writerows(tags)
    return d


@pytest.mark.parametrize("layout, folder", [("100k", "movielens-100k"), ("1m", "movielens-1m")])
def test_classic_layout_matches_modern(layout: str, folder: str, tmp_path: Path) -> None:
    modern = _write_modern(tmp_path / "modern")
    assert detect_movielens_layout(str(FIXTURES / folder)) == layout
    a = import_movielens(FIXTURES / folder, tmp_path / "classic")
    b = import_movielens(modern, tmp_path / "modern-out")
    assert a.layout == layout and b.layout == "latest"
    for s in (a, b):
        assert (s.users, s.ratings, s.tags, s.movies, s.unknown_movies) == (5, 30, 0, 7, 1)
    for kind in ("explicit", "requests"):
        assert _rows(str(tmp_path / "classic"), kind) == _rows(str(tmp_path / "modern-out"), kind)
    assert TimelineDataset(str(tmp_path / "classic")).meta.extra["genres"] == list(GENRES)
    rows = {r["media_id"]: r["topic_ids"] for r in _rows(str(tmp_path / "classic"), "explicit")}
    assert rows[29] == sorted([_genre_id("Adventure"), _genre_id("Sci-Fi")])  # latin-1 title, comma in title
    assert rows[1] == sorted([_genre_id("Animation"), _genre_id("Children"), _genre_id("Comedy")])  # Children's
    assert rows[267] == [0] and rows[9999] == []  # "unknown" genre; a movie not in the movies file


def test_layout_is_forced_and_checked(tmp_path: Path) -> None:
    s = import_movielens(str(FIXTURES / "movielens-1m"), _mem_url(), layout="1m")
    assert s.ratings == 30
    with pytest.raises(DatasetError, match=r"u\.data: file not found"):
        import_movielens(FIXTURES / "movielens-1m", _mem_url(), layout="100k")
    with pytest.raises(DatasetError, match="unknown MovieLens layout 'ml-25m'"):
        import_movielens(FIXTURES / "movielens-1m", _mem_url(), layout="ml-25m")


def test_unknown_layout_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DatasetError, match=r"not a MovieLens folder: expected ratings\.csv \+ movies\.csv"):
        import_movielens(tmp_path, _mem_url())
    with pytest.raises(DatasetError, match="MovieLens folder not found"):
        import_movielens(tmp_path / "nope", _mem_url())
    both = _write_modern(tmp_path / "both")
    for f in ("ratings.dat", "movies.dat"):
        (both / f).write_bytes((FIXTURES / "movielens-1m" / f).read_bytes())
    with pytest.raises(DatasetError, match=r"several MovieLens layouts \(latest, 1m\)"):
        import_movielens(both, _mem_url())


def test_tags_csv_is_optional_and_read(tmp_path: Path, mem: str) -> None:
    d = _write_modern(tmp_path / "ml", tags=[(1, 50, "space opera", 874966100), (5, 9999, "mystery", 875800001)])
    s = import_movielens(d, mem)
    assert (s.ratings, s.tags, s.explicit_events, s.requests) == (30, 2, 32, 30)
    tags = [r for r in _rows(mem, "explicit") if r["action"] == "tag"]
    assert [(r["user_id"], r["media_id"], r["value"]) for r in tags] == [(1, 50, None), (5, 9999, None)]


def test_missing_column_names_column_and_file(tmp_path: Path) -> None:
    d = tmp_path / "ml"
    _write_modern(d)
    (d / "ratings.csv").write_text("userId,movieId,rating\n1,1,4.0\n")
    with pytest.raises(DatasetError, match=r"ratings\.csv: missing column 'timestamp'"):
        import_movielens(d, _mem_url())


def test_bad_value_raises_timeline_error_naming_field_and_user(tmp_path: Path, mem: str) -> None:
    bad = list(RATINGS)
    bad[13] = (3, 1252, 3, -5)  # a negative timestamp for user 3
    d = _write_modern(tmp_path / "ml", ratings=bad)
    with pytest.raises(TimelineError) as e:
        import_movielens(d, _mem_url())
    assert (e.value.field, e.value.user_id, e.value.value, e.value.reason) == ("ts", 3, -5, "negative_timestamp")
    assert e.value.record == 13 and "ratings.csv" in str(e.value)
    s = import_movielens(d, mem, policy=ValidationPolicy(on_error="drop"))
    assert (s.ratings, s.explicit_events, s.requests) == (30, 29, 29)
    assert "29/30" in s.validation


def test_unparsable_file_names_it(tmp_path: Path) -> None:
    d = _write_modern(tmp_path / "ml")
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,874965758\nx,1,4.0,874965758\n")
    with pytest.raises(DatasetError, match=r"ratings\.csv: cannot parse"):
        import_movielens(d, _mem_url())


# ------------------------------------------------------------------------------------------------------
# KuaiRand: fixture log joined with the REAL KuaiRand-Pure catalog
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kuairand(data_dir: Path) -> Iterator[tuple[Any, str]]:
    url = _mem_url()
    summary = import_kuairand([str(KUAIRAND_LOG)], url, catalog=data_dir / "kuairand-pure-catalog")
    yield summary, url
    fsspec.filesystem("memory").rm(url, recursive=True)


def _log_rows() -> list[dict[str, str]]:
    return _csv_rows(KUAIRAND_LOG)


def test_kuairand_summary(kuairand: tuple[Any, str]) -> None:
    s, url = kuairand
    log = _log_rows()
    flags = sum(int(r[c]) for r in log for c in FLAG_ACTIONS)
    assert (s.files, s.log_rows, s.users) == (1, 200, 5)
    assert (s.rows_not_in_catalog, s.videos_not_in_catalog) == (2, 1)
    assert (s.implicit_events, s.explicit_events, s.requests) == (200, flags, 200)
    meta = TimelineDataset(url).meta
    assert meta.simulated is False and meta.source == "kuairand:log_fixture.csv"
    assert meta.extra["tab_surfaces"]["1"] == DEFAULT_TAB_SURFACES[1]


def test_kuairand_implicit_events_joined_with_catalog(kuairand: tuple[Any, str]) -> None:
    _, url = kuairand
    cat = load_kuairand_catalog()
    events = {(r["user_id"], r["ts"], r["media_id"]): r for r in _rows(url, "implicit")}
    types = {"NORMAL": "video", "AD": "ad"}
    for i, row in enumerate(_log_rows()):
        vid = int(row["video_id"])
        e = events[(int(row["user_id"]), int(row["time_ms"]) // 1000, vid)]
        assert e["dwell_time"] == pytest.approx(int(row["play_time_ms"]) / 1000)
        assert e["surface"] == DEFAULT_TAB_SURFACES.get(int(row["tab"]), "other")
        (pos,) = cat.index_of(np.array([vid]))
        if pos < 0:
            assert (e["author_id"], e["topic_ids"], e["media_type"]) == (None, [], "other")
            continue
        assert e["author_id"] == cat.author_id[pos]
        assert e["topic_ids"] == cat.tag_values[cat.tag_offsets[pos] : cat.tag_offsets[pos + 1]].tolist()
        assert e["media_type"] == types.get(cat.video_type[pos], "other")
        log_dur = float(row["duration_ms"] or 0) / 1000
        want = log_dur if log_dur > 0 else float(cat.duration_s[pos])
        if math.isnan(want):
            assert e["video_duration"] is None, i
        else:
            assert e["video_duration"] == pytest.approx(want, rel=1e-6), i


def test_kuairand_fixture_special_rows(kuairand: tuple[Any, str]) -> None:
    _, url = kuairand
    cat = load_kuairand_catalog()
    log = _log_rows()
    events = {(r["user_id"], r["ts"], r["media_id"]): r for r in _rows(url, "implicit")}

    def event(i: int) -> dict[str, Any]:
        r = log[i]
        return events[(int(r["user_id"]), int(r["time_ms"]) // 1000, int(r["video_id"]))]

    assert event(0)["author_id"] is None and event(0)["media_id"] == 99999
    assert event(2)["video_duration"] == pytest.approx(float(cat.duration_s[cat.index_of(np.array([0]))[0]]))
    assert event(3)["video_duration"] == event(2)["video_duration"]  # duration_ms 0 -> catalog duration
    assert event(4)["video_duration"] is None  # video 7: no duration in the log nor in the catalog
    assert {e["media_type"] for e in events.values()} >= {"video", "ad", "other"}


def test_kuairand_flags_become_explicit_events(kuairand: tuple[Any, str]) -> None:
    _, url = kuairand
    got = Counter((r["user_id"], r["ts"], r["media_id"], r["action"]) for r in _rows(url, "explicit"))
    want: Counter[tuple[int, int, int, str]] = Counter()
    for r in _log_rows():
        for col, action in FLAG_ACTIONS.items():
            if int(r[col]):
                want[(int(r["user_id"]), int(r["time_ms"]) // 1000, int(r["video_id"]), action)] += 1
    assert got == want and set(a for *_, a in want) == set(FLAG_ACTIONS.values())


def test_kuairand_request_labels(kuairand: tuple[Any, str]) -> None:
    _, url = kuairand
    reqs = {(r["user_id"], r["ts"], r["media_id"]): r for r in _rows(url, "requests")}
    names = {
        "label_click": "is_click",
        "label_like": "is_like",
        "label_follow": "is_follow",
        "label_comment": "is_comment",
        "label_forward": "is_forward",
        "label_hate": "is_hate",
        "label_long_view": "long_view",
    }
    for row in _log_rows():
        q = reqs[(int(row["user_id"]), int(row["time_ms"]) // 1000, int(row["video_id"]))]
        for label, col in names.items():
            assert q[label] == float(row[col])
        assert q["label_watch_time"] == pytest.approx(int(row["play_time_ms"]) / 1000)


def test_kuairand_missing_column_and_tab_map(tmp_path: Path, mem: str) -> None:
    rows = _log_rows()[:20]
    cols = [c for c in rows[0] if c != "play_time_ms"]
    bad = tmp_path / "log_bad.csv"
    with bad.open("w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DatasetError, match=r"log_bad\.csv: missing column 'play_time_ms'"):
        import_kuairand([str(bad)], _mem_url())
    s = import_kuairand(str(KUAIRAND_LOG), mem, tab_surfaces={1: "feed"})
    surfaces = {r["surface"] for r in _rows(mem, "implicit")}
    assert surfaces == {"feed", "other"} and s.log_rows == 200
    with pytest.raises(MappingError, match="unknown surface"):
        import_kuairand(str(KUAIRAND_LOG), _mem_url(), tab_surfaces={1: "timeline"})


# ------------------------------------------------------------------------------------------------------
# generic
# ------------------------------------------------------------------------------------------------------
def test_generic_csv_with_mapping_and_constants(tmp_path: Path, mem: str) -> None:
    f = tmp_path / "likes.csv"
    f.write_text(
        "uid,time,item,creator,topics\n7,1700000000123,42,9,3|5\n7,1700000100999,43,,\n8,1700000050000,42,9,4\n"
    )
    s = import_generic(
        str(f),
        mem,
        kind="explicit",
        mapping={"user_id": "uid", "ts": "time", "media_id": "item", "author_id": "creator", "topic_ids": "topics"},
        constants={"action": "like", "surface": "feed", "media_type": "video"},
        time_unit="ms",
        list_sep="|",
    )
    assert (s.rows, s.users, s.explicit_events, s.implicit_events) == (3, 2, 3, 0)
    rows = _rows(mem, "explicit")
    assert [(r["user_id"], r["ts"], r["media_id"], r["author_id"], r["topic_ids"]) for r in rows] == [
        (7, 1700000000, 42, 9, [3, 5]),
        (7, 1700000100, 43, None, []),
        (8, 1700000050, 42, 9, [4]),
    ]
    assert {(r["action"], r["surface"], r["media_type"]) for r in rows} == {("like", "feed", "video")}
    assert TimelineDataset(mem).meta.source == "generic:likes.csv"


def test_generic_parquet_through_fsspec(mem: str) -> None:
    src = _mem_url() + "/views.parquet"
    table = pa.table(
        {
            "viewer": pa.array([1, 1, 2], pa.int64()),
            "at": pa.array([1_600_000_000_000, 1_600_000_060_000, 1_600_000_000_500], pa.timestamp("ms", tz="UTC")),
            "video": [10, 11, 10],
            "watch_ms": [1500.0, 30000.0, 250.0],
            "len_ms": [20000, 60000, 20000],
            "tags": [[1, 2], [], [2]],
        }
    )
    with fsspec.open(src, "wb") as fh:
        pq.write_table(table, fh)
    s = import_generic(
        src,
        mem,
        kind="implicit",
        mapping={
            "user_id": "viewer",
            "ts": "at",
            "media_id": "video",
            "dwell_time": "watch_ms",
            "video_duration": "len_ms",
            "topic_ids": "tags",
        },
        constants={"surface": "reels"},
        duration_unit="ms",
    )
    assert (s.rows, s.implicit_events) == (3, 3)
    rows = _rows(mem, "implicit")
    assert [(r["user_id"], r["ts"], r["dwell_time"], r["video_duration"], r["topic_ids"]) for r in rows] == [
        (1, 1_600_000_000, 1.5, 20.0, [1, 2]),
        (1, 1_600_000_060, 30.0, 60.0, []),
        (2, 1_600_000_000, 0.25, 20.0, [2]),
    ]
    assert {r["surface"] for r in rows} == {"reels"}


def test_generic_iso_timestamps_and_tsv(tmp_path: Path, mem: str) -> None:
    f = tmp_path / "events.tsv"
    f.write_text("u\tt\tm\n1\t2020-01-01T00:00:10Z\t5\n2\t2020-01-01T01:00:20+01:00\t6\n")
    import_generic(
        str(f), mem, kind="explicit", mapping={"user_id": "u", "ts": "t", "media_id": "m"}, constants={"action": "save"}
    )
    assert [r["ts"] for r in _rows(mem, "explicit")] == [1_577_836_810, 1_577_836_820]
    naive = tmp_path / "naive.csv"  # no zone offset: read as UTC
    naive.write_text("u,t,m\n1,2020-01-01 00:00:10,5\n")
    out = _mem_url()
    import_generic(
        str(naive),
        out,
        kind="explicit",
        mapping={"user_id": "u", "ts": "t", "media_id": "m"},
        constants={"action": "save"},
    )
    assert [r["ts"] for r in _rows(out, "explicit")] == [1_577_836_810]


def test_generic_mapping_errors(tmp_path: Path) -> None:
    f = tmp_path / "e.csv"
    f.write_text("uid,time,item\n1,100,5\n")
    base = {"user_id": "uid", "ts": "time", "media_id": "item"}
    with pytest.raises(MappingError, match=r"unknown UniTi field userid .* valid fields: user_id, ts, media_id"):
        import_generic(
            str(f), _mem_url(), kind="explicit", mapping={**base, "userid": "uid"}, constants={"action": "like"}
        )
    with pytest.raises(MappingError, match="required explicit field.*action"):
        import_generic(str(f), _mem_url(), kind="explicit", mapping=base)
    with pytest.raises(DatasetError, match=r"e\.csv: missing column 'dwell'"):
        import_generic(str(f), _mem_url(), kind="implicit", mapping={**base, "dwell_time": "dwell"})
    with pytest.raises(MappingError, match="kind must be one of"):
        import_generic(str(f), _mem_url(), kind="requests", mapping=base)
    with pytest.raises(DatasetError, match="cannot tell the file type"):
        import_generic(
            str(tmp_path / "e.json"), _mem_url(), kind="explicit", mapping=base, constants={"action": "like"}
        )


def test_generic_bad_value_names_field_and_user(tmp_path: Path) -> None:
    f = tmp_path / "views.csv"
    f.write_text("uid,time,item,dwell\n1,1600000100,5,2.5\n2,1600000101,5,abc\n")
    with pytest.raises(TimelineError) as e:
        import_generic(
            str(f),
            _mem_url(),
            kind="implicit",
            mapping={"user_id": "uid", "ts": "time", "media_id": "item", "dwell_time": "dwell"},
        )
    assert (e.value.field, e.value.user_id, e.value.value) == ("dwell_time", 2, "abc")
    assert "views.csv" in str(e.value)


# ------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------
def test_cli_import_movielens_end_to_end(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dv365.core.cli import main

    out = tmp_path / "ml"
    assert main(["import", "movielens", str(data_dir / "movielens-latest-small"), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("[import] ") for line in lines) == 3  # movies, ratings, tags
    assert lines[-1].startswith("imported movielens:movielens-latest-small")
    assert "610 users, 100,836 ratings, 3,683 tags" in lines[-1]
    assert TimelineDataset(str(out)).meta.stats["users"] == 610
    assert main(["import", "movielens", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert "not a MovieLens folder" in capsys.readouterr().err


def test_cli_generic_with_mapping_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dv365.core.cli import main

    f = tmp_path / "likes.csv"
    f.write_text("uid,time,item\n1,1600000001000,5\n2,1600000002000,6\n")
    m = tmp_path / "map.yaml"
    m.write_text("kind: explicit\nmap: {user_id: uid, ts: time}\nconst: {action: like}\ntime_unit: ms\n")
    out = tmp_path / "ds"
    rc = main(
        [
            "import",
            "generic",
            str(f),
            "--out",
            str(out),
            "--mapping-file",
            str(m),
            "--map",
            "media_id=item",
            "--const",
            "surface=feed",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("imported generic:likes.csv")
    assert [(r["user_id"], r["ts"], r["surface"]) for r in _rows(str(out), "explicit")] == [
        (1, 1_600_000_001, "feed"),
        (2, 1_600_000_002, "feed"),
    ]
    assert (
        main(["import", "generic", str(f), "--out", str(tmp_path / "y"), "--kind", "explicit", "--map", "user_id"]) == 1
    )
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_cli_kuairand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dv365.core.cli import main

    out = tmp_path / "kr"
    assert main(["import", "kuairand", str(KUAIRAND_LOG), "--out", str(out), "--tab-map", "1=feed"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "5 users" in last and "200 log rows" in last and "2 rows not in catalog" in last
