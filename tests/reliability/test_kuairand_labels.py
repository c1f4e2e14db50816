"""KuaiRand: ``is_profile_enter`` becomes the request label ``label_profile_enter`` (item 6)."""

from __future__ import annotations

import csv
from pathlib import Path

from dv365.core.catalog import default_data_dir
from dv365.core.importers import import_kuairand
from dv365.core.timeline import TimelineDataset

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
