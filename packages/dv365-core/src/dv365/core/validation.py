"""Validation of UniTi records: the documented reject/clamp policy (docs/validation.md).

Every record goes through :func:`validate_table` before it is written or sliced. Checks are vectorised
(numpy over Arrow columns). In ``on_error="raise"`` mode (the default) the *first* bad record (lowest row
index; for that record, the first failing field in :data:`FIELD_ORDER`) raises :class:`TimelineError`
naming record, user, field and value. In ``on_error="drop"`` mode bad records are dropped and counted
in a :class:`ValidationReport` (with a few examples), and nothing else changes.

Rejected (per record): missing required field; id that is not a non-negative integer; timestamp that is
not a non-negative integer or is after ``as_of`` (the request time / data cut-off); unknown action;
NaN, infinite or negative ``dwell_time`` / ``video_duration``.
Clamped (record kept, value changed, counted): ``dwell_time`` above ``max_dwell_s``; ``video_duration``
above ``max_duration_s``; more than ``max_topics`` topic ids (first ones kept); unknown media type or
surface (mapped to ``"other"``); NaN ``value`` (becomes null).
Per timeline: a timeline with more than ``max_events`` events is rejected (``absurd_length``); an empty
timeline is rejected where a timeline is required (:func:`check_timeline_lengths`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np
import pyarrow as pa

from dv365.core.errors import TimelineError
from dv365.core.vocab import Vocabulary

Kind = Literal["explicit", "implicit", "requests"]

ID_FIELDS = ("user_id", "media_id", "author_id")
# Order in which a record's fields are checked; the first failing one is reported.
FIELD_ORDER: dict[str, tuple[str, ...]] = {
    "explicit": ("user_id", "ts", "media_id", "author_id", "topic_ids", "action", "media_type", "surface", "value"),
    "implicit": (
        "user_id", "ts", "media_id", "author_id", "topic_ids", "media_type", "surface", "video_duration", "dwell_time",
    ),
    "requests": ("user_id", "ts", "media_id", "author_id", "topic_ids", "media_type", "surface", "video_duration"),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "explicit": ("user_id", "ts", "media_id", "action"),
    "implicit": ("user_id", "ts", "media_id", "dwell_time"),
    "requests": ("user_id", "ts", "media_id"),
}
MAX_ID = np.iinfo(np.int64).max


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
    """

    on_error: Literal["raise", "drop"] = "raise"
    as_of: int | None = None
    max_dwell_s: float = 4 * 3600.0
    max_duration_s: float = 24 * 3600.0
    max_topics: int = 16
    max_events: int = 10_000_000


