"""What every importer shares: the :class:`ImportSummary` base, the parts fed to the writer, and the
file helpers (fsspec input, block-wise CSV reading, catalog topic gathering, :func:`write_parts`).

Files are read through fsspec (a local path, ``memory://``, ``s3://``, ...); ``.gz``/``.bz2``/``.zst``/``.xz``
CSVs are decompressed on the fly.
"""

from __future__ import annotations

import csv
import io
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields, replace
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dv365.core.catalog import Catalog
from dv365.core.errors import DatasetError, Dv365Error
from dv365.core.fsio import url_to_fs
from dv365.core.timeline import DatasetWriter
from dv365.core.validation import ValidationPolicy, plausible_ts_range

# One table for the writer: (kind, table, name of its origin for error messages, e.g. "ratings.csv").
Part = tuple[str, pa.Table, str]


@dataclass(frozen=True)
class Block:
    """Tables made from the same input rows, added in one :meth:`DatasetWriter.add` call.

    Args:
        tables: ``{kind: table}``.
        origins: ``{kind: name for error messages}``.
        requests_of: request row ``i`` was made from row ``i`` of this kind's table: a record that validation
            drops there takes its request with it (never a request without its event).
        value_range: the explicit ``value`` must lie in it (see :class:`ValidationPolicy`), e.g. a rating scale.
        explicit_of: with ``requests_of="implicit"``: the implicit row each explicit row was made from (KuaiRand's
            flag events of an impression): it goes when its impression goes.
        duplicates: ``{kind: [n] bool}``: rows of that table made from an input row that repeats an earlier one
            of the block (:func:`repeated_rows`); the writer drops them after validation and counts them.
    """

    tables: Mapping[str, pa.Table]
    origins: Mapping[str, str]
    requests_of: str | None = None
    value_range: tuple[float, float] | None = None
    explicit_of: np.ndarray | None = None
    duplicates: Mapping[str, np.ndarray] | None = None


class MappingError(Dv365Error, ValueError):
    """A column mapping is unusable (unknown UniTi field, missing required field, bad unit...)."""


_BASE_FIELDS = (
    "source",
    "url",
    "users",
    "explicit_events",
    "implicit_events",
    "requests",
    "duplicate_rows",
    "validation",
)


@dataclass
class ImportSummary:
    """What one import wrote; each importer subclasses it to add its own input counts (int fields).

    Args:
        source: the dataset's ``source`` tag (e.g. ``"movielens:ml-latest-small"``).
        url: where the UniTi dataset was written.
        users: users with at least one event.
        explicit_events: explicit events written (after validation).
        implicit_events: implicit events written (after validation).
        requests: request rows written (after validation).
        duplicate_rows: input rows dropped because they repeat an earlier row exactly (every column the importer
            reads; see docs/importers.md), with the events and requests made from them.
        validation: the writer's validation summary, one clause per table kind.

    Example::

        s = import_movielens(src, "memory://ml")
        s.users, s.events, s.counts()  # 610, 104519, {"ratings": 100836, "tags": 3683, ...}
        print(s.line())
    """

    source: str = ""
    url: str = ""
    users: int = 0
    explicit_events: int = 0
    implicit_events: int = 0
    requests: int = 0
    duplicate_rows: int = 0
    validation: str = ""

    @property
    def events(self) -> int:
        """Explicit plus implicit events written."""
        return self.explicit_events + self.implicit_events

    def counts(self) -> dict[str, int]:
        """The importer-specific input counts (the int fields a subclass adds), in declaration order."""
        out: dict[str, int] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in _BASE_FIELDS and isinstance(v, int) and not isinstance(v, bool):
                out[f.name] = v
        return out

    def line(self) -> str:
        """The one-line summary the CLI prints last."""
        parts = [f"{self.users:,} users"] + [f"{v:,} {k.replace('_', ' ')}" for k, v in self.counts().items()]
        parts.append(f"{self.events:,} events ({self.explicit_events:,} explicit, {self.implicit_events:,} implicit)")
        parts.append(f"{self.requests:,} requests")
        parts.append(f"{self.duplicate_rows:,} duplicate rows dropped")
        return f"imported {self.source} -> {self.url}: {', '.join(parts)}; validation: {self.validation or 'n/a'}"


def join_url(base: str, name: str) -> str:
    """``base/name`` for a local path or an fsspec URL."""
    return str(base).rstrip("/") + "/" + name


def url_exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return bool(fs.exists(path))


# what reading a truncated or corrupt compressed file raises (gzip/bz2/lzma: EOFError, OSError; zlib.error)
_READ_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)


