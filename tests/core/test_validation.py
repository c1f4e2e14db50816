"""Validation policy (docs/validation.md): a fuzz test against a per-record oracle, and one test per rule."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dv365.core.errors import TimelineError
from dv365.core.timeline import DatasetWriter, TimelineDataset, schema_for
from dv365.core.validation import (
    FIELD_ORDER,
    ValidationPolicy,
    ValidationReport,
    check_timeline_lengths,
    validate_table,
)
from dv365.core.vocab import Vocabulary

VOCAB = Vocabulary()
T0 = 1_700_000_000
AS_OF = T0 + 1_000
F32_MAX = 3.4028234663852886e38
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
LABELS = ("label_click", "label_watch")


# ==================================================================================================
# The oracle: docs/validation.md for ONE record, in plain Python
# ==================================================================================================
class Bad(Exception):
    """The oracle's verdict for a rejected field."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def o_int(v: Any) -> int | None:
    """An integer in int64 (int, integral float, decimal ASCII digits with optional sign/spaces); None if missing."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise Bad("not_an_integer")
    if isinstance(v, float):
        if not (math.isfinite(v) and v.is_integer() and -(2.0**63) <= v < 2.0**63):
            raise Bad("not_an_integer")
        v = int(v)
    elif isinstance(v, str):
        s = v.strip()
        digits = s[1:] if s[:1] in ("+", "-") else s
        if not (digits and digits.isascii() and digits.isdigit()) or len(digits.lstrip("0")) > 19:
            raise Bad("not_an_integer")
        v = int(s)
    elif not isinstance(v, int):
        raise Bad("not_an_integer")
    if not INT64_MIN <= v <= INT64_MAX:
        raise Bad("not_an_integer")
    return v


def o_float(v: Any) -> float | None:
    """A number (int, float, or ASCII text Python's float() parses, without '_'); None if missing."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise Bad("not_a_number")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.isascii() and "_" not in v:
        try:
            return float(v)
        except ValueError:
            pass
    raise Bad("not_a_number")


def f32(x: float) -> float:
    return float(np.float32(x))


ORACLE_ORDER = {
    "explicit": ["user_id", "ts", "media_id", "author_id", "topic_ids", "action", "media_type", "surface", "value"],
    "implicit": [
        "user_id",
        "ts",
        "media_id",
        "author_id",
        "topic_ids",
        "media_type",
        "surface",
        "video_duration",
        "dwell_time",
    ],
    "requests": ["user_id", "ts", "media_id", "author_id", "topic_ids", "media_type", "surface", "video_duration"],
}


def oracle(kind: str, rec: dict[str, Any], policy: ValidationPolicy, labels: tuple[str, ...]) -> tuple[Any, ...]:
    """``("ok", canonical_row, clamps)`` or ``("bad", field, reason)`` for one record as stored in Arrow."""
    row: dict[str, Any] = {}
    clamps: list[str] = []
    order = ORACLE_ORDER[kind] + list(labels)
    for name in order:
        v = rec.get(name)
        try:
            if name in ("user_id", "ts", "media_id", "author_id"):
                iv = o_int(v)
                if iv is None and name != "author_id":
                    raise Bad("missing")
                if iv is not None and iv < 0:
                    raise Bad("negative_timestamp" if name == "ts" else "negative_id")
                if name == "ts" and policy.as_of is not None and iv > policy.as_of:  # type: ignore[operator]
                    raise Bad("after_request_time")
                row[name] = iv
            elif name == "topic_ids":
                if v is None:
                    v = []
                if not isinstance(v, list):
                    raise Bad("not_a_list")
                try:
                    ids = [o_int(x) for x in v]
                except Bad:
                    raise Bad("not_a_non_negative_integer_list") from None
                if any(x is None or x < 0 for x in ids):
                    raise Bad("not_a_non_negative_integer_list")
                if len(ids) > policy.max_topics:
                    clamps.append("topic_ids:max_topics")
                row[name] = ids[: policy.max_topics]
            elif name == "action":
                if v is None:
                    raise Bad("missing")
                if not (isinstance(v, str) and v in VOCAB.actions):
                    raise Bad("unknown_action")
                row[name] = v
            elif name in ("media_type", "surface"):
                known = VOCAB.media_types if name == "media_type" else VOCAB.surfaces
                if v is None:
                    row[name] = "other"
                elif isinstance(v, str) and v in known:
                    row[name] = v
                else:
                    row[name] = "other"
                    clamps.append(f"{name}:other")
            elif name in ("dwell_time", "video_duration"):
                fv = o_float(v)
                if fv is None:
                    if name == "dwell_time":
                        raise Bad("missing")
                    row[name] = None
                    continue
                if math.isnan(fv):
                    raise Bad("nan")
                if math.isinf(fv):
                    raise Bad("infinite")
                if fv < 0:
                    raise Bad("negative")
                cap = policy.max_dwell_s if name == "dwell_time" else policy.max_duration_s
                if fv > cap:
                    clamps.append(f"{name}:max")
                    fv = cap
                row[name] = f32(fv)
            else:  # value, label_*
                fv = o_float(v)
                if fv is not None and math.isinf(fv):
                    raise Bad("infinite")
                if fv is not None and abs(fv) > F32_MAX:
                    raise Bad("out_of_range")
                if fv is not None and math.isnan(fv):
                    clamps.append(f"{name}:null")
                    fv = None
                row[name] = None if fv is None else f32(fv)
        except Bad as b:
            return ("bad", name, b.reason)
    return ("ok", row, clamps)


# ==================================================================================================
# Record generators: typed Arrow columns as importers hand them over, valid and malformed values mixed
# ==================================================================================================
Gen = Callable[[random.Random], Any]
GARBAGE_TEXT = [
    "",
    " ",
    "abc",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "Infinity",
    "1e3",
    "4.0",
    "0x1F",
    "1_000",
    "²",
    "١٢",
    "99999999999999999999",
    "-5",
    "+7",
    " 42 ",
    "9" * 5000,
    "True",
    "None",
    "null",
    "\x00",
    "like ",
    "LIKE",
    "1,2,3",
    "[1, 2]",
    "1e400",
    "-0",
    "3.5e2",
    "  2.5  ",
]
WEIRD_FLOATS = [
    math.nan,
    math.inf,
    -math.inf,
    0.5,
    -1.0,
    -0.0,
    1e300,
    -1e300,
    2.0**63,
    -(2.0**63),
    1e19,
    3.5e38,
    1e-50,
    4e38,
]
WEIRD_INTS = [-1, -(10**6), INT64_MIN, INT64_MAX, 0]


def as_int(x: float) -> int:
    return int(x) if math.isfinite(x) else 0


def one_of(rnd: random.Random, p_bad: float, good: Gen, bad: Gen) -> Any:
    return bad(rnd) if rnd.random() < p_bad else good(rnd)


def numeric_cell(typing: str, good: Gen, rnd: random.Random, p_bad: float, p_null: float) -> Any:
    """A value of an integer- or float-valued field under ``typing``, good or malformed."""
    if rnd.random() < p_null:
        return None
    if typing == "int64":
        return one_of(rnd, p_bad, lambda r: as_int(good(r)), lambda r: r.choice(WEIRD_INTS))
    if typing == "uint64":
        return one_of(rnd, p_bad, lambda r: abs(as_int(good(r))), lambda r: r.choice([2**63, 2**64 - 1, 2**63 + 5]))
    if typing in ("float64", "float32"):
        return one_of(rnd, p_bad, lambda r: float(good(r)), lambda r: r.choice(WEIRD_FLOATS + [r.uniform(-10, 10)]))
    if typing == "string":
        return one_of(rnd, p_bad, lambda r: str(good(r)), lambda r: r.choice(GARBAGE_TEXT + [repr(r.random())]))
    if typing == "bool":
        return rnd.random() < 0.5
    raise AssertionError(typing)


FIELDS: dict[str, dict[str, Any]] = {
    # column: the Arrow typings fuzzed for it (repeats weigh them) and a generator of valid values
    "user_id": {
        "typings": ["int64", "int64", "uint64", "float64", "string", "bool"],
        "good": lambda r: r.choice([0, 1, 2, 3, 7, 42, 10**12]),
    },
    "ts": {
        "typings": ["int64", "int64", "float64", "string"],  # 10%: close to AS_OF, half of them after it
        "good": lambda r: T0 + (r.randint(900, 1_100) if r.random() < 0.1 else r.randint(-(10**6), 0)),
    },
    "media_id": {"typings": ["int64", "int64", "float64", "string"], "good": lambda r: r.randint(0, 10**12)},
    "author_id": {"typings": ["int64", "float64", "string"], "good": lambda r: r.randint(0, 10**9)},
    "value": {
        "typings": ["float64", "float32", "int64", "string"],
        "good": lambda r: r.choice([1.0, 4.5, r.uniform(-5, 5), math.nan]),
    },
    "dwell_time": {
        "typings": ["float64", "float64", "float32", "int64", "string"],
        "good": lambda r: r.choice([0.0, r.uniform(0, 60), r.uniform(0, 30_000)]),
    },
    "video_duration": {
        "typings": ["float64", "float32", "int64", "string"],
        "good": lambda r: r.choice([r.uniform(1, 600), r.uniform(0, 200_000)]),
    },
    "label_click": {"typings": ["float64", "int64", "string"], "good": lambda r: r.choice([0.0, 1.0, math.nan])},
    "label_watch": {"typings": ["float64", "float32"], "good": lambda r: r.uniform(0, 100)},
}
ARROW_TYPES = {
    "int64": pa.int64(),
    "uint64": pa.uint64(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "dict": pa.dictionary(pa.int32(), pa.string()),
    "list<int64>": pa.list_(pa.int64()),
    "large_list<int64>": pa.large_list(pa.int64()),
    "list<string>": pa.list_(pa.string()),
    "list<float64>": pa.list_(pa.float64()),
    "list<bool>": pa.list_(pa.bool_()),
}


def topic_cell(typing: str, rnd: random.Random, p_bad: float, p_null: float) -> Any:
    if rnd.random() < p_null:
        return None
    if typing == "string":  # a serialised list: not a list
        return rnd.choice(["1,2", "[3]", ""])
    if typing == "list<bool>":
        return [rnd.random() < 0.5 for _ in range(rnd.randint(0, 2))]
    elem = typing[typing.index("<") + 1 : -1]
    out = []
    for _ in range(rnd.choice([0, 1, 2, 3, 5, 20])):
        x = numeric_cell("int64" if elem == "int64" else elem, lambda r: r.randint(0, 10**6), rnd, p_bad / 3, 0.0)
        out.append(None if rnd.random() < p_bad / 10 else x)
    return out


def categorical_cell(typing: str, known: tuple[str, ...], rnd: random.Random, p_bad: float, p_null: float) -> Any:
    if rnd.random() < p_null:
        return None
    if typing == "int64":
        return rnd.randint(-1, 20)
    return one_of(rnd, p_bad, lambda r: r.choice(known), lambda r: r.choice(GARBAGE_TEXT[:24] + ["Video", "tv"]))


def make_batch(kind: str, seed: int, n: int, typings: dict[str, str], bad_rates: dict[str, float] | float) -> pa.Table:
    """``n`` records of ``kind``: column ``c`` typed ``typings[c]``, malformed with probability ``bad_rates[c]``."""
    rnd = random.Random(seed)
    names = list(schema_for(kind).names) + (list(LABELS) if kind == "requests" else [])
    cols: dict[str, pa.Array] = {}
    for name in names:
        typing = typings[name]
        p_bad = bad_rates if isinstance(bad_rates, float) else bad_rates[name]
        if name == "topic_ids":
            values = [topic_cell(typing, rnd, p_bad, 0.1) for _ in range(n)]
        elif name in ("action", "media_type", "surface"):
            known = {"action": VOCAB.actions, "media_type": VOCAB.media_types, "surface": VOCAB.surfaces}[name]
            values = [
                categorical_cell(typing, known, rnd, p_bad, 0.15 if name != "action" else p_bad / 4) for _ in range(n)
            ]
        else:
            spec = FIELDS[name]
            optional = name in ("author_id", "value", "video_duration") or name.startswith("label_")
            p_null = 0.3 if optional else p_bad / 4
            values = [numeric_cell(typing, spec["good"], rnd, p_bad, p_null) for _ in range(n)]
        if typing == "float64" and name in ("user_id", "ts", "media_id", "author_id", "dwell_time"):
            values = [math.nan if v is None and rnd.random() < 0.5 else v for v in values]  # pandas-style NaN
        cols[name] = pa.array(values, type=ARROW_TYPES[typing])
    table = pa.table(cols)
    if n >= 4 and rnd.random() < 0.3:  # importers often hand over several chunks
        k = rnd.randint(1, n - 1)
        table = pa.concat_tables([table.slice(0, k), table.slice(k)])
    return table


def column_names(kind: str) -> list[str]:
    return list(schema_for(kind).names) + (list(LABELS) if kind == "requests" else [])


def all_typings(name: str) -> list[str]:
    """Every typing fuzzed for a column (the first ones are what a sane importer produces)."""
    if name == "topic_ids":
        return ["list<int64>", "large_list<int64>", "list<string>", "list<float64>", "list<bool>", "string"]
    if name in ("action", "media_type", "surface"):
        return ["string", "dict", "int64"]
    return list(dict.fromkeys(FIELDS[name]["typings"]))


def sane_typing(name: str) -> str:
    return (
        "list<int64>"
        if name == "topic_ids"
        else "string"
        if name in ("action", "media_type", "surface")
        else "int64"
        if name in ("user_id", "ts", "media_id", "author_id")
        else "float64"
    )


@st.composite
def batches(draw: st.DrawFn) -> tuple[str, pa.Table, ValidationPolicy]:
    """A batch where a few "focus" columns are badly typed or often malformed, the rest rarely malformed."""
    kind = draw(st.sampled_from(["explicit", "implicit", "requests"]))
    names = column_names(kind)
    focus = set(draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)))
    typings = {c: draw(st.sampled_from(all_typings(c))) if c in focus else sane_typing(c) for c in names}
    bad_rates = {c: draw(st.sampled_from([0.1, 0.5, 1.0] if c in focus else [0.0, 0.0, 0.01])) for c in names}
    policy = ValidationPolicy(as_of=draw(st.sampled_from([None, AS_OF])), max_topics=draw(st.sampled_from([0, 3, 16])))
    table = make_batch(kind, draw(st.integers(0, 2**32 - 1)), draw(st.integers(20, 80)), typings, bad_rates)
    return kind, table, policy