@dataclass
class ValidationReport:
    """What validation did: counts of dropped records by (field, reason), clamped values, examples."""

    records_in: int = 0
    records_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    clamped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def merge(self, other: "ValidationReport") -> None:
        self.records_in += other.records_in
        self.records_out += other.records_out
        for src, dst in ((other.dropped, self.dropped), (other.clamped, self.clamped)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
        self.examples.extend(other.examples[: max(0, 10 - len(self.examples))])

    def summary(self) -> str:
        parts = [f"{self.records_out:,}/{self.records_in:,} records kept"]
        if self.dropped:
            parts.append("dropped " + ", ".join(f"{k}: {v:,}" for k, v in sorted(self.dropped.items())))
        if self.clamped:
            parts.append("clamped " + ", ".join(f"{k}: {v:,}" for k, v in sorted(self.clamped.items())))
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# column coercion: each returns (clean values, bad mask, reason per bad) without raising
# --------------------------------------------------------------------------------------------------
def _to_numpy(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Values as numpy (object for non-numeric) and the null mask."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    nulls = col.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
        if col.null_count:
            fill = pa.scalar(0, col.type) if not pa.types.is_boolean(col.type) else pa.scalar(False)
            col = col.fill_null(fill)
        return col.to_numpy(zero_copy_only=False), nulls
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return np.asarray(col.to_pylist(), dtype=object), nulls


def _int_column(vals: np.ndarray, nulls: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int64 values, mask of non-integers, mask of negatives. Strings of digits are accepted."""
    n = len(vals)
    out = np.zeros(n, dtype=np.int64)
    nonint = np.zeros(n, dtype=bool)
    if vals.dtype.kind in "iu":
        if vals.dtype.kind == "u":
            too_big = vals > MAX_ID
            nonint |= too_big
            out[~too_big] = vals[~too_big].astype(np.int64)
        else:
            out[:] = vals
    elif vals.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(vals) & (np.floor(vals) == vals) & (np.abs(vals) < 2.0**63)
        nonint |= ~ok
        out[ok] = vals[ok].astype(np.int64)
    elif vals.dtype.kind == "b":
        nonint[:] = True
    else:  # object: python ints, strings, floats, anything
        for i, v in enumerate(vals):
            if nulls[i]:
                continue
            iv = _py_int(v)
            if iv is None:
                nonint[i] = True
            else:
                out[i] = iv
    nonint &= ~nulls
    neg = (out < 0) & ~nonint & ~nulls
    return out, nonint, neg


def _py_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, np.integer)):
        iv = int(v)
    elif isinstance(v, (float, np.floating)):
        if not np.isfinite(v) or float(v) != np.floor(v):
            return None
        iv = int(v)
    elif isinstance(v, (str, bytes)):
        s = v.decode() if isinstance(v, bytes) else v
        s = s.strip()
        if not s or not (s.isdigit() or (s[0] in "+-" and s[1:].isdigit())):
            return None
        iv = int(s)
    else:
        return None
    if not (-MAX_ID - 1 <= iv <= MAX_ID):
        return None
    return iv


def _float_column(vals: np.ndarray, nulls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 values (NaN where null) and the mask of values that are not numbers at all."""
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
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating, str)):
                notnum[i] = True
                continue
            try:
                out[i] = float(v)
            except ValueError:
                notnum[i] = True
    out[nulls] = np.nan
    notnum &= ~nulls
    return out, notnum


class _Checker:
    """Accumulates per-field bad masks for one table; resolves them into an error or a keep-mask."""

    def __init__(self, kind: str, n: int, user_ids: np.ndarray, source: str | None) -> None:
        self.kind, self.n, self.user_ids, self.source = kind, n, user_ids, source
        self.bad: dict[str, list[tuple[np.ndarray, str, Any]]] = {}

    def add(self, name: str, mask: np.ndarray, reason: str, values: Any) -> None:
        if mask.any():
            self.bad.setdefault(name, []).append((mask, reason, values))

    def any_bad(self) -> np.ndarray:
        out = np.zeros(self.n, dtype=bool)
        for entries in self.bad.values():
            for mask, _, _ in entries:
                out |= mask
        return out

    def first_error(self) -> TimelineError | None:
        if not self.bad:
            return None
        bad = self.any_bad()
        row = int(np.flatnonzero(bad)[0])
        for name in FIELD_ORDER[self.kind]:
            for mask, reason, values in self.bad.get(name, []):
                if mask[row]:
                    return self._error(name, reason, values, row)
        raise AssertionError("unreachable: a bad row without a bad field")  # pragma: no cover

    def _error(self, name: str, reason: str, values: Any, row: int) -> TimelineError:
        user = self.user_ids[row] if name != "user_id" else None
        value = values[row] if values is not None else None
        if isinstance(value, np.generic):
            value = value.item()
        return TimelineError(name, value, reason, user_id=user, record=row, source=self.source)


def validate_table(
    table: pa.Table,
    kind: Kind,
    vocab: Vocabulary,
    policy: ValidationPolicy = ValidationPolicy(),
    *,
    source: str | None = None,
    report: ValidationReport | None = None,
) -> pa.Table:
    """Checks and canonicalises a table of ``kind`` events; returns it in the UniTi schema.

    Raises:
        TimelineError: in ``raise`` mode, for the first bad record; in any mode for a missing column.
    """
    from dv365.core.timeline import schema_for  # local: timeline imports this module

    schema = schema_for(kind)
    n = table.num_rows
    rep = ValidationReport(records_in=n)
    for name in REQUIRED[kind]:
        if name not in table.column_names:
            raise TimelineError(name, None, "missing_column", source=source,
                                detail=f"columns present: {table.column_names}")

    def col(name: str) -> tuple[np.ndarray, np.ndarray]:
        if name in table.column_names:
            return _to_numpy(table.column(name))
        return np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)

    raw_user, null_user = col("user_id")
    users, nonint_u, neg_u = _int_column(raw_user, null_user)
    user_display = np.where(null_user | nonint_u, None, users.astype(object))
    chk = _Checker(kind, n, user_display, source)
    out: dict[str, pa.Array] = {}

    def id_col(name: str, required: bool) -> np.ndarray:
        raw, nulls = col(name)
        vals, nonint, neg = _int_column(raw, nulls)
        if required:
            chk.add(name, nulls, "missing", raw)
        chk.add(name, nonint, "not_an_integer", raw)
        chk.add(name, neg, "negative_id", raw)
        out[name] = pa.array(vals, type=pa.int64(), mask=nulls if not required else None)
        return vals

    id_col("user_id", True)
    raw_ts, null_ts = col("ts")
    ts, nonint_ts, neg_ts = _int_column(raw_ts, null_ts)
    chk.add("ts", null_ts, "missing", raw_ts)
    chk.add("ts", nonint_ts, "not_an_integer", raw_ts)
    chk.add("ts", neg_ts, "negative_timestamp", raw_ts)
    if policy.as_of is not None:
        chk.add("ts", (ts > policy.as_of) & ~null_ts & ~nonint_ts, "after_request_time", raw_ts)
    out["ts"] = pa.array(ts, type=pa.int64())
    id_col("media_id", True)
    id_col("author_id", False)
    out["topic_ids"] = _topics(table, chk, policy, rep)

    def cat_col(name: str, vocab_kind: str) -> None:
        raw, nulls = col(name)
        if name == "action":
            chk.add(name, nulls, "missing", raw)
            known = set(vocab.actions)
            unknown = np.array([(not nulls[i]) and (raw[i] not in known) for i in range(n)], dtype=bool)
            chk.add(name, unknown, "unknown_action", raw)
            out[name] = pa.array(np.where(nulls | unknown, vocab.actions[0], raw).astype(str), type=pa.string())
            return
        known_vals = getattr(vocab, vocab_kind)
        strs = np.where(nulls, "other", raw).astype(object)
        bad_type = np.array([not isinstance(v, str) for v in strs], dtype=bool)
        strs = np.where(bad_type, "other", strs)
        unknown = ~np.isin(strs.astype(str), np.asarray(known_vals))
        clamp = (unknown | bad_type) & ~nulls
        if clamp.any():
            rep.clamped[f"{name}:other"] = int(clamp.sum())
        out[name] = pa.array(np.where(unknown, "other", strs).astype(str), type=pa.string())

    if kind == "explicit":
        cat_col("action", "actions")
    cat_col("media_type", "media_types")
    cat_col("surface", "surfaces")

    def duration_col(name: str, required: bool, cap: float) -> None:
        raw, nulls = col(name)
        vals, notnum = _float_column(raw, nulls)
        if required:
            chk.add(name, nulls, "missing", raw)
        chk.add(name, notnum, "not_a_number", raw)
        with np.errstate(invalid="ignore"):
            chk.add(name, np.isnan(vals) & ~nulls & ~notnum, "nan", raw)
            chk.add(name, np.isinf(vals), "infinite", raw)
            chk.add(name, vals < 0, "negative", raw)
            over = (vals > cap) & np.isfinite(vals)
        if over.any():
            rep.clamped[f"{name}:max"] = int(over.sum())
            vals = np.where(over, cap, vals)
        out[name] = pa.array(vals.astype(np.float32), type=pa.float32(), mask=nulls | notnum)

    if kind in ("implicit", "requests"):
        duration_col("video_duration", False, policy.max_duration_s)
    if kind == "implicit":
        duration_col("dwell_time", True, policy.max_dwell_s)
    if kind == "explicit":
        raw, nulls = col("value")
        vals, notnum = _float_column(raw, nulls)
        chk.add("value", notnum, "not_a_number", raw)
        nan = np.isnan(vals) & ~nulls & ~notnum
        if nan.any():
            rep.clamped["value:null"] = int(nan.sum())
        out["value"] = pa.array(vals.astype(np.float32), type=pa.float32(), mask=nulls | notnum | nan)

    if policy.on_error == "raise":
        err = chk.first_error()
        if err is not None:
            raise err
        keep = None
    else:
        bad = chk.any_bad()
        keep = ~bad if bad.any() else None
        for name, entries in chk.bad.items():
            for mask, reason, _ in entries:
                rep.dropped[f"{name}:{reason}"] = rep.dropped.get(f"{name}:{reason}", 0) + int(mask.sum())
        if keep is not None:
            err = chk.first_error()
            if err is not None:
                rep.examples.append(str(err))

    extra = [c for c in table.column_names if c not in schema.names and c.startswith("label_")] if kind == "requests" else []
    arrays = [out[f.name] for f in schema] + [_label(table, c, chk) for c in extra]
    names = schema.names + extra
    result = pa.Table.from_arrays(arrays, names=names)
    if keep is not None:
        result = result.filter(pa.array(keep))
    rep.records_out = result.num_rows
    if report is not None:
        report.merge(rep)
    return result


