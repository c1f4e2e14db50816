"""Validation of UniTi records: the documented reject/clamp policy (docs/validation.md).

Every record goes through :func:`validate_table` before it is written or sliced. Checks are vectorised
(numpy over Arrow columns). In ``on_error="raise"`` mode (the default) the *first* bad record (lowest row
index; for that record, the first failing field in :data:`FIELD_ORDER`, then ``label_*`` columns in table
order) raises :class:`TimelineError` naming record, user, field and value. In ``on_error="drop"`` mode bad
records are dropped and counted in a :class:`ValidationReport` (each dropped record once, under the
``field:reason`` that raise mode would have reported), and nothing else changes: kept records keep their
input order and are canonicalised exactly as in raise mode.

Missing means an Arrow null (or an absent optional column). NaN is a value, not a marker for "missing".
Integers may arrive as integer, integral float or decimal-digit string columns; numbers as numeric or
numeric-string columns.

Rejected (per record): missing required field; id that is not an integer (in int64) or is negative;
timestamp that is not an integer, is negative or is after ``as_of`` (the request time / data cut-off);
``topic_ids`` that is not a list of non-negative integers; unknown action; non-numeric, NaN, infinite or
negative ``dwell_time`` / ``video_duration``; non-numeric, infinite or out-of-float32-range ``value`` /
``label_*``.
Clamped (record kept, value changed, counted): ``dwell_time`` above ``max_dwell_s``; ``video_duration``
above ``max_duration_s``; more than ``max_topics`` topic ids (first ones kept); unknown media type or
surface (mapped to ``"other"``); NaN ``value`` / ``label_*`` (becomes null).
Canonicalised silently: missing ``topic_ids`` -> ``[]``; missing media type / surface -> ``"other"``.
Per timeline: a timeline with more than ``max_events`` events is rejected (``absurd_length``); an empty
timeline is rejected where a timeline is required (:func:`check_timeline_lengths`). These always raise.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dv365.core.errors import TimelineError
from dv365.core.schema import schema_for
from dv365.core.vocab import Vocabulary

Kind = Literal["explicit", "implicit", "requests"]

ID_FIELDS = ("user_id", "media_id", "author_id")
# Order in which a record's fields are checked; the first failing one is reported.
FIELD_ORDER: dict[str, tuple[str, ...]] = {
    "explicit": ("user_id", "ts", "media_id", "author_id", "topic_ids", "action", "media_type", "surface", "value"),
    "implicit": (
        "user_id",
        "ts",
        "media_id",
        "author_id",
        "topic_ids",
        "media_type",
        "surface",
        "video_duration",
        "dwell_time",
    ),
    "requests": ("user_id", "ts", "media_id", "author_id", "topic_ids", "media_type", "surface", "video_duration"),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "explicit": ("user_id", "ts", "media_id", "action"),
    "implicit": ("user_id", "ts", "media_id", "dwell_time"),
    "requests": ("user_id", "ts", "media_id"),
}
LABEL_PREFIX = "label_"
MAX_ID = np.iinfo(np.int64).max
FLOAT32_MAX = float(np.finfo(np.float32).max)
MS_THRESHOLD = 100_000_000_000  # 1e11 s is the year 5138; 1e11 ms is 1973: above it, seconds are milliseconds
DAY_S = 86_400
EARLIEST_TS = 631_152_000  # 1990-01-01 00:00 UTC: the earliest time the importers accept
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_MAX_EXAMPLES = 10


@dataclass(frozen=True)
class ValidationPolicy:
    """Limits and the error mode of :func:`validate_table`.

    Args:
        on_error: ``"raise"`` (first bad record raises) or ``"drop"`` (bad records dropped and counted).
        as_of: request time / data cut-off (unix s); events after it are rejected. ``None`` = no check.
        max_dwell_s: dwell times above this are clamped to it (default 4 h).
        max_duration_s: video durations above this are clamped to it (default 24 h).
        max_topics: topic ids beyond this many per event are dropped (first ones kept).
        max_events: a timeline longer than this is rejected (default 10M; the paper's max is 70K).
        ts_range: ``(lo, hi)``: plausible timestamps (unix s; the importers use ``(1990-01-01, now + 1 day)``,
            :func:`plausible_ts_range`). Outside is
            rejected: ``implausible_timestamp``, or ``milliseconds`` for a value above :data:`MS_THRESHOLD`
            (a time in milliseconds given as seconds). ``None``: no check.
        value_range: ``(lo, hi)``: the explicit ``value`` is required and must lie in ``[lo, hi]`` (a rating
            scale; missing -> ``missing``, NaN -> ``nan``, outside -> ``out_of_range``). ``None``: optional, any.
        labels_required: every ``label_*`` of a request must hold a number: missing -> ``missing``, NaN ->
            ``nan`` (rejected) instead of a null label (training refuses null labels; the importers set it).
    """

    on_error: Literal["raise", "drop"] = "raise"
    as_of: int | None = None
    max_dwell_s: float = 4 * 3600.0
    max_duration_s: float = 24 * 3600.0
    max_topics: int = 16
    max_events: int = 10_000_000
    ts_range: tuple[int, int] | None = None
    value_range: tuple[float, float] | None = None
    labels_required: bool = False

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "drop"):
            raise ValueError(f"ValidationPolicy.on_error must be 'raise' or 'drop', got {self.on_error!r}")
        if self.ts_range is not None and not (len(self.ts_range) == 2 and self.ts_range[0] <= self.ts_range[1]):
            raise ValueError(f"ValidationPolicy.ts_range must be (lo, hi) with lo <= hi, got {self.ts_range!r}")
        if self.value_range is not None and not (
            len(self.value_range) == 2 and float(self.value_range[0]) <= float(self.value_range[1])
        ):
            raise ValueError(f"ValidationPolicy.value_range must be (lo, hi) with lo <= hi, got {self.value_range!r}")


@dataclass
class ValidationReport:
    """What validation did.

    ``dropped`` counts dropped records by ``"field:reason"`` (each record once, under its first failure, so
    ``sum(dropped.values()) == records_in - records_out``); ``clamped`` counts *kept* records whose field was
    changed, by ``"field:what"``; ``examples`` holds a few error messages (the first of each dropped kind).
    """

    records_in: int = 0
    records_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    clamped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def merge(self, other: ValidationReport) -> None:
        self.records_in += other.records_in
        self.records_out += other.records_out
        for src, dst in ((other.dropped, self.dropped), (other.clamped, self.clamped)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
        self.examples.extend(other.examples[: max(0, _MAX_EXAMPLES - len(self.examples))])

    def summary(self) -> str:
        parts = [f"{self.records_out:,}/{self.records_in:,} records kept"]
        if self.dropped:
            parts.append("dropped " + ", ".join(f"{k}: {v:,}" for k, v in sorted(self.dropped.items())))
        if self.clamped:
            parts.append("clamped " + ", ".join(f"{k}: {v:,}" for k, v in sorted(self.clamped.items())))
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# column coercion: each returns clean values and masks of bad values, without raising
# --------------------------------------------------------------------------------------------------
def _combined(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def _to_numpy(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Values as numpy (1-D object array for non-numeric types) and the null mask."""
    nulls = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
        if col.null_count:
            fill = pa.scalar(False) if pa.types.is_boolean(col.type) else pa.scalar(0, col.type)
            col = col.fill_null(fill)
        return np.asarray(col.to_numpy(zero_copy_only=False)), nulls
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    out = np.empty(len(col), dtype=object)
    for i, v in enumerate(col.to_pylist()):  # element-wise: lists must stay list objects, not a 2-D array
        out[i] = v
    return out, nulls


def _py_int(v: Any) -> int | None:
    """``v`` as an int64 if it is an integer (int, integral float, decimal-digit text), else ``None``."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, np.integer)):
        iv = int(v)
    elif isinstance(v, (float, np.floating)):
        if not np.isfinite(v) or float(v) != np.floor(v):
            return None
        iv = int(v)
    elif isinstance(v, (str, bytes)):
        try:
            s = (v.decode("ascii") if isinstance(v, bytes) else v).strip()
        except UnicodeDecodeError:
            return None
        if not _INT_TEXT.fullmatch(s) or len(s.lstrip("+-").lstrip("0")) > 19:  # > 19 digits: beyond int64
            return None
        iv = int(s)
    else:
        return None
    return iv if -MAX_ID - 1 <= iv <= MAX_ID else None


def _py_float(v: Any) -> float | None:
    """``v`` as a float if it is a number (int, float, numeric ASCII text incl. "nan"/"inf"), else ``None``."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        try:
            return float(v)
        except OverflowError:  # a Python int beyond float range
            return float("inf") if v > 0 else float("-inf")
    if isinstance(v, (str, bytes)):
        try:
            s = (v.decode("ascii") if isinstance(v, bytes) else v).strip()
        except UnicodeDecodeError:
            return None
        if not s.isascii() or "_" in s:
            return None
        try:
            return float(s)
        except ValueError:
            return None
    return None


def _int_column(vals: np.ndarray, nulls: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int64 values, mask of non-integers, mask of negatives (both exclude nulls)."""
    n = len(vals)
    out = np.zeros(n, dtype=np.int64)
    nonint = np.zeros(n, dtype=bool)
    if vals.dtype.kind == "u":
        too_big = vals > MAX_ID
        nonint |= too_big
        out[~too_big] = vals[~too_big].astype(np.int64)
    elif vals.dtype.kind == "i":
        out[:] = vals
    elif vals.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(vals) & (np.floor(vals) == vals) & (vals >= -(2.0**63)) & (vals < 2.0**63)
        nonint |= ~ok
        out[ok] = vals[ok].astype(np.int64)
    elif vals.dtype.kind == "b":
        nonint[:] = True
    else:  # object: strings and anything else
        for i, v in enumerate(vals):
            if nulls[i]:
                continue
            iv = _py_int(v)
            if iv is None:
                nonint[i] = True
            else:
                out[i] = iv
    nonint &= ~nulls
    out[nulls | nonint] = 0
    neg = (out < 0) & ~nonint & ~nulls
    return out, nonint, neg


def _float_column(vals: np.ndarray, nulls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 values (NaN where null or not a number) and the mask of values that are not numbers."""
    n = len(vals)
    notnum = np.zeros(n, dtype=bool)
    if vals.dtype.kind in "iuf":
        out = vals.astype(np.float64)
    elif vals.dtype.kind == "b":
        out = np.zeros(n)
        notnum[:] = True
    else:
        out = np.zeros(n)
        for i, v in enumerate(vals):
            if nulls[i]:
                continue
            f = _py_float(v)
            if f is None:
                notnum[i] = True
            else:
                out[i] = f
    notnum &= ~nulls
    out[nulls | notnum] = np.nan
    return out, notnum


# --------------------------------------------------------------------------------------------------
# per-table checks and bookkeeping
# --------------------------------------------------------------------------------------------------
class _Checker:
    """Checks the columns of one table: accumulates per-field bad masks and clamp masks, and the clean columns.

    ``bad[field]`` lists ``(rows, reason, column as read)`` in the order the reasons are tried;
    :meth:`first_failures` and :meth:`error_at` resolve them in ``order`` (the documented field order).
    """

    def __init__(self, table: pa.Table, names: Sequence[str], order: Sequence[str], source: str | None) -> None:
        self.n, self.order, self.source = table.num_rows, tuple(order), source
        self.raw = {c: _combined(table.column(c)) for c in names if c in table.column_names}
        self.bad: dict[str, list[tuple[np.ndarray, str, pa.Array | None]]] = {}
        self.clamps: dict[str, np.ndarray] = {}
        self.out: dict[str, pa.Array] = {}
        self.user_ids = np.full(self.n, None, dtype=object)  # for messages; set by the user_id check
        self.details: dict[str, str] = {}  # "field:reason" -> the explanation its message adds

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray, pa.Array | None]:
        """Values, null mask and Arrow column of ``name`` (all-null if the column is absent)."""
        if name in self.raw:
            return (*_to_numpy(self.raw[name]), self.raw[name])
        return np.zeros(self.n, dtype=np.int64), np.ones(self.n, dtype=bool), None

    def add(self, name: str, mask: np.ndarray, reason: str, raw: pa.Array | None) -> None:
        """Records that rows ``mask`` of column ``name`` (as read: ``raw``) fail with ``reason``."""
        if mask.any():
            self.bad.setdefault(name, []).append((mask, reason, raw))

    def clamp(self, key: str, mask: np.ndarray) -> None:
        """Records that rows ``mask`` had a value changed (``key`` = ``"field:what"``)."""
        if mask.any():
            self.clamps[key] = self.clamps.get(key, np.zeros(self.n, dtype=bool)) | mask

    # --- the column checks --------------------------------------------------------------------------
    def ints(self, name: str, required: bool, neg_reason: str) -> tuple[np.ndarray, np.ndarray]:
        """An integer column: values and the mask of usable integers (not null, in int64)."""
        vals_raw, nulls, raw = self.column(name)
        vals, nonint, neg = _int_column(vals_raw, nulls)
        if required:
            self.add(name, nulls, "missing", raw)
        self.add(name, nonint, "not_an_integer", raw)
        self.add(name, neg, neg_reason, raw)
        self.out[name] = pa.array(vals, type=pa.int64(), mask=None if required else nulls)
        return vals, ~(nulls | nonint)

    def durations(self, name: str, required: bool, cap: float) -> None:
        """``dwell_time`` / ``video_duration``: NaN, infinite, negative rejected; above ``cap`` clamped."""
        vals_raw, nulls, raw = self.column(name)
        vals, notnum = _float_column(vals_raw, nulls)
        if required:
            self.add(name, nulls, "missing", raw)
        self.add(name, notnum, "not_a_number", raw)
        with np.errstate(invalid="ignore"):
            self.add(name, np.isnan(vals) & ~nulls & ~notnum, "nan", raw)
            self.add(name, np.isinf(vals), "infinite", raw)
            self.add(name, vals < 0, "negative", raw)
            over = (vals > cap) & np.isfinite(vals)
        self.clamp(f"{name}:max", over)
        vals = np.where(over, cap, vals)
        with np.errstate(over="ignore"):  # huge negatives are rejected anyway
            self.out[name] = pa.array(vals.astype(np.float32), type=pa.float32(), mask=None if required else nulls)

    def floats(self, name: str, required: bool = False) -> None:
        """``value`` / ``label_*``: float32; infinite or beyond float32 rejected; missing and NaN: null (NaN
        counted as clamped), or, if ``required``, rejected (``missing`` / ``nan``)."""
        vals_raw, nulls, raw = self.column(name)
        vals, notnum = _float_column(vals_raw, nulls)
        self.add(name, notnum, "not_a_number", raw)
        with np.errstate(invalid="ignore"):
            nan = np.isnan(vals) & ~nulls & ~notnum
            self.add(name, np.isinf(vals), "infinite", raw)
            self.add(name, np.isfinite(vals) & (np.abs(vals) > FLOAT32_MAX), "out_of_range", raw)
            vals = np.where(np.abs(vals) <= FLOAT32_MAX, vals, 0.0)
        if required:
            self.add(name, nulls, "missing", raw)
            self.add(name, nan, "nan", raw)
        else:
            self.clamp(f"{name}:null", nan)
        self.out[name] = pa.array(vals.astype(np.float32), type=pa.float32(), mask=nulls | notnum | nan)

    def in_range(self, name: str, lo: float, hi: float) -> None:
        """A required number in ``[lo, hi]``: missing, NaN and values outside are rejected."""
        vals_raw, nulls, raw = self.column(name)
        vals, notnum = _float_column(vals_raw, nulls)
        self.add(name, nulls, "missing", raw)
        with np.errstate(invalid="ignore"):
            self.add(name, np.isnan(vals) & ~nulls & ~notnum, "nan", raw)
            self.add(name, np.isfinite(vals) & ((vals < lo) | (vals > hi)), "out_of_range", raw)

    # --- resolution ---------------------------------------------------------------------------------
    def first_failures(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Mask of bad rows, and for each ``"field:reason"`` the rows whose *first* failure it is."""
        assigned = np.zeros(self.n, dtype=bool)
        firsts: dict[str, np.ndarray] = {}
        for name in self.order:
            for mask, reason, _ in self.bad.get(name, []):
                new = mask & ~assigned
                if new.any():
                    key = f"{name}:{reason}"
                    firsts[key] = firsts.get(key, np.zeros(self.n, dtype=bool)) | new
                    assigned |= new
        return assigned, firsts

    def error_at(self, row: int) -> TimelineError:
        """The error of ``row``'s first failing field (the row must be bad)."""
        for name in self.order:
            for mask, reason, raw in self.bad.get(name, []):
                if mask[row]:
                    value = raw[row].as_py() if raw is not None else None
                    user = None if name == "user_id" else self.user_ids[row]
                    detail = self.details.get(f"{name}:{reason}", "")
                    return TimelineError(
                        name, value, reason, user_id=user, record=row, source=self.source, detail=detail
                    )
        raise AssertionError(f"unreachable: row {row} has no failing field")  # pragma: no cover

    def report(self, bad: np.ndarray, firsts: dict[str, np.ndarray]) -> ValidationReport:
        """Drop counts (first failures), clamp counts of kept rows, one example per dropped kind."""
        rep = ValidationReport(records_in=self.n, records_out=self.n - int(bad.sum()))
        for row, key in sorted((int(np.flatnonzero(mask)[0]), key) for key, mask in firsts.items()):
            rep.dropped[key] = int(firsts[key].sum())
            if len(rep.examples) < _MAX_EXAMPLES:
                rep.examples.append(str(self.error_at(row)))
        for key, mask in self.clamps.items():
            if (mask & ~bad).any():
                rep.clamped[key] = int((mask & ~bad).sum())
        return rep


# --------------------------------------------------------------------------------------------------
# validate_table
# --------------------------------------------------------------------------------------------------
def validate_table(
    table: pa.Table,
    kind: Kind,
    vocab: Vocabulary,
    policy: ValidationPolicy = ValidationPolicy(),
    *,
    source: str | None = None,
    report: ValidationReport | None = None,
) -> pa.Table:
    """:func:`validate_rows` without the mask of kept rows."""
    return validate_rows(table, kind, vocab, policy, source=source, report=report)[0]


def validate_rows(
    table: pa.Table,
    kind: Kind,
    vocab: Vocabulary,
    policy: ValidationPolicy = ValidationPolicy(),
    *,
    source: str | None = None,
    report: ValidationReport | None = None,
) -> tuple[pa.Table, np.ndarray]:
    """Checks and canonicalises a table of ``kind`` events; returns it in the UniTi schema.

    Columns not in the schema are ignored, except ``label_*`` columns of ``requests`` tables, which are kept
    as float32 (after the schema's columns, in input order). See docs/validation.md for every rule.

    Args:
        table: events as an importer hands them over (typed Arrow columns, any row order).
        kind: ``"explicit"``, ``"implicit"`` or ``"requests"``.
        vocab: the dataset's vocabulary (actions, media types, surfaces).
        policy: limits and the error mode.
        source: named in error messages (e.g. the input file).
        report: if given, this call's :class:`ValidationReport` is merged into it.

    Returns:
        The valid records in the UniTi schema, and the mask of the input rows they come from ([n] bool;
        all true unless drop mode dropped some), so that rows made from the same input can be dropped too.

    Raises:
        TimelineError: in ``raise`` mode, for the first bad record; in any mode for a missing required column.
    """
    schema = schema_for(kind)
    for name in REQUIRED[kind]:
        if name not in table.column_names:
            raise TimelineError(
                name, None, "missing_column", source=source, detail=f"columns present: {table.column_names}"
            )
    labels = [
        c for c in table.column_names if kind == "requests" and c.startswith(LABEL_PREFIX) and c not in schema.names
    ]
    chk = _Checker(table, schema.names + labels, FIELD_ORDER[kind] + tuple(labels), source)

    users, user_ok = chk.ints("user_id", True, "negative_id")
    chk.user_ids = np.where(user_ok, users.astype(object), None)
    ts, ts_ok = chk.ints("ts", True, "negative_timestamp")
    if policy.as_of is not None:
        chk.add("ts", (ts > policy.as_of) & ts_ok, "after_request_time", chk.raw.get("ts"))
    if policy.ts_range is not None:
        _plausible_ts(chk, ts, ts_ok, policy.ts_range)
    chk.ints("media_id", True, "negative_id")
    chk.ints("author_id", False, "negative_id")
    chk.out["topic_ids"] = _topics(chk.raw.get("topic_ids"), chk, policy.max_topics)
    if kind == "explicit":
        chk.out["action"] = _action(chk.raw["action"], chk, vocab)
    chk.out["media_type"] = _open_categorical("media_type", chk.raw.get("media_type"), chk, vocab.media_types)
    chk.out["surface"] = _open_categorical("surface", chk.raw.get("surface"), chk, vocab.surfaces)
    if kind in ("implicit", "requests"):
        chk.durations("video_duration", False, policy.max_duration_s)
    if kind == "implicit":
        chk.durations("dwell_time", True, policy.max_dwell_s)
    if kind == "explicit":
        chk.floats("value")
        if policy.value_range is not None:
            chk.in_range("value", float(policy.value_range[0]), float(policy.value_range[1]))
    for name in labels:
        chk.floats(name, required=policy.labels_required)

    bad, firsts = chk.first_failures()
    if policy.on_error == "raise" and bad.any():
        raise chk.error_at(int(np.flatnonzero(bad)[0]))
    full_schema = pa.schema(list(schema) + [pa.field(c, pa.float32()) for c in labels])
    result = pa.Table.from_arrays([chk.out[f.name] for f in full_schema], schema=full_schema)
    if bad.any():
        result = result.filter(pa.array(~bad))
    if report is not None:
        report.merge(chk.report(bad, firsts))
    return result, ~bad


def plausible_ts_range(now: float | None = None, earliest: int | None = None) -> tuple[int, int]:
    """The timestamps an importer accepts (unix s): from ``earliest`` (default :data:`EARLIEST_TS`, 1990-01-01:
    before any web interaction log; a line cut inside its time, ``…,1107`` for ``…,1107…``, falls before it)
    to a day from now."""
    return EARLIEST_TS if earliest is None else int(earliest), int(time.time() if now is None else now) + DAY_S


def _plausible_ts(chk: _Checker, ts: np.ndarray, ok: np.ndarray, bounds: tuple[int, int]) -> None:
    """Rejects timestamps outside ``bounds``; those above :data:`MS_THRESHOLD` that are plausible as
    milliseconds as ``milliseconds`` (a time in milliseconds given as seconds), the others (``2**63 - 1``, a
    time in microseconds) as ``implausible_timestamp``."""
    lo, hi = int(bounds[0]), int(bounds[1])
    ms = ok & (ts > max(hi, MS_THRESHOLD)) & (ts // 1000 <= hi)
    chk.add("ts", ms, "milliseconds", chk.raw.get("ts"))
    chk.add("ts", ok & ~ms & ((ts < lo) | (ts > hi)), "implausible_timestamp", chk.raw.get("ts"))
    chk.details["ts:milliseconds"] = "milliseconds? a time in seconds above 1e11 is after the year 5000"
    chk.details["ts:implausible_timestamp"] = f"plausible: {lo} ({_utc(lo)}) to {hi} (now + 1 day)"


def _utc(ts: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts)) if 0 <= ts < 253402300800 else str(ts)


def _topics(col: pa.Array | None, chk: _Checker, max_topics: int) -> pa.Array:
    """``topic_ids`` as list<int64>: null -> [], more than ``max_topics`` -> the first ones (clamped)."""
    n = chk.n
    if col is None:
        return pa.array([[]] * n, type=pa.list_(pa.int64()))
    if pa.types.is_fixed_size_list(col.type):
        col = col.cast(pa.list_(col.type.value_type))
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        chk.add("topic_ids", ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool), "not_a_list", col)
        return pa.array([[]] * n, type=pa.list_(pa.int64()))
    filled = col.fill_null(pa.scalar([], col.type)) if col.null_count else col
    offsets = np.asarray(filled.offsets.to_numpy(), dtype=np.int64)
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)  # [n]
    elem_vals, elem_nulls = _to_numpy(filled.flatten())  # [T]
    ids, nonint, neg = _int_column(elem_vals, elem_nulls)
    elem_row = np.repeat(np.arange(n), lengths)  # [T] row of each topic id
    row_bad = np.zeros(n, dtype=bool)
    row_bad[elem_row[nonint | neg | elem_nulls]] = True
    chk.add("topic_ids", row_bad, "not_a_non_negative_integer_list", col)
    over = lengths > max_topics
    chk.clamp("topic_ids:max_topics", over & ~row_bad)
    keep_elem = (np.arange(len(ids)) - np.repeat(offsets[:-1], lengths)) < max_topics
    new_offsets = np.concatenate([[0], np.cumsum(np.minimum(lengths, max_topics))]).astype(np.int64)
    return pa.ListArray.from_arrays(pa.array(new_offsets.astype(np.int32)), pa.array(ids[keep_elem], type=pa.int64()))


