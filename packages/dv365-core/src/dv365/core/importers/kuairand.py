"""KuaiRand interaction logs -> UniTi, joined with the KuaiRand video catalog.

Log layout (KuaiRand-Pure/1K/27K ``log_*.csv``): user_id, video_id, date, hourmin, time_ms, is_click,
is_like, is_follow, is_comment, is_forward, is_hate, long_view, play_time_ms, duration_ms,
profile_stay_time, comment_stay_time, [is_profile_stay,] is_profile_enter, is_rand, tab.

Each log row (an impression) becomes:

* one *implicit* event: ``ts = time_ms // 1000``, ``dwell_time = play_time_ms / 1000``,
  ``video_duration = duration_ms / 1000`` (the catalog's duration where the log has none or 0),
  ``surface`` from ``tab`` (:data:`DEFAULT_TAB_SURFACES`);
* one *explicit* event per positive flag (:data:`FLAG_ACTIONS`), at the same ``ts``; it exists only with its
  impression (an impression that validation drops, or a log row repeating an earlier one, takes it along);
* one training request with labels (:data:`LABELS`): clicks, likes, ... and the watch time in seconds.

Media attributes come from the catalog (``video_features_basic*.csv``): ``author_id``, ``topic_ids`` =
the video's tags, ``media_type`` from ``video_type`` (NORMAL -> video, AD -> ad, else other). A video the
catalog lacks keeps its events with a null author, no topics and media type ``other``; the summary counts them.
Logs are streamed block by block, so the multi-GB KuaiRand-27K logs import in bounded memory.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dv365.core.catalog import Catalog, load_kuairand_catalog
from dv365.core.errors import DatasetError
from dv365.core.importers.common import (
    Block,
    ImportSummary,
    MappingError,
    block_origin,
    gather_topics,
    iter_csv,
    repeated_rows,
    write_parts,
)
from dv365.core.validation import ValidationPolicy
from dv365.core.vocab import DEFAULT_SURFACES

# KuaiRand publishes ``tab`` only as a scenario id in [0, 14], without names. This default is a stable
# convention that gives the first six scenarios distinct UniTi surfaces (so per-surface slices separate
# them); it is NOT a claim about Kuaishou's UI. Tabs not listed -> "other". Override with ``tab_surfaces``
# (CLI: ``--tab-map TAB=SURFACE``).
DEFAULT_TAB_SURFACES: dict[int, str] = {0: "feed", 1: "reels", 2: "explore", 3: "profile", 4: "search", 5: "stories"}
# flag column -> explicit action (one event per positive flag)
FLAG_ACTIONS: dict[str, str] = {
    "is_like": "like",
    "is_follow": "follow",
    "is_comment": "comment",
    "is_forward": "forward",
    "is_hate": "hate",
    "long_view": "long_view",
    "is_profile_enter": "profile_enter",
}
# request label -> log column (flags as 1.0/0.0); label_watch_time is play_time_ms in seconds
LABELS: dict[str, str] = {
    "label_click": "is_click",
    "label_like": "is_like",
    "label_follow": "is_follow",
    "label_comment": "is_comment",
    "label_forward": "is_forward",
    "label_hate": "is_hate",
    "label_long_view": "long_view",
    "label_profile_enter": "is_profile_enter",
    "label_watch_time": "play_time_ms",
}
VIDEO_TYPES: dict[str, str] = {"NORMAL": "video", "AD": "ad"}
LOG_COLUMNS: tuple[str, ...] = tuple(
    dict.fromkeys(["user_id", "video_id", "time_ms", "play_time_ms", "duration_ms", "tab", "is_click", *FLAG_ACTIONS])
)

logger = logging.getLogger(__name__)
_LOG_TYPES = {c: (pa.int64() if c in ("user_id", "video_id") else pa.float64()) for c in LOG_COLUMNS}


@dataclass
class KuaiRandSummary(ImportSummary):
    """:class:`ImportSummary` plus KuaiRand input counts.

    Args:
        files: log files read.
        log_rows: log rows (impressions) read.
        rows_not_in_catalog: log rows whose video the catalog lacks (imported without author/topics).
        videos_not_in_catalog: distinct such video ids.
    """

    files: int = 0
    log_rows: int = 0
    rows_not_in_catalog: int = 0
    videos_not_in_catalog: int = 0


@dataclass(frozen=True)
class _Join:
    """What a log block is joined with: the catalog, its UniTi media types, the tab -> surface map."""

    catalog: Catalog
    media_types: np.ndarray  # [I+1] object: media type of each catalog row; the last one for "not in catalog"
    tabs: Mapping[int, str]
    max_watch_s: float  # label_watch_time is clamped like the impression's dwell time (policy.max_dwell_s)

    @classmethod
    def build(cls, catalog: Catalog, tabs: Mapping[int, str], max_watch_s: float) -> _Join:
        types = [VIDEO_TYPES.get(str(v), "other") for v in catalog.video_type] + ["other"]
        return cls(catalog, np.array(types, dtype=object), dict(tabs), float(max_watch_s))

    def take(self, values: np.ndarray, rows: np.ndarray, fill: float) -> np.ndarray:
        """``values[rows]`` of a catalog column, ``fill`` where the row is -1."""
        ext = np.concatenate([values, np.array([fill], dtype=values.dtype)])
        return ext[np.where(rows >= 0, rows, len(values))]


def _f64(t: pa.Table, name: str) -> np.ndarray:
    """A numeric log column as float64, NaN where empty."""
    col = t.column(name).combine_chunks().cast(pa.float64()).fill_null(np.nan)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)


def _surfaces(tab: np.ndarray, tabs: Mapping[int, str]) -> pa.Array:
    """Surface of each row from its ``tab`` (unknown or empty tab -> ``other``)."""
    uniq, inverse = np.unique(tab, return_inverse=True)
    names = np.array([tabs.get(int(x), "other") if np.isfinite(x) else "other" for x in uniq], dtype=object)
    return pa.array(names[inverse.reshape(-1)], pa.string())


def _media(t: pa.Table, j: _Join) -> tuple[dict[str, pa.Array], np.ndarray]:
    """The fields shared by a block's events and requests, and each row's catalog row (-1: not in it)."""
    vids = t.column("video_id").combine_chunks()
    rows = j.catalog.index_of(vids.fill_null(-1).to_numpy(zero_copy_only=False))
    ms = _f64(t, "time_ms")
    ok_ts = np.isfinite(ms)
    media = {
        "user_id": t.column("user_id").combine_chunks(),
        "ts": pa.array(np.floor_divide(np.where(ok_ts, ms, 0), 1000).astype(np.int64), pa.int64(), mask=~ok_ts),
        "media_id": vids,
        "author_id": pa.array(j.take(j.catalog.author_id, rows, 0), pa.int64(), mask=rows < 0),
        "topic_ids": gather_topics(j.catalog, rows),
        "media_type": pa.array(j.media_types[np.where(rows >= 0, rows, len(j.catalog))], pa.string()),
        "surface": _surfaces(_f64(t, "tab"), j.tabs),
    }
    return media, rows


def _durations(t: pa.Table, rows: np.ndarray, j: _Join) -> pa.Array:
    """Video duration (s): the log's ``duration_ms``, else (missing/0) the catalog's; null if neither."""
    dur = _f64(t, "duration_ms") / 1000.0
    dur = np.where(np.isnan(dur) | (dur <= 0), j.take(j.catalog.duration_s.astype(np.float64), rows, np.nan), dur)
    return pa.array(dur.astype(np.float32), pa.float32(), mask=np.isnan(dur))


def _flag_events(media: Mapping[str, pa.Array], t: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """One explicit event per positive flag of each row, with the row's media fields; and the log row of each."""
    hits = [np.flatnonzero(_f64(t, col) > 0) for col in FLAG_ACTIONS]
    idx = np.concatenate(hits).astype(np.int64)
    actions = np.repeat(np.array(list(FLAG_ACTIONS.values()), dtype=object), [len(h) for h in hits])
    events = pa.table(dict(media)).take(pa.array(idx))
    events = events.append_column("action", pa.array(actions, pa.string())).append_column(
        "value", pa.nulls(len(idx), pa.float32())
    )
    return events, idx