def _label(table: pa.Table, name: str, chk: _Checker) -> pa.Array:
    raw, nulls = _to_numpy(table.column(name))
    vals, notnum = _float_column(raw, nulls)
    chk.add(name, notnum, "not_a_number", raw)
    return pa.array(vals.astype(np.float32), type=pa.float32(), mask=nulls | notnum)


def _topics(table: pa.Table, chk: _Checker, policy: ValidationPolicy, rep: ValidationReport) -> pa.Array:
    n = table.num_rows
    if "topic_ids" not in table.column_names:
        return pa.array([[]] * n, type=pa.list_(pa.int64()))
    col = table.column("topic_ids")
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        chk.add("topic_ids", ~col.is_null().to_numpy(zero_copy_only=False), "not_a_list", np.asarray(col.to_pylist(), dtype=object))
        return pa.array([[]] * n, type=pa.list_(pa.int64()))
    nulls = col.is_null().to_numpy(zero_copy_only=False)
    col = col.fill_null(pa.scalar([], col.type)) if col.null_count else col
    offsets = col.offsets.to_numpy().astype(np.int64) - int(col.offsets[0].as_py())
    flat = col.flatten()
    fvals, fnulls = _to_numpy(flat)
    ids, nonint, neg = _int_column(fvals, fnulls)
    elem_bad = nonint | neg | fnulls
    per_row_bad = np.zeros(n, dtype=bool)
    if elem_bad.any():
        rows = np.searchsorted(offsets, np.flatnonzero(elem_bad), side="right") - 1
        per_row_bad[rows] = True
        raw_rows = np.asarray(col.to_pylist(), dtype=object)
        chk.add("topic_ids", per_row_bad, "not_a_non_negative_integer_list", raw_rows)
    lengths = np.diff(offsets)
    over = lengths > policy.max_topics
    if over.any():
        rep.clamped["topic_ids:max_topics"] = int(over.sum())
        keep_len = np.minimum(lengths, policy.max_topics)
        starts = offsets[:-1]
        idx = np.concatenate([np.arange(s, s + k) for s, k in zip(starts, keep_len)]) if n else np.zeros(0, np.int64)
        ids = ids[idx.astype(np.int64)]
        offsets = np.concatenate([[0], np.cumsum(keep_len)])
    ids = np.where(ids < 0, 0, ids)
    arr = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids, type=pa.int64()))
    del nulls
    return arr


def check_timeline_lengths(
    user_ids: Iterable[Any], lengths: Iterable[int], policy: ValidationPolicy = ValidationPolicy(), *, allow_empty: bool = False
) -> None:
    """Rejects empty (unless ``allow_empty``) and absurdly long (> ``policy.max_events``) timelines."""
    for uid, n in zip(user_ids, lengths):
        if n > policy.max_events:
            raise TimelineError("<timeline>", int(n), "absurd_length", user_id=uid,
                                detail=f"more than max_events={policy.max_events:,} events")
        if n == 0 and not allow_empty:
            raise TimelineError("<timeline>", 0, "empty_timeline", user_id=uid)