def _known_strings(col: pa.Array, known_values: Sequence[str]) -> tuple[pa.Array, np.ndarray]:
    """``col`` as strings and the mask of values in ``known_values`` (exact match; non-string types never match)."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return pa.nulls(len(col), pa.string()), np.zeros(len(col), dtype=bool)
    strs = col.cast(pa.string())
    known = pc.is_in(strs, value_set=pa.array(known_values, pa.string()))  # null -> false
    return strs, np.asarray(known.to_numpy(zero_copy_only=False), dtype=bool)


def _action(col: pa.Array, chk: _Checker, vocab: Vocabulary) -> pa.Array:
    """The required closed categorical: unknown (or non-string) actions are rejected."""
    nulls = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    strs, known = _known_strings(col, vocab.actions)
    chk.add("action", nulls, "missing", col)
    chk.add("action", ~known & ~nulls, "unknown_action", col)
    return pc.if_else(pa.array(known), strs, pa.scalar(vocab.actions[0], pa.string()))  # rejected rows: a filler


def _open_categorical(name: str, col: pa.Array | None, chk: _Checker, known_values: Sequence[str]) -> pa.Array:
    """Media type / surface: unknown (or non-string) values map to ``"other"`` (counted); null -> ``"other"``."""
    if col is None:
        return pa.array([known_values[0]] * chk.n, type=pa.string())
    nulls = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    strs, known = _known_strings(col, known_values)
    chk.clamp(f"{name}:other", ~known & ~nulls)
    return pc.if_else(pa.array(known), strs, pa.scalar(known_values[0], pa.string()))


def check_timeline_lengths(
    user_ids: Iterable[Any],
    lengths: Iterable[int],
    policy: ValidationPolicy = ValidationPolicy(),
    *,
    allow_empty: bool = False,
) -> None:
    """Rejects empty (unless ``allow_empty``) and absurdly long (> ``policy.max_events``) timelines.

    Raises:
        TimelineError: field ``"<timeline>"``, reason ``"empty_timeline"`` or ``"absurd_length"`` (in any mode).
    """
    for uid, n in zip(user_ids, lengths):
        n = int(n)
        uid = uid.item() if isinstance(uid, np.generic) else uid  # message shows 9, not np.int64(9)
        if n > policy.max_events:
            raise TimelineError(
                "<timeline>",
                n,
                "absurd_length",
                user_id=uid,
                detail=f"more than max_events={policy.max_events:,} events",
            )
        if n == 0 and not allow_empty:
            raise TimelineError("<timeline>", 0, "empty_timeline", user_id=uid)