def sweep() -> list[tuple[str, pa.Table, ValidationPolicy]]:
    """Deterministic batches: every (kind, column, typing), that column malformed half the time."""
    out = []
    for k, kind in enumerate(["explicit", "implicit", "requests"]):
        names = column_names(kind)
        for c, name in enumerate(names):
            for t, typing in enumerate(all_typings(name)):
                typings = {n: sane_typing(n) for n in names} | {name: typing}
                rates = {n: 0.0 for n in names} | {name: 0.5}
                table = make_batch(kind, 1000 * k + 10 * c + t, 60, typings, rates)
                out.append((kind, table, ValidationPolicy(as_of=AS_OF if t % 2 else None, max_topics=3)))
    return out


def same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN (also inside lists)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def run_validate(table: pa.Table, kind: str, policy: ValidationPolicy, report: ValidationReport | None = None) -> Any:
    """``validate_table`` result or its TimelineError; any other exception fails the test."""
    try:
        return validate_table(table, kind, VOCAB, policy, source="fuzz", report=report)  # type: ignore[arg-type]
    except TimelineError as e:
        return e
    except Exception as e:  # noqa: BLE001 - the point: nothing but TimelineError may escape
        pytest.fail(f"validate_table crashed with {type(e).__name__}: {e}")


def check_against_oracle(kind: str, table: pa.Table, policy: ValidationPolicy) -> None:
    labels = LABELS if kind == "requests" else ()
    records = table.to_pylist()
    verdicts = [oracle(kind, r, policy, labels) for r in records]
    accepted = [v[1] for v in verdicts if v[0] == "ok"]
    first_bad = next((i for i, v in enumerate(verdicts) if v[0] == "bad"), None)
    expected_schema = pa.schema(list(schema_for(kind)) + [pa.field(c, pa.float32()) for c in labels])

    # raise mode: the oracle's first bad record, its first bad field, or the exact accepted rows
    got = run_validate(table, kind, ValidationPolicy(**{**policy.__dict__, "on_error": "raise"}))
    if first_bad is None:
        assert isinstance(got, pa.Table), got
        assert got.schema == expected_schema
        assert got.to_pylist() == accepted
    else:
        _, field, reason = verdicts[first_bad]
        assert isinstance(got, TimelineError), f"expected {field}:{reason} at record {first_bad}"
        assert (got.record, got.field, got.reason) == (first_bad, field, reason), str(got)
        assert same(got.value, records[first_bad][field]), (got.value, records[first_bad][field])
        assert got.user_id == (None if field == "user_id" else o_int(records[first_bad]["user_id"]))
        assert got.source == "fuzz" and f"record {first_bad}" in str(got) and repr(field) in str(got)

    # drop mode: exactly the accepted rows, canonicalised; counts per first failure and per clamp
    report = ValidationReport()
    kept = run_validate(table, kind, ValidationPolicy(**{**policy.__dict__, "on_error": "drop"}), report)
    assert isinstance(kept, pa.Table), kept
    assert kept.schema == expected_schema
    assert kept.to_pylist() == accepted
    dropped = Counter(f"{v[1]}:{v[2]}" for v in verdicts if v[0] == "bad")
    clamped = Counter(c for v in verdicts if v[0] == "ok" for c in v[2])
    assert (report.records_in, report.records_out) == (len(records), len(accepted))
    assert report.dropped == dict(dropped)
    assert report.clamped == dict(clamped)
    assert bool(report.examples) == bool(dropped)


