"""Byte-level fuzzing of the CSV / TSV / gzip readers behind ``dv365 import generic``, ``movielens`` and
``kuairand``: a small valid file of each kind is cut at every byte position and has seeded random bytes
replaced (a bounded number of variants, a few seconds in all), imported in raise mode; the replaced-byte
variants and every fifth cut are imported again with ``--on-error drop``. Every outcome must be one of:

- ``same``: success, the records written are the original file's;
- ``as_in_file``: success, the records written are exactly what an independent parse of the mutated bytes
  (Python's ``csv`` and ``gzip``) finds *within the plausibility bounds* of docs/validation.md (ids >= 0 and
  < 2**63, times in ``plausible_ts_range()``, ratings on 0.5..5, dwell >= 0 ...), exact duplicate rows once,
  every input row accounted for by the summary (written, dropped with a named reason, or a duplicate). In
  raise mode a row outside the bounds must stop the import; in drop mode it must be dropped alone;
- ``error``: a :class:`~dv365.core.errors.Dv365Error` whose message names the file (for ``generic``, whose
  columns are read as text, drop mode only errs when the file itself does not parse);

never another exception type, never a record the file does not hold, and never a stored value outside the
bounds (checked on every table of every dataset written: :func:`assert_within_bounds`). docs/validation.md
has the counts of one run (``python -m pytest tests/reliability/test_fuzz_readers.py -s`` prints them)."""

from __future__ import annotations

import collections
import csv
import gzip
import io
import math
import random
import re
import shutil
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from dv365.core.catalog import default_data_dir
from dv365.core.errors import Dv365Error
from dv365.core.importers import import_generic, import_kuairand, import_movielens
from dv365.core.timeline import TimelineDataset
from dv365.core.validation import MAX_ID, ValidationPolicy, plausible_ts_range

FLIPS = 40  # random variants per file (1-3 bytes replaced each)
DROP_CUT_EVERY = 5  # drop mode: every fifth cut (and every flip)
T0 = 1_600_000_000
LO, HI = plausible_ts_range()  # the importers' bounds (now + 1 day: a few seconds apart from theirs at most)
POLICY = ValidationPolicy()
GENERIC = "uid,time,item\n" + "".join(f"{u},{T0 + 37 * i},{i % 5 + 1}\n" for i, u in enumerate([1, 2, 3, 1, 2, 7]))
MOVIES = "movieId,title,genres\n" + "".join(f"{m},M{m} (1990),Drama\n" for m in range(1, 6))
RATINGS = "userId,movieId,rating,timestamp\n" + "".join(
    f"{u},{i % 5 + 1},{(i % 4) + 1.5},{T0 + 41 * i}\n" for i, u in enumerate([1, 2, 3, 1, 2])
)
KUAIRAND_LOG = Path(__file__).resolve().parents[1] / "fixtures" / "kuairand-log" / "log_fixture.csv"
Row = tuple[object, ...]
Run = Callable[[Path, Path, ValidationPolicy], list[Row]]
Expect = Callable[[bytes, bool], "list[Row] | None"]
COUNTS: collections.Counter[tuple[str, str, str]] = collections.Counter()
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def variants(data: bytes, seed: int) -> Iterator[tuple[str, int, bytes]]:
    for i in range(len(data)):
        yield "cut", i, data[:i]
    rng = random.Random(seed)
    for k in range(FLIPS):
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        yield "flip", k, bytes(b)


def oracle(data: bytes, name: str, header: list[str], delimiter: str) -> list[list[str]] | None:
    """The data rows an independent reader finds in ``data`` (``None``: it is not a clean file of ``header``
    whose rows all have the header's field count)."""
    try:
        text = (gzip.decompress(data) if name.endswith(".gz") else data).decode("utf-8")
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error):
        return None
    if not rows or rows[0] != header or any(len(r) != len(header) for r in rows[1:]):
        return None
    return rows[1:]


def as_int(v: str) -> int | None:
    """An integer as the validator reads a text id (digits, a sign, blanks around)."""
    v = v.strip()
    return int(v) if _INT.fullmatch(v) else None


def as_float(v: str) -> float | None:
    v = v.strip()
    return float(v) if _FLOAT.fullmatch(v) or v.lower() in ("nan", "+nan", "-nan") else None


def as_seconds(v: str) -> int | None:
    """A generic importer's text time in seconds: an integer, or a decimal number floored."""
    i = as_int(v)
    if i is not None:
        return i
    f = as_float(v)
    return math.floor(f) if f is not None and math.isfinite(f) else None


def is_id(v: int | None) -> bool:
    return v is not None and 0 <= v <= MAX_ID


def plausible(ts: int | None) -> bool:
    return ts is not None and LO <= ts <= HI


def select(rows: list[tuple[Row, Row | None]], drop: bool) -> list[Row] | None:
    """The records a valid import writes: ``rows`` are ``(dedupe key, record or None if out of bounds)``; a
    bad row makes raise mode fail (``None``) and is left out in drop mode; a repeated key is written once."""
    seen: set[Row] = set()
    out: list[Row] = []
    for key, rec in rows:
        if rec is None:
            if not drop:
                return None
            continue
        if key not in seen:
            seen.add(key)
            out.append(rec)
    return out