def _input_path(url: str) -> tuple[Any, str]:
    """The file system and path of an input file; :class:`DatasetError` if it is missing or a folder."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise DatasetError(f"{url}: file not found")
    if fs.isdir(path):
        raise DatasetError(f"{url}: is a folder, expected a file")
    return fs, path


def unreadable(url: str, e: BaseException) -> DatasetError:
    """The error for a file that cannot be read to its end (truncated or corrupt compression, I/O error)."""
    return DatasetError(f"{url}: cannot read the file to its end (truncated or corrupt?): {type(e).__name__}: {e}")


def read_bytes(url: str) -> bytes:
    """Whole content of a file; :class:`DatasetError` naming it if it is not there, is a folder or is truncated."""
    fs, path = _input_path(url)
    try:
        with fs.open(path, "rb", compression="infer") as f:
            return cast(bytes, f.read())
    except _READ_ERRORS as e:
        raise unreadable(url, e) from e


def open_input(url: str, data: bytes | None) -> AbstractContextManager[Any]:
    """``url`` opened for binary reading (decompressed by its suffix), or ``data`` when given."""
    if data is not None:
        return io.BytesIO(data)
    fs, path = _input_path(url)
    return cast(AbstractContextManager[Any], fs.open(path, "rb", compression="infer"))


def csv_header(url: str, delimiter: str = ",", data: bytes | None = None) -> list[str]:
    """Column names in the first line of a delimited file (a UTF-8 BOM is ignored)."""
    try:
        with open_input(url, data) as f:
            first = f.readline()
    except DatasetError:
        raise
    except _READ_ERRORS as e:
        raise unreadable(url, e) from e
    text = first.decode("utf-8-sig", errors="replace").rstrip("\r\n")
    return next(csv.reader([text], delimiter=delimiter), [])


def require_columns(present: Sequence[str], needed: Iterable[str], where: str) -> None:
    """Raises :class:`DatasetError` naming the file and every missing column."""
    missing = [c for c in dict.fromkeys(needed) if c not in present]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        raise DatasetError(
            f"{where}: missing column{'s' if len(missing) > 1 else ''} {names} "
            f"(columns present: {', '.join(present) or 'none'})"
        )


def iter_csv(
    url: str,
    columns: Sequence[str],
    *,
    column_types: Mapping[str, pa.DataType] | None = None,
    delimiter: str = ",",
    column_names: Sequence[str] | None = None,
    quoted: bool = True,
    data: bytes | None = None,
    block_size: int = 1 << 24,
    allow_empty: bool = False,
) -> Iterator[pa.Table]:
    """Reads ``columns`` of a delimited file block by block (pyarrow.csv, constant memory).

    Args:
        url: the file (local path or fsspec URL); also the name used in error messages.
        columns: the columns to read; a missing one raises :class:`DatasetError` naming it and the file.
        column_types: Arrow types to parse columns as (others are inferred); empty cells are nulls.
        delimiter: field separator.
        column_names: names for a file without a header line.
        quoted: whether ``"`` quotes fields.
        data: parse these bytes instead of reading ``url``.
        block_size: bytes per block (one yielded table per block).
        allow_empty: a file without data rows is fine (else :class:`DatasetError`: "no rows").

    Raises:
        DatasetError: naming the file: a missing column, no data rows, a folder, a truncated or corrupt
            file, or a line that does not parse (named by its line number where it can be found).
    """
    if column_names is None:
        require_columns(csv_header(url, delimiter, data), columns, url)
    else:
        require_columns(column_names, columns, url)
    read = pacsv.ReadOptions(column_names=list(column_names) if column_names else None, block_size=block_size)
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoted else False)
    conv = pacsv.ConvertOptions(
        include_columns=list(dict.fromkeys(columns)), column_types=dict(column_types or {}), strings_can_be_null=True
    )
    rows = 0
    try:
        with open_input(url, data) as f:
            for batch in pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=conv):
                rows += batch.num_rows
                yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError) as e:
        line = _bad_line(url, data, str(e), delimiter, quoted, has_header=column_names is None)
        raise DatasetError(f"{url}: cannot parse{f' line {line}' if line else ''}: {e}") from e
    except DatasetError:
        raise
    except _READ_ERRORS as e:
        raise unreadable(url, e) from e
    if not rows and not allow_empty:
        raise DatasetError(f"{url}: no rows (the file has {'only a header' if column_names is None else 'no lines'})")


_TOO_MANY = re.compile(r"Expected (\d+) columns, got (\d+)")
_BAD_VALUE = re.compile(r"In CSV column #(\d+): .*invalid value '(.*)'$", re.S)


def _bad_line(url: str, data: bytes | None, message: str, delimiter: str, quoted: bool, has_header: bool) -> int | None:
    """Line number (1-based, counting the header) of the line an Arrow CSV error is about: the first line
    with the field count or the invalid value it quotes; ``None`` if it cannot be found."""
    count, value = _TOO_MANY.search(message), _BAD_VALUE.search(message)
    if count is None and value is None:
        return None
    try:
        with open_input(url, data) as f:
            text = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
            reader = csv.reader(text, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
            for row in reader:
                if has_header and reader.line_num == 1:
                    continue
                if count is not None and len(row) == int(count.group(2)):
                    return reader.line_num
                if value is not None and int(value.group(1)) < len(row) and row[int(value.group(1))] == value.group(2):
                    return reader.line_num
    except (*_READ_ERRORS, csv.Error):
        return None
    return None


def block_origin(name: str, first_row: int) -> str:
    """How validation errors name a block of a file: ``"log.csv"`` or ``"log.csv [rows 1,048,576+]"``
    (the error's ``record`` then counts from that data row)."""
    return name if first_row == 0 else f"{name} [rows {first_row:,}+]"


def repeated_rows(t: pa.Table) -> np.ndarray:
    """``[n] bool``: rows equal in every column to an earlier row of ``t`` (nulls equal nulls, NaN equals NaN);
    the first of each group of equal rows is not marked. List columns are compared by their elements."""
    n = t.num_rows
    if n < 2:
        return np.zeros(n, dtype=bool)
    keys: dict[str, pa.Array] = {}
    for i, col in enumerate(t.columns):
        arr = col.combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            arr = pc.binary_join(arr.cast(pa.list_(pa.string())), ",")
        keys[f"k{i}"] = arr
    keys["row"] = pa.array(np.arange(n, dtype=np.int64))
    first = pa.table(keys).group_by([k for k in keys if k != "row"], use_threads=False).aggregate([("row", "min")])
    out = np.ones(n, dtype=bool)
    out[first.column("row_min").to_numpy()] = False
    return out


def gather_topics(catalog: Catalog, rows: np.ndarray) -> pa.ListArray:
    """Topic-id lists of catalog ``rows`` (as from :meth:`Catalog.index_of`); row -1 gives an empty list."""
    rows = np.asarray(rows, dtype=np.int64)
    ok = rows >= 0
    safe = np.where(ok, rows, 0)
    starts = catalog.tag_offsets[safe] if len(catalog) else np.zeros(len(rows), np.int64)
    ends = catalog.tag_offsets[safe + 1] if len(catalog) else starts
    lens = np.where(ok, ends - starts, 0)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    idx = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1], dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(catalog.tag_values[idx], pa.int64()))