FUZZ_RECORDS: Counter[str] = Counter()
DOCUMENTED_OUTCOMES = [
    "user_id:missing",
    "user_id:not_an_integer",
    "user_id:negative_id",
    "ts:missing",
    "ts:not_an_integer",
    "ts:negative_timestamp",
    "ts:after_request_time",
    "media_id:missing",
    "media_id:not_an_integer",
    "media_id:negative_id",
    "author_id:not_an_integer",
    "author_id:negative_id",
    "topic_ids:not_a_list",
    "topic_ids:not_a_non_negative_integer_list",
    "action:missing",
    "action:unknown_action",
    "value:not_a_number",
    "value:infinite",
    "value:out_of_range",
    "dwell_time:missing",
    "dwell_time:not_a_number",
    "dwell_time:nan",
    "dwell_time:infinite",
    "dwell_time:negative",
    "video_duration:not_a_number",
    "video_duration:nan",
    "video_duration:infinite",
    "video_duration:negative",
    "label_click:not_a_number",
    "label_click:infinite",
    # clamps of kept records
    "topic_ids:max_topics",
    "media_type:other",
    "surface:other",
    "dwell_time:max",
    "video_duration:max",
    "value:null",
    "label_click:null",
]


def test_fuzz_validate_table_matches_oracle() -> None:
    """>= 10,000 mixed valid/malformed records in typed Arrow columns: raise and drop mode agree with the oracle.

    Hypothesis draws batches (kind, column typings, malformation rates, policy, seed); a deterministic sweep adds
    one batch per (kind, column, typing) so that every documented outcome is exercised on every run.
    """

    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(batches())
    def run(batch: tuple[str, pa.Table, ValidationPolicy]) -> None:
        record(*batch)

    def record(kind: str, table: pa.Table, policy: ValidationPolicy) -> None:
        check_against_oracle(kind, table, policy)
        FUZZ_RECORDS["records"] += table.num_rows
        for r in table.to_pylist():
            v = oracle(kind, r, policy, LABELS if kind == "requests" else ())
            FUZZ_RECORDS[f"{v[1]}:{v[2]}" if v[0] == "bad" else "accepted"] += 1
            FUZZ_RECORDS.update(v[2] if v[0] == "ok" else [])

    run()
    for kind, table, policy in sweep():
        record(kind, table, policy)
    n, accepted = FUZZ_RECORDS["records"], FUZZ_RECORDS["accepted"]
    assert n - accepted >= 10_000, FUZZ_RECORDS  # >= 10,000 rejected (malformed) records
    assert accepted >= 5_000, FUZZ_RECORDS  # and plenty of valid ones beside them
    # every documented outcome was exercised
    missing = [k for k in DOCUMENTED_OUTCOMES if FUZZ_RECORDS[k] == 0]
    assert not missing, (missing, FUZZ_RECORDS)


