"""UniTi timelines: the Parquet dataset (write/read/append, memory:// and local), EventTable/Timelines, take_rows."""

from __future__ import annotations

import json
import posixpath
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dv365.core.errors import DatasetError, TimelineError
from dv365.core.timeline import (
    DatasetWriter,
    EventTable,
    TimelineDataset,
    Timelines,
    schema_for,
    take_rows,
    user_bucket,
)
from dv365.core.validation import ValidationPolicy, validate_table
from dv365.core.vocab import Vocabulary

T0 = 1_700_000_000
MakeEvents = Callable[..., pa.Table]


# --------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(params=["memory", "local"])
def url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A fresh dataset location: a ``memory://`` URL (removed afterwards) or a local folder."""
    if request.param == "local":
        yield str(tmp_path / "ds")
        return
    u = f"memory://dv365-test-{uuid.uuid4().hex}"
    yield u
    fs = fsspec.filesystem("memory")
    root = fsspec.core.url_to_fs(u)[1]
    if fs.exists(root):
        fs.rm(root, recursive=True)


def sample_events(make_events: MakeEvents, seed: int = 0, users: int = 12) -> dict[str, pa.Table]:
    """Explicit, implicit and request tables of ``users`` users, rows shuffled, with topics/labels."""
    rnd = random.Random(seed)
    actions = ["like", "follow", "comment", "save", "tag"]
    ex = [
        {
            "user_id": 1000 + u,
            "ts": T0 + rnd.randint(0, 10**6),
            "action": rnd.choice(actions),
            "topic_ids": [rnd.randint(0, 50) for _ in range(rnd.randint(0, 3))],
            "author_id": rnd.choice([None, 7]),
            "value": rnd.choice([None, 4.5]),
            "surface": rnd.choice(["feed", "reels"]),
        }
        for u in range(users)
        for _ in range(rnd.randint(1, 6))
    ]
    im = [
        {
            "user_id": 1000 + u,
            "ts": T0 + rnd.randint(0, 10**6),
            "dwell_time": float(rnd.randint(0, 300)),
            "video_duration": rnd.choice([None, 60.0]),
            "media_type": rnd.choice(["video", "image"]),
        }
        for u in range(0, users, 2)
        for _ in range(rnd.randint(1, 8))
    ]
    rq = [
        {"user_id": 1000 + u, "ts": T0 + 2 * 10**6 + i, "label_click": float(i % 2), "label_watch_time": 3.5 * i}
        for u in range(users)
        for i in range(2)
    ]
    for rows in (ex, im, rq):
        rnd.shuffle(rows)
    return {
        "explicit": make_events("explicit", ex),
        "implicit": make_events("implicit", im),
        "requests": make_events("requests", rq),
    }


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def part_files(ds: TimelineDataset, kind: str) -> list[str]:
    return sorted(p for p in ds.fs.find(posixpath.join(ds.root, kind)) if p.endswith(".parquet"))


def user_rows(tl: Timelines, row: int) -> dict[str, list[Any]]:
    """One user's events as plain lists (for comparisons)."""
    ex, im = tl.explicit, tl.implicit
    e, i = ex.user_slice(row), im.user_slice(row)
    assert ex.action is not None and im.dwell_time is not None
    return {
        "explicit_ts": ex.ts[e].tolist(),
        "actions": [tl.vocab.actions[c] for c in ex.action[e]],
        "implicit_ts": im.ts[i].tolist(),
        "dwell": im.dwell_time[i].tolist(),
    }


# --------------------------------------------------------------------------------------------------
# dataset round trips
# --------------------------------------------------------------------------------------------------
def test_write_read_round_trip(make_events: MakeEvents, vocab: Vocabulary, url: str) -> None:
    data = sample_events(make_events)
    with DatasetWriter(url, num_buckets=4, source="unit", extra={"note": "x"}) as w:
        w.add(**data)
    ds = TimelineDataset(url)
    assert (ds.meta.num_buckets, ds.meta.source, ds.meta.extra, ds.vocab) == (4, "unit", {"note": "x"}, vocab)
    for kind, table in data.items():
        expected = validate_table(table, kind, vocab)  # type: ignore[arg-type]
        got = ds.read_table(kind)
        assert sort_rows(got.to_pylist()) == sort_rows(expected.to_pylist()), kind
    assert ds.requests().column_names == schema_for("requests").names + ["label_click", "label_watch_time"]
    users = sorted({u for k in ("explicit", "implicit") for u in data[k].column("user_id").to_pylist()})
    assert ds.user_ids().tolist() == users
    stats = ds.meta.stats
    assert stats["users"] == len(users)
    assert (
        stats["events"]
        == stats["explicit_events"] + stats["implicit_events"]
        == (data["explicit"].num_rows + data["implicit"].num_rows)
    )
    n_ex = data["explicit"].num_rows
    assert stats["validation"]["explicit"] == f"{n_ex:,}/{n_ex:,} records kept"


