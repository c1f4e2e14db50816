"""UniTi timelines (paper §2.1): the in-memory columnar form and the Parquet dataset.

The Arrow schemas of the three table kinds are defined in :mod:`dv365.core.schema` and re-exported here.

On disk a UniTi dataset is a directory (any fsspec URL: a local path, ``memory://``, ``s3://``...)::

    <root>/_dataset.json                      # format, vocabulary, labels (simulated?), stats, committed parts
    <root>/explicit/bucket=00007/part-*.parquet  # explicit events of the users hashed to bucket 7
    <root>/implicit/bucket=00007/part-*.parquet
    <root>/requests/bucket=00007/part-*.parquet  # optional: training requests with label_* columns

Users are hash-partitioned into buckets so one user's events live in one bucket; inside a part file
rows are sorted by (user_id, ts). ``_dataset.json`` is written last (atomically): a dataset without it is
incomplete. It lists the part files it commits (``parts``); a reader reads exactly those, so the parts of an
append that failed or was killed stay invisible (datasets written before the list existed are globbed).

In memory, :class:`EventTable` holds one kind of event for many users in CSR form (``offsets``),
categoricals as int16 codes of a :class:`~dv365.core.vocab.Vocabulary`. :class:`Timelines` pairs the
explicit and implicit tables of the same users (aligned rows), which is what the slicer consumes.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dv365.core.errors import DatasetError
from dv365.core.fsio import open_atomic, url_to_fs
from dv365.core.schema import EXPLICIT_SCHEMA as EXPLICIT_SCHEMA  # re-exported: part of the timeline API
from dv365.core.schema import IMPLICIT_SCHEMA as IMPLICIT_SCHEMA
from dv365.core.schema import REQUEST_SCHEMA as REQUEST_SCHEMA
from dv365.core.schema import schema_for as schema_for
from dv365.core.validation import (
    ValidationPolicy,
    ValidationReport,
    check_timeline_lengths,
    validate_rows,
    validate_table,
)
from dv365.core.vocab import Vocabulary

# what a dataset folder may hold (the .tmp file: a _dataset.json write that was interrupted)
_DATASET_ENTRIES = ("_dataset.json", "_dataset.json.tmp", "explicit", "implicit", "requests", "ids")
FORMAT = "dv365.uniti"
FORMAT_VERSION = 1
EVENT_KINDS: tuple[str, str] = ("explicit", "implicit")
# string columns coded by the vocabulary (read dictionary-encoded for timelines)
CATEGORICAL_COLUMNS: tuple[str, ...] = ("media_type", "surface", "action")
# Rows per Parquet row group of a part. Parts are sorted by (user_id, ts) and a read picks row groups by their
# user_id statistics, so a group spanning fewer users means fewer other users' rows read: at the 40K-events
# profile, 256K-row groups read 1.9x the rows a 32-user batch needs, 64K-row groups 1.27x (and 2 ms/user less).
EVENT_ROW_GROUP_ROWS = 65_536
# id types that can be stored dense (``DatasetWriter(dense_ids=...)``) and the column holding each
ID_COLUMNS: dict[str, str] = {"media": "media_id", "author": "author_id", "topic": "topic_ids"}


def check_num_buckets(num_buckets: Any, where: str) -> int:
    """``num_buckets`` if it is an integer >= 1; else :class:`DatasetError` naming ``where`` and the value."""
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)) or num_buckets < 1:
        raise DatasetError(f"{where}: num_buckets must be an integer >= 1, got {num_buckets!r}")
    return int(num_buckets)


def user_bucket(user_ids: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket of each user id: a 64-bit mix (splitmix64 finaliser) modulo ``num_buckets``."""
    check_num_buckets(num_buckets, "user_bucket")
    x = np.asarray(user_ids, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(num_buckets)).astype(np.int64)