@settings(max_examples=40, deadline=None, database=None)
@given(
    kind=st.sampled_from(["explicit", "implicit", "requests"]), seed=st.integers(0, 2**32 - 1), n_bad=st.integers(0, 30)
)
def test_valid_records_survive_among_malformed_ones(kind: str, seed: int, n_bad: int) -> None:
    """A valid record is never dropped or altered (only documented clamps), whatever its neighbours are."""
    typed = {name: "int64" if name in ("user_id", "ts", "media_id", "author_id") else "float64" for name in FIELDS}
    typed.update(topic_ids="list<int64>", action="string", media_type="string", surface="string")
    good = make_batch(kind, seed, 40, typed, 0.0)
    bad = make_batch(kind, seed + 1, n_bad, {**typed, "media_id": "string"}, 1.0)
    bad = bad.set_column(bad.schema.get_field_index("media_id"), "media_id", pa.array(["x"] * n_bad, pa.string()))
    good = good.cast(bad.schema)
    rnd = random.Random(seed)
    order = list(range(40 + n_bad))
    rnd.shuffle(order)
    mixed = pa.concat_tables([good, bad]).take(pa.array(order))
    labels = LABELS if kind == "requests" else ()
    expected = [oracle(kind, r, ValidationPolicy(), labels) for r in good.to_pylist()]
    assert all(v[0] == "ok" for v in expected)
    rows_in_mixed_order = [expected[i][1] for i in order if i < 40]
    kept = validate_table(mixed, kind, VOCAB, ValidationPolicy(on_error="drop"))  # type: ignore[arg-type]
    assert kept.to_pylist() == rows_in_mixed_order
    assert validate_table(good, kind, VOCAB).to_pylist() == [v[1] for v in expected]  # type: ignore[arg-type]


