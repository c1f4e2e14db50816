"""Byte-level fuzzing of the CSV / TSV / gzip readers behind ``dv365 import generic`` and ``dv365 import
movielens``: a small valid file of each kind is cut at every byte position and has seeded random bytes
replaced (a bounded number of variants, a few seconds in all). Every outcome must be one of:

- ``same``: success, the records written are the original file's;
- ``as_in_file``: success, the records written are exactly what an independent parse of the mutated bytes
  (Python's ``csv`` and ``gzip``) finds, every row accounted for by the import summary (e.g. a cut inside
  the last line's last number leaves a shorter number: nothing in a plain-text file tells them apart);
- ``error``: a :class:`~dv365.core.errors.Dv365Error` whose message names the file;

never another exception type and never a record that the file does not hold. docs/validation.md has the
counts of one run (``python -m pytest tests/reliability/test_fuzz_readers.py -s`` prints them)."""

from __future__ import annotations

import collections
import csv
import gzip
import io
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dv365.core.catalog import default_data_dir
from dv365.core.errors import Dv365Error
from dv365.core.importers import import_generic, import_kuairand, import_movielens
from dv365.core.timeline import TimelineDataset

FLIPS = 40  # random variants per file (1-3 bytes replaced each)
T0 = 1_600_000_000
GENERIC = "uid,time,item\n" + "".join(f"{u},{T0 + 37 * i},{i % 5 + 1}\n" for i, u in enumerate([1, 2, 3, 1, 2, 7]))
MOVIES = "movieId,title,genres\n" + "".join(f"{m},M{m} (1990),Drama\n" for m in range(1, 6))
RATINGS = "userId,movieId,rating,timestamp\n" + "".join(
    f"{u},{i % 5 + 1},{(i % 4) + 1.5},{T0 + 41 * i}\n" for i, u in enumerate([1, 2, 3, 1, 2])
)
Row = tuple[object, ...]
COUNTS: collections.Counter[tuple[str, str, str]] = collections.Counter()


def variants(data: bytes, seed: int) -> Iterator[tuple[str, bytes]]:
    for i in range(len(data)):
        yield "cut", data[:i]
    rng = random.Random(seed)
    for _ in range(FLIPS):
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        yield "flip", bytes(b)


def oracle(data: bytes, name: str, header: list[str], delimiter: str) -> list[list[str]] | None:
    """The data rows an independent reader finds in ``data`` (``None``: it is not a clean file of ``header``)."""
    try:
        text = (gzip.decompress(data) if name.endswith(".gz") else data).decode("utf-8")
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error):
        return None
    if not rows or rows[0] != header:
        return None
    return rows[1:]


def as_int(v: str) -> int | None:
    v = v.strip()
    return int(v) if v.lstrip("+-").isdigit() and v.isascii() else None


