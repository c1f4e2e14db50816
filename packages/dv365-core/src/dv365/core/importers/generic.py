"""Generic column-mapped importer (CSV/TSV or Parquet -> UniTi).

A :class:`ColumnMapping` says which source column feeds each UniTi field of one event kind
(``{"user_id": "uid", "ts": "time", ...}``), which fields are constants (``{"action": "like"}``), the
unit of the timestamps (s/ms/us/ns) and of durations (s/ms), and the separator of topic ids given as one
delimited string. Values are converted as far as cleanly possible (strings of digits -> ints, ISO dates
-> unix seconds, ``"3|5"`` -> ``[3, 5]``), value by value: a value that does not convert is passed on
unchanged, so the writer's validation rejects that record alone with a
:class:`~dv365.core.errors.TimelineError` naming the record, the user, the field (and its source column)
and the value. Ids are never read through float64: a column of ids that holds ``"5.0"`` keeps every id exact
and rejects the ``"5.0"`` record.

Files are read through fsspec (a local path, ``memory://``, ``s3://``, ...), in blocks, so the input
may be larger than memory; ``.gz``/``.bz2``/``.zst``/``.xz`` CSVs are decompressed on the fly.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from dv365.core.errors import DatasetError, TimelineError
from dv365.core.importers.common import (
    Block,
    ImportSummary,
    MappingError,
    block_origin,
    iter_csv,
    open_input,
    read_bytes,
    repeated_rows,
    require_columns,
    write_parts,
)
from dv365.core.schema import schema_for
from dv365.core.validation import REQUIRED, ValidationPolicy

logger = logging.getLogger(__name__)

TIME_UNITS: dict[str, int] = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
DURATION_UNITS: dict[str, float] = {"s": 1.0, "ms": 1_000.0}
GENERIC_KINDS: tuple[str, ...] = ("explicit", "implicit")
_INT_FIELDS = ("user_id", "media_id", "author_id")
_DURATION_FIELDS = ("dwell_time", "video_duration")
_STR_FIELDS = ("action", "media_type", "surface")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".xz")


# ------------------------------------------------------------------------------------------------------
# the column mapping
# ------------------------------------------------------------------------------------------------------
def uniti_fields(kind: str) -> tuple[str, ...]:
    """The UniTi fields of ``kind`` events (what a mapping may name)."""
    return tuple(schema_for(kind).names)


@dataclass(frozen=True)
class ColumnMapping:
    """How a flat table becomes UniTi events of one kind; checked on construction.

    Args:
        kind: ``"explicit"`` or ``"implicit"``.
        columns: ``{uniti_field: source_column}``.
        constants: ``{uniti_field: value}`` for fields the source does not have (``{"action": "like"}``).
        time_unit: unit of numeric timestamps: ``s``, ``ms``, ``us`` or ``ns`` (typed timestamps and ISO
            strings are converted whatever the unit).
        duration_unit: unit of ``dwell_time``/``video_duration``: ``s`` or ``ms``.
        list_sep: separator of topic ids given as one string (``"3|5"``).

    Example::

        m = ColumnMapping("explicit", {"user_id": "uid", "ts": "time", "media_id": "item"}, {"action": "like"})
    """

    kind: str
    columns: Mapping[str, str]
    constants: Mapping[str, Any] = field(default_factory=dict)
    time_unit: str = "s"
    duration_unit: str = "s"
    list_sep: str = ","

    def __post_init__(self) -> None:
        if self.kind not in GENERIC_KINDS:
            raise MappingError(f"kind must be one of {', '.join(GENERIC_KINDS)}, got {self.kind!r}")
        valid = uniti_fields(self.kind)
        for what, d in (("mapping", self.columns), ("constants", self.constants)):
            unknown = sorted(set(d) - set(valid))
            if unknown:
                raise MappingError(
                    f"unknown UniTi field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in the "
                    f"{what} of {self.kind} events; valid fields: {', '.join(valid)}"
                )
        both = sorted(set(self.columns) & set(self.constants))
        if both:
            raise MappingError(f"field(s) {', '.join(both)} both mapped to a column and given a constant; keep one")
        missing = [f for f in REQUIRED[self.kind] if f not in self.columns and f not in self.constants]
        if missing:
            raise MappingError(
                f"required {self.kind} field(s) {', '.join(missing)} neither mapped to a column "
                f"(--map FIELD=COLUMN) nor given a constant (--const FIELD=VALUE)"
            )
        for name, value, allowed in (
            ("time_unit", self.time_unit, TIME_UNITS),
            ("duration_unit", self.duration_unit, DURATION_UNITS),
        ):
            if value not in allowed:
                raise MappingError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not self.list_sep:
            raise MappingError("list_sep must not be empty")

    @property
    def source_columns(self) -> list[str]:
        """The distinct source columns to read."""
        return list(dict.fromkeys(self.columns.values()))

    def to_uniti(self, batch: pa.Table) -> pa.Table:
        """One block of the source as a (not yet validated) UniTi table."""
        cols: dict[str, pa.Array] = {}
        for name, src in self.columns.items():
            cols[name] = self._convert(name, batch.column(src))
        for name, value in self.constants.items():
            cols[name] = self._convert(name, pa.repeat(pa.scalar(value), batch.num_rows))
        return pa.table(cols)

    def _convert(self, name: str, col: pa.Array | pa.ChunkedArray) -> pa.Array:
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if pa.types.is_null(arr.type):
            return arr
        if name == "ts":
            return to_unix_seconds(arr, self.time_unit)
        if name == "topic_ids":
            return to_id_lists(arr, self.list_sep)
        if name in _INT_FIELDS:  # exact: strings that are not integers stay strings (validation names them)
            return _exact_float_ids(arr) if pa.types.is_floating(arr.type) else _try_cast(arr, pa.int64())
        if name in _DURATION_FIELDS:
            return _scale(_try_cast(arr, pa.float64()), DURATION_UNITS[self.duration_unit])
        if name == "value":
            return _try_cast(arr, pa.float64())
        if name in _STR_FIELDS and not pa.types.is_string(arr.type):
            return arr.cast(pa.string())
        return arr


def read_mapping_file(url: str) -> dict[str, Any]:
    """Settings from a YAML mapping file.

    Either a flat ``{uniti_field: source_column}`` dict, or one with any of the keys ``kind``, ``map``,
    ``const``, ``time_unit``, ``duration_unit``, ``list_sep``.
    """
    try:
        doc = yaml.safe_load(read_bytes(url).decode("utf-8"))
    except yaml.YAMLError as e:
        raise MappingError(f"{url}: not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise MappingError(f"{url}: a mapping file holds a YAML mapping, got {type(doc).__name__}")
    keys = {"kind", "map", "const", "time_unit", "duration_unit", "list_sep"}
    if "map" not in doc:
        doc = {"map": doc}
    unknown = sorted(set(doc) - keys)
    if unknown:
        raise MappingError(f"{url}: unknown key(s) {', '.join(map(str, unknown))}; expected {', '.join(sorted(keys))}")
    for k in ("map", "const"):
        if not isinstance(doc.get(k, {}), dict):
            raise MappingError(f"{url}: {k!r} must be a mapping of UniTi field -> value")
    return {k: v for k, v in doc.items()}


# ------------------------------------------------------------------------------------------------------
# value conversion (Arrow in, Arrow out; never raises on bad values)
# ------------------------------------------------------------------------------------------------------
def _try_cast(arr: pa.Array, *types: pa.DataType) -> pa.Array:
    """The first of ``types`` that ``arr`` casts to cleanly (strings are trimmed), else ``arr`` unchanged."""
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        src = pc.utf8_trim_whitespace(arr)
    elif pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        src = arr
    else:
        return arr
    for t in types:
        if src.type == t:
            return src
        try:
            return src.cast(t)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return arr


def _exact_float_ids(arr: pa.Array) -> pa.Array:
    """A float column of ids (e.g. Parquet float64) unchanged, unless it holds values beyond 2^53, which a
    float cannot hold exactly (two ids may have become one): then ids as text, those values as the float's
    text, so validation rejects them by name."""
    f64 = arr.cast(pa.float64())
    inexact = pc.fill_null(pc.and_(pc.is_finite(f64), pc.greater(pc.abs(f64), float(2**53))), False)
    if not pc.any(inexact).as_py():
        return arr
    exact = pc.fill_null(pc.and_(pc.invert(inexact), pc.equal(pc.floor(f64), f64)), False)
    as_int = pc.if_else(exact, f64, 0.0).cast(pa.int64()).cast(pa.string())
    return pc.if_else(exact, as_int, f64.cast(pa.string()))


def _scale(arr: pa.Array, divisor: float) -> pa.Array:
    if divisor == 1.0 or not pa.types.is_floating(arr.type):
        return arr
    return pc.divide(arr, divisor)


def to_unix_seconds(arr: pa.Array, unit: str = "s") -> pa.Array:
    """Timestamps as unix seconds (floored). Numbers are in ``unit``; typed timestamps/dates and ISO-8601
    strings (with a zone offset, or without one: then read as UTC) are converted whatever ``unit`` says.
    Values that do not convert are returned unchanged (validation then names the record)."""
    t = arr.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return arr.cast(pa.timestamp("s"), safe=False).cast(pa.int64())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return _text_to_unix_seconds(arr, unit)
    scale = TIME_UNITS[unit]
    if pa.types.is_integer(t):
        vals = arr.fill_null(0).to_numpy().astype(np.int64) // scale
        return pa.array(vals, pa.int64(), mask=arr.is_null().to_numpy(zero_copy_only=False))
    if pa.types.is_floating(t):
        return pc.floor(pc.divide(arr.cast(pa.float64()), float(scale)))
    return arr


_TIME_TEXT_TYPES = (pa.int64(), pa.float64(), pa.timestamp("ns"), pa.timestamp("ns", tz="UTC"))


def _text_to_unix_seconds(arr: pa.Array, unit: str) -> pa.Array:
    """Timestamp strings as unix seconds: the whole column if it casts cleanly to one of the time types.
    Otherwise value by value: values that cannot be a time (not starting with a digit) are left as read at
    once, the others are converted in halves, down to single values, so a bad (or differently written) value
    leaves only itself unconverted. The result is then a string column: converted values as decimal
    seconds, the others as read (validation rejects those records alone, naming the value)."""
    num = _try_cast(arr, *_TIME_TEXT_TYPES)
    if num is not arr:
        return to_unix_seconds(num, unit)
    text = arr.cast(pa.string())
    plausible = pc.fill_null(pc.match_substring_regex(text, r"^\s*[+-]?\.?[0-9]"), False)
    idx = np.flatnonzero(plausible.to_numpy(zero_copy_only=False))
    if not len(idx):
        return arr
    converted = _as_text(_halves_to_unix_seconds(text.take(pa.array(idx)), unit))
    return pc.replace_with_mask(text, plausible, converted)


def _halves_to_unix_seconds(arr: pa.Array, unit: str) -> pa.Array:
    """:func:`to_unix_seconds` of ``arr`` if it casts cleanly, else of each half (recursively); see above."""
    num = _try_cast(arr, *_TIME_TEXT_TYPES)
    if num is not arr:
        return to_unix_seconds(num, unit)
    if len(arr) <= 1:
        return arr
    half = len(arr) // 2
    pieces = [_halves_to_unix_seconds(arr.slice(0, half), unit), _halves_to_unix_seconds(arr.slice(half), unit)]
    if all(pa.types.is_integer(p.type) for p in pieces):
        return pa.concat_arrays(pieces)
    return pa.concat_arrays([_as_text(p) for p in pieces])


def _as_text(arr: pa.Array) -> pa.Array:
    """Seconds (int or float) as decimal strings (integral floats without ``.0``); strings unchanged."""
    if pa.types.is_floating(arr.type):
        exact = pc.and_(pc.is_finite(arr), pc.less(pc.abs(arr), 2.0**63))
        integral = pc.fill_null(pc.and_(exact, pc.equal(pc.floor(arr), arr)), False)
        as_int = pc.if_else(integral, arr, 0.0).cast(pa.int64()).cast(pa.string())
        return pc.if_else(integral, as_int, arr.cast(pa.string()))
    return arr.cast(pa.string())


def to_id_lists(arr: pa.Array, sep: str = ",") -> pa.Array:
    """Topic ids as a list column: list columns pass through, ``"3|5"`` strings are split on ``sep``
    (blanks dropped), a single number becomes a one-element list; nulls become empty lists."""
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return arr
    n = len(arr)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        parts = pc.split_pattern(arr, pattern=sep)
        lengths = parts.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.utf8_trim_whitespace(parts.flatten())
        keep = pc.fill_null(pc.not_equal(flat, ""), False)
        rows = np.repeat(np.arange(n), lengths)[keep.to_numpy(zero_copy_only=False)]
        values = _try_cast(flat.filter(keep), pa.int64())
    else:
        valid = arr.is_valid()
        rows = np.flatnonzero(valid.to_numpy(zero_copy_only=False))
        values = _try_cast(arr.filter(valid), pa.int64())
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


# ------------------------------------------------------------------------------------------------------
# the importer
# ------------------------------------------------------------------------------------------------------
@dataclass
class GenericSummary(ImportSummary):
    """:class:`ImportSummary` plus the number of source rows read."""

    rows: int = 0


def file_format(url: str) -> str:
    """``"csv"``, ``"tsv"`` or ``"parquet"`` from the file name (a compression suffix is ignored)."""
    name = posixpath.basename(str(url).rstrip("/")).lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith((".csv", ".txt")):
        return "csv"
    raise DatasetError(
        f"{url}: cannot tell the file type from its name; expected .csv, .tsv, .parquet or .pq "
        f"(CSV/TSV optionally compressed: {', '.join(_COMPRESSION_SUFFIXES)})"
    )


def iter_table_file(url: str, columns: Sequence[str], *, batch_rows: int = 1 << 20) -> Iterator[pa.Table]:
    """The given columns of a CSV/TSV (read as strings) or Parquet file, block by block."""
    fmt = file_format(url)
    if fmt != "parquet":
        yield from iter_csv(
            url, columns, column_types={c: pa.string() for c in columns}, delimiter="\t" if fmt == "tsv" else ","
        )
        return
    with open_input(url, None) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{url}: not a readable Parquet file: {e}") from e
        require_columns(pf.schema_arrow.names, columns, url)
        for b in pf.iter_batches(batch_size=batch_rows, columns=list(dict.fromkeys(columns))):
            yield pa.Table.from_batches([b])


def import_generic(
    path: str | os.PathLike[str],
    out_url: str | os.PathLike[str],
    *,
    kind: str,
    mapping: Mapping[str, str],
    time_unit: str = "s",
    constants: Mapping[str, Any] | None = None,
    list_sep: str = ",",
    duration_unit: str = "s",
    value_range: tuple[float, float] | None = None,
    num_buckets: int = 16,
    policy: ValidationPolicy = ValidationPolicy(),
    source: str | None = None,
    simulated: bool = False,
    dense_ids: bool | Sequence[str] = False,
    overwrite: bool = False,
) -> GenericSummary:
    """Imports one CSV/TSV/Parquet file of events of one kind, columns mapped to UniTi fields.

    Args:
        path: the input file (local path or fsspec URL); the type comes from the extension.
        out_url: where to write the UniTi dataset (must not hold one already).
        kind: ``"explicit"`` or ``"implicit"``.
        mapping: ``{uniti_field: source_column}``; unknown fields raise :class:`MappingError` listing the
            valid ones; a column the file lacks raises :class:`DatasetError` naming it and the file.
        time_unit: unit of numeric timestamps (``s``, ``ms``, ``us``, ``ns``).
        constants: ``{uniti_field: value}`` for fields without a column (e.g. ``{"action": "like"}``).
        list_sep: separator of topic ids given as one string.
        duration_unit: unit of ``dwell_time``/``video_duration`` (``s`` or ``ms``).
        value_range: ``(lo, hi)``: explicit events only: the ``value`` is required and must lie in ``[lo, hi]``
            (a rating scale, e.g. ``(1, 5)``: a rating 400 or -3 is rejected, named); default: any number or none.
        num_buckets: user hash buckets of the dataset.
        policy: validation policy (``on_error="drop"`` drops bad records and counts them).
        source: the dataset's source tag (default ``"generic:<file name>"``).
        simulated: mark the dataset SIMULATED (a simulator wrote the input): reports on it say so.
        dense_ids: store these id types (``True``: media, author and topic) as dense table rows, raw ids kept in
            the dataset's id maps (:meth:`TimelineDataset.id_map`).
        overwrite: replace a dataset at ``out_url``; the old one stays until the new one is complete.

    Example::

        import_generic("events.csv", "memory://ds", kind="explicit",
                       mapping={"user_id": "uid", "ts": "time", "media_id": "item"},
                       constants={"action": "like", "surface": "feed"}, time_unit="ms")
    """
    cm = ColumnMapping(kind, dict(mapping), dict(constants or {}), time_unit, duration_unit, list_sep)
    if value_range is not None:
        if kind != "explicit" or "value" not in cm.columns:
            raise MappingError(
                "value_range (--value-range) needs explicit events with a value column (--map value=COLUMN)"
            )
        lo, hi = (float(v) for v in value_range)
        if not lo <= hi:
            raise MappingError(f"value_range (--value-range) must be LO,HI with LO <= HI, got {lo:g},{hi:g}")
        value_range = (lo, hi)
    name = posixpath.basename(str(path).rstrip("/"))
    src = source or f"generic:{name}"
    counts = {"rows": 0}

    def parts() -> Iterator[Block]:
        for batch in iter_table_file(str(path), cm.source_columns):
            origin = block_origin(name, counts["rows"])
            table = cm.to_uniti(batch)
            yield Block({kind: table}, {kind: origin}, value_range=value_range, duplicates={kind: repeated_rows(batch)})
            counts["rows"] += batch.num_rows
        if not counts["rows"]:
            raise DatasetError(f"{path}: no rows")
        logger.info(f"{path}: {counts['rows']:,} rows of {kind} events")

    extra = {
        "importer": "generic",
        "file": str(path),
        "kind": kind,
        "mapping": dict(cm.columns),
        "constants": {k: _jsonable(v) for k, v in cm.constants.items()},
        "time_unit": time_unit,
        "duration_unit": duration_unit,
        "value_range": list(value_range) if value_range else None,
    }
    try:
        base = write_parts(
            out_url,
            parts(),
            source=src,
            extra=extra,
            num_buckets=num_buckets,
            policy=policy,
            simulated=simulated,
            dense_ids=dense_ids,
            overwrite=overwrite,
        )
    except TimelineError as e:
        if e.record is None or e.field not in cm.columns:
            raise
        raise TimelineError(
            e.field,
            e.value,
            e.reason,
            user_id=e.user_id,
            record=e.record,
            source=e.source,
            detail="; ".join(filter(None, [e.detail, f"source column {cm.columns[e.field]!r}"])),
        ) from None
    return GenericSummary(**base, rows=counts["rows"])


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool, list, type(None))) else str(v)