def test_oracle_order_is_the_documented_field_order() -> None:
    """The oracle spells the field order out; it must be FIELD_ORDER (so the fuzz test checks the constant)."""
    assert ORACLE_ORDER == {k: list(v) for k, v in FIELD_ORDER.items()}


# ==================================================================================================
# One test per rule
# ==================================================================================================
def two_rows(make_events: Callable[..., pa.Table], kind: str, **bad: Any) -> pa.Table:
    """Two records of user 7; the second one gets the ``bad`` field values."""
    return make_events(kind, [{"user_id": 7, "ts": T0}, {"user_id": 7, "ts": T0 + 1, **bad}])


def with_column(table: pa.Table, name: str, values: list[Any], typ: pa.DataType) -> pa.Table:
    i = table.schema.get_field_index(name)
    arr = pa.array(values, type=typ)
    return table.set_column(i, name, arr) if i >= 0 else table.append_column(name, arr)


REJECTIONS = [
    # kind, field, second-record value, Arrow type, reason, value as shown in the message
    ("explicit", "user_id", None, pa.int64(), "missing", "None"),
    ("explicit", "user_id", -3, pa.int64(), "negative_id", "-3"),
    ("explicit", "user_id", 1.5, pa.float64(), "not_an_integer", "1.5"),
    ("explicit", "user_id", math.nan, pa.float64(), "not_an_integer", "nan"),
    ("explicit", "user_id", "u7", pa.string(), "not_an_integer", "'u7'"),
    ("explicit", "user_id", True, pa.bool_(), "not_an_integer", "True"),
    ("explicit", "user_id", 2**63, pa.uint64(), "not_an_integer", "9223372036854775808"),
    ("explicit", "ts", None, pa.int64(), "missing", "None"),
    ("explicit", "ts", -1, pa.int64(), "negative_timestamp", "-1"),
    ("explicit", "ts", math.inf, pa.float64(), "not_an_integer", "inf"),
    ("explicit", "ts", "²", pa.string(), "not_an_integer", "'²'"),
    ("explicit", "media_id", "9" * 30, pa.string(), "not_an_integer", repr("9" * 30)),
    ("explicit", "media_id", -1.0, pa.float64(), "negative_id", "-1.0"),
    ("explicit", "author_id", -2, pa.int64(), "negative_id", "-2"),
    ("explicit", "author_id", "someone", pa.string(), "not_an_integer", "'someone'"),
    ("explicit", "topic_ids", [1, -2], pa.list_(pa.int64()), "not_a_non_negative_integer_list", "[1, -2]"),
    ("explicit", "topic_ids", [1, None], pa.list_(pa.int64()), "not_a_non_negative_integer_list", "[1, None]"),
    ("explicit", "topic_ids", ["a", "b"], pa.list_(pa.string()), "not_a_non_negative_integer_list", "['a', 'b']"),
    ("explicit", "topic_ids", "1,2", pa.string(), "not_a_list", "'1,2'"),
    ("explicit", "action", None, pa.string(), "missing", "None"),
    ("explicit", "action", "Like", pa.string(), "unknown_action", "'Like'"),
    ("explicit", "action", 3, pa.int64(), "unknown_action", "3"),
    ("explicit", "value", "four", pa.string(), "not_a_number", "'four'"),
    ("explicit", "value", math.inf, pa.float64(), "infinite", "inf"),
    ("explicit", "value", 1e39, pa.float64(), "out_of_range", "1e+39"),
    ("implicit", "dwell_time", None, pa.float32(), "missing", "None"),
    ("implicit", "dwell_time", math.nan, pa.float64(), "nan", "nan"),
    ("implicit", "dwell_time", math.inf, pa.float64(), "infinite", "inf"),
    ("implicit", "dwell_time", -math.inf, pa.float64(), "infinite", "-inf"),
    ("implicit", "dwell_time", -0.5, pa.float64(), "negative", "-0.5"),
    ("implicit", "dwell_time", "5s", pa.string(), "not_a_number", "'5s'"),
    ("implicit", "dwell_time", False, pa.bool_(), "not_a_number", "False"),
    ("implicit", "video_duration", math.nan, pa.float64(), "nan", "nan"),
    ("implicit", "video_duration", -1, pa.int64(), "negative", "-1"),
    ("requests", "video_duration", "1e400", pa.string(), "infinite", "'1e400'"),
    ("requests", "label_click", "yes", pa.string(), "not_a_number", "'yes'"),
    ("requests", "label_click", -math.inf, pa.float64(), "infinite", "-inf"),
]


