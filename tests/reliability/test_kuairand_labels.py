"""KuaiRand labels: ``is_profile_enter`` becomes ``label_profile_enter`` (item 6); an empty flag rejects the
request instead of storing a null label; ``label_watch_time`` is capped like the impression's dwell."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dv365.core.catalog import default_data_dir
from dv365.core.errors import TimelineError
from dv365.core.importers import import_kuairand
from dv365.core.timeline import TimelineDataset
from dv365.core.validation import ValidationPolicy

LOG = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "kuairand-log" / "log_fixture.csv"


def test_profile_enter_label(tmp_path: Path) -> None:
    url = str(tmp_path / "kr")
    import_kuairand([str(LOG)], url, catalog=default_data_dir() / "kuairand-pure-catalog")
    with LOG.open() as f:
        log = list(csv.DictReader(f))
    assert sum(int(r["is_profile_enter"]) for r in log) > 0  # the fixture has positives
    reqs = TimelineDataset(url).requests()
    got = {
        (u, t, m): v
        for u, t, m, v in zip(
            *(reqs.column(c).to_pylist() for c in ("user_id", "ts", "media_id", "label_profile_enter"))
        )
    }
    assert len(got) == len(log)
    for r in log:
        key = (int(r["user_id"]), int(r["time_ms"]) // 1000, int(r["video_id"]))
        assert got[key] == float(r["is_profile_enter"])
    assert TimelineDataset(url).meta.extra["labels"]["label_profile_enter"] == "is_profile_enter"


def _log(path: Path, edits: dict[tuple[int, str], str]) -> tuple[Path, list[dict[str, str]]]:
    with LOG.open() as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    for (i, c), v in edits.items():
        rows[i][c] = v
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path, rows


def test_an_empty_flag_rejects_the_request_not_a_null_label(tmp_path: Path) -> None:
    log, rows = _log(tmp_path / "log.csv", {(4, "is_click"): ""})
    catalog = default_data_dir() / "kuairand-pure-catalog"
    with pytest.raises(TimelineError) as e:
        import_kuairand([str(log)], str(tmp_path / "raise"), catalog=catalog)
    assert str(e.value) == "log.csv (requests), record 4, user 2048: field 'label_click' = None: missing"
    assert not (tmp_path / "raise" / "_dataset.json").exists()
    url = str(tmp_path / "drop")
    s = import_kuairand([str(log)], url, catalog=catalog, policy=ValidationPolicy(on_error="drop"))
    assert (s.implicit_events, s.requests) == (len(rows), len(rows) - 1)  # the impression stays, not its request
    assert "requests 199/200 records kept; dropped label_click:missing: 1" in s.validation
    reqs = TimelineDataset(url).requests()
    assert all(reqs.column(c).null_count == 0 for c in reqs.column_names if c.startswith("label_"))


def test_watch_time_label_is_capped_like_the_dwell(tmp_path: Path) -> None:
    log, rows = _log(tmp_path / "log.csv", {(0, "play_time_ms"): str(10**12)})
    url = str(tmp_path / "kr")
    s = import_kuairand([str(log)], url, catalog=default_data_dir() / "kuairand-pure-catalog")
    assert "clamped dwell_time:max: 1" in s.validation
    ds = TimelineDataset(url)
    key = (int(rows[0]["user_id"]), int(rows[0]["time_ms"]) // 1000, int(rows[0]["video_id"]))
    for kind, col in (("implicit", "dwell_time"), ("requests", "label_watch_time")):
        t = ds.requests() if kind == "requests" else ds.read_table(kind)
        got = {
            (u, ts, m): v for u, ts, m, v in zip(*(t.column(c).to_pylist() for c in ("user_id", "ts", "media_id", col)))
        }
        assert got[key] == 4 * 3600.0, kind
        assert max(got.values()) <= 4 * 3600.0