# ------------------------------------------------------------------------------------------------------
# In-memory columnar timelines
# ------------------------------------------------------------------------------------------------------
@dataclass
class EventTable:
    """One kind of event for many users, time-sorted per user, CSR by user.

    Row ``i`` of ``user_ids`` owns events ``offsets[i]:offsets[i+1]``. Topic ids are CSR by event
    (``topic_offsets`` [n+1], ``topic_values``). ``author_id`` is -1 when unknown; ``video_duration`` is
    NaN for non-videos. Explicit tables carry ``action``/``value``; implicit ones ``video_duration``/``dwell_time``.
    """

    kind: str
    user_ids: np.ndarray  # [U] int64
    offsets: np.ndarray  # [U+1] int64
    ts: np.ndarray  # [n] int64
    media_id: np.ndarray  # [n] int64
    author_id: np.ndarray  # [n] int64
    topic_offsets: np.ndarray  # [n+1] int64
    topic_values: np.ndarray  # [T] int64
    media_type: np.ndarray  # [n] int16 codes
    surface: np.ndarray  # [n] int16 codes
    action: np.ndarray | None = None  # [n] int16 codes (explicit)
    value: np.ndarray | None = None  # [n] float32 (explicit; NaN = none)
    video_duration: np.ndarray | None = None  # [n] float32 (implicit; NaN = not a video)
    dwell_time: np.ndarray | None = None  # [n] float32 (implicit)

    @property
    def num_events(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def empty(cls, kind: str, user_ids: np.ndarray | None = None) -> EventTable:
        u = np.zeros(0, np.int64) if user_ids is None else np.asarray(user_ids, np.int64)
        z64, z16, zf = np.zeros(0, np.int64), np.zeros(0, np.int16), np.zeros(0, np.float32)
        explicit = kind == "explicit"
        return cls(
            kind,
            u,
            np.zeros(len(u) + 1, np.int64),
            z64,
            z64,
            z64,
            np.zeros(1, np.int64),
            z64,
            z16,
            z16,
            action=z16 if explicit else None,
            value=zf if explicit else None,
            video_duration=None if explicit else zf,
            dwell_time=None if explicit else zf,
        )

    @classmethod
    def from_arrow(
        cls, table: pa.Table, kind: str, vocab: Vocabulary, user_ids: np.ndarray | None = None
    ) -> EventTable:
        """Builds from a *validated* table (any row order). ``user_ids`` fixes the row order and may
        include users without events here (empty ranges); by default, the users present, ascending."""
        uid = _int64(table.column("user_id"))
        ts = _int64(table.column("ts"))
        order = _user_time_order(uid, ts)
        if order is not None:
            uid = uid[order]
        if user_ids is None:
            user_ids = np.unique(uid) if order is None else uid[np.r_[True, uid[1:] != uid[:-1]]] if len(uid) else uid
        user_ids = np.asarray(user_ids, dtype=np.int64)
        pos = np.searchsorted(uid, user_ids, side="left")
        end = np.searchsorted(uid, user_ids, side="right")
        counts = end - pos
        # rows of the requested users in the requested order (others left out), as positions in ``table``;
        # ``None`` when that is every row in table order. The columns are gathered as numpy arrays (an Arrow
        # ``take`` of the whole table, list column included, cost more than the Parquet read itself)
        idx: np.ndarray | None = _ranges(pos, counts)
        if order is not None:
            idx = order[idx]
        if len(idx) == table.num_rows and (len(idx) == 0 or (idx[0] == 0 and np.all(np.diff(idx) == 1))):
            idx = None
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        def rows(a: np.ndarray) -> np.ndarray:
            return a if idx is None else a[idx]

        topics = table.column("topic_ids").combine_chunks()
        if topics.null_count:
            topics = topics.fill_null(pa.scalar([], topics.type))
        toff = topics.offsets.to_numpy().astype(np.int64)
        tvals = topics.flatten().to_numpy().astype(np.int64, copy=False)  # flatten: from offsets[0] on
        toff = toff - toff[0]
        if idx is not None:
            toff, tvals = _take_lists(toff, tvals, idx)

        def codes(name: str, vk: str) -> np.ndarray:
            return rows(arrow_codes(vocab, vk, table.column(name)))

        def f32(name: str) -> np.ndarray:
            a = table.column(name).to_numpy()
            return a.astype(np.float32) if idx is None else a[idx].astype(np.float32, copy=False)

        author = _int64(table.column("author_id").fill_null(-1))
        out = cls(
            kind=kind,
            user_ids=user_ids,
            offsets=offsets,
            ts=rows(ts),
            media_id=rows(_int64(table.column("media_id"))),
            author_id=rows(author),
            topic_offsets=toff,
            topic_values=tvals,
            media_type=codes("media_type", "media_types"),
            surface=codes("surface", "surfaces"),
        )
        if kind == "explicit":
            out.action = codes("action", "actions")
            out.value = f32("value")
        else:
            out.video_duration = f32("video_duration")
            out.dwell_time = f32("dwell_time")
        return out

    def to_arrow(self, vocab: Vocabulary) -> pa.Table:
        """Back to the UniTi Arrow schema (one row per event)."""
        uid = np.repeat(self.user_ids, self.lengths)
        topics = pa.ListArray.from_arrays(
            pa.array(self.topic_offsets.astype(np.int32)), pa.array(self.topic_values, pa.int64())
        )
        cols: dict[str, Any] = {
            "user_id": pa.array(uid, pa.int64()),
            "ts": pa.array(self.ts, pa.int64()),
            "media_id": pa.array(self.media_id, pa.int64()),
            "author_id": pa.array(self.author_id, pa.int64(), mask=self.author_id < 0),
            "topic_ids": topics,
            "media_type": pa.array(np.asarray(vocab.media_types, dtype=object)[self.media_type], pa.string()),
            "surface": pa.array(np.asarray(vocab.surfaces, dtype=object)[self.surface], pa.string()),
        }
        if self.kind == "explicit":
            assert self.action is not None and self.value is not None
            cols["action"] = pa.array(np.asarray(vocab.actions, dtype=object)[self.action], pa.string())
            cols["value"] = pa.array(self.value, pa.float32(), mask=np.isnan(self.value))
        else:
            assert self.video_duration is not None and self.dwell_time is not None
            cols["video_duration"] = pa.array(self.video_duration, pa.float32(), mask=np.isnan(self.video_duration))
            cols["dwell_time"] = pa.array(self.dwell_time, pa.float32())
        schema = schema_for(self.kind)
        return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)

    def user_slice(self, row: int) -> slice:
        return slice(int(self.offsets[row]), int(self.offsets[row + 1]))


@dataclass
class Timelines:
    """Explicit and implicit timelines of the same users, row-aligned (row i = ``user_ids[i]``)."""

    user_ids: np.ndarray
    explicit: EventTable
    implicit: EventTable
    vocab: Vocabulary = field(default_factory=Vocabulary)

    def __post_init__(self) -> None:
        for t in (self.explicit, self.implicit):
            if not np.array_equal(t.user_ids, self.user_ids):
                raise ValueError(f"{t.kind} table rows are not aligned with Timelines.user_ids")

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def num_events(self) -> int:
        return self.explicit.num_events + self.implicit.num_events

    def lengths(self) -> np.ndarray:
        """Events per user, both kinds together."""
        return self.explicit.lengths + self.implicit.lengths

    @classmethod
    def from_arrow(
        cls,
        explicit: pa.Table | None,
        implicit: pa.Table | None,
        vocab: Vocabulary | None = None,
        user_ids: Sequence[int] | np.ndarray | None = None,
        *,
        validate: bool = True,
        policy: ValidationPolicy = ValidationPolicy(),
    ) -> Timelines:
        """Builds aligned timelines from (optionally unvalidated) Arrow tables of events."""
        vocab = vocab or Vocabulary()
        tables: dict[str, pa.Table] = {}
        for kind, t in (("explicit", explicit), ("implicit", implicit)):
            if t is None:
                t = schema_for(kind).empty_table()
            tables[kind] = validate_table(t, kind, vocab, policy) if validate else t  # type: ignore[arg-type]
        if user_ids is None:
            ids = np.unique(
                np.concatenate([tables[k].column("user_id").to_numpy() for k in EVENT_KINDS]).astype(np.int64)
            )
        else:
            ids = np.asarray(user_ids, dtype=np.int64)
        ex = EventTable.from_arrow(tables["explicit"], "explicit", vocab, ids)
        im = EventTable.from_arrow(tables["implicit"], "implicit", vocab, ids)
        tl = cls(ids, ex, im, vocab)
        check_timeline_lengths(ids, tl.lengths(), policy, allow_empty=True)
        return tl