def assert_within_bounds(url: str) -> None:
    """Every stored value lies within the documented plausibility bounds (docs/validation.md)."""
    ds = TimelineDataset(url)
    for kind in ("explicit", "implicit", "requests"):
        t = ds.requests() if kind == "requests" else ds.read_table(kind)
        if not t.num_rows:
            continue
        cols = {c: np.asarray(t.column(c).to_numpy(zero_copy_only=False)) for c in ("user_id", "ts", "media_id")}
        assert (cols["user_id"] >= 0).all() and (cols["media_id"] >= 0).all(), kind
        assert ((cols["ts"] >= LO) & (cols["ts"] <= HI)).all(), (kind, cols["ts"])
        authors = [a for a in t.column("author_id").to_pylist() if a is not None]
        assert all(a >= 0 for a in authors), kind
        if kind == "implicit":
            dwell = t.column("dwell_time").to_numpy(zero_copy_only=False)
            assert (np.isfinite(dwell) & (dwell >= 0) & (dwell <= POLICY.max_dwell_s)).all()
        if kind in ("implicit", "requests"):
            dur = [d for d in t.column("video_duration").to_pylist() if d is not None]
            assert all(0 <= d <= POLICY.max_duration_s for d in dur), kind
        if kind == "explicit":
            for action, value in zip(t.column("action").to_pylist(), t.column("value").to_pylist(), strict=True):
                if action.startswith("rate_"):
                    assert value is not None and 0.5 <= value <= 5.0, value
        for c in (c for c in t.column_names if c.startswith("label_")):
            v = t.column(c).to_pylist()
            assert None not in v and all(math.isfinite(x) for x in v), (c, v)
            if c == "label_watch_time":
                assert all(0 <= x <= POLICY.max_dwell_s for x in v)
            elif c == "label_rating":
                assert all(0.5 <= x <= 5.0 for x in v)
            else:
                assert set(v) <= {0.0, 1.0}, (c, v)


def check(kind: str, name: str, data: bytes, run: Run, expect: Expect, original: list[Row], tmp: Path, how: str,
          drop: bool, must_parse: bool) -> None:  # fmt: skip
    """Runs one import of ``data`` (as file ``name``) and classifies the outcome (asserting it is allowed)."""
    d = tmp / "in"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    (d / name).write_bytes(data)
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    mode = "drop" if drop else "raise"
    policy = ValidationPolicy(on_error=mode)
    want = expect(data, drop)
    try:
        got = run(d, out, policy)
    except Dv365Error as e:
        assert name in str(e), f"{kind} {how} {mode}: the error does not name {name}: {e} (input {data!r})"
        assert not (drop and must_parse and want is not None), f"{kind} {how}: drop mode failed: {e} ({data!r})"
        COUNTS[(kind, f"{how} {mode}", "error")] += 1
        return
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{kind} {how} {mode}: {type(e).__name__}: {e} (input {data!r})")
    assert_within_bounds(str(out))
    if sorted(got) == sorted(original) and (want is None or sorted(want) == sorted(original)):
        COUNTS[(kind, f"{how} {mode}", "same")] += 1
        return
    assert want is not None and sorted(got) == sorted(want), f"{kind} {how} {mode}: {got} is not {want} ({data!r})"
    COUNTS[(kind, f"{how} {mode}", "as_in_file")] += 1


def _accounted(s: object, kind: str, rows: int) -> None:
    """Every input row is a ``kind`` record: written, dropped (named in the validation summary) or a duplicate."""
    m = re.search(rf"{kind} (\d+)/(\d+) records kept", s.validation)  # type: ignore[attr-defined]
    assert m is not None and int(m.group(2)) == rows, s.line()  # type: ignore[attr-defined]


def generic_case(name: str, delimiter: str) -> tuple[bytes, Run, Expect]:
    raw = GENERIC.replace(",", delimiter).encode()
    data = gzip.compress(raw, mtime=0) if name.endswith(".gz") else raw

    def run(d: Path, out: Path, policy: ValidationPolicy) -> list[Row]:
        s = import_generic(
            d / name,
            str(out),
            kind="explicit",
            mapping={"user_id": "uid", "ts": "time", "media_id": "item"},
            constants={"action": "like"},
            num_buckets=2,
            policy=policy,
        )
        _accounted(s, "explicit", s.rows)
        t = TimelineDataset(str(out)).read_table("explicit")
        return list(zip(*(t.column(c).to_pylist() for c in ("user_id", "ts", "media_id")), strict=True))

    def expect(b: bytes, drop: bool) -> list[Row] | None:
        rows = oracle(b, name, ["uid", "time", "item"], delimiter)
        if rows is None:
            return None
        recs: list[tuple[Row, Row | None]] = []
        for r in rows:
            u, t, m = as_int(r[0]), as_seconds(r[1]), as_int(r[2])
            ok = is_id(u) and plausible(t) and is_id(m)
            recs.append((tuple(r), (u, t, m) if ok else None))  # duplicates: the same text in every column
        return select(recs, drop)

    return data, run, expect


