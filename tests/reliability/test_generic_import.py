"""Reliability of ``dv365 import generic``: ids are read exactly, never through float64 (item 2), and one
unparsable value rejects its own record only, named by record and source column (item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dv365.core.errors import TimelineError
from dv365.core.importers import import_generic
from dv365.core.timeline import TimelineDataset
from dv365.core.validation import ValidationPolicy

BIG = 9007199254740993  # 2**53 + 1: float64 rounds it to 2**53
MAP = {"user_id": "uid", "ts": "time", "media_id": "item"}
CONST = {"action": "like"}


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_big_ids_stay_distinct_and_exact(tmp_path: Path) -> None:
    f = _csv(tmp_path / "ev.csv", "uid,time,item", [f"{BIG},1600000100,1", f"{BIG - 1},1600000100,1", "7,1600000100,1"])
    s = import_generic(f, str(tmp_path / "ds"), kind="explicit", mapping=MAP, constants=CONST)
    assert s.users == 3
    assert TimelineDataset(str(tmp_path / "ds")).user_ids().tolist() == [7, BIG - 1, BIG]


def test_a_non_integer_id_is_named_and_does_not_merge_users(tmp_path: Path) -> None:
    f = _csv(
        tmp_path / "ev.csv", "uid,time,item", [f"{BIG},1600000100,1", f"{BIG - 1},1600000100,1", "5.0,1600000100,1"]
    )
    with pytest.raises(TimelineError) as e:
        import_generic(f, str(tmp_path / "ds"), kind="explicit", mapping=MAP, constants=CONST)
    assert (e.value.record, e.value.field, e.value.value, e.value.reason) == (2, "user_id", "5.0", "not_an_integer")
    assert "ev.csv, record 2" in str(e.value) and "source column 'uid'" in str(e.value)
    s = import_generic(
        f, str(tmp_path / "ds"), kind="explicit", mapping=MAP, constants=CONST, policy=ValidationPolicy(on_error="drop")
    )
    assert s.users == 2 and "2/3 records kept; dropped user_id:not_an_integer: 1" in s.validation
    assert TimelineDataset(str(tmp_path / "ds")).user_ids().tolist() == [BIG - 1, BIG]


def test_big_media_ids_exact_beside_a_bad_one(tmp_path: Path) -> None:
    f = _csv(tmp_path / "ev.csv", "uid,time,item", [f"1,1600000100,{BIG}", f"1,1600000101,{BIG - 1}", "1,1600000102,x"])
    import_generic(
        f, str(tmp_path / "ds"), kind="explicit", mapping=MAP, constants=CONST, policy=ValidationPolicy(on_error="drop")
    )
    t = TimelineDataset(str(tmp_path / "ds")).read_table("explicit")
    assert t.column("media_id").to_pylist() == [BIG, BIG - 1]


def _iso_rows(bad: list[str]) -> list[str]:
    good = [f"{u},2020-01-01T00:{i:02d}:00,{i}" for i, u in enumerate(range(50))]
    return good + [f"99,{b},1" for b in bad]


def test_one_zoned_iso_timestamp_is_converted_not_the_column_dropped(tmp_path: Path) -> None:
    f = _csv(tmp_path / "ev.csv", "uid,time,item", _iso_rows(["2020-01-01 00:00:00Z"]))
    s = import_generic(
        f, str(tmp_path / "ds"), kind="explicit", mapping=MAP, constants=CONST, policy=ValidationPolicy(on_error="drop")
    )
    assert "51/51 records kept" in s.validation
    t = TimelineDataset(str(tmp_path / "ds")).read_table("explicit", [0, 49, 99])
    ts = dict(zip(t.column("user_id").to_pylist(), t.column("ts").to_pylist()))
    assert ts == {0: 1577836800, 49: 1577836800 + 49 * 60, 99: 1577836800}


def test_one_bad_timestamp_drops_only_its_row_and_raise_names_it(tmp_path: Path) -> None:
    f = _csv(tmp_path / "ev.csv", "uid,time,item", _iso_rows(["2020-01-01 00:00:00Z", "2020-13-45"]))
    with pytest.raises(TimelineError) as e:
        import_generic(f, str(tmp_path / "ds"), kind="explicit", mapping=MAP, constants=CONST)
    assert (e.value.record, e.value.field, e.value.value) == (51, "ts", "2020-13-45")
    assert "ev.csv, record 51" in str(e.value) and "source column 'time'" in str(e.value)
    s = import_generic(
        f, str(tmp_path / "ds"), kind="explicit", mapping=MAP, constants=CONST, policy=ValidationPolicy(on_error="drop")
    )
    assert "51/52 records kept; dropped ts:not_an_integer: 1" in s.validation


def test_millisecond_column_with_one_bad_value_keeps_the_unit(tmp_path: Path) -> None:
    rows = [f"{u},{1_700_000_000_000 + u},1" for u in range(10)] + ["11,soon,1"]
    f = _csv(tmp_path / "ev.csv", "uid,time,item", rows)
    s = import_generic(
        f,
        str(tmp_path / "ds"),
        kind="explicit",
        mapping=MAP,
        constants=CONST,
        time_unit="ms",
        policy=ValidationPolicy(on_error="drop"),
    )
    assert "10/11 records kept" in s.validation
    ts = TimelineDataset(str(tmp_path / "ds")).read_table("explicit").column("ts").to_pylist()
    assert set(ts) == {1_700_000_000}  # converted from ms, not read as seconds


def test_float_id_column_beyond_2_53_is_rejected_not_merged(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "ev.parquet"
    ids = [float(2**53), float(2**53 + 2), 7.0]  # 2**53 + 2 is a float; as ids they may stand for merged users
    pq.write_table(pa.table({"uid": ids, "time": [1_600_000_100, 1_600_000_101, 1_600_000_102], "item": [1, 1, 1]}), f)
    with pytest.raises(TimelineError) as e:
        import_generic(f, str(tmp_path / "ds"), kind="explicit", mapping=MAP, constants=CONST)
    assert (e.value.record, e.value.field, e.value.reason) == (1, "user_id", "not_an_integer")
    assert "source column 'uid'" in str(e.value)
    ok = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"uid": [5.0, 7.0], "time": [1_600_000_100, 1_600_000_101], "item": [1, 1]}), ok)
    s = import_generic(ok, str(tmp_path / "ok"), kind="explicit", mapping=MAP, constants=CONST)
    assert s.users == 2


def test_value_range_rejects_ratings_off_the_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dv365.core.cli import main
    from dv365.core.importers.common import MappingError

    f = _csv(tmp_path / "r.csv", "uid,time,item,stars", ["1,1600000100,1,4", "2,1600000101,1,400", "3,1600000102,1,-3"])
    mapping = {**MAP, "value": "stars"}
    with pytest.raises(TimelineError) as e:
        import_generic(f, str(tmp_path / "a"), kind="explicit", mapping=mapping, constants=CONST, value_range=(1, 5))
    assert str(e.value) == "r.csv, record 1, user 2: field 'value' = 400.0: out_of_range (source column 'stars')"
    s = import_generic(f, str(tmp_path / "b"), kind="explicit", mapping=mapping, constants=CONST)
    assert s.explicit_events == 3  # no scale given: any number
    with pytest.raises(MappingError, match="value_range .* needs explicit events with a value column"):
        import_generic(f, str(tmp_path / "c"), kind="explicit", mapping=MAP, constants=CONST, value_range=(1, 5))
    args = ["import", "generic", str(f), "--kind", "explicit", "--const", "action=like", "--on-error", "drop"]
    args += [f"--map={k}={v}" for k, v in mapping.items()]
    assert main([*args, "--out", str(tmp_path / "d"), "--value-range", "1,5"]) == 0
    assert "dropped value:out_of_range: 2" in capsys.readouterr().out
    assert TimelineDataset(str(tmp_path / "d")).read_table("explicit").column("value").to_pylist() == [4.0]
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "e"), "--value-range", "5,1"])
    assert "--value-range: expected LO,HI with LO <= HI" in capsys.readouterr().err
