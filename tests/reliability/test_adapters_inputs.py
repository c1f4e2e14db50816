"""dv365-adapters given bad input: lengths that do not match the batch, NaN ages, rows with a NaN/inf scale or
bias, ``errors`` keys outside the batch, a reader that returns None. The answers come from a real embedded
(LMDB) store; the bad ones are those answers with one thing changed."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from dv365.adapters import AdapterError, DV365Input, batch_from_lookup, fetch_dv365
from dv365.core.lookup import LookupResult
from dv365.store import EmbeddingStore, open_store


@pytest.fixture
def reader(store_url: str) -> EmbeddingStore:
    store = open_store(store_url + "?mode=ro")
    yield store  # type: ignore[misc]
    store.close()


@pytest.fixture
def answer(reader: EmbeddingStore) -> LookupResult:
    result = reader.get([1000, 1001, 1002])
    assert result.present.all() and not result.errors
    return result


def test_present_of_another_length_names_the_argument_and_both_lengths(answer: LookupResult) -> None:
    b = batch_from_lookup(answer)
    with pytest.raises(AdapterError, match=r"present must be \[B\] bool with B = 3 .* got shape \(2,\)"):
        DV365Input()(b.payload, b.present[:2], b.age_s)


def test_age_s_of_another_length_names_the_argument_and_both_lengths(answer: LookupResult) -> None:
    b = batch_from_lookup(answer)
    with pytest.raises(AdapterError, match="age_s has 4 values but the payload has 3 users"):
        DV365Input()(b.payload, b.present, torch.zeros(4))
    out = DV365Input()(b.payload, b.present, torch.tensor(60.0))  # one value for the batch is fine
    assert out.side.shape == (3, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_age_is_an_adapter_error(answer: LookupResult, bad: float) -> None:
    with pytest.raises(AdapterError, match="age_s = (nan|inf)"):
        batch_from_lookup(dataclasses.replace(answer, age_s=bad))
    b = batch_from_lookup(answer)
    age = b.age_s.clone()
    age[1] = bad
    with pytest.raises(AdapterError, match="age_s holds NaN or infinite values"):
        DV365Input()(b.payload, b.present, age)


def _nan_scale(payload: np.ndarray, user: int, row: int) -> np.ndarray:
    """``payload`` with the fp16 scale of one row of one user set to NaN (as a corrupted row would hold)."""
    bad = np.array(payload, copy=True)
    bad[user, row, -4:-2] = np.array([np.nan], dtype="<f2").view(np.uint8)
    return bad


def test_a_row_with_a_nan_scale_is_treated_as_missing_and_counted(
    answer: LookupResult, caplog: pytest.LogCaptureFixture
) -> None:
    corrupted = dataclasses.replace(answer, payload=_nan_scale(answer.payload, user=1, row=7))
    with caplog.at_level(logging.WARNING, logger="dv365.adapters.fetch"):
        b = batch_from_lookup(corrupted)
    assert b.present.tolist() == [True, False, True]
    assert "1 user(s) have a row with a NaN/inf scale or bias" in caplog.text
    dv_in = DV365Input()
    out = dv_in(b.payload, torch.ones(3, dtype=torch.bool), b.age_s)  # even when told it is present
    assert out.missing.tolist() == [False, True, False]
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.side).all()
    assert torch.equal(out.tokens[1], dv_in.default_embedding.detach())
    assert out.side[1].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("key", [3, 9, -1])
def test_errors_keys_outside_the_batch_are_refused(answer: LookupResult, key: int) -> None:
    bad = dataclasses.replace(answer, errors={key: "crc mismatch"})
    with pytest.raises(AdapterError, match=rf"errors has key {key}, expected a batch position 0\.\.2"):
        batch_from_lookup(bad)


class _Returns:
    """A reader (EmbeddingReader protocol) that returns ``value`` instead of a LookupResult."""

    def __init__(self, value: object) -> None:
        self.value = value

    def get(self, user_ids: Sequence[int] | np.ndarray) -> LookupResult:
        return self.value  # type: ignore[return-value]


@pytest.mark.parametrize("dedup", [True, False])
def test_a_reader_returning_none_is_named(dedup: bool) -> None:
    with pytest.raises(AdapterError, match="the reader returned None, expected a LookupResult"):
        fetch_dv365(_Returns(None), [1000, 1001], dedup=dedup)
    with pytest.raises(AdapterError, match="the reader returned dict, expected a LookupResult"):
        fetch_dv365(_Returns({}), [1000], dedup=dedup)
    with pytest.raises(AdapterError, match="the reader returned None"):
        batch_from_lookup(None)  # type: ignore[arg-type]


def test_a_real_reader_still_works(reader: EmbeddingStore) -> None:
    b = fetch_dv365(reader, [1001, 1000, 1001, 99])
    assert b.present.tolist() == [True, True, True, False]
    out = DV365Input()(*b)
    assert torch.isfinite(out.tokens).all()