def write_parts(
    out_url: str | os.PathLike[str],
    parts: Iterable[Part | Block],
    *,
    source: str,
    extra: Mapping[str, Any],
    num_buckets: int,
    policy: ValidationPolicy,
    simulated: bool = False,
    overwrite: bool = False,
    dense_ids: bool | Sequence[str] = False,
) -> dict[str, Any]:
    """Feeds ``(kind, table, origin)`` parts and :class:`Block` s to a :class:`DatasetWriter`, with the policy's
    ``ts_range`` set to the plausible timestamps (:func:`plausible_ts_range`) unless it is set, and
    ``labels_required`` (a request without a label is rejected); ``simulated`` marks a dataset that a
    simulator wrote (the importers' ``--simulated``), so every report on it says SIMULATED.

    ``overwrite`` replaces a dataset at ``out_url`` when the new one is complete (until then, and if the import
    fails, the old one stays as it was). ``dense_ids`` (``True`` or id types among media / author / topic): store
    those ids as dense table rows, the raw ids kept in the dataset's id maps (:class:`DatasetWriter`).

    Returns the base fields of an :class:`ImportSummary` (users, events written, validation summary).
    """
    if policy.ts_range is None:
        policy = replace(policy, ts_range=plausible_ts_range())
    policy = replace(policy, labels_required=True)  # training refuses null labels: reject them here, named
    w = DatasetWriter(
        str(out_url),
        num_buckets=num_buckets,
        source=source,
        simulated=simulated,
        policy=policy,
        extra=dict(extra),
        mode="overwrite" if overwrite else "create",
        dense_ids=dense_ids,
    )
    for item in parts:
        if isinstance(item, Block):
            block_policy = policy if item.value_range is None else replace(policy, value_range=item.value_range)
            w.add(
                **item.tables,
                source=item.origins,
                requests_of=item.requests_of,
                explicit_of=item.explicit_of,
                duplicates=item.duplicates,
                policy=block_policy,
            )
            continue
        kind, table, origin = item
        w.add(**{kind: table}, source=origin)
    stats = w.close().stats
    return {
        "source": source,
        "url": str(out_url),
        "users": int(stats.get("users", 0)),
        "explicit_events": int(stats.get("explicit_events", 0)),
        "implicit_events": int(stats.get("implicit_events", 0)),
        "requests": w.report["requests"].records_out,
        "duplicate_rows": sum(w.duplicates.values()),
        "validation": "; ".join(f"{k} {v}" for k, v in stats.get("validation", {}).items()),
    }
