"""A record dropped by validation takes its training request with it, so an import that exits 0 never
leaves requests with null labels for training to refuse later (item 5); MovieLens ratings must lie on
the 0.5-5 scale (item 7)."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from dv365.core.catalog import default_data_dir
from dv365.core.errors import TimelineError
from dv365.core.importers import import_kuairand, import_movielens
from dv365.core.timeline import DatasetWriter, TimelineDataset
from dv365.core.validation import ValidationPolicy, validate_rows, validate_table
from dv365.core.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[2]
KUAIRAND_LOG = ROOT / "tests" / "fixtures" / "kuairand-log" / "log_fixture.csv"
DROP = ValidationPolicy(on_error="drop")


def _movielens(d: Path, ratings: list[tuple[object, ...]]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "movies.csv").write_text("movieId,title,genres\n1,A (1990),Drama\n2,B (1991),Comedy\n")
    with (d / "ratings.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        w.writerows(ratings)
    return d


GOOD = [(1, 1, 4.0, 1_600_001_000), (1, 2, 0.5, 1_600_001_001), (2, 1, 5.0, 1_600_001_002), (3, 2, 2.5, 1_600_001_003)]


def _keys(t: pa.Table) -> list[tuple[int, int, int]]:
    return sorted(zip(*(t.column(c).to_pylist() for c in ("user_id", "ts", "media_id"))))


def _assert_every_request_has_its_event(url: str, kind: str, label: str) -> pa.Table:
    ds = TimelineDataset(url)
    reqs, events = ds.requests(), ds.read_table(kind)
    assert _keys(reqs) == _keys(events)
    assert reqs.column(label).null_count == 0
    return reqs


@pytest.mark.parametrize(
    "bad, field_value, reason",
    [
        ((2, 2, "", 1_600_001_004), None, "missing"),
        ((2, 2, "nan", 1_600_001_004), None, "missing"),  # the CSV reader reads "nan" as empty
        ((2, 2, 7.0, 1_600_001_004), 7.0, "out_of_range"),
        ((2, 2, 0.0, 1_600_001_004), 0.0, "out_of_range"),
        ((2, 2, -1.0, 1_600_001_004), -1.0, "out_of_range"),
        ((2, 2, 400.0, 1_600_001_004), 400.0, "out_of_range"),  # the examples
        ((2, 2, -3.0, 1_600_001_004), -3.0, "out_of_range"),
    ],
)
def test_movielens_bad_rating_is_named_and_takes_its_request(
    tmp_path: Path, bad: tuple[object, ...], field_value: object, reason: str
) -> None:
    src = _movielens(tmp_path / "ml", GOOD[:2] + [bad] + GOOD[2:])
    with pytest.raises(TimelineError) as e:
        import_movielens(src, str(tmp_path / "raise"))
    assert (e.value.record, e.value.field, e.value.reason, e.value.user_id) == (2, "value", reason, 2)
    assert e.value.value == field_value
    assert str(e.value).startswith("ratings.csv, record 2, user 2: field 'value'")
    url = str(tmp_path / "drop")
    s = import_movielens(src, url, policy=DROP)
    assert (s.ratings, s.explicit_events, s.requests) == (5, 4, 4)
    assert f"dropped value:{reason}: 1" in s.validation
    assert "dropped explicit_event:dropped: 1" in s.validation
    _assert_every_request_has_its_event(url, "explicit", "label_rating")


@pytest.mark.parametrize("value, reason", [(None, "missing"), (float("nan"), "nan"), (5.5, "out_of_range")])
def test_value_range_policy(value: float | None, reason: str) -> None:
    t = pa.table(
        {
            "user_id": pa.array([1, 1], pa.int64()),
            "ts": pa.array([1, 2], pa.int64()),
            "media_id": pa.array([3, 3], pa.int64()),
            "action": pa.array(["rate_mid", "rate_mid"]),
            "value": pa.array([3.0, value], pa.float64()),
        }
    )
    policy = ValidationPolicy(value_range=(0.5, 5.0))
    with pytest.raises(TimelineError, match=f"record 1, user 1: field 'value' = .*: {reason}$"):
        validate_table(t, "explicit", Vocabulary(), policy, source="t")
    kept, mask = validate_rows(t, "explicit", Vocabulary(), replace(policy, on_error="drop"))
    assert kept.num_rows == 1 and mask.tolist() == [True, False]
    with pytest.raises(ValueError, match="value_range"):
        ValidationPolicy(value_range=(5.0, 0.5))


def test_movielens_scale_edges_are_kept(tmp_path: Path) -> None:
    s = import_movielens(_movielens(tmp_path / "ml", GOOD), str(tmp_path / "ds"))
    assert (s.explicit_events, s.requests) == (4, 4)


def _kuairand_log(path: Path, edits: dict[int, str]) -> Path:
    with KUAIRAND_LOG.open() as f:
        rows = list(csv.DictReader(f))
    for i, play in edits.items():
        rows[i]["play_time_ms"] = play
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_kuairand_impression_dropped_for_dwell_takes_its_request(tmp_path: Path) -> None:
    log = _kuairand_log(tmp_path / "log.csv", {3: "", 10: "nan", 11: "-5"})
    catalog = default_data_dir() / "kuairand-pure-catalog"
    with pytest.raises(TimelineError) as e:
        import_kuairand([str(log)], str(tmp_path / "raise"), catalog=catalog)
    assert (e.value.record, e.value.field, e.value.reason) == (3, "dwell_time", "missing")
    assert str(e.value).startswith("log.csv, record 3,")
    url = str(tmp_path / "drop")
    s = import_kuairand([str(log)], url, catalog=catalog, policy=DROP)
    assert (s.log_rows, s.implicit_events, s.requests) == (200, 197, 197)
    assert "implicit_event:dropped: 3" in s.validation
    _assert_every_request_has_its_event(url, "implicit", "label_watch_time")


def _events(n: int) -> pa.Table:
    return pa.table(
        {
            "user_id": pa.array([1] * n, pa.int64()),
            "ts": pa.array(range(100, 100 + n), pa.int64()),
            "media_id": pa.array([5] * n, pa.int64()),
            "dwell_time": pa.array([1.0, float("nan"), 2.0][:n], pa.float64()),
        }
    )


def test_writer_requests_of_drops_orphans_and_checks_lengths(tmp_path: Path) -> None:
    ev = _events(3)
    reqs = ev.select(["user_id", "ts", "media_id"]).append_column("label_x", pa.array([1.0, 2.0, 3.0]))
    with DatasetWriter(str(tmp_path / "ds"), policy=DROP) as w:
        w.add(implicit=ev, requests=reqs, requests_of="implicit")
        with pytest.raises(ValueError, match="differ in length"):
            w.add(implicit=ev, requests=reqs.slice(1), requests_of="implicit")
    ds = TimelineDataset(str(tmp_path / "ds"))
    assert ds.requests().column("label_x").to_pylist() == [1.0, 3.0]
    assert w.report["requests"].dropped == {"implicit_event:dropped": 1}
    assert w.report["requests"].records_in - w.report["requests"].records_out == 1
