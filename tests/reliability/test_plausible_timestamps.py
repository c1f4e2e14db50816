"""Import-time plausibility of timestamps (item 7): before 1990-01-01 (0, a line cut inside its time) and
beyond now + 1 day (int64 max, microseconds) are rejected, and milliseconds given as seconds are named as
such ("milliseconds?")."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pyarrow as pa
import pytest

from dv365.core.errors import TimelineError
from dv365.core.importers import import_generic, import_movielens
from dv365.core.timeline import DatasetWriter, TimelineDataset
from dv365.core.validation import ValidationPolicy, plausible_ts_range, validate_table
from dv365.core.vocab import Vocabulary

MAP = {"user_id": "uid", "ts": "time", "media_id": "item"}
CONST = {"action": "like"}


def _ml(d: Path, ratings: list[tuple[object, ...]]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "movies.csv").write_text("movieId,title,genres\n1,A (1990),Drama\n")
    with (d / "ratings.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        w.writerows(ratings)
    return d


@pytest.mark.parametrize(
    "ts, reason, text",
    [
        (0, "implausible_timestamp", "plausible: 631152000 (1990-01-01) to"),
        (1107, "implausible_timestamp", "plausible: 631152000 (1990-01-01) to"),  # a line cut inside its time
        (631_151_999, "implausible_timestamp", "plausible: 631152000 (1990-01-01) to"),
        (int(time.time()) + 2 * 86_400, "implausible_timestamp", "(now + 1 day)"),
        (1_700_000_000_123, "milliseconds", "milliseconds?"),
        (1_700_000_000_123_456, "implausible_timestamp", "(now + 1 day)"),  # microseconds: not "milliseconds?"
        (2**63 - 1, "implausible_timestamp", "(now + 1 day)"),
    ],
)
def test_movielens_implausible_timestamp_is_named(tmp_path: Path, ts: int, reason: str, text: str) -> None:
    d = _ml(tmp_path / "ml", [(1, 1, 4.0, 874965758), (2, 1, 3.0, ts), (3, 1, 5.0, 874965759)])
    with pytest.raises(TimelineError) as e:
        import_movielens(d, str(tmp_path / "out"))
    assert (e.value.record, e.value.user_id, e.value.field, e.value.value, e.value.reason) == (1, 2, "ts", ts, reason)
    assert str(e.value).startswith("ratings.csv, record 1, user 2: field 'ts'") and text in str(e.value)
    s = import_movielens(d, str(tmp_path / "drop"), policy=ValidationPolicy(on_error="drop"))
    assert (s.explicit_events, s.requests) == (2, 2) and f"dropped ts:{reason}: 1" in s.validation


def test_generic_milliseconds_given_as_seconds(tmp_path: Path) -> None:
    f = tmp_path / "ev.csv"
    f.write_text("uid,time,item\n1,1700000000123,5\n")
    with pytest.raises(
        TimelineError, match=r"record 0, user 1: field 'ts' = 1700000000123: milliseconds \(milliseconds\?"
    ):
        import_generic(f, str(tmp_path / "out"), kind="explicit", mapping=MAP, constants=CONST)
    s = import_generic(f, str(tmp_path / "ok"), kind="explicit", mapping=MAP, constants=CONST, time_unit="ms")
    assert s.explicit_events == 1
    assert TimelineDataset(str(tmp_path / "ok")).read_table("explicit").column("ts").to_pylist() == [1_700_000_000]


def test_bounds_are_opt_in_outside_the_importers(tmp_path: Path) -> None:
    t = pa.table(
        {
            "user_id": pa.array([1], pa.int64()),
            "ts": pa.array([0], pa.int64()),
            "media_id": pa.array([1], pa.int64()),
            "action": pa.array(["like"]),
        }
    )
    assert validate_table(t, "explicit", Vocabulary()).num_rows == 1  # tests and synthetic data may use ts 0
    with DatasetWriter(str(tmp_path / "ds")) as w:
        w.add(explicit=t)
    with pytest.raises(TimelineError, match="implausible_timestamp"):
        validate_table(t, "explicit", Vocabulary(), ValidationPolicy(ts_range=plausible_ts_range()))
    assert plausible_ts_range(now=1_700_000_000) == (631_152_000, 1_700_086_400)
    assert plausible_ts_range(now=1_000_000, earliest=1) == (1, 1_086_400)


def test_movielens_line_cut_inside_its_time_is_rejected(tmp_path: Path) -> None:
    d = _ml(tmp_path / "ml", [(7, 1, 2.0, 1107136000)])
    with (d / "ratings.csv").open("a") as f:
        f.write("7,1,2.0,1107")  # the last line cut inside its time (no line end)
    with pytest.raises(TimelineError, match=r"ratings.csv, record 1, user 7: field 'ts' = 1107: implausible_timestamp"):
        import_movielens(d, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "_dataset.json").exists()
    s = import_movielens(d, str(tmp_path / "drop"), policy=ValidationPolicy(on_error="drop"))
    assert s.explicit_events == 1 and "dropped ts:implausible_timestamp: 1" in s.validation


def test_earliest_flag_admits_an_older_log(tmp_path: Path) -> None:
    """`dv365 import ... --earliest YYYY-MM-DD` moves the lower bound for logs that really start before 1990;
    a bad date is a usage error naming the flag."""
    import subprocess
    import sys

    src = _ml(tmp_path / "ml", [(1, 1, 4.0, 500_000_000), (1, 1, 3.0, 600_000_000)])  # 1985 and 1989
    dv365 = str(Path(sys.executable).with_name("dv365"))

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [dv365, "import", "movielens", str(src), "--out", str(tmp_path / "out"), "--overwrite", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    refused = run()
    assert refused.returncode != 0 and "implausible_timestamp" in refused.stderr + refused.stdout
    ok = run("--earliest", "1980-01-01")
    assert ok.returncode == 0, ok.stderr
    assert TimelineDataset(str(tmp_path / "out")).meta.stats["events"] == 2
    bad = run("--earliest", "1980-13-01")
    assert bad.returncode == 2 and "--earliest '1980-13-01': not a date YYYY-MM-DD" in bad.stderr
