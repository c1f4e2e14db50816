"""``--overwrite`` / ``mode="overwrite"`` replaces a dataset only when the new one is complete: an import
that fails (bad record, unreadable input, a crash) leaves the old dataset readable and unchanged."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pytest

from dv365.core.timeline import DatasetWriter, TimelineDataset

ROOT = Path(__file__).resolve().parents[2]
MOVIELENS_100K = ROOT / "tests" / "fixtures" / "movielens-100k"


def _events(users: range) -> pa.Table:
    n = len(users)
    return pa.table(
        {
            "user_id": pa.array(list(users), pa.int64()),
            "ts": pa.array([1_600_000_000] * n, pa.int64()),
            "media_id": pa.array([1] * n, pa.int64()),
            "action": pa.array(["like"] * n),
        }
    )


def _state(url: str) -> tuple[list[int], int]:
    ds = TimelineDataset(url)
    return ds.user_ids().tolist(), ds.meta.stats["events"]


def test_failed_overwrite_keeps_the_old_dataset(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    with DatasetWriter(url, num_buckets=2) as w:
        w.add(explicit=_events(range(3)))
    with pytest.raises(RuntimeError):
        with DatasetWriter(url, num_buckets=4, mode="overwrite", flush_rows=1) as w:
            w.add(explicit=_events(range(10, 20)))  # flushed
            raise RuntimeError("crash")
    assert _state(url) == ([0, 1, 2], 3)
    with DatasetWriter(url, num_buckets=4, mode="overwrite") as w:
        w.add(explicit=_events(range(10, 12)))
    assert _state(url) == ([10, 11], 2)
    listed = json.loads((tmp_path / "ds" / "_dataset.json").read_text())["parts"]
    assert sorted(str(p.relative_to(tmp_path / "ds")) for p in (tmp_path / "ds").rglob("*.parquet")) == listed


def test_failed_overwrite_of_an_old_dataset_without_parts_list(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    with DatasetWriter(url, num_buckets=2) as w:
        w.add(explicit=_events(range(3)))
    meta_path = tmp_path / "ds" / "_dataset.json"
    meta = json.loads(meta_path.read_text())
    del meta["parts"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RuntimeError):
        with DatasetWriter(url, num_buckets=2, mode="overwrite", flush_rows=1) as w:
            w.add(explicit=_events(range(10, 20)))
            raise RuntimeError("crash")
    assert _state(url) == ([0, 1, 2], 3)


def test_cli_overwrite_with_bad_input_keeps_the_old_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dv365.core.cli import main

    out = str(tmp_path / "ml")
    assert main(["import", "movielens", str(MOVIELENS_100K), "--out", out]) == 0
    before = _state(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "movies.csv").write_text("movieId,title,genres\n1,A (1990),Drama\n")
    with (bad / "ratings.csv").open("w", newline="") as f:
        csv.writer(f).writerows(
            [["userId", "movieId", "rating", "timestamp"], [1, 1, 4.0, 1600001000], [2, 1, 9.0, 1600001001]]
        )
    assert main(["import", "movielens", str(bad), "--out", out, "--overwrite"]) == 1
    assert "field 'value' = 9.0: out_of_range" in capsys.readouterr().err
    assert _state(out) == before
    assert main(["import", "movielens", str(tmp_path / "missing"), "--out", out, "--overwrite"]) == 1
    assert _state(out) == before
    (bad / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1600001000\n")
    assert main(["import", "movielens", str(bad), "--out", out, "--overwrite"]) == 0
    assert _state(out) == ([1], 1)


@pytest.mark.parametrize("mode", ["overwrite", "append"])
def test_a_reused_run_id_never_writes_over_committed_files(tmp_path: Path, mode: str) -> None:
    url = str(tmp_path / "ds")
    with DatasetWriter(url, num_buckets=1, run_id="daily") as w:
        w.add(explicit=_events(range(3)))
    with pytest.raises(RuntimeError):
        with DatasetWriter(url, num_buckets=1, mode=mode, run_id="daily", flush_rows=1) as w:
            w.add(explicit=_events(range(10, 20)))  # flushed: must not replace part-daily-00000.parquet
            raise RuntimeError("crash")
    assert _state(url) == ([0, 1, 2], 3)