def test_users_are_hash_partitioned_and_sorted(make_events: MakeEvents, url: str) -> None:
    with DatasetWriter(url, num_buckets=3) as w:
        w.add(**sample_events(make_events, seed=1, users=30))
    ds = TimelineDataset(url)
    for kind in ("explicit", "implicit", "requests"):
        files = part_files(ds, kind)
        assert files
        for path in files:
            bucket = int(path.split("bucket=")[1].split("/")[0])
            with ds.fs.open(path, "rb") as f:
                t = pq.read_table(f)
            uid, ts = t.column("user_id").to_numpy(), t.column("ts").to_numpy()
            assert (user_bucket(uid, 3) == bucket).all(), path
            assert (np.diff(uid) >= 0).all() and ((np.diff(uid) > 0) | (np.diff(ts) >= 0)).all(), path


def test_read_users_in_given_order_with_user_without_events(make_events: MakeEvents, url: str) -> None:
    data = sample_events(make_events)
    with DatasetWriter(url, num_buckets=4) as w:
        w.add(**data)
    ds = TimelineDataset(url)
    order = [1005, 999_999, 1000, 1003]  # 999_999 has no events; 1003 has no implicit events
    tl = ds.read_users(order)
    assert tl.user_ids.tolist() == order and len(tl) == 4
    assert tl.explicit.lengths[1] == tl.implicit.lengths[1] == 0
    assert tl.implicit.lengths[3] == 0
    ex = data["explicit"].to_pylist()
    for row, uid in enumerate(order):
        got = user_rows(tl, row)
        want = sorted((r["ts"], r["action"]) for r in ex if r["user_id"] == uid)
        assert list(zip(got["explicit_ts"], got["actions"])) == want
        assert got["implicit_ts"] == sorted(r["ts"] for r in data["implicit"].to_pylist() if r["user_id"] == uid)


def test_iter_timelines_covers_every_user_exactly_once(make_events: MakeEvents, url: str) -> None:
    with DatasetWriter(url, num_buckets=5) as w:
        w.add(**sample_events(make_events, seed=2, users=23))
    ds = TimelineDataset(url)
    seen: list[int] = []
    events = 0
    for tl in ds.iter_timelines(batch_users=3):
        assert 1 <= len(tl) <= 3
        assert (tl.lengths() > 0).all()
        seen.extend(tl.user_ids.tolist())
        events += tl.num_events
        for row in range(len(tl)):  # each batch row is that user's whole, sorted timeline
            assert (np.diff(tl.explicit.ts[tl.explicit.user_slice(row)]) >= 0).all()
    assert sorted(seen) == ds.user_ids().tolist() and len(seen) == len(set(seen)) == 23
    assert events == ds.meta.stats["events"]


def test_append_adds_parts_and_merges_a_users_events(make_events: MakeEvents, url: str) -> None:
    first = make_events("explicit", [{"user_id": 5, "ts": T0 + t, "action": "like"} for t in (30, 10)])
    second = make_events(
        "explicit",
        [{"user_id": 5, "ts": T0 + t, "action": "save"} for t in (20, 40, 0)]
        + [{"user_id": 6, "ts": T0, "action": "tag"}],
    )
    with DatasetWriter(url, num_buckets=2) as w:
        w.add(explicit=first)
    ds = TimelineDataset(url)
    files_before = part_files(ds, "explicit")
    with DatasetWriter(url, mode="append") as w:
        w.add(explicit=second)
    ds = TimelineDataset(url)
    files_after = part_files(ds, "explicit")
    assert set(files_before) < set(files_after)  # new parts, old ones untouched
    bucket5 = int(user_bucket(np.array([5]), 2)[0])
    assert len([p for p in files_after if f"bucket={bucket5:05d}" in p]) == 2  # user 5 spread over two parts
    got = user_rows(ds.read_users([5]), 0)
    assert got["explicit_ts"] == [T0 + t for t in (0, 10, 20, 30, 40)]
    assert got["actions"] == ["save", "like", "save", "like", "save"]
    assert ds.read_bucket("explicit", bucket5, np.array([5])).column("ts").to_pylist() == got["explicit_ts"]
    assert (ds.meta.stats["users"], ds.meta.stats["events"]) == (2, 6)
    merged = [user_rows(t, t.user_ids.tolist().index(5)) for t in ds.iter_timelines() if 5 in t.user_ids.tolist()]
    assert merged == [got]


