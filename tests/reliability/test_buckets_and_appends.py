"""Reliability: the bucket count is checked before anything is written or removed (item 1), and readers
see only committed appends: a failed or SIGKILLed append leaves the readable rows equal to the
figures of ``_dataset.json`` (item 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from dv365.core.errors import DatasetError
from dv365.core.importers import import_movielens
from dv365.core.timeline import DatasetWriter, TimelineDataset

ROOT = Path(__file__).resolve().parents[2]
MOVIELENS_100K = ROOT / "tests" / "fixtures" / "movielens-100k"


def _events(users: range, per_user: int = 3, ts0: int = 1_600_000_000) -> pa.Table:
    rows = [(u, ts0 + i, 100 + i) for u in users for i in range(per_user)]
    return pa.table(
        {
            "user_id": pa.array([r[0] for r in rows], pa.int64()),
            "ts": pa.array([r[1] for r in rows], pa.int64()),
            "media_id": pa.array([r[2] for r in rows], pa.int64()),
            "action": pa.array(["like"] * len(rows)),
        }
    )


def _readable_vs_meta(url: str) -> tuple[int, int, int, int]:
    """(rows a reader sees, rows the metadata claims, users a reader sees, users the metadata claims)."""
    ds = TimelineDataset(url)
    rows = ds.read_table("explicit").num_rows + ds.read_table("implicit").num_rows
    return rows, ds.meta.stats["events"], len(ds.user_ids()), ds.meta.stats["users"]


# ------------------------------------------------------------------------------------------------------
# item 1: num_buckets >= 1
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, -1, True, 2.0])
def test_writer_rejects_bad_bucket_count(tmp_path: Path, n: object) -> None:
    with pytest.raises(DatasetError, match=r"num_buckets must be an integer >= 1"):
        DatasetWriter(str(tmp_path / "ds"), num_buckets=n)  # type: ignore[arg-type]
    assert not (tmp_path / "ds").exists()


def test_overwrite_with_bad_bucket_count_keeps_the_old_dataset(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    with DatasetWriter(url, num_buckets=2) as w:
        w.add(explicit=_events(range(3)))
    with pytest.raises(DatasetError, match=r"num_buckets must be an integer >= 1, got 0"):
        DatasetWriter(url, num_buckets=0, mode="overwrite")
    assert _readable_vs_meta(url) == (9, 9, 3, 3)


def test_importer_rejects_zero_buckets(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"num_buckets must be an integer >= 1, got 0"):
        import_movielens(MOVIELENS_100K, str(tmp_path / "ml"), num_buckets=0)


def test_metadata_with_zero_buckets_is_an_error(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    with DatasetWriter(url, num_buckets=2) as w:
        w.add(explicit=_events(range(3)))
    meta = json.loads((tmp_path / "ds" / "_dataset.json").read_text())
    meta["num_buckets"] = 0
    (tmp_path / "ds" / "_dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"_dataset.json: num_buckets must be an integer >= 1, got 0"):
        TimelineDataset(url)


@pytest.mark.parametrize("flag", ["0", "-1", "x"])
def test_cli_buckets_flag_is_checked(tmp_path: Path, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    from dv365.core.cli import main

    out = tmp_path / "ml"
    with pytest.raises(SystemExit) as e:
        main(["import", "movielens", str(MOVIELENS_100K), "--out", str(out), "--buckets", flag])
    assert e.value.code == 2
    assert "--buckets" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------
# item 4: readers see only committed appends
# ------------------------------------------------------------------------------------------------------
def test_parts_are_listed_in_the_metadata(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    with DatasetWriter(url, num_buckets=2, flush_rows=4) as w:
        w.add(explicit=_events(range(0, 2)))
        w.add(explicit=_events(range(2, 4)))
    parts = json.loads((tmp_path / "ds" / "_dataset.json").read_text())["parts"]
    on_disk = sorted(str(p.relative_to(tmp_path / "ds")) for p in (tmp_path / "ds").rglob("*.parquet"))
    assert parts == on_disk and len(parts) >= 2


def test_failed_append_stays_invisible(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    with DatasetWriter(url, num_buckets=2) as w:
        w.add(explicit=_events(range(4)))
    before = _readable_vs_meta(url)
    assert before == (12, 12, 4, 4)
    with pytest.raises(RuntimeError, match="midway"):
        with DatasetWriter(url, mode="append", flush_rows=1) as w:
            w.add(explicit=_events(range(10, 20)))  # flushed: part files are on disk
            raise RuntimeError("failed midway")
    assert len(list((tmp_path / "ds").rglob("*.parquet"))) > 2  # the failed append's parts are there...
    assert _readable_vs_meta(url) == before  # ...but no reader sees them
    with DatasetWriter(url, mode="append") as w:  # a later append commits only its own parts
        w.add(explicit=_events(range(30, 32)))
    assert _readable_vs_meta(url) == (18, 18, 6, 6)


def test_old_dataset_without_parts_list_is_globbed_and_appendable(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    with DatasetWriter(url, num_buckets=2) as w:
        w.add(explicit=_events(range(4)))
    path = tmp_path / "ds" / "_dataset.json"
    meta = json.loads(path.read_text())
    del meta["parts"]  # as written before the list existed
    path.write_text(json.dumps(meta))
    assert _readable_vs_meta(url) == (12, 12, 4, 4)
    with DatasetWriter(url, mode="append") as w:
        w.add(explicit=_events(range(10, 12)))
    assert _readable_vs_meta(url) == (18, 18, 6, 6)
    assert len(json.loads(path.read_text())["parts"]) == len(list((tmp_path / "ds").rglob("*.parquet")))


KILLED_APPEND = textwrap.dedent(
    """
    import os, signal, sys
    import pyarrow as pa
    from dv365.core import timeline
    url, where = sys.argv[1], sys.argv[2]
    rows = [(u, 1_600_000_000 + i) for u in range(100, 140) for i in range(3)]
    t = pa.table({"user_id": pa.array([r[0] for r in rows], pa.int64()), "ts": pa.array([r[1] for r in rows], pa.int64()),
                  "media_id": pa.array([7] * len(rows), pa.int64()), "action": pa.array(["like"] * len(rows))})
    if where == "metadata":  # killed while _dataset.json is being written
        def killed(self):
            os.kill(os.getpid(), signal.SIGKILL)
        timeline.DatasetMeta.to_json = killed
    w = timeline.DatasetWriter(url, mode="append", flush_rows=1)
    w.add(explicit=t)  # flushed: part files on disk
    if where == "ingest":
        os.kill(os.getpid(), signal.SIGKILL)
    w.close()
    """
)


@pytest.mark.parametrize("where", ["ingest", "metadata"])
def test_sigkilled_append_stays_invisible(tmp_path: Path, where: str) -> None:
    url = str(tmp_path / "ds")
    with DatasetWriter(url, num_buckets=2) as w:
        w.add(explicit=_events(range(4)))
    before = _readable_vs_meta(url)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLED_APPEND, url, where], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert len(list((tmp_path / "ds").rglob("*.parquet"))) > 2  # the killed append wrote parts
    assert _readable_vs_meta(url) == before
