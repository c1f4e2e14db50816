"""Dense ids at import: ``DatasetWriter(dense_ids=...)`` / ``dv365 import ... --dense-ids`` store media, author and
topic ids as table rows 0..N-1, keep the raw ids in the dataset, extend the same maps on append (earlier ids
keep their rows), and commit the maps with ``_dataset.json`` (a failed append changes nothing)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from dv365.core.errors import DatasetError
from dv365.core.timeline import DatasetWriter, TimelineDataset, schema_for

ROOT = Path(__file__).resolve().parents[2]
MOVIELENS_100K = ROOT / "tests" / "fixtures" / "movielens-100k"
T0 = 1_700_000_000


def events(rows: list[dict[str, Any]], kind: str = "explicit") -> pa.Table:
    sch = schema_for(kind)
    base = {"action": "like"} if kind == "explicit" else {"dwell_time": 3.0}
    return pa.table({f.name: [{**base, **r}.get(f.name) for r in rows] for f in sch}, schema=sch)


def random_rows(seed: int, users: range, n: int) -> list[dict[str, Any]]:
    rnd = np.random.default_rng(seed)
    return [
        {
            "user_id": int(rnd.choice(users)),
            "ts": T0 + int(rnd.integers(0, 10**6)),
            "media_id": int(rnd.choice([10**12 + 7, 3, 999_983, 42, 5_000_000_000])) + int(rnd.integers(0, 20)),
            "author_id": None if rnd.random() < 0.2 else int(rnd.integers(10**9, 10**9 + 30)),
            "topic_ids": None
            if rnd.random() < 0.1
            else [int(x) for x in rnd.integers(70_000, 70_050, rnd.integers(0, 4))],
        }
        for _ in range(n)
    ]


def raw_view(ds: TimelineDataset, kind: str) -> list[tuple[Any, ...]]:
    """Every event of ``kind`` with its ids translated back to raw ids through the dataset's maps (sorted)."""
    t = ds.read_table(kind)
    media, author, topic = (ds.id_map(k) for k in ("media", "author", "topic"))
    out = []
    for r in t.select(["user_id", "ts", "media_id", "author_id", "topic_ids"]).to_pylist():
        out.append(
            (
                r["user_id"],
                r["ts"],
                int(media[r["media_id"]]),
                None if r["author_id"] is None else int(author[r["author_id"]]),
                tuple(int(topic[x]) for x in (r["topic_ids"] or [])),
            )
        )
    return sorted(out, key=repr)