# ------------------------------------------------------------------------------------------------------
# Dataset on disk (fsspec)
# ------------------------------------------------------------------------------------------------------
@dataclass
class DatasetMeta:
    """Contents of ``_dataset.json``."""

    num_buckets: int
    vocab: Vocabulary
    source: str = ""
    simulated: bool = False
    created_at: float = field(default_factory=time.time)
    stats: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = FORMAT_VERSION
    parts: list[str] | None = None  # committed part files, relative to the root; None: glob (older datasets)
    # dense ids: id type -> the Parquet file (relative to the root) listing the raw id of each dense id
    id_maps: dict[str, str] | None = None

    def to_json(self) -> str:
        parts = {} if self.parts is None else {"parts": sorted(self.parts)}
        maps = {} if self.id_maps is None else {"id_maps": dict(sorted(self.id_maps.items()))}
        return json.dumps(
            {
                **parts,
                **maps,
                "format": self.format,
                "version": self.version,
                "num_buckets": self.num_buckets,
                "vocab": self.vocab.to_dict(),
                "source": self.source,
                "simulated": self.simulated,
                "created_at": self.created_at,
                "stats": self.stats,
                "extra": self.extra,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> DatasetMeta:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: _dataset.json is not valid JSON: {e}") from e
        if d.get("format") != FORMAT:
            raise DatasetError(f"{where}: not a UniTi dataset (format={d.get('format')!r}, expected {FORMAT!r})")
        if not isinstance(d.get("version"), int):
            raise DatasetError(f"{where}: _dataset.json has no integer 'version'")
        if int(d["version"]) > FORMAT_VERSION:
            raise DatasetError(
                f"{where}: dataset format version {d['version']} is newer than this dv365 ({FORMAT_VERSION})"
            )
        parts = d.get("parts")
        if parts is not None and not (isinstance(parts, list) and all(isinstance(p, str) for p in parts)):
            raise DatasetError(f"{where}: _dataset.json 'parts' must be a list of part file paths")
        if "num_buckets" in d:
            check_num_buckets(d["num_buckets"], f"{where}: _dataset.json")
        maps = d.get("id_maps")
        if maps is not None and not (
            isinstance(maps, dict) and all(k in ID_COLUMNS and isinstance(v, str) for k, v in maps.items())
        ):
            raise DatasetError(f"{where}: _dataset.json 'id_maps' must map id types {sorted(ID_COLUMNS)} to files")
        try:
            return cls(
                parts=parts,
                id_maps=maps,
                num_buckets=int(d["num_buckets"]),
                vocab=Vocabulary.from_dict(d["vocab"]),
                source=d.get("source", ""),
                simulated=bool(d.get("simulated", False)),
                created_at=float(d.get("created_at", 0.0)),
                stats=d.get("stats", {}),
                extra=d.get("extra", {}),
                format=d["format"],
                version=int(d["version"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{where}: _dataset.json is incomplete or malformed: {type(e).__name__}: {e}") from e


class DatasetWriter:
    """Writes a UniTi dataset: validates, hash-partitions by user, sorts, writes Parquet parts.

    Buffered: call :meth:`add` any number of times (e.g. one chunk of users at a time); rows are
    flushed per bucket when ``flush_rows`` accumulate, and :meth:`close` writes ``_dataset.json``, which lists
    the committed part files: until then nothing this writer wrote is visible to readers.
    ``mode="create"`` refuses an existing dataset, ``mode="overwrite"`` replaces it when :meth:`close` commits
    (the old dataset stays readable until then, and if the writer fails), ``mode="append"`` adds new parts to a
    finished one (meta stats updated).

    ``run_id`` names this writer's part files (``part-<run_id>-<n>.parquet``; default: random). A recurring
    job that appends with a deterministic ``run_id`` can make its append idempotent: if it was killed
    mid-way, :func:`remove_run_parts` deletes that run's parts before it appends again, and the run ids of
    completed appends are listed in ``_dataset.json`` (``meta.extra["appends"]``, see :func:`appended_runs`).

    Example::

        with DatasetWriter("memory://ds", source="example") as w:
            w.add(explicit=explicit_table, implicit=implicit_table)
        ds = TimelineDataset("memory://ds")
    """

    def __init__(
        self,
        url: str,
        *,
        vocab: Vocabulary | None = None,
        num_buckets: int = 16,
        source: str = "",
        simulated: bool = False,
        policy: ValidationPolicy = ValidationPolicy(),
        flush_rows: int = 2_000_000,
        mode: str = "create",
        extra: dict[str, Any] | None = None,
        run_id: str | None = None,
        dense_ids: bool | Sequence[str] = False,
    ) -> None:
        if run_id is not None and not (run_id and all(c.isalnum() or c in "_." for c in run_id)):
            raise ValueError(f"run_id must be letters, digits, '_' or '.', got {run_id!r}")
        if mode not in ("create", "overwrite", "append"):
            raise ValueError(f"mode must be 'create', 'overwrite' or 'append', got {mode!r}")
        if mode != "append":
            check_num_buckets(num_buckets, url)  # before anything is removed
        self._replaces = False  # overwriting a dataset: its files are deleted when the new one is committed
        self._old_parts: list[str] = []  # the part files of the dataset being overwritten
        self.url = url
        self.fs, self.root = url_to_fs(url)
        meta_path = posixpath.join(self.root, "_dataset.json")
        if mode == "append":
            if not self.fs.exists(meta_path):
                raise DatasetError(f"{url}: cannot append, no complete dataset here (no _dataset.json)")
            self.meta = DatasetMeta.from_json(self.fs.cat_file(meta_path).decode(), url)
            if self.meta.parts is None:  # an older dataset: what is there now is what it committed
                self.meta.parts = self._committed_now(self.meta)
        else:
            if self.fs.exists(meta_path):
                if mode == "create":
                    raise DatasetError(
                        f"{url}: a dataset already exists here; choose another output, or overwrite "
                        "it (--overwrite on the command line, mode='overwrite' in Python)"
                    )
                self._replaces = True
                self._keep_until_close(url, meta_path)
            else:
                self._remove_leftovers(url)
            self.meta = DatasetMeta(
                num_buckets=num_buckets,
                vocab=vocab or Vocabulary(),
                source=source,
                simulated=simulated,
                extra=dict(extra or {}),
                parts=[],
            )
        self._append = mode == "append"
        self.policy = policy
        self.flush_rows = flush_rows
        self.report: dict[str, ValidationReport] = {k: ValidationReport() for k in ("explicit", "implicit", "requests")}
        self.duplicates: dict[str, int] = {}  # valid records dropped as repeats of an earlier input row, by kind
        self._buf: dict[tuple[str, int], list[pa.Table]] = {}
        self._buf_rows = 0
        self._run = run_id or uuid.uuid4().hex[:8]
        # never write over a committed file (a run_id reused after its run was committed): then a fresh name
        committed = self.meta.parts if self._append else self._old_parts
        clash = any(posixpath.basename(p).startswith(f"part-{self._run}-") for p in committed)
        self._file_run = f"{self._run}.{uuid.uuid4().hex[:8]}" if clash else self._run
        self._part = 0
        self._written: list[str] = []  # part files of this writer, relative to the root
        self._kept_events = np.zeros(0, dtype=bool)  # rows kept by the last validation of a requests_of table
        self._closed = False
        self._maps = self._open_id_maps(dense_ids)  # id type -> raw ids by dense id (grown by add)

    def _open_id_maps(self, dense_ids: bool | Sequence[str]) -> dict[str, np.ndarray]:
        """The id maps this writer grows: an append continues the dataset's own (``dense_ids`` must then be left
        out or name the same types); a new dataset gets empty maps of the requested types."""
        want = dense_id_types(dense_ids)
        if self._append:
            old = self.meta.id_maps or {}
            have = sorted(old)
            if want and sorted(set(want)) != have:
                raise DatasetError(
                    f"{self.url}: dense_ids={sorted(set(want))} but this dataset stores "
                    f"{have or 'raw ids'}: an append keeps the dataset's own choice (leave dense_ids out)"
                )
            return {t: read_id_map(self.fs, posixpath.join(self.root, rel), self.url) for t, rel in old.items()}
        return {t: np.zeros(0, np.int64) for t in want}

    def _densify(self, t: pa.Table) -> pa.Table:
        """``t`` with its raw ids replaced by dense ones (ids seen first get new ids at the end of their map)."""
        for id_type, raw in self._maps.items():
            name = ID_COLUMNS[id_type]
            if name not in t.column_names:
                continue
            i = t.schema.get_field_index(name)
            col, self._maps[id_type] = dense_column(t.column(i), raw)
            t = t.set_column(i, t.schema.field(i), col)
        return t

    def _committed_now(self, meta: DatasetMeta) -> list[str]:
        """The part files a dataset without a ``parts`` list holds now (relative paths): what it committed."""
        reader = TimelineDataset(self.url, _meta=meta)
        return [
            posixpath.relpath(p, self.root)
            for k in ("explicit", "implicit", "requests")
            for b in range(meta.num_buckets)
            for p in reader.part_files(k, b)
        ]

    def _keep_until_close(self, url: str, meta_path: str) -> None:
        """``mode="overwrite"`` of a dataset: the old one stays readable until :meth:`close` commits the new one
        (then its files are deleted). An old ``_dataset.json`` without a ``parts`` list gets one first, so
        the new parts stay invisible; an unreadable one is removed (that dataset was lost already)."""
        self._check_not_foreign(url)
        try:
            old = DatasetMeta.from_json(self.fs.cat_file(meta_path).decode(), url)
        except DatasetError:
            self.fs.rm(meta_path)
            self._replaces = False
            self._remove_leftovers(url)
            return
        if old.parts is None:
            old.parts = self._committed_now(old)
            with open_atomic(self.fs, meta_path, "w") as f:
                f.write(old.to_json())
        self._old_parts = list(old.parts)

    def _check_not_foreign(self, url: str) -> list[str]:
        """The entries of the dataset folder; :class:`DatasetError` if it holds files dv365 did not write."""
        if not self.fs.exists(self.root):
            return []
        entries = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        foreign = sorted(set(entries) - set(_DATASET_ENTRIES))
        if foreign:
            raise DatasetError(
                f"{url}: folder is not empty and is not a dv365 dataset (found {foreign[:5]}); "
                "choose an empty or new folder"
            )
        return entries

    def _remove_unlisted(self) -> None:
        """After an overwrite is committed: deletes the part files ``_dataset.json`` does not list."""
        listed = set(self.meta.parts or [])
        for kind in ("explicit", "implicit", "requests"):
            d = posixpath.join(self.root, kind)
            if not self.fs.exists(d):
                continue
            for bucket in self.fs.ls(d, detail=False):
                for p in self.fs.ls(bucket, detail=False):
                    rel = posixpath.relpath(p, self.root)
                    if rel not in listed and (p.endswith(".parquet") or p.endswith(".parquet.tmp")):
                        self.fs.rm(p)

    def _remove_leftovers(self, url: str) -> None:
        """An interrupted write leaves kind folders without ``_dataset.json``: remove those, and refuse to
        write into a folder that holds anything else (never delete files dv365 did not write)."""
        for e in self._check_not_foreign(url):
            self.fs.rm(posixpath.join(self.root, e), recursive=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()

    def add(
        self,
        explicit: pa.Table | None = None,
        implicit: pa.Table | None = None,
        requests: pa.Table | None = None,
        *,
        source: str | Mapping[str, str] | None = None,
        requests_of: str | None = None,
        explicit_of: np.ndarray | None = None,
        duplicates: Mapping[str, np.ndarray] | None = None,
        policy: ValidationPolicy | None = None,
    ) -> None:
        """Validates and buffers tables of events (any order, any users).

        Args:
            explicit, implicit, requests: the tables (any may be ``None``).
            source: named in validation errors: one name, or one per kind (default: the kind).
            requests_of: ``"explicit"`` or ``"implicit"``: request row ``i`` was made from row ``i`` of that
                table (same length), so a record validation drops there takes its request with it (counted in
                the requests report as ``<kind>_event:dropped``); that table is validated first.
            explicit_of: with ``requests_of="implicit"``: explicit row ``j`` was made from implicit row
                ``explicit_of[j]`` (e.g. a like flag of an impression), so it goes when that row goes (counted in
                the explicit report as ``implicit_event:dropped``).
            duplicates: ``{kind: [n] bool}``: rows of that table that repeat an earlier input row. They are
                validated like the others (so record numbers stay those of the input); those validation keeps
                are then dropped, counted in :attr:`duplicates` and in the report as ``row:duplicate``, and take
                their requests / explicit rows along.
            policy: this call's validation policy (default: the writer's; its ``on_error`` should match).
        """
        policy = policy or self.policy
        tables = {"explicit": explicit, "implicit": implicit, "requests": requests}
        order = ["explicit", "implicit", "requests"]
        if requests_of is not None:
            if requests_of not in ("explicit", "implicit"):
                raise ValueError(f"requests_of must be 'explicit' or 'implicit', got {requests_of!r}")
            ev, rq = tables[requests_of], tables["requests"]
            if (ev.num_rows if ev is not None else 0) != (rq.num_rows if rq is not None else 0):
                raise ValueError(f"requests_of={requests_of!r}: the {requests_of} and requests tables differ in length")
            order = [requests_of] + [k for k in order if k != requests_of]
        if explicit_of is not None and (
            requests_of != "implicit" or explicit is None or len(explicit_of) != len(explicit)
        ):
            raise ValueError("explicit_of needs requests_of='implicit' and one implicit row per explicit row")
        for kind in order:
            t = tables[kind]
            if t is None or t.num_rows == 0:
                continue
            if kind == "requests" and requests_of is not None:
                t = self._drop_orphans(t, requests_of, "requests", None)
            if kind == "explicit" and explicit_of is not None:
                t = self._drop_orphans(t, "implicit", "explicit", np.asarray(explicit_of, dtype=np.int64))
            name = source.get(kind, kind) if isinstance(source, Mapping) else (source or kind)
            clean, kept = validate_rows(
                t,
                kind,  # type: ignore[arg-type]
                self.meta.vocab,
                policy,
                source=name,
                report=self.report[kind],
            )
            repeats = (duplicates or {}).get(kind)
            if repeats is not None:
                repeats = np.asarray(repeats, dtype=bool) & kept
                if repeats.any():
                    clean = clean.filter(pa.array(~repeats[kept]))
                    kept = kept & ~repeats
                    n, rep = int(repeats.sum()), self.report[kind]
                    self.duplicates[kind] = self.duplicates.get(kind, 0) + n
                    rep.records_out -= n
                    rep.dropped["row:duplicate"] = rep.dropped.get("row:duplicate", 0) + n
            if kind == requests_of:
                self._kept_events = kept
            if self._maps:
                clean = self._densify(clean)
            self._buffer(kind, clean)
        if self._buf_rows >= self.flush_rows:
            self.flush()

    def _drop_orphans(self, rows: pa.Table, events_kind: str, kind: str, source_rows: np.ndarray | None) -> pa.Table:
        """The ``kind`` rows whose event row (``source_rows``, default: the same row) was kept by the last
        validation of ``events_kind``; the rest are counted in the ``kind`` report."""
        kept = self._kept_events if source_rows is None else self._kept_events[source_rows]
        dropped = int((~kept).sum())
        if not dropped:
            return rows
        self.report[kind].merge(
            ValidationReport(records_in=dropped, records_out=0, dropped={f"{events_kind}_event:dropped": dropped})
        )
        return rows.filter(pa.array(kept))

    def _buffer(self, kind: str, clean: pa.Table) -> None:
        buckets = user_bucket(clean.column("user_id").to_numpy(), self.meta.num_buckets)
        order = np.argsort(buckets, kind="stable")
        sb = buckets[order]
        bounds = np.flatnonzero(np.diff(sb)) + 1
        for part in np.split(order, bounds):
            if len(part):
                key = (kind, int(buckets[part[0]]))
                self._buf.setdefault(key, []).append(clean.take(pa.array(part)))
        self._buf_rows += clean.num_rows

    def flush(self) -> None:
        for (kind, bucket), parts in sorted(self._buf.items()):
            t = pa.concat_tables(parts, promote_options="default")
            t = t.sort_by([("user_id", "ascending"), ("ts", "ascending")])
            d = posixpath.join(self.root, kind, f"bucket={bucket:05d}")
            self.fs.makedirs(d, exist_ok=True)
            path = posixpath.join(d, f"part-{self._file_run}-{self._part:05d}.parquet")
            with open_atomic(self.fs, path) as f:
                pq.write_table(t, f, compression="zstd", row_group_size=EVENT_ROW_GROUP_ROWS)
            self._written.append(posixpath.relpath(path, self.root))
        self._part += 1
        self._buf.clear()
        self._buf_rows = 0

    def close(self) -> DatasetMeta:
        """Flushes, checks timeline lengths, writes ``_dataset.json`` atomically, listing the committed part
        files (the dataset, or the append, becomes visible)."""
        if self._closed:
            return self.meta
        self.flush()
        self.meta.parts = sorted(set(self.meta.parts or []) | set(self._written))
        ds = TimelineDataset(self.url, _meta=self.meta)
        lengths = ds.compute_stats()
        check_timeline_lengths(lengths.keys(), lengths.values(), self.policy)
        self.meta.stats.update(ds.stats_from_lengths(lengths))
        validation = dict(self.meta.stats.get("validation", {})) if self._append else {}
        for k, r in self.report.items():
            if r.records_in:
                validation[k] = r.summary() if k not in validation else f"{validation[k]} | appended: {r.summary()}"
        self.meta.stats["validation"] = validation
        if self._append:
            runs = [r for r in self.meta.extra.get("appends", []) if r != self._run]
            self.meta.extra["appends"] = runs + [self._run]
        self.fs.makedirs(self.root, exist_ok=True)
        if self._maps:  # new files (this run's name), made visible with _dataset.json below
            self.meta.id_maps = {}
            self.fs.makedirs(posixpath.join(self.root, "ids"), exist_ok=True)
            for id_type, raw in self._maps.items():
                rel = f"ids/{id_type}-{self._file_run}.parquet"
                with open_atomic(self.fs, posixpath.join(self.root, rel)) as f:
                    pq.write_table(pa.table({"raw_id": pa.array(raw, pa.int64())}), f, compression="zstd")
                self.meta.id_maps[id_type] = rel
        with open_atomic(self.fs, posixpath.join(self.root, "_dataset.json"), "w") as f:
            f.write(self.meta.to_json())
        if self._replaces:
            self._remove_unlisted()
        self._remove_old_id_maps()
        self._closed = True
        return self.meta

    def _remove_old_id_maps(self) -> None:
        """After a commit: deletes the id map files ``_dataset.json`` no longer lists (an append's predecessors,
        an overwritten dataset's)."""
        d = posixpath.join(self.root, "ids")
        if not self.fs.exists(d):
            return
        listed = set((self.meta.id_maps or {}).values())
        for p in self.fs.ls(d, detail=False):
            if posixpath.relpath(p, self.root) not in listed:
                self.fs.rm(p)


def remove_run_parts(url: str, run_id: str) -> int:
    """Deletes the part files one :class:`DatasetWriter` ``run_id`` wrote (e.g. an append killed mid-way,
    before it is redone); returns how many. Other runs' files are untouched."""
    fs, root = url_to_fs(url)
    n = 0
    for kind in ("explicit", "implicit", "requests"):
        d = posixpath.join(root, kind)
        if not fs.exists(d):
            continue
        for bucket in fs.ls(d, detail=False):
            for p in fs.ls(bucket, detail=False):
                name = posixpath.basename(p)
                if name.startswith(f"part-{run_id}-") and (name.endswith(".parquet") or name.endswith(".parquet.tmp")):
                    fs.rm(p)
                    n += 1
    return n


def appended_runs(url: str) -> list[str]:
    """Run ids of the completed appends of a dataset (oldest first), from its ``_dataset.json``."""
    return list(TimelineDataset(url).meta.extra.get("appends", []))


class TimelineDataset:
    """Reads a UniTi dataset written by :class:`DatasetWriter` (local path or fsspec URL).

    Example::

        ds = TimelineDataset("data/movielens")
        for tl in ds.iter_timelines(batch_users=256):   # Timelines of 256 users at a time
            ...
        one = ds.read_users([42])
    """

    def __init__(self, url: str, *, _meta: DatasetMeta | None = None) -> None:
        self.url = url
        self.fs, self.root = url_to_fs(url)
        if _meta is None:
            meta_path = posixpath.join(self.root, "_dataset.json")
            if not self.fs.exists(meta_path):
                hint = " (an interrupted write leaves no _dataset.json)" if self.fs.exists(self.root) else ""
                raise DatasetError(f"{url}: no UniTi dataset here: _dataset.json not found{hint}")
            _meta = DatasetMeta.from_json(self.fs.cat_file(meta_path).decode(), url)
        self.meta = _meta
        self.vocab = _meta.vocab
        self._parts_by_dir: dict[str, list[str]] | None = None

    # --- dense ids -----------------------------------------------------------------------------------
    @property
    def dense_id_types(self) -> tuple[str, ...]:
        """The id types (``media``, ``author``, ``topic``) this dataset stores as dense ids (written with
        ``DatasetWriter(dense_ids=...)`` / an importer's ``--dense-ids``); empty: raw ids."""
        return tuple(sorted(self.meta.id_maps or {}))

    def id_map(self, id_type: str) -> np.ndarray:
        """``raw[i]``: the raw id stored as dense id ``i`` (``id_type`` among :attr:`dense_id_types`)."""
        maps = self.meta.id_maps or {}
        if id_type not in maps:
            raise DatasetError(
                f"{self.url}: no dense {id_type!r} ids here (dense: {sorted(maps) or 'none, the ids are raw'})"
            )
        return read_id_map(self.fs, posixpath.join(self.root, maps[id_type]), self.url)

    # --- raw tables ----------------------------------------------------------------------------------
    def part_files(self, kind: str, bucket: int) -> list[str]:
        """The committed Parquet part files of one kind (``explicit``/``implicit``/``requests``) and bucket,
        sorted: those ``_dataset.json`` lists (other files in the folder are not part of the dataset), or,
        for a dataset written before the list existed, every part file there."""
        if self.meta.parts is not None:
            if self._parts_by_dir is None:
                self._parts_by_dir = {}
                for p in sorted(self.meta.parts):
                    self._parts_by_dir.setdefault(posixpath.dirname(p), []).append(posixpath.join(self.root, p))
            return list(self._parts_by_dir.get(f"{kind}/bucket={bucket:05d}", []))
        d = posixpath.join(self.root, kind, f"bucket={bucket:05d}")
        if not self.fs.exists(d):
            return []
        return sorted(p for p in self.fs.ls(d, detail=False) if p.endswith(".parquet"))

    def read_bucket(
        self,
        kind: str,
        bucket: int,
        user_ids: np.ndarray | None = None,
        *,
        dictionary: bool = False,
        sort: bool = True,
    ) -> pa.Table:
        """All rows of ``kind`` in one bucket (optionally only ``user_ids``), sorted by (user_id, ts).
        ``dictionary``: the categorical string columns come back dictionary-encoded (as Parquet stores them),
        which :meth:`EventTable.from_arrow` maps to codes without hashing the rows' strings. ``sort=False``:
        the row groups that may hold ``user_ids``, concatenated as read (each part sorted), other users' rows
        included: for :meth:`EventTable.from_arrow`, which picks and orders the rows itself (sorting or
        filtering an Arrow table here costs more than reading it)."""
        files = self.part_files(kind, bucket)
        if not files:
            schema = schema_for(kind)
            return schema.empty_table()
        ids = None
        if user_ids is not None:
            ids = np.asarray(user_ids, np.int64)
            if not len(ids):
                return schema_for(kind).empty_table()
        # events: only the UniTi columns (a part may carry more); requests keep every column (their labels)
        columns = [f.name for f in schema_for(kind)] if kind in EVENT_KINDS else None
        tables = []
        for p in files:
            with self.fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                have = set(pf.schema_arrow.names)
                cols = [c for c in columns if c in have] if columns is not None else None
                dict_cols = [c for c in CATEGORICAL_COLUMNS if c in have] if dictionary else None
                if dict_cols:  # the same footer, read once
                    pf = pq.ParquetFile(f, read_dictionary=dict_cols, metadata=pf.metadata)
                groups = _row_groups_for(pf.metadata, ids) if ids is not None else None
                if groups is None:
                    t = pf.read(columns=cols)
                elif groups:
                    t = pf.read_row_groups(groups, columns=cols)
                else:
                    t = None
            if t is not None and ids is not None and sort:  # unsorted reads leave other users' rows to the reader
                uid = t.column("user_id").to_numpy()
                keep = np.isin(uid, ids)
                if not keep.all():
                    t = t.filter(pa.array(keep))
            if t is not None:
                tables.append(t)
        if not tables:
            return schema_for(kind).empty_table()
        t = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        if len(tables) > 1 and sort:
            t = t.sort_by([("user_id", "ascending"), ("ts", "ascending")])
        return t

    def read_table(
        self,
        kind: str,
        user_ids: Sequence[int] | np.ndarray | None = None,
        *,
        dictionary: bool = False,
        sort: bool = True,
    ) -> pa.Table:
        """Rows of ``kind`` (``explicit``/``implicit``/``requests``) for all users or the given ones, bucket
        after bucket (``dictionary``, ``sort``: see :meth:`read_bucket`)."""
        if user_ids is None:
            parts = [self.read_bucket(kind, b, dictionary=dictionary, sort=sort) for b in range(self.meta.num_buckets)]
        else:
            ids = np.asarray(user_ids, dtype=np.int64)
            buckets = user_bucket(ids, self.meta.num_buckets)
            parts = [
                self.read_bucket(kind, int(b), ids[buckets == b], dictionary=dictionary, sort=sort)
                for b in np.unique(buckets)
            ]
        parts = [p for p in parts if p.num_rows] or [schema_for(kind).empty_table()]
        return pa.concat_tables(parts, promote_options="default")

    def requests(self, user_ids: Sequence[int] | np.ndarray | None = None) -> pa.Table:
        return self.read_table("requests", user_ids)

    # --- timelines -----------------------------------------------------------------------------------
    def user_ids(self) -> np.ndarray:
        """Every user with at least one event, ascending."""
        ids = [
            self.read_bucket(k, b).column("user_id").to_numpy()
            for k in EVENT_KINDS
            for b in range(self.meta.num_buckets)
        ]
        return np.unique(np.concatenate(ids + [np.zeros(0, np.int64)]).astype(np.int64))

    def read_users(self, user_ids: Sequence[int] | np.ndarray) -> Timelines:
        """Timelines of the given users, in the given order (users without events get empty rows)."""
        ids = np.asarray(user_ids, dtype=np.int64)
        ex = self.read_table("explicit", ids, dictionary=True, sort=False)
        im = self.read_table("implicit", ids, dictionary=True, sort=False)
        return Timelines(
            ids,
            EventTable.from_arrow(ex, "explicit", self.vocab, ids),
            EventTable.from_arrow(im, "implicit", self.vocab, ids),
            self.vocab,
        )

    def iter_timelines(self, batch_users: int = 256) -> Iterator[Timelines]:
        """Every user's timelines, one bucket at a time, ``batch_users`` users per :class:`Timelines`."""
        for b in range(self.meta.num_buckets):
            ex = self.read_bucket("explicit", b, dictionary=True, sort=False)
            im = self.read_bucket("implicit", b, dictionary=True, sort=False)
            ids = np.unique(
                np.concatenate([ex.column("user_id").to_numpy(), im.column("user_id").to_numpy()]).astype(np.int64)
            )
            if not len(ids):
                continue
            ext = EventTable.from_arrow(ex, "explicit", self.vocab, ids)
            imt = EventTable.from_arrow(im, "implicit", self.vocab, ids)
            for s in range(0, len(ids), batch_users):
                rows = np.arange(s, min(s + batch_users, len(ids)))
                yield Timelines(ids[rows], take_rows(ext, rows), take_rows(imt, rows), self.vocab)

    # --- stats ---------------------------------------------------------------------------------------
    def compute_stats(self) -> dict[int, int]:
        """Events per user (both kinds)."""
        counts: dict[int, int] = {}
        for k in EVENT_KINDS:
            for b in range(self.meta.num_buckets):
                for f in self.part_files(k, b):
                    with self.fs.open(f, "rb") as fh:
                        u = pq.read_table(fh, columns=["user_id"]).column("user_id").to_numpy()
                    ids, c = np.unique(u, return_counts=True)
                    for i, n in zip(ids.tolist(), c.tolist()):
                        counts[i] = counts.get(i, 0) + n
        return counts

    def stats_from_lengths(self, lengths: dict[int, int]) -> dict[str, Any]:
        n = np.array(list(lengths.values()), dtype=np.int64)
        stats: dict[str, Any] = {"users": int(len(n)), "events": int(n.sum()) if len(n) else 0}
        if len(n):
            stats.update(
                mean_events=float(n.mean()),
                median_events=float(np.median(n)),
                max_events=int(n.max()),
                p99_events=float(np.percentile(n, 99)),
            )
        span = []
        for k in EVENT_KINDS:
            rows = 0
            for b in range(self.meta.num_buckets):
                for f in self.part_files(k, b):
                    with self.fs.open(f, "rb") as fh:
                        ts = pq.read_table(fh, columns=["ts"]).column("ts").to_numpy()
                    rows += len(ts)
                    if len(ts):
                        span.extend([int(ts.min()), int(ts.max())])
            stats[f"{k}_events"] = rows
        if span:
            stats["first_ts"], stats["last_ts"] = min(span), max(span)
            stats["span_days"] = (max(span) - min(span)) / 86400.0
        return stats


def remove_dataset(url: str) -> bool:
    """Deletes the dv365 dataset at ``url`` (``_dataset.json`` first, then its kind folders); returns
    whether there was one. Refuses (DatasetError) if the folder holds files dv365 did not write."""
    fs, root = url_to_fs(url)
    if not fs.exists(root):
        return False
    entries = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    foreign = sorted(set(entries) - set(_DATASET_ENTRIES))
    if foreign:
        raise DatasetError(
            f"{url}: not removed: the folder holds files that are not part of a dv365 dataset {foreign[:5]}"
        )
    if "_dataset.json" in entries:
        fs.rm(posixpath.join(root, "_dataset.json"))
    for e in entries:
        if e != "_dataset.json":
            fs.rm(posixpath.join(root, e), recursive=True)
    return bool(entries)


def dense_id_types(dense_ids: bool | Sequence[str]) -> tuple[str, ...]:
    """The id types a ``dense_ids`` argument names (``True``: every one of :data:`ID_COLUMNS`), checked, each once."""
    want = tuple(dict.fromkeys(ID_COLUMNS if dense_ids is True else (dense_ids or ())))
    bad = [t for t in want if t not in ID_COLUMNS]
    if bad:
        raise ValueError(f"dense_ids: unknown id types {bad}; choose among {sorted(ID_COLUMNS)} (or True for all)")
    return want


def dense_column(column: pa.ChunkedArray | pa.Array, raw: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """``column`` (int64 ids, or lists of them) with each raw id replaced by its position in ``raw``, and ``raw``
    grown by the ids it did not hold yet, in order of first appearance (so earlier ids keep their dense ids).
    Nulls stay null (an unknown author, a missing topic list)."""
    import pyarrow.compute as pc

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    listed = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
    flat = col.flatten() if listed else col
    known = pa.array(raw, pa.int64())
    pos = pc.index_in(flat, value_set=known)
    new_mask = pc.and_(pc.is_null(pos), pc.is_valid(flat))
    if pc.any(new_mask).as_py():
        new = pc.unique(pc.filter(flat, new_mask)).to_numpy(zero_copy_only=False).astype(np.int64)
        raw = np.concatenate([raw, new])
        pos = pc.index_in(flat, value_set=pa.array(raw, pa.int64()))
    pos = pos.cast(pa.int64())
    if not listed:
        return pos, raw
    offsets = col.offsets
    offsets = pc.subtract(offsets, offsets[0])
    return pa.ListArray.from_arrays(offsets, pos, mask=col.is_null() if col.null_count else None), raw


def read_id_map(fs: Any, path: str, where: str) -> np.ndarray:
    """The raw ids of an id map file, by dense id."""
    try:
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=["raw_id"])
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DatasetError(f"{where}: the id map {path} cannot be read: {type(e).__name__}: {e}") from e
    return t.column("raw_id").to_numpy().astype(np.int64, copy=False)


def _row_groups_for(meta: Any, ids: np.ndarray) -> list[int]:
    """Row groups of a Parquet file that may hold rows of ``ids``: those whose ``user_id`` min/max statistics
    overlap the ids' range and bracket at least one of them (every group when statistics are missing)."""
    col = meta.schema.to_arrow_schema().get_field_index("user_id")
    srt = np.sort(ids)
    out = []
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(col).statistics
        if st is None or not st.has_min_max:
            out.append(g)
            continue
        lo, hi = int(st.min), int(st.max)
        i = int(np.searchsorted(srt, lo, side="left"))
        if i < len(srt) and srt[i] <= hi:  # some requested id lies in [lo, hi]
            out.append(g)
    return out


def arrow_codes(vocab: Vocabulary, kind: str, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """:meth:`Vocabulary.codes` of a string column, through Arrow's dictionary encoding: the vocabulary sees each
    distinct value once, and the rows get their codes by a gather (no sort or unique over the rows' strings).
    A column read dictionary-encoded from Parquet (``read_dictionary``) is not even hashed. A null reads as the
    string ``"None"`` (an unknown media type / surface -> ``other``; an unknown action raises), as
    :meth:`Vocabulary.codes` of ``to_numpy`` values does."""
    import pyarrow.compute as pc

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = []
    for col in chunks:
        if len(col) == 0:
            continue
        if not pa.types.is_dictionary(col.type):
            col = pc.dictionary_encode(col)
        words = [str(v) for v in col.dictionary.to_pylist()]
        if col.null_count:
            words.append("None")
        mapped = vocab.codes(kind, np.asarray(words, dtype=object)) if words else np.zeros(0, np.int16)
        idx = col.indices
        if col.null_count:
            idx = idx.fill_null(len(words) - 1)
        out.append(mapped[idx.to_numpy(zero_copy_only=False).astype(np.intp, copy=False)])
    return np.concatenate(out) if out else np.zeros(0, np.int16)


def concat_timelines(parts: Sequence[Timelines]) -> Timelines:
    """Row-wise concatenation of :class:`Timelines` sharing one vocabulary (CSR arrays joined, no copy
    through Arrow)."""
    if len(parts) == 1:
        return parts[0]
    tables = []
    for kind in EVENT_KINDS:
        ts = [getattr(p, kind) for p in parts]
        ev = np.cumsum([0] + [t.num_events for t in ts])
        tp = np.cumsum([0] + [int(t.topic_offsets[-1]) for t in ts])
        out = EventTable(
            kind,
            np.concatenate([t.user_ids for t in ts]),
            np.concatenate([ts[0].offsets[:1]] + [t.offsets[1:] + ev[i] for i, t in enumerate(ts)]),
            np.concatenate([t.ts for t in ts]),
            np.concatenate([t.media_id for t in ts]),
            np.concatenate([t.author_id for t in ts]),
            np.concatenate([ts[0].topic_offsets[:1]] + [t.topic_offsets[1:] + tp[i] for i, t in enumerate(ts)]),
            np.concatenate([t.topic_values for t in ts]),
            np.concatenate([t.media_type for t in ts]),
            np.concatenate([t.surface for t in ts]),
        )
        for name in ("action", "value", "video_duration", "dwell_time"):
            vs = [getattr(t, name) for t in ts]
            setattr(out, name, None if vs[0] is None else np.concatenate(vs))
        tables.append(out)
    return Timelines(np.concatenate([p.user_ids for p in parts]), tables[0], tables[1], parts[0].vocab)


def take_rows(t: EventTable, rows: np.ndarray) -> EventTable:
    """Sub-table with the given user rows (in that order)."""
    starts, ends = t.offsets[rows], t.offsets[rows + 1]
    counts = ends - starts
    idx = _ranges(starts, counts)
    topic_offsets, topic_values = _take_lists(t.topic_offsets, t.topic_values, idx)
    out = EventTable(
        t.kind,
        t.user_ids[rows],
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        t.ts[idx],
        t.media_id[idx],
        t.author_id[idx],
        topic_offsets,
        topic_values,
        t.media_type[idx],
        t.surface[idx],
    )
    for name in ("action", "value", "video_duration", "dwell_time"):
        v = getattr(t, name)
        setattr(out, name, None if v is None else v[idx])
    return out


def _take_lists(offsets: np.ndarray, values: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``idx`` of a CSR list column (``offsets`` from 0, ``values``): its new offsets and values."""
    start, end = offsets[idx], offsets[idx + 1]
    return np.concatenate([[0], np.cumsum(end - start)]).astype(np.int64), values[_ranges(start, end - start)]


def _int64(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An integer column as int64 numpy (no copy for one int64 chunk)."""
    return column.to_numpy().astype(np.int64, copy=False)


def _user_time_order(uid: np.ndarray, ts: np.ndarray) -> np.ndarray | None:
    """The row permutation that sorts rows by (user, time), ``None`` when they already are.

    Reads come as sorted runs (each Parquet part is written sorted; buckets and appended parts are
    concatenated), so a stable sort by user alone (timsort/radix over the runs) usually leaves each user's
    rows in time order already; only when it does not (an appended part with older events of a user) the
    full two-key sort runs.
    """
    if len(uid) < 2:
        return None
    du = np.diff(uid)
    if bool(np.all((du > 0) | ((du == 0) & (np.diff(ts) >= 0)))):
        return None
    order = np.argsort(uid, kind="stable")
    su, st = uid[order], ts[order]
    if bool(np.all((np.diff(su) > 0) | (np.diff(st) >= 0))):
        return order
    return np.lexsort((ts, uid))


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s+c)`` for each (s, c), vectorised."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    rep_start = np.repeat(np.asarray(starts, np.int64) - (ends - counts), counts)
    return np.arange(total, dtype=np.int64) + rep_start