@pytest.mark.parametrize(
    "kind,name,value,typ,reason,shown", REJECTIONS, ids=[f"{r[1]}-{r[4]}-{r[2]!r:.12}" for r in REJECTIONS]
)
def test_rejection_rule(
    make_events: Callable[..., pa.Table], kind: str, name: str, value: Any, typ: pa.DataType, reason: str, shown: str
) -> None:
    """Record 0 is valid (in the same column typing, where one exists), record 1 breaks one rule."""
    default = {
        "user_id": 7,
        "ts": T0,
        "media_id": 100 + T0,
        "author_id": None,
        "topic_ids": [],
        "action": "like",
        "value": None,
        "dwell_time": 5.0,
        "video_duration": 30.0,
        "label_click": 1.0,
    }[name]
    table = two_rows(make_events, kind, **({"label_click": 1.0} if name.startswith("label_") else {}))
    if pa.types.is_boolean(typ) or (name == "action" and not pa.types.is_string(typ)):  # no valid value of this type
        table, values, bad_row = table.slice(1), [value], 0
    else:
        first = default
        if default is not None and not isinstance(default, list):
            conv = str if pa.types.is_string(typ) else float if pa.types.is_floating(typ) else int
            first = conv(default)
        values, bad_row = [None if name == "topic_ids" and pa.types.is_string(typ) else first, value], 1
    table = with_column(table, name, values, typ)
    user = "None" if name == "user_id" else "7"
    with pytest.raises(TimelineError) as info:
        validate_table(table, kind, VOCAB, source="in.parquet")  # type: ignore[arg-type]
    e = info.value
    assert str(e) == f"in.parquet, record {bad_row}, user {user}: field {name!r} = {shown}: {reason}"
    assert (e.field, e.reason, e.record) == (name, reason, bad_row)

    report = ValidationReport()
    kept = validate_table(
        table,
        kind,
        VOCAB,
        ValidationPolicy(on_error="drop"),  # type: ignore[arg-type]
        source="in.parquet",
        report=report,
    )
    assert kept.column("ts").to_pylist() == [T0] * bad_row
    assert report.dropped == {f"{name}:{reason}": 1}
    assert report.summary() == f"{bad_row}/{bad_row + 1} records kept; dropped {name}:{reason}: 1"
    assert report.examples == [str(e)]


def test_timestamp_after_request_time(make_events: Callable[..., pa.Table]) -> None:
    table = make_events("explicit", [{"user_id": 1, "ts": AS_OF}, {"user_id": 2, "ts": AS_OF + 1}])
    with pytest.raises(TimelineError, match=r"record 1, user 2: field 'ts' = 1700001001: after_request_time"):
        validate_table(table, "explicit", VOCAB, ValidationPolicy(as_of=AS_OF))
    assert validate_table(table, "explicit", VOCAB).num_rows == 2  # no as_of: no check
    kept = validate_table(table, "explicit", VOCAB, ValidationPolicy(as_of=AS_OF, on_error="drop"))
    assert kept.column("user_id").to_pylist() == [1]  # ts == as_of is not "after"


def test_valid_table_is_canonical_and_unchanged(make_events: Callable[..., pa.Table]) -> None:
    rows = [
        {
            "user_id": 3,
            "ts": T0 + 5,
            "author_id": 9,
            "topic_ids": [4, 5],
            "media_type": "image",
            "surface": "reels",
            "action": "save",
            "value": 4.5,
        },
        {"user_id": 1, "ts": T0},
    ]
    table = make_events("explicit", rows)
    report = ValidationReport()
    out = validate_table(table, "explicit", VOCAB, report=report)
    assert out.schema == schema_for("explicit")
    assert out.to_pylist() == table.to_pylist()  # same rows, same order
    assert report.summary() == "2/2 records kept"
    assert (report.dropped, report.clamped, report.examples) == ({}, {}, [])


@pytest.mark.parametrize("raw,expected", [(" 42 ", 42), ("+7", 7), ("007", 7), ("-0", 0), (3.0, 3), (2**62, 2**62)])
def test_integer_forms_are_accepted(make_events: Callable[..., pa.Table], raw: Any, expected: int) -> None:
    typ = pa.string() if isinstance(raw, str) else pa.float64() if isinstance(raw, float) else pa.int64()
    table = with_column(make_events("implicit", [{"user_id": 0, "ts": T0}]), "media_id", [raw], typ)
    assert validate_table(table, "implicit", VOCAB).column("media_id").to_pylist() == [expected]