def test_append_with_run_id_can_be_redone_after_a_kill(make_events: MakeEvents, url: str) -> None:
    """A recurring job appends with a deterministic run id: a killed append (parts flushed, never closed) is
    cleaned up by remove_run_parts and redone; completed appends are listed; other runs are untouched."""
    from dv365.core.timeline import appended_runs, remove_run_parts

    first = make_events("explicit", [{"user_id": 5, "ts": T0 + 10, "action": "like"}])
    new = make_events("explicit", [{"user_id": u, "ts": T0 + 20, "action": "save"} for u in (5, 6)])
    with DatasetWriter(url, num_buckets=2) as w:
        w.add(explicit=first)
    base = set(part_files(TimelineDataset(url), "explicit"))
    with pytest.raises(RuntimeError, match="killed"):
        with DatasetWriter(url, mode="append", run_id="cycle_0002", flush_rows=1) as w:
            w.add(explicit=new)  # flushed: its parts are already in the folders
            raise RuntimeError("killed")
    assert appended_runs(url) == []  # never completed
    assert remove_run_parts(url, "cycle_0002") >= 1
    assert set(part_files(TimelineDataset(url), "explicit")) == base  # only the killed run's parts went
    with DatasetWriter(url, mode="append", run_id="cycle_0002") as w:
        w.add(explicit=new)
    ds = TimelineDataset(url)
    assert appended_runs(url) == ["cycle_0002"]
    assert user_rows(ds.read_users([5]), 0)["explicit_ts"] == [T0 + 10, T0 + 20]  # no duplicate rows
    assert (ds.meta.stats["users"], ds.meta.stats["events"]) == (2, 3)
    with pytest.raises(ValueError, match="run_id"):
        DatasetWriter(url, mode="append", run_id="../x")


def test_incomplete_write_is_invisible(make_events: MakeEvents, url: str) -> None:
    data = sample_events(make_events)
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(url, num_buckets=2, flush_rows=1) as w:
            w.add(**data)  # parts are flushed ...
            raise RuntimeError("boom")  # ... but the dataset is never closed
    fs, root = fsspec.core.url_to_fs(url)
    assert fs.find(root), "parts were written"
    with pytest.raises(DatasetError, match="_dataset.json not found"):
        TimelineDataset(url)
    with pytest.raises(DatasetError, match="cannot append"):
        DatasetWriter(url, mode="append")
    # a bad record stops the write the same way
    with pytest.raises(TimelineError):
        with DatasetWriter(url, num_buckets=2) as w:
            w.add(implicit=make_events("implicit", [{"user_id": 1, "ts": -5}]))
    with pytest.raises(DatasetError):
        TimelineDataset(url)
    # a new create replaces the leftovers; creating over a complete dataset is refused
    with DatasetWriter(url, num_buckets=2) as w:
        w.add(explicit=data["explicit"])
    assert TimelineDataset(url).read_table("implicit").num_rows == 0
    with pytest.raises(DatasetError, match="already exists"):
        DatasetWriter(url)