def _requests(media: Mapping[str, pa.Array], duration: pa.Array, t: pa.Table, max_watch_s: float) -> pa.Table:
    """One request per log row: the impression's media fields plus the :data:`LABELS` (a flag > 0 is 1.0, else
    0.0; an empty flag is a null label, which validation rejects; the watch time is capped at ``max_watch_s``)."""
    cols = {**media, "video_duration": duration}
    for label, col in LABELS.items():
        x = _f64(t, col)
        val = np.minimum(x / 1000.0, max_watch_s) if col == "play_time_ms" else (x > 0).astype(np.float64)
        cols[label] = pa.array(val.astype(np.float32), pa.float32(), mask=np.isnan(x))
    return pa.table(cols)


def _log_block(t: pa.Table, origin: str, j: _Join) -> tuple[Block, np.ndarray]:
    """One block of log rows -> implicit events, flag events, requests; plus the video ids not in the catalog.

    An impression that validation drops (e.g. NaN dwell), or that repeats an earlier log row of the block,
    takes its request and its flag events with it."""
    media, rows = _media(t, j)
    duration = _durations(t, rows, j)
    play = _f64(t, "play_time_ms") / 1000.0
    implicit = pa.table(
        {
            **media,
            "video_duration": duration,
            "dwell_time": pa.array(play.astype(np.float32), pa.float32(), mask=np.isnan(play)),
        }
    )
    flags, flag_rows = _flag_events(media, t)
    block = Block(
        {"implicit": implicit, "explicit": flags, "requests": _requests(media, duration, t, j.max_watch_s)},
        {"implicit": origin, "explicit": f"{origin} (flag events)", "requests": f"{origin} (requests)"},
        requests_of="implicit",  # validated first: its records are the log rows, so errors point at them
        explicit_of=flag_rows,
        duplicates={"implicit": repeated_rows(t)},
    )
    vids = media["media_id"].fill_null(-1).to_numpy(zero_copy_only=False)
    return block, vids[(rows < 0) & (vids >= 0)]