def as_float(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def check(
    kind: str,
    name: str,
    data: bytes,
    run: Callable[[Path, Path], list[Row]],
    expect: Callable[[bytes], list[Row] | None],
    original: list[Row],
    tmp: Path,
    how: str,
) -> None:
    """Runs one import of ``data`` (as file ``name``) and classifies the outcome (asserting it is allowed)."""
    d = tmp / "in"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    f = d / name
    f.write_bytes(data)
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    try:
        got = run(d, out)
    except Dv365Error as e:
        assert name in str(e), f"{kind} {how}: the error does not name {name}: {e} (input {data!r})"
        COUNTS[(kind, how, "error")] += 1
        return
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{kind} {how}: {type(e).__name__}: {e} (input {data!r})")
    if sorted(got) == sorted(original):
        COUNTS[(kind, how, "same")] += 1
        return
    want = expect(data)
    assert want is not None and sorted(got) == sorted(want), f"{kind} {how}: records {got} not in the file {data!r}"
    COUNTS[(kind, how, "as_in_file")] += 1


def generic_case(
    name: str, delimiter: str
) -> tuple[bytes, Callable[[Path, Path], list[Row]], Callable[[bytes], list[Row] | None]]:
    raw = GENERIC.replace(",", delimiter).encode()
    data = gzip.compress(raw, mtime=0) if name.endswith(".gz") else raw

    def run(d: Path, out: Path) -> list[Row]:
        import_generic(
            d / name,
            str(out),
            kind="explicit",
            mapping={"user_id": "uid", "ts": "time", "media_id": "item"},
            constants={"action": "like"},
            num_buckets=2,
        )
        t = TimelineDataset(str(out)).read_table("explicit")
        return list(zip(*(t.column(c).to_pylist() for c in ("user_id", "ts", "media_id")), strict=True))

    def expect(b: bytes) -> list[Row] | None:
        rows = oracle(b, name, ["uid", "time", "item"], delimiter)
        if rows is None or any(len(r) != 3 for r in rows):
            return None
        out = [tuple(as_int(v) for v in r) for r in rows]
        return None if any(None in r for r in out) else out

    return data, run, expect


def movielens_case() -> tuple[bytes, Callable[[Path, Path], list[Row]], Callable[[bytes], list[Row] | None]]:
    def run(d: Path, out: Path) -> list[Row]:
        (d / "movies.csv").write_text(MOVIES)
        s = import_movielens(d, str(out), num_buckets=2)
        t = TimelineDataset(str(out)).read_table("explicit")
        got = list(zip(*(t.column(c).to_pylist() for c in ("user_id", "media_id", "value", "ts")), strict=True))
        assert s.explicit_events + s.unknown_movies == s.ratings, s.line()  # every row accounted for
        return got

    def expect(b: bytes) -> list[Row] | None:
        rows = oracle(b, "ratings.csv", ["userId", "movieId", "rating", "timestamp"], ",")
        if rows is None or any(len(r) != 4 for r in rows):
            return None
        out = [(as_int(r[0]), as_int(r[1]), as_float(r[2]), as_int(r[3])) for r in rows]
        return None if any(None in r for r in out) else [r for r in out if 1 <= r[1] <= 5]  # type: ignore[operator]

    return RATINGS.encode(), run, expect


KUAIRAND_LOG = Path(__file__).resolve().parents[1] / "fixtures" / "kuairand-log" / "log_fixture.csv"


def kuairand_case() -> tuple[bytes, Callable[[Path, Path], list[Row]], Callable[[bytes], list[Row] | None]]:
    data = b"".join(KUAIRAND_LOG.read_bytes().splitlines(keepends=True)[:3])  # the header and two rows
    header = data.splitlines()[0].decode().split(",")

    def run(d: Path, out: Path) -> list[Row]:
        s = import_kuairand([str(d / "log.csv")], str(out), catalog=default_data_dir() / "kuairand-pure-catalog")
        t = TimelineDataset(str(out)).requests()
        got = list(zip(*(t.column(c).to_pylist() for c in ("user_id", "ts", "media_id")), strict=True))
        assert s.log_rows == len(got), s.line()  # one request per log row
        return got

    def expect(b: bytes) -> list[Row] | None:
        rows = oracle(b, "log.csv", header, ",")
        if rows is None or any(len(r) != len(header) for r in rows):
            return None
        out = [(as_int(r[0]), as_int(r[4]), as_int(r[1])) for r in rows]
        if any(None in r for r in out):
            return None
        return [(u, t // 1000, m) for u, t, m in out]  # type: ignore[operator]

    return data, run, expect


CASES = {
    "generic.csv": lambda: ("ev.csv", *generic_case("ev.csv", ",")),
    "generic.tsv": lambda: ("ev.tsv", *generic_case("ev.tsv", "\t")),
    "generic.csv.gz": lambda: ("ev.csv.gz", *generic_case("ev.csv.gz", ",")),
    "movielens ratings.csv": lambda: ("ratings.csv", *movielens_case()),
    "kuairand log.csv": lambda: ("log.csv", *kuairand_case()),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_every_cut_and_flip_is_imported_as_in_the_file_or_named_as_an_error(kind: str, tmp_path: Path) -> None:
    name, data, run, expect = CASES[kind]()
    original = expect(gzip.compress(gzip.decompress(data), mtime=0) if name.endswith(".gz") else data)
    assert original, "the unmutated file must parse"
    check(kind, name, data, run, expect, original, tmp_path, "valid")
    assert COUNTS[(kind, "valid", "same")] == 1
    for how, b in variants(data, seed=sum(map(ord, kind))):
        check(kind, name, b, run, expect, original, tmp_path, how)
    print(f"\n{kind}: {dict((k[1:], v) for k, v in sorted(COUNTS.items()) if k[0] == kind)}")