@pytest.mark.parametrize(
    "meta,match",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"format": "parquet"}), "not a UniTi dataset"),
        (json.dumps({"format": "dv365.uniti", "version": 99, "num_buckets": 1, "vocab": {}}), "newer"),
    ],
)
def test_unknown_dataset_formats_are_refused(url: str, meta: str, match: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    with fs.open(posixpath.join(root, "_dataset.json"), "w") as f:
        f.write(meta)
    with pytest.raises(DatasetError, match=match):
        TimelineDataset(url)


def test_meta_with_missing_keys_is_a_dataset_error(url: str) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    with fs.open(posixpath.join(root, "_dataset.json"), "w") as f:
        f.write(json.dumps({"format": "dv365.uniti", "version": 1}))
    with pytest.raises(DatasetError):
        TimelineDataset(url)


def test_empty_dataset() -> None:
    url = f"memory://dv365-test-{uuid.uuid4().hex}"
    with DatasetWriter(url, num_buckets=2):
        pass
    ds = TimelineDataset(url)
    assert (ds.meta.stats["users"], ds.meta.stats["events"]) == (0, 0)
    assert ds.user_ids().tolist() == [] and list(ds.iter_timelines()) == []
    tl = ds.read_users([1, 2])
    assert tl.lengths().tolist() == [0, 0]
    assert ds.read_table("explicit").schema == schema_for("explicit")


def test_local_dataset_with_every_record_dropped(make_events: MakeEvents, tmp_path: Any) -> None:
    url = str(tmp_path / "all-dropped")
    with DatasetWriter(url, policy=ValidationPolicy(on_error="drop")) as w:
        w.add(implicit=make_events("implicit", [{"user_id": 1, "ts": -1}]))
    ds = TimelineDataset(url)
    assert ds.meta.stats["users"] == 0
    assert ds.meta.stats["validation"]["implicit"] == "0/1 records kept; dropped ts:negative_timestamp: 1"


def test_writer_arguments_are_checked(url: str) -> None:
    with pytest.raises(ValueError, match="mode"):
        DatasetWriter(url, mode="bogus")


def test_requests_with_different_labels_in_two_adds(make_events: MakeEvents, url: str) -> None:
    with DatasetWriter(url, num_buckets=1) as w:
        w.add(
            explicit=make_events("explicit", [{"user_id": 1, "ts": T0}]),
            requests=make_events("requests", [{"user_id": 1, "ts": T0 + 9, "label_click": 1.0}]),
        )
        w.add(requests=make_events("requests", [{"user_id": 2, "ts": T0 + 8, "label_watch": 2.0}]))
    rows = TimelineDataset(url).requests().select(["user_id", "label_click", "label_watch"]).to_pylist()
    assert rows == [
        {"user_id": 1, "label_click": 1.0, "label_watch": None},
        {"user_id": 2, "label_click": None, "label_watch": 2.0},
    ]


def test_create_never_deletes_unrelated_files(make_events: MakeEvents, tmp_path: Any) -> None:
    folder = tmp_path / "my-project"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    try:
        with DatasetWriter(str(folder)) as w:
            w.add(explicit=make_events("explicit", [{"user_id": 1, "ts": T0}]))
    except DatasetError:
        pass  # refusing is fine too
    assert (folder / "notes.txt").read_text() == "precious"


# --------------------------------------------------------------------------------------------------
# in-memory timelines
# --------------------------------------------------------------------------------------------------
def assert_event_tables_equal(a: EventTable, b: EventTable) -> None:
    assert a.kind == b.kind
    for name in (
        "user_ids",
        "offsets",
        "ts",
        "media_id",
        "author_id",
        "topic_offsets",
        "topic_values",
        "media_type",
        "surface",
        "action",
        "value",
        "video_duration",
        "dwell_time",
    ):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
        else:
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


def test_event_table_arrow_round_trip(make_events: MakeEvents, vocab: Vocabulary) -> None:
    data = sample_events(make_events, seed=3)
    tl = Timelines.from_arrow(data["explicit"], data["implicit"], vocab)
    for table in (tl.explicit, tl.implicit):
        arrow = table.to_arrow(vocab)
        assert arrow.schema == schema_for(table.kind)
        back = EventTable.from_arrow(arrow, table.kind, vocab, table.user_ids)
        assert_event_tables_equal(back, table)
        # and the Arrow side: to_arrow(from_arrow(validated)) is the validated table, sorted per user
        expected = validate_table(data[table.kind], table.kind, vocab)  # type: ignore[arg-type]
        expected = expected.sort_by([("user_id", "ascending"), ("ts", "ascending")])
        assert sort_rows(arrow.to_pylist()) == sort_rows(expected.to_pylist())
        assert arrow.column("user_id").to_pylist() == expected.column("user_id").to_pylist()
        assert arrow.column("ts").to_pylist() == expected.column("ts").to_pylist()


def test_event_table_empty_and_users_without_events(vocab: Vocabulary, make_events: MakeEvents) -> None:
    e = EventTable.empty("implicit", np.array([3, 4]))
    assert (e.num_events, e.lengths.tolist(), e.to_arrow(vocab).num_rows) == (0, [0, 0], 0)
    table = EventTable.from_arrow(schema_for("explicit").empty_table(), "explicit", vocab, np.array([1, 2]))
    assert table.offsets.tolist() == [0, 0, 0] and table.topic_offsets.tolist() == [0]
    tl = Timelines.from_arrow(make_events("explicit", [{"user_id": 2, "ts": T0}]), None, vocab, user_ids=[9, 2])
    assert tl.lengths().tolist() == [0, 1]
    with pytest.raises(ValueError, match="not aligned"):
        Timelines(
            np.array([1]), EventTable.empty("explicit", np.array([1])), EventTable.empty("implicit", np.array([2]))
        )


def test_timelines_from_arrow_validates_with_policy(make_events: MakeEvents, vocab: Vocabulary) -> None:
    ex = make_events("explicit", [{"user_id": 1, "ts": T0, "action": "like"}, {"user_id": 2, "ts": T0, "action": "x"}])
    with pytest.raises(TimelineError, match="record 1, user 2: field 'action' = 'x': unknown_action"):
        Timelines.from_arrow(ex, None, vocab)
    tl = Timelines.from_arrow(ex, None, vocab, policy=ValidationPolicy(on_error="drop"))
    assert tl.user_ids.tolist() == [1]
    with pytest.raises(TimelineError, match="absurd_length"):
        Timelines.from_arrow(ex.slice(0, 1), None, vocab, policy=ValidationPolicy(max_events=0))


def test_take_rows(make_events: MakeEvents, vocab: Vocabulary) -> None:
    data = sample_events(make_events, seed=4)
    tl = Timelines.from_arrow(data["explicit"], data["implicit"], vocab)
    rows = np.array([5, 0, 5, 3])  # any order, repeats allowed
    for table in (tl.explicit, tl.implicit):
        sub = take_rows(table, rows)
        direct = EventTable.from_arrow(table.to_arrow(vocab), table.kind, vocab, table.user_ids[rows])
        assert_event_tables_equal(sub, direct)
    empty = take_rows(tl.explicit, np.zeros(0, np.int64))
    assert (len(empty.user_ids), empty.num_events, empty.topic_offsets.tolist()) == (0, 0, [0])


event_rows = st.lists(
    st.fixed_dictionaries(
        {
            "user_id": st.integers(0, 6),
            "ts": st.integers(T0, T0 + 50),
            "media_id": st.integers(0, 3),
            "topic_ids": st.lists(st.integers(0, 9), max_size=3),
            "action": st.sampled_from(["like", "save", "tag"]),
            "dwell_time": st.sampled_from([0.0, 1.5, 30.0]),
        }
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ex_rows=event_rows, im_rows=event_rows)
def test_from_arrow_sorts_by_ts_and_keeps_every_event(
    make_events: MakeEvents, vocab: Vocabulary, ex_rows: list[dict[str, Any]], im_rows: list[dict[str, Any]]
) -> None:
    """For random small timelines, each user's events come out sorted by ts, none lost or duplicated."""
    ex_in = [{k: v for k, v in r.items() if k != "dwell_time"} for r in ex_rows]
    im_in = [{k: v for k, v in r.items() if k != "action"} for r in im_rows]
    tl = Timelines.from_arrow(make_events("explicit", ex_in), make_events("implicit", im_in), vocab)
    users = sorted({r["user_id"] for r in ex_in + im_in})
    assert tl.user_ids.tolist() == users
    for row, uid in enumerate(users):
        for table, rows, key in ((tl.explicit, ex_in, "action"), (tl.implicit, im_in, "dwell_time")):
            s = table.user_slice(row)
            ts = table.ts[s]
            assert (np.diff(ts) >= 0).all()
            topics = [
                table.topic_values[table.topic_offsets[i] : table.topic_offsets[i + 1]].tolist()
                for i in range(s.start, s.stop)
            ]
            extra = (
                [vocab.actions[c] for c in table.action[s]]
                if key == "action"  # type: ignore[index]
                else table.dwell_time[s].tolist()
            )  # type: ignore[index]
            got = Counter((int(t), int(m), tuple(tp), x) for t, m, tp, x in zip(ts, table.media_id[s], topics, extra))
            want = Counter((r["ts"], r["media_id"], tuple(r["topic_ids"]), r[key]) for r in rows if r["user_id"] == uid)
            assert got == want


def test_overwrite_and_remove_dataset(make_events: MakeEvents, tmp_path: Any) -> None:
    from dv365.core.timeline import remove_dataset

    url = str(tmp_path / "ds")
    with DatasetWriter(url) as w:
        w.add(explicit=make_events("explicit", [{"user_id": 1, "ts": T0}]))
    with pytest.raises(DatasetError, match="already exists"):
        DatasetWriter(url)
    with DatasetWriter(url, mode="overwrite") as w:
        w.add(explicit=make_events("explicit", [{"user_id": 2, "ts": T0}]))
    assert TimelineDataset(url).user_ids().tolist() == [2]
    assert remove_dataset(url) and not remove_dataset(str(tmp_path / "missing"))
    (tmp_path / "ds" / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not part of a dv365 dataset"):
        remove_dataset(url)
    assert (tmp_path / "ds" / "keep.txt").exists()


def test_row_groups_are_chosen_by_user_id_statistics(tmp_path) -> None:
    """read_bucket reads only the row groups whose user_id range brackets a requested user."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dv365.core.timeline import _row_groups_for

    uid = np.repeat(np.arange(0, 100, 2), 10)  # users 0, 2, ..., 98, 10 rows each: 10 users per group of 100
    pq.write_table(pa.table({"user_id": uid, "ts": np.arange(len(uid))}), tmp_path / "p.parquet", row_group_size=100)
    meta = pq.ParquetFile(tmp_path / "p.parquet").metadata
    assert meta.num_row_groups == 5
    assert _row_groups_for(meta, np.array([3])) == [0]  # inside group 0's range: statistics cannot rule it out
    assert _row_groups_for(meta, np.array([4, 58])) == [0, 2]
    assert _row_groups_for(meta, np.array([98, 0, 41])) == [0, 2, 4]
    assert _row_groups_for(meta, np.array([-5, 1000, 19])) == []  # 19 lies between groups 0 (..18) and 1 (20..)


def test_read_users_over_many_row_groups_and_appended_parts_equals_the_sorted_read(
    make_events: MakeEvents, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_users reads only the row groups that may hold its users and leaves the picking and ordering to
    EventTable.from_arrow (other users' rows included, parts unsorted): with 3-row groups and three appends
    (a user's older events arriving later), every subset of users, in any order, reads exactly what the sorted,
    filtered read of the same users gives."""
    import dv365.core.timeline as timeline

    monkeypatch.setattr(timeline, "EVENT_ROW_GROUP_ROWS", 3)
    url = str(tmp_path / "ds")
    for i in range(3):
        ev = sample_events(make_events, seed=i, users=9)
        with DatasetWriter(url, num_buckets=2, mode="create" if i == 0 else "append") as w:
            w.add(explicit=ev["explicit"], implicit=ev["implicit"])
    ds = TimelineDataset(url)
    f = part_files(ds, "explicit")[0]
    assert pq.ParquetFile(f).metadata.num_row_groups > 2  # the reads really pick among row groups
    rnd = random.Random(0)
    users = ds.user_ids().tolist()
    for _ in range(6):
        ids = np.array(rnd.sample(users + [99_999], rnd.randint(1, len(users))), np.int64)
        got = ds.read_users(ids)
        ex = ds.read_table("explicit", ids, dictionary=True)  # sorted per bucket, only these users
        im = ds.read_table("implicit", ids, dictionary=True)
        want = Timelines(
            ids,
            EventTable.from_arrow(ex, "explicit", ds.vocab, ids),
            EventTable.from_arrow(im, "implicit", ds.vocab, ids),
            ds.vocab,
        )
        assert got.user_ids.tolist() == ids.tolist()
        for row in range(len(ids)):
            assert user_rows(got, row) == user_rows(want, row)
            for t in (got.explicit, got.implicit):
                assert (np.diff(t.ts[t.user_slice(row)]) >= 0).all()
