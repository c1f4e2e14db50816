"""The pipeline's cut-off policy: a far-future ``--as-of`` is refused, a source row dated beyond now + tolerance
is rejected at ingest and counted (it never moves the cut-off), late arrivals (rows at or before the previous
cut-off that appear afterwards) are counted in the cycle record and reported, not ingested. Training, export
and publishing are replaced by stubs here: only the ingest and the cycle bookkeeping are under test."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from dv365.core.synth import SynthConfig, write_synth_dataset
from dv365.core.timeline import DatasetWriter, TimelineDataset
from dv365.export.pipeline import FUTURE_TOLERANCE_S, Pipeline, PipelineConfig, PipelineError

DAY = 86_400
SYNTH = SynthConfig(
    users=4,
    mean_events=150,
    max_events=200,
    min_events=100,
    days=10,
    requests_per_user=2,
    request_window_days=5,
    min_history_days=5,
    seed=3,
)
YEAR_5138 = 99_999_999_999  # 5138-11-16


def make(tmp_path: Path) -> tuple[Pipeline, str, int]:
    src = str(tmp_path / "src")
    write_synth_dataset(SYNTH, src, progress=False, num_buckets=2)
    cfg = PipelineConfig.from_dict(
        {"name": "t", "workdir": str(tmp_path / "work"), "source": src, "train": {"config": "synth-quick"}}
    )
    ds = TimelineDataset(src)
    newest = max(int(ds.read_bucket("explicit", b).column("ts").to_numpy().max(initial=0)) for b in range(2))
    return Pipeline(cfg, progress=False), src, newest


def append_row(src: str, ts: int) -> None:
    """Appends a copy of one explicit row of the source, dated ``ts`` (a late or a future arrival)."""
    ds = TimelineDataset(src)
    row = ds.read_bucket("explicit", 0).slice(0, 1)
    row = row.set_column(row.schema.get_field_index("ts"), "ts", pa.array([ts], row.schema.field("ts").type))
    with DatasetWriter(src, mode="append", run_id=f"extra_{ts}") as w:
        w.add(explicit=row)


def test_as_of_in_the_far_future_is_refused(tmp_path: Path, stubbed: None) -> None:
    p, _src, _newest = make(tmp_path)
    with pytest.raises(PipelineError, match=r"--as-of 99999999999 .* later than now"):
        p.run_cycle(YEAR_5138)
    assert p.cycles() == []  # no cycle was started


def test_future_source_row_is_rejected_counted_and_never_moves_the_cut_off(tmp_path: Path, stubbed: None) -> None:
    p, src, newest = make(tmp_path)
    append_row(src, YEAR_5138)
    rec = p.run_cycle()
    assert rec is not None and rec["as_of"] < YEAR_5138
    assert rec["figures"]["rejected_future_rows"]["explicit"] == 1
    ingest = p.cycles()[0].done("ingest")
    assert ingest is not None and ingest["source_rows_covered"]["explicit"] == ingest["rows"]["explicit"]
    # a later row still starts a new cycle (ingesting did not stop for good)
    append_row(src, rec["as_of"] + 10)
    rec2 = p.run_cycle()
    assert rec2 is not None and rec2["cycle"] == 2 and rec2["figures"]["new_rows"]["explicit"] == 1
    assert rec2["figures"]["rejected_future_rows"]["explicit"] == 1
    assert FUTURE_TOLERANCE_S == DAY


def test_late_rows_are_counted_in_the_cycle_record_and_not_ingested(tmp_path: Path, stubbed: None) -> None:
    p, src, newest = make(tmp_path)
    rec1 = p.run_cycle(newest - DAY)
    assert rec1 is not None and rec1["figures"]["late_rows"] == {"explicit": 0, "implicit": 0, "requests": 0}
    events1 = TimelineDataset(str(tmp_path / "work/data")).meta.stats["events"]
    append_row(src, newest - 2 * DAY)  # arrives after cycle 1, dated before its cut-off
    rec2 = p.run_cycle(newest)
    assert rec2 is not None and rec2["figures"]["late_rows"]["explicit"] == 1
    new = rec2["figures"]["new_rows"]
    assert (
        TimelineDataset(str(tmp_path / "work/data")).meta.stats["events"] == events1 + new["explicit"] + new["implicit"]
    )