def test_clamps_are_applied_and_counted(make_events: Callable[..., pa.Table]) -> None:
    policy = ValidationPolicy(max_dwell_s=100.0, max_duration_s=1000.0, max_topics=2, on_error="drop")
    table = make_events(
        "implicit",
        [
            {"user_id": 1, "ts": T0, "dwell_time": 500.0, "video_duration": 5000.0, "topic_ids": [5, 6, 7, 8]},
            {"user_id": 1, "ts": T0 + 1, "media_type": "hologram", "surface": "fridge", "topic_ids": [1, 2]},
            {"user_id": 1, "ts": T0 + 2, "media_type": None, "surface": None, "video_duration": None},
            {
                "user_id": 1,
                "ts": T0 + 3,
                "dwell_time": 500.0,
                "media_type": "tv",
                "topic_ids": [1, 2, 3],
                "media_id": -1,
            },
        ],
    )
    report = ValidationReport()
    out = validate_table(table, "implicit", VOCAB, policy, report=report).to_pylist()
    assert [(r["dwell_time"], r["video_duration"], r["topic_ids"]) for r in out] == [
        (100.0, 1000.0, [5, 6]),
        (5.0, 30.0, [1, 2]),
        (5.0, None, []),
    ]
    assert [(r["media_type"], r["surface"]) for r in out] == [("video", "feed"), ("other", "other"), ("other", "other")]
    # the dropped 4th record's clamps are not counted; a missing media type/surface is not a clamp
    assert report.clamped == {
        "dwell_time:max": 1,
        "video_duration:max": 1,
        "topic_ids:max_topics": 1,
        "media_type:other": 1,
        "surface:other": 1,
    }
    assert report.summary() == (
        "3/4 records kept; dropped media_id:negative_id: 1; clamped dwell_time:max: 1, "
        "media_type:other: 1, surface:other: 1, topic_ids:max_topics: 1, video_duration:max: 1"
    )


def test_topic_list_clamping_keeps_the_first_ids(make_events: Callable[..., pa.Table]) -> None:
    topics = [list(range(20)), [], None, [3, 2, 1], list(range(100, 117))]
    table = with_column(
        make_events("explicit", [{"user_id": 1, "ts": T0 + i} for i in range(5)]),
        "topic_ids",
        topics,
        pa.large_list(pa.int64()),
    )
    report = ValidationReport()
    out = validate_table(table, "explicit", VOCAB, ValidationPolicy(max_topics=16), report=report)
    assert out.column("topic_ids").to_pylist() == [list(range(16)), [], [], [3, 2, 1], list(range(100, 116))]
    assert out.schema.field("topic_ids").type == pa.list_(pa.int64())
    assert report.clamped == {"topic_ids:max_topics": 2}
    zero = validate_table(table, "explicit", VOCAB, ValidationPolicy(max_topics=0))
    assert zero.column("topic_ids").to_pylist() == [[]] * 5


def test_topic_ids_as_strings_and_sliced_input(make_events: Callable[..., pa.Table]) -> None:
    table = with_column(
        make_events("explicit", [{"user_id": 1, "ts": T0 + i} for i in range(4)]),
        "topic_ids",
        [["1"], [" 2", "3 "], ["x"], ["4"]],
        pa.list_(pa.string()),
    )
    sliced = table.slice(1)  # offsets of a sliced list array do not start at 0
    with pytest.raises(TimelineError, match=r"record 1, user 1: field 'topic_ids' = \['x'\]"):
        validate_table(sliced, "explicit", VOCAB)
    kept = validate_table(sliced, "explicit", VOCAB, ValidationPolicy(on_error="drop"))
    assert kept.column("topic_ids").to_pylist() == [[2, 3], [4]]


def test_value_nan_becomes_null_and_is_counted(make_events: Callable[..., pa.Table]) -> None:
    table = make_events(
        "explicit", [{"user_id": 1, "ts": T0, "value": math.nan}, {"user_id": 1, "ts": T0, "value": 2.0}]
    )
    report = ValidationReport()
    out = validate_table(table, "explicit", VOCAB, report=report)
    assert out.column("value").to_pylist() == [None, 2.0]
    assert report.clamped == {"value:null": 1}


def test_request_labels_are_kept_and_checked(make_events: Callable[..., pa.Table]) -> None:
    table = make_events(
        "requests",
        [
            {"user_id": 1, "ts": T0, "label_click": 1.0, "label_watch": 12.5},
            {"user_id": 2, "ts": T0, "label_click": math.nan, "label_watch": None},
        ],
    )
    table = table.append_column("not_a_label", pa.array([1, 2]))
    report = ValidationReport()
    out = validate_table(table, "requests", VOCAB, report=report)
    assert out.column_names == schema_for("requests").names + ["label_click", "label_watch"]
    assert out.select(["label_click", "label_watch"]).to_pylist() == [
        {"label_click": 1.0, "label_watch": 12.5},
        {"label_click": None, "label_watch": None},
    ]
    assert report.clamped == {"label_click:null": 1}
    # explicit/implicit tables have no labels: extra columns are ignored
    ex = make_events("explicit", [{"user_id": 1, "ts": T0}]).append_column("label_x", pa.array(["junk"]))
    assert validate_table(ex, "explicit", VOCAB).column_names == schema_for("explicit").names


def test_first_bad_record_and_first_field_win(make_events: Callable[..., pa.Table]) -> None:
    table = make_events(
        "implicit",
        [
            {"user_id": 1, "ts": T0},
            {"user_id": 2, "ts": T0, "dwell_time": -1.0, "media_id": -5},  # two problems: media_id comes first
            {"user_id": -3, "ts": T0},
        ],
    )
    with pytest.raises(TimelineError) as info:
        validate_table(table, "implicit", VOCAB)
    e = info.value
    assert (e.record, e.field, e.reason, e.user_id) == (1, "media_id", "negative_id", 2)
    report = ValidationReport()
    validate_table(table, "implicit", VOCAB, ValidationPolicy(on_error="drop"), report=report)
    # every dropped record is counted once, under its first failure
    assert report.dropped == {"media_id:negative_id": 1, "user_id:negative_id": 1}
    assert sum(report.dropped.values()) == report.records_in - report.records_out
    assert report.examples == [
        "record 1, user 2: field 'media_id' = -5: negative_id",
        "record 2, user None: field 'user_id' = -3: negative_id",
    ]


