"""Exact duplicate input rows are dropped and counted (``duplicate_rows`` in the import summary), in every
importer; a KuaiRand impression that goes (dropped by validation, or a duplicate) takes its flag events
(like, follow, ...) and its request with it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dv365.core.catalog import default_data_dir
from dv365.core.errors import DatasetError, TimelineError
from dv365.core.importers import import_generic, import_kuairand, import_movielens
from dv365.core.importers.common import repeated_rows
from dv365.core.timeline import DatasetWriter, TimelineDataset
from dv365.core.validation import ValidationPolicy

LOG = Path(__file__).resolve().parents[1] / "fixtures" / "kuairand-log" / "log_fixture.csv"
CATALOG = default_data_dir() / "kuairand-pure-catalog"
DROP = ValidationPolicy(on_error="drop")
MAP = {"user_id": "uid", "ts": "time", "media_id": "item"}
CONST = {"action": "like"}
T0 = 1_600_000_000


def _keys(t: pa.Table, *cols: str) -> list[tuple[object, ...]]:
    return sorted(zip(*(t.column(c).to_pylist() for c in ("user_id", "ts", "media_id", *cols))))


def test_repeated_rows_marks_every_copy_after_the_first() -> None:
    t = pa.table(
        {
            "a": pa.array([1.0, float("nan"), 1.0, float("nan"), None, None, 1.0]),
            "b": ["x", "y", "x", "y", None, None, "z"],
            "l": pa.array([[1, 2], [], [1, 2], [], None, None, [1, 2]]),
        }
    )
    assert repeated_rows(t).tolist() == [False, False, True, True, False, True, False]
    lists = pa.table({"l": pa.array([[1, 2], [1], [1, 2], [12]]), "u": [1, 1, 1, 1]})
    assert repeated_rows(lists).tolist() == [False, False, True, False]
    assert repeated_rows(t.slice(0, 1)).tolist() == [False]


def test_generic_three_identical_rows_make_one_event(tmp_path: Path) -> None:
    f = tmp_path / "ev.csv"
    f.write_text(f"uid,time,item,note\n1,{T0},5,a\n1,{T0},5,b\n1,{T0},5,c\n1,{T0 + 1},5,a\n2,{T0},5,a\n")
    url = str(tmp_path / "ds")
    s = import_generic(f, url, kind="explicit", mapping=MAP, constants=CONST)
    assert (s.rows, s.duplicate_rows, s.explicit_events) == (5, 2, 3)  # "note" is not read: rows 1, 2 repeat row 0
    assert "3 explicit" in s.line() and "2 duplicate rows dropped" in s.line()
    t = TimelineDataset(url).read_table("explicit")
    assert _keys(t) == [(1, T0, 5), (1, T0 + 1, 5), (2, T0, 5)]


def test_a_duplicate_keeps_record_numbers_and_bad_copies_are_validation_drops(tmp_path: Path) -> None:
    f = tmp_path / "ev.csv"
    f.write_text(f"uid,time,item\n1,{T0},5\n1,{T0},5\n1,-4,5\n1,-4,5\n")
    with pytest.raises(TimelineError) as e:
        import_generic(f, str(tmp_path / "raise"), kind="explicit", mapping=MAP, constants=CONST)
    assert (e.value.record, e.value.reason) == (2, "negative_timestamp")  # the input row, not the 2nd kept row
    s = import_generic(f, str(tmp_path / "drop"), kind="explicit", mapping=MAP, constants=CONST, policy=DROP)
    assert (s.explicit_events, s.duplicate_rows) == (1, 1)
    # a bad copy is a bad record; a good one a duplicate
    assert s.validation == "explicit 1/4 records kept; dropped row:duplicate: 1, ts:negative_timestamp: 2"


def _ml(d: Path, ratings: list[tuple[object, ...]], tags: list[tuple[object, ...]]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "movies.csv").write_text("movieId,title,genres\n1,A (1990),Drama\n2,B (1991),Comedy\n")
    for name, header, rows in (
        ("ratings.csv", ["userId", "movieId", "rating", "timestamp"], ratings),
        ("tags.csv", ["userId", "movieId", "tag", "timestamp"], tags),
    ):
        with (d / name).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    return d


def test_movielens_duplicate_rating_and_tag(tmp_path: Path) -> None:
    ratings = [(1, 1, 4.0, T0), (1, 1, 4.0, T0), (1, 1, 3.0, T0), (2, 2, 5.0, T0)]
    tags = [(1, 1, "funny", T0), (1, 1, "funny", T0), (1, 1, "quotable", T0)]  # two tags in one second: kept
    url = str(tmp_path / "ds")
    s = import_movielens(_ml(tmp_path / "ml", ratings, tags), url)
    assert (s.ratings, s.tags, s.duplicate_rows) == (4, 3, 2)
    assert (s.explicit_events, s.requests) == (3 + 2, 3)
    ds = TimelineDataset(url)
    got = _keys(ds.read_table("explicit"), "action")
    assert got == sorted(
        [(1, T0, 1, "rate_high"), (1, T0, 1, "rate_mid"), (2, T0, 2, "rate_high")] + 2 * [(1, T0, 1, "tag")]
    )
    assert sorted(ds.requests().column("label_rating").to_pylist()) == [3.0, 4.0, 5.0]


def _log_rows() -> tuple[list[str], list[dict[str, str]]]:
    with LOG.open() as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


def _write_log(path: Path, header: list[str], rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


def test_kuairand_duplicate_impression_goes_with_its_flags_and_request(tmp_path: Path) -> None:
    header, rows = _log_rows()
    base = import_kuairand([str(_write_log(tmp_path / "a.csv", header, rows))], str(tmp_path / "a"), catalog=CATALOG)
    twice = rows[:12] + [rows[11], rows[11]] + rows[12:]  # row 11: like + follow
    s = import_kuairand([str(_write_log(tmp_path / "b.csv", header, twice))], str(tmp_path / "b"), catalog=CATALOG)
    assert (s.log_rows, s.duplicate_rows) == (len(rows) + 2, 2)
    assert (s.implicit_events, s.explicit_events, s.requests) == (
        base.implicit_events,
        base.explicit_events,
        base.requests,
    )
    assert "implicit_event:dropped: 2" in s.validation  # the requests of the two copies
    a, b = TimelineDataset(str(tmp_path / "a")), TimelineDataset(str(tmp_path / "b"))
    assert _keys(b.read_table("explicit"), "action") == _keys(a.read_table("explicit"), "action")


def test_kuairand_flag_events_of_a_dropped_impression_are_dropped(tmp_path: Path) -> None:
    header, rows = _log_rows()
    for i in (3, 10, 11):  # hate; follow + long_view; like + follow
        rows[i]["play_time_ms"] = "nan"
    log = _write_log(tmp_path / "log.csv", header, rows)
    url = str(tmp_path / "drop")
    s = import_kuairand([str(log)], url, catalog=CATALOG, policy=DROP)
    flags = sum(1 for i in (3, 10, 11) for c in ("is_like", "is_follow", "is_hate", "long_view") if rows[i][c] == "1")
    assert flags == 5
    assert s.validation.startswith("explicit ") and "dropped implicit_event:dropped: 5" in s.validation
    ds = TimelineDataset(url)
    impressions = set(_keys(ds.read_table("implicit")))
    explicit = ds.read_table("explicit")
    assert explicit.num_rows == s.explicit_events > 0
    assert all(k in impressions for k in _keys(explicit))  # no flag event without its impression
    dropped = {
        (int(rows[i]["user_id"]), int(rows[i]["time_ms"]) // 1000, int(rows[i]["video_id"])) for i in (3, 10, 11)
    }
    assert not dropped & set(_keys(explicit)) and not dropped & impressions


def test_writer_checks_explicit_of(tmp_path: Path) -> None:
    ev = pa.table({"user_id": [1], "ts": [T0], "media_id": [2], "dwell_time": [1.0]})
    flags = pa.table({"user_id": [1], "ts": [T0], "media_id": [2], "action": ["like"]})
    with DatasetWriter(str(tmp_path / "ds")) as w:
        with pytest.raises(ValueError, match="explicit_of needs requests_of='implicit'"):
            w.add(implicit=ev, explicit=flags, explicit_of=np.array([0]))
        with pytest.raises(ValueError, match="one implicit row per explicit row"):
            w.add(implicit=ev, explicit=flags, requests=ev, requests_of="implicit", explicit_of=np.array([0, 0]))
        w.add(
            implicit=ev,
            explicit=flags,
            requests=ev.drop_columns(["dwell_time"]),
            requests_of="implicit",
            explicit_of=np.array([0]),
        )
    assert TimelineDataset(str(tmp_path / "ds")).read_table("explicit").num_rows == 1


def test_kuairand_log_given_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"log_fixture\.csv: given more than once"):
        import_kuairand([str(LOG), str(LOG)], str(tmp_path / "out"), catalog=CATALOG)
    assert not (tmp_path / "out").exists()