def import_kuairand(
    log_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_url: str | os.PathLike[str],
    *,
    catalog: Catalog | str | os.PathLike[str] | None = None,
    tab_surfaces: Mapping[int, str] | None = None,
    num_buckets: int = 16,
    policy: ValidationPolicy = ValidationPolicy(),
    source: str | None = None,
    simulated: bool = False,
    dense_ids: bool | Sequence[str] = False,
    overwrite: bool = False,
) -> KuaiRandSummary:
    """Imports KuaiRand log CSVs into one UniTi dataset (implicit + explicit events, requests).

    Args:
        log_files: one or more ``log_*.csv`` files (local paths or fsspec URLs), read in order.
        out_url: where to write the UniTi dataset (must not hold one already).
        catalog: a :class:`Catalog`, a folder/file with ``video_features_basic*.csv``, or ``None`` for the
            shipped KuaiRand-Pure catalog.
        tab_surfaces: ``{tab: surface}`` (default :data:`DEFAULT_TAB_SURFACES`; unknown tabs -> ``other``).
        num_buckets: user hash buckets of the dataset.
        policy: validation policy (``on_error="drop"`` drops bad records and counts them).
        source: the dataset's source tag (default ``"kuairand:<file names>"``).
        simulated: mark the dataset SIMULATED (a simulator wrote the input): reports on it say so.
        dense_ids: store these id types (``True``: media, author and topic) as dense table rows, raw ids kept in
            the dataset's id maps (:meth:`TimelineDataset.id_map`).
        overwrite: replace a dataset at ``out_url``; the old one stays until the new one is complete.

    Raises:
        DatasetError: a missing file, a missing log column (named, with the file), an unparsable value, a file
            given twice.
        MappingError: ``tab_surfaces`` names a surface outside the vocabulary.
        TimelineError: a record the writer's validation rejects (names file, record, user, field, value).

    Example::

        s = import_kuairand(["log_standard_4_08_to_4_21_pure.csv"], "data/kuairand")
        s.log_rows, s.implicit_events, s.rows_not_in_catalog
    """
    files = [str(log_files)] if isinstance(log_files, (str, os.PathLike)) else [str(f) for f in log_files]
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:
        raise DatasetError(f"{', '.join(twice)}: given more than once (its rows would be imported twice)")
    cat = catalog if isinstance(catalog, Catalog) else load_kuairand_catalog(catalog)
    tabs = dict(DEFAULT_TAB_SURFACES if tab_surfaces is None else tab_surfaces)
    bad = sorted({v for v in tabs.values() if v not in DEFAULT_SURFACES})
    if bad:
        raise MappingError(f"tab_surfaces: unknown surface(s) {', '.join(bad)}; valid: {', '.join(DEFAULT_SURFACES)}")
    join = _Join.build(cat, tabs, policy.max_dwell_s)
    counts = {"log_rows": 0, "rows_not_in_catalog": 0}
    missing: set[int] = set()

    def parts() -> Iterator[Block]:
        for path in files:
            name, start = posixpath.basename(path), 0
            for t in iter_csv(path, LOG_COLUMNS, column_types=_LOG_TYPES):
                block, not_found = _log_block(t, block_origin(name, start), join)
                start += t.num_rows
                counts["rows_not_in_catalog"] += len(not_found)
                missing.update(np.unique(not_found).tolist())
                yield block
            counts["log_rows"] += start
            logger.info(f"{path}: {start:,} log rows")

    names = [posixpath.basename(f) for f in files]
    extra = {
        "importer": "kuairand",
        "files": names,
        "catalog_videos": len(cat),
        "tab_surfaces": {str(k): v for k, v in sorted(tabs.items())},
        "flag_actions": FLAG_ACTIONS,
        "labels": LABELS,
    }
    base = write_parts(
        out_url,
        parts(),
        source=source or f"kuairand:{'+'.join(names)}",
        extra=extra,
        num_buckets=num_buckets,
        policy=policy,
        simulated=simulated,
        dense_ids=dense_ids,
        overwrite=overwrite,
    )
    return KuaiRandSummary(
        **base,
        files=len(files),
        log_rows=counts["log_rows"],
        rows_not_in_catalog=counts["rows_not_in_catalog"],
        videos_not_in_catalog=len(missing),
    )