def plain(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(
        ((r["user_id"], r["ts"], r["media_id"], r["author_id"], tuple(r["topic_ids"] or [])) for r in rows), key=repr
    )


def test_dense_ids_round_trip_and_appends_keep_earlier_rows(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    first = random_rows(0, range(1, 9), 300)
    with DatasetWriter(url, num_buckets=3, dense_ids=True) as w:
        w.add(explicit=events(first[:150]))
        w.add(explicit=events(first[150:]), implicit=events(first[:40], "implicit"))
    ds = TimelineDataset(url)
    assert ds.dense_id_types == ("author", "media", "topic")
    media0 = ds.id_map("media")
    # dense: rows 0..N-1, in order of first appearance (the first add's rows first), each raw id once
    t = ds.read_table("explicit")
    assert sorted(set(t.column("media_id").to_pylist())) == list(range(len(media0)))
    assert len(set(media0.tolist())) == len(media0) and media0[0] == first[0]["media_id"]
    assert raw_view(ds, "explicit") == plain(first)
    assert raw_view(ds, "implicit") == plain(first[:40])

    # append: new raw ids get new rows at the end, earlier ids keep theirs
    more = random_rows(1, range(5, 14), 200) + [{**first[0], "user_id": 77, "media_id": 1}]
    with DatasetWriter(url, mode="append") as w:
        w.add(explicit=events(more))
    ds = TimelineDataset(url)
    media1 = ds.id_map("media")
    assert media1[: len(media0)].tolist() == media0.tolist() and len(media1) > len(media0)
    assert raw_view(ds, "explicit") == plain(first + more)
    maps = sorted(os.listdir(tmp_path / "ds" / "ids"))  # the replaced maps are gone, the committed ones listed
    assert maps == sorted(os.path.basename(p) for p in ds.meta.id_maps.values())  # type: ignore[union-attr]


def test_append_keeps_the_datasets_choice_and_a_failed_append_changes_nothing(tmp_path: Path) -> None:
    raw_url, dense_url = str(tmp_path / "raw"), str(tmp_path / "dense")
    rows = random_rows(2, range(1, 5), 50)
    with DatasetWriter(raw_url, num_buckets=2) as w:
        w.add(explicit=events(rows))
    with DatasetWriter(dense_url, num_buckets=2, dense_ids=["media"]) as w:
        w.add(explicit=events(rows))
    with pytest.raises(DatasetError, match="stores raw ids"):
        DatasetWriter(raw_url, mode="append", dense_ids=True)
    with pytest.raises(DatasetError, match=r"dense_ids=\['author'\].*\['media'\]"):
        DatasetWriter(dense_url, mode="append", dense_ids=["author"])
    with pytest.raises(ValueError, match="unknown id types"):
        DatasetWriter(str(tmp_path / "x"), dense_ids=["item"])
    ds = TimelineDataset(dense_url)
    assert ds.dense_id_types == ("media",)
    t = ds.read_table("explicit")  # only media is dense: authors stay raw
    assert sorted(x for x in t.column("author_id").to_pylist() if x is not None) == sorted(
        r["author_id"] for r in rows if r["author_id"] is not None
    )
    with pytest.raises(DatasetError, match="no dense 'author' ids"):
        ds.id_map("author")
    before = (ds.id_map("media").tolist(), ds.read_table("explicit").to_pylist())

    # an append that fails before it is committed (new ids flushed, maps never listed) leaves the dataset as it was
    w = DatasetWriter(dense_url, mode="append")
    w.add(explicit=events([{**rows[0], "media_id": 123_456_789}]))
    w.flush()
    del w
    ds = TimelineDataset(dense_url)
    assert (ds.id_map("media").tolist(), ds.read_table("explicit").to_pylist()) == before
    with DatasetWriter(dense_url, mode="append") as w2:  # the next append commits, and clears what was left
        w2.add(explicit=events([{**rows[0], "media_id": 5}]))
    ds = TimelineDataset(dense_url)
    assert ds.id_map("media").tolist() == before[0] + ([5] if 5 not in before[0] else [])
    assert len(os.listdir(tmp_path / "dense" / "ids")) == 1


def test_overwrite_replaces_the_maps(tmp_path: Path) -> None:
    url = str(tmp_path / "ds")
    with DatasetWriter(url, num_buckets=2, dense_ids=True) as w:
        w.add(explicit=events(random_rows(3, range(1, 4), 30)))
    with DatasetWriter(url, num_buckets=2, mode="overwrite") as w:
        w.add(explicit=events(random_rows(4, range(1, 4), 30)))
    ds = TimelineDataset(url)
    assert ds.dense_id_types == () and not os.listdir(tmp_path / "ds" / "ids")


def test_import_cli_dense_ids(tmp_path: Path) -> None:
    from dv365.core.cli import main

    raw, dense = str(tmp_path / "raw"), str(tmp_path / "dense")
    assert main(["import", "movielens", str(MOVIELENS_100K), "--out", raw]) == 0
    assert main(["import", "movielens", str(MOVIELENS_100K), "--out", dense, "--dense-ids"]) == 0
    a, b = TimelineDataset(raw), TimelineDataset(dense)
    assert a.dense_id_types == () and b.dense_id_types == ("author", "media", "topic")
    ta, tb = a.read_table("explicit"), b.read_table("explicit")
    media = b.id_map("media")
    assert media[tb.column("media_id").to_numpy()].tolist() == ta.column("media_id").to_pylist()
    assert tb.column("media_id").to_numpy().max() == len(media) - 1
    topic = b.id_map("topic")
    assert [[int(topic[x]) for x in ts] for ts in tb.column("topic_ids").to_pylist()] == ta.column(
        "topic_ids"
    ).to_pylist()
    assert "dense topic id" in b.meta.extra["topic_ids"]
    ra, rb = a.requests(), b.requests()  # request targets use the same maps as the events
    assert media[rb.column("media_id").to_numpy()].tolist() == ra.column("media_id").to_pylist()
