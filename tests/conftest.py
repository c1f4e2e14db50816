"""Shared fixtures: a default vocabulary and a builder of small valid UniTi Arrow tables."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import settings

# CI (CI=true) runs hypothesis derandomized: the same examples every run, so a landing never depends on
# luck; local runs keep exploring new examples (and the .hypothesis database replays any failure found).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

from dv365.core.timeline import schema_for  # noqa: E402 - after the hypothesis profile is chosen
from dv365.core.vocab import Vocabulary  # noqa: E402

DEFAULTS: dict[str, Any] = {
    "author_id": None,
    "topic_ids": [],
    "media_type": "video",
    "surface": "feed",
    "action": "like",
    "value": None,
    "dwell_time": 5.0,
    "video_duration": 30.0,
}


def event_table(kind: str, rows: Iterable[dict[str, Any]]) -> pa.Table:
    """A table in the UniTi schema of ``kind`` from row dicts (``user_id`` and ``ts`` required).

    Omitted fields get valid defaults (:data:`DEFAULTS`; ``media_id`` = 100 + ts). Extra keys (e.g.
    ``label_click`` for requests) become float32 columns after the schema's, in sorted order.
    """
    rows = list(rows)
    schema = schema_for(kind)
    extra = sorted({k for r in rows for k in r} - set(schema.names))
    fields = list(schema) + [pa.field(k, pa.float32()) for k in extra]
    cols = []
    for f in fields:
        if f.name == "media_id":
            values = [r.get("media_id", 100 + r["ts"]) for r in rows]
        else:
            values = [r.get(f.name, DEFAULTS.get(f.name)) for r in rows]
        cols.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


@pytest.fixture(scope="session")
def vocab() -> Vocabulary:
    """The default vocabulary (immutable, so shared by every test)."""
    return Vocabulary()


@pytest.fixture(scope="session")
def make_events() -> Callable[[str, Iterable[dict[str, Any]]], pa.Table]:
    """The :func:`event_table` builder: ``make_events("implicit", [{"user_id": 1, "ts": 10}, ...])``."""
    return event_table
