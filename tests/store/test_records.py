"""Stored records (payload || xxh3-64 seeded by the user id) and the batch assembler, against a plain reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dv365.core.quantize import RowFormat
from dv365.store.records import CHECKSUM_BYTES, assemble, checksum, encode_records, verify_payloads

FMT = RowFormat(dim=16, bits=4, rows_per_user=3)  # 36 B per user


def _reference(values, ids, fmt):  # type: ignore[no-untyped-def]
    n = fmt.user_bytes
    payload = np.zeros((len(ids), n), np.uint8)
    present = np.zeros(len(ids), bool)
    bad = set()
    for i, (v, uid) in enumerate(zip(values, ids.tolist())):
        if v is None:
            continue
        if len(v) == n + 8 and checksum(v[:n], uid) == int.from_bytes(v[n:], "little"):
            payload[i] = np.frombuffer(v[:n], np.uint8)
            present[i] = True
        else:
            bad.add(i)
    return payload, present, bad


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-(2**63), 2**63 - 1), st.sampled_from(["ok", "missing", "flip", "short", "swap"])),
        max_size=20,
    ),
    st.integers(0, 2**32 - 1),
)
def test_assemble_matches_the_reference(cases, seed) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    ids = np.array([c[0] for c in cases], dtype=np.int64)
    recs = encode_records(ids, rng.integers(0, 256, (len(ids), FMT.user_bytes), dtype=np.uint8))
    values: list[bytes | None] = []
    for (uid, kind), rec in zip(cases, recs):
        if kind == "missing":
            values.append(None)
        elif kind == "flip":
            b = bytearray(rec)
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
            values.append(bytes(b))
        elif kind == "short":
            values.append(rec[:-1])
        elif kind == "swap":  # another user's valid record stored under this user
            values.append(encode_records(np.array([uid ^ 1]), np.frombuffer(rec[: FMT.user_bytes], np.uint8)[None])[0])
        else:
            values.append(rec)
    payload, present, checksums, errors = assemble(iter(values), ids, FMT, "test")
    ref_payload, ref_present, ref_bad = _reference(values, ids, FMT)
    np.testing.assert_array_equal(payload, ref_payload)
    np.testing.assert_array_equal(present, ref_present)
    assert set(errors) == ref_bad
    for i in errors:
        assert f"user {int(ids[i])}" in errors[i]
    assert not verify_payloads(payload, ids, checksums, present).size
    if present.any():
        k = int(np.flatnonzero(present)[0])
        payload[k, 0] ^= 0xFF
        assert verify_payloads(payload, ids, checksums, present).tolist() == [k]


@settings(max_examples=40, deadline=None)
@given(st.integers(-(2**63), 2**63 - 1), st.sampled_from(["ok", "missing", "flip", "short"]), st.integers(0, 2**32 - 1))
def test_single_user_path_matches_the_batch_loop(uid, kind, seed) -> None:  # type: ignore[no-untyped-def]
    """assemble() of one user takes its own short path: same answer as that user inside a batch."""
    rng = np.random.default_rng(seed)
    ids = np.array([uid, uid ^ 1], dtype=np.int64)
    recs = encode_records(ids, rng.integers(0, 256, (2, FMT.user_bytes), dtype=np.uint8))
    value: bytes | None = {"ok": recs[0], "missing": None, "flip": bytes([recs[0][0] ^ 1]) + recs[0][1:]}.get(
        kind, recs[0][:-1]
    )
    one = assemble(iter([value]), ids[:1], FMT, "test")
    batch = assemble(iter([value, recs[1]]), ids, FMT, "test")
    for a, b in zip(one[:3], batch[:3]):
        np.testing.assert_array_equal(a, b[:1])
    assert one[3] == {k: v for k, v in batch[3].items() if k == 0}


def test_record_layout() -> None:
    rec = encode_records(np.array([5]), np.arange(FMT.user_bytes, dtype=np.uint8)[None])[0]
    assert len(rec) == FMT.user_bytes + CHECKSUM_BYTES
    assert rec[: FMT.user_bytes] == bytes(range(FMT.user_bytes))
    assert (
        int.from_bytes(rec[FMT.user_bytes :], "little")
        == checksum(rec[: FMT.user_bytes], 5)
        != checksum(rec[: FMT.user_bytes], 6)
    )