def movielens_case() -> tuple[bytes, Run, Expect]:
    def run(d: Path, out: Path, policy: ValidationPolicy) -> list[Row]:
        (d / "movies.csv").write_text(MOVIES)
        s = import_movielens(d, str(out), num_buckets=2, policy=policy)
        _accounted(s, "explicit", s.ratings)
        assert s.requests == s.explicit_events, s.line()  # one request per rating written
        t = TimelineDataset(str(out)).read_table("explicit")
        return list(zip(*(t.column(c).to_pylist() for c in ("user_id", "media_id", "value", "ts")), strict=True))

    def expect(b: bytes, drop: bool) -> list[Row] | None:
        rows = oracle(b, "ratings.csv", ["userId", "movieId", "rating", "timestamp"], ",")
        if rows is None:
            return None
        recs: list[tuple[Row, Row | None]] = []
        for r in rows:
            u, m, v, t = as_int(r[0]), as_int(r[1]), as_float(r[2]), as_int(r[3])
            ok = is_id(u) and is_id(m) and v is not None and 0.5 <= v <= 5.0 and plausible(t)
            recs.append(((u, m, v, t), (u, m, v, t) if ok else None))  # duplicates: the same numbers
        return select(recs, drop)

    return RATINGS.encode(), run, expect


def kuairand_case() -> tuple[bytes, Run, Expect]:
    data = b"".join(KUAIRAND_LOG.read_bytes().splitlines(keepends=True)[:3])  # the header and two rows
    header = data.splitlines()[0].decode().split(",")
    col = {c: i for i, c in enumerate(header)}
    read = ["user_id", "video_id", "time_ms", "play_time_ms", "duration_ms", "tab", "is_click"]
    read += ["is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view", "is_profile_enter"]

    def run(d: Path, out: Path, policy: ValidationPolicy) -> list[Row]:
        s = import_kuairand([str(d / "log.csv")], str(out), catalog=default_data_dir() / "kuairand-pure-catalog",
                            policy=policy)  # fmt: skip
        _accounted(s, "implicit", s.log_rows)
        t = TimelineDataset(str(out)).requests()
        got = list(zip(*(t.column(c).to_pylist() for c in ("user_id", "ts", "media_id")), strict=True))
        assert s.requests == s.implicit_events == len(got), s.line()  # one request per impression written
        return got

    def expect(b: bytes, drop: bool) -> list[Row] | None:
        rows = oracle(b, "log.csv", header, ",")
        if rows is None:
            return None
        recs: list[tuple[Row, Row | None]] = []
        for r in rows:
            u, m, ms, play = as_int(r[col["user_id"]]), as_int(r[col["video_id"]]), as_float(r[col["time_ms"]]), \
                as_float(r[col["play_time_ms"]])  # fmt: skip
            flags = [as_float(r[col[c]]) for c in read[6:]]
            ts = math.floor(ms / 1000) if ms is not None and math.isfinite(ms) else None
            ok = is_id(u) and is_id(m) and plausible(ts) and play is not None and math.isfinite(play) and play >= 0
            ok = ok and all(f is not None and not math.isnan(f) for f in flags)
            key = tuple(as_float(r[col[c]]) if c not in ("user_id", "video_id") else as_int(r[col[c]]) for c in read)
            recs.append((key, (u, ts, m) if ok else None))  # the request key; its labels are checked by bounds
        return select(recs, drop)

    return data, run, expect


CASES = {
    "generic.csv": lambda: ("ev.csv", True, *generic_case("ev.csv", ",")),
    "generic.tsv": lambda: ("ev.tsv", True, *generic_case("ev.tsv", "\t")),
    "generic.csv.gz": lambda: ("ev.csv.gz", True, *generic_case("ev.csv.gz", ",")),
    "movielens ratings.csv": lambda: ("ratings.csv", False, *movielens_case()),
    "kuairand log.csv": lambda: ("log.csv", False, *kuairand_case()),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_every_cut_and_flip_is_imported_as_in_the_file_or_named_as_an_error(kind: str, tmp_path: Path) -> None:
    name, must_parse, data, run, expect = CASES[kind]()
    original = expect(data, False)
    assert original, "the unmutated file must parse"
    check(kind, name, data, run, expect, original, tmp_path, "valid", False, must_parse)
    assert COUNTS[(kind, "valid raise", "same")] == 1
    for how, i, b in variants(data, seed=sum(map(ord, kind))):
        check(kind, name, b, run, expect, original, tmp_path, how, False, must_parse)
        if how == "flip" or i % DROP_CUT_EVERY == 0:
            check(kind, name, b, run, expect, original, tmp_path, how, True, must_parse)
    print(f"\n{kind}: {dict((k[1:], v) for k, v in sorted(COUNTS.items()) if k[0] == kind)}")