def test_missing_required_column_raises_in_both_modes(make_events: Callable[..., pa.Table]) -> None:
    table = make_events("implicit", [{"user_id": 1, "ts": T0}]).drop_columns(["dwell_time"])
    for mode in ("raise", "drop"):
        with pytest.raises(TimelineError, match="field 'dwell_time' = None: missing_column"):
            validate_table(table, "implicit", VOCAB, ValidationPolicy(on_error=mode))  # type: ignore[arg-type]
    # optional columns may be absent
    minimal = pa.table({"user_id": [1], "ts": [T0], "media_id": [5], "action": ["tag"]})
    assert validate_table(minimal, "explicit", VOCAB).to_pylist() == [
        {
            "user_id": 1,
            "ts": T0,
            "media_id": 5,
            "author_id": None,
            "topic_ids": [],
            "media_type": "other",
            "action": "tag",
            "surface": "other",
            "value": None,
        }
    ]


def test_empty_and_chunked_tables(make_events: Callable[..., pa.Table]) -> None:
    empty = schema_for("implicit").empty_table()
    out = validate_table(empty, "implicit", VOCAB, ValidationPolicy(on_error="drop"))
    assert out.num_rows == 0 and out.schema == schema_for("implicit")
    t = make_events("implicit", [{"user_id": u, "ts": T0 + u} for u in range(6)])
    chunked = pa.concat_tables([t.slice(0, 2), t.slice(2, 1), t.slice(3)])
    assert validate_table(chunked, "implicit", VOCAB).to_pylist() == t.to_pylist()


def test_dictionary_encoded_categoricals(make_events: Callable[..., pa.Table]) -> None:
    t = make_events(
        "explicit",
        [
            {"user_id": 1, "ts": T0, "action": "follow", "media_type": "live"},
            {"user_id": 1, "ts": T0 + 1, "action": "comment", "media_type": "vr"},
        ],
    )
    for name in ("action", "media_type"):
        t = with_column(t, name, t.column(name).to_pylist(), pa.dictionary(pa.int8(), pa.string()))
    out = validate_table(t, "explicit", VOCAB)
    assert out.select(["action", "media_type"]).to_pylist() == [
        {"action": "follow", "media_type": "live"},
        {"action": "comment", "media_type": "other"},
    ]


def test_policy_and_report_helpers() -> None:
    with pytest.raises(ValueError, match="on_error"):
        ValidationPolicy(on_error="ignore")  # type: ignore[arg-type]
    a = ValidationReport(records_in=3, records_out=2, dropped={"ts:missing": 1}, clamped={"x:y": 1}, examples=["e1"])
    b = ValidationReport(records_in=5, records_out=5, clamped={"x:y": 2})
    a.merge(b)
    assert (a.records_in, a.records_out, a.dropped, a.clamped, a.examples) == (
        8,
        7,
        {"ts:missing": 1},
        {"x:y": 3},
        ["e1"],
    )
    assert a.summary() == "7/8 records kept; dropped ts:missing: 1; clamped x:y: 3"


def test_check_timeline_lengths() -> None:
    check_timeline_lengths([1, 2], [5, 70_000])
    check_timeline_lengths([1], [0], allow_empty=True)
    with pytest.raises(TimelineError) as info:
        check_timeline_lengths([1, 2], [3, 0])
    assert str(info.value) == "user 2: field '<timeline>' = 0: empty_timeline"
    assert (info.value.field, info.value.reason, info.value.user_id) == ("<timeline>", "empty_timeline", 2)
    with pytest.raises(TimelineError) as info:
        check_timeline_lengths(np.array([9]), np.array([10_000_001]))
    assert str(info.value) == (
        "user 9: field '<timeline>' = 10000001: absurd_length (more than max_events=10,000,000 events)"
    )
    check_timeline_lengths([9], [10_000_000])  # the limit itself is fine
    with pytest.raises(TimelineError, match="absurd_length"):
        check_timeline_lengths([9], [11], ValidationPolicy(max_events=10, on_error="drop"))  # always raises


def test_dataset_writer_drop_policy_records_report(make_events: Callable[..., pa.Table], tmp_path: Any) -> None:
    good = make_events("implicit", [{"user_id": 1, "ts": T0}, {"user_id": 2, "ts": T0, "dwell_time": 1e6}])
    bad = make_events("implicit", [{"user_id": 3, "ts": T0, "dwell_time": math.nan}])
    url = str(tmp_path / "ds")
    with pytest.raises(TimelineError, match="record 0, user 3: field 'dwell_time' = nan: nan"):
        DatasetWriter(url).add(implicit=bad)
    with DatasetWriter(url, policy=ValidationPolicy(on_error="drop")) as w:
        w.add(implicit=pa.concat_tables([good, bad]))
    ds = TimelineDataset(url)
    assert sorted(ds.user_ids().tolist()) == [1, 2]
    assert ds.meta.stats["validation"]["implicit"] == (
        "2/3 records kept; dropped dwell_time:nan: 1; clamped dwell_time:max: 1"
    )
    assert w.report["implicit"].examples == ["implicit, record 2, user 3: field 'dwell_time' = nan: nan"]
