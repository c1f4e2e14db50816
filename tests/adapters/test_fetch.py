"""fetch_dv365 / batch_from_lookup with an in-memory EmbeddingReader (a test double of a dv365-store client)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from dv365.adapters import AdapterError, DV365Batch, DV365Input, batch_from_lookup, fetch_dv365
from dv365.core.lookup import EmbeddingReader, LookupResult
from dv365.core.quantize import RowFormat, dequantize_rows, quantize_rows


class InMemoryReader:
    """Follows the :class:`EmbeddingReader` protocol: user id -> stored rows, unknown users absent."""

    def __init__(
        self,
        rows: dict[int, np.ndarray],
        fmt: RowFormat = RowFormat(),
        age_s: float = 3600.0,
        corrupt: frozenset[int] = frozenset(),
    ) -> None:
        self.rows, self.fmt, self.age_s, self.corrupt = rows, fmt, age_s, corrupt
        self.calls: list[list[int]] = []

    def get(self, user_ids: Sequence[int] | np.ndarray) -> LookupResult:
        ids = [int(u) for u in user_ids]
        self.calls.append(ids)
        payload = np.zeros((len(ids), self.fmt.rows_per_user, self.fmt.row_bytes), dtype=np.uint8)
        present = np.zeros(len(ids), dtype=bool)
        errors: dict[int, str] = {}
        for i, u in enumerate(ids):
            if u in self.corrupt:
                errors[i] = f"user {u}: crc32 mismatch"
            elif u in self.rows:
                payload[i], present[i] = self.rows[u], True
        return LookupResult(
            payload=payload, present=present, snapshot_id="snap-1", age_s=self.age_s, row_format=self.fmt, errors=errors
        )


@pytest.fixture()
def reader() -> InMemoryReader:
    g = torch.Generator().manual_seed(0)
    rows = {u: quantize_rows(torch.randn(58, 256, generator=g)).numpy() for u in (10, 11, 12, 13)}
    return InMemoryReader(rows, corrupt=frozenset({13}))


def test_reader_follows_the_protocol(reader: InMemoryReader) -> None:
    assert isinstance(reader, EmbeddingReader)


IDS = [11, 99, 10, 11, 13]


@pytest.mark.parametrize("ids", [IDS, np.array(IDS), torch.tensor(IDS)], ids=["list", "numpy", "tensor"])
def test_fetch_batch(reader: InMemoryReader, ids: object, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dv365.adapters.fetch"):
        batch = fetch_dv365(reader, ids)  # type: ignore[arg-type]
    assert isinstance(batch, DV365Batch)
    assert batch.payload.shape == (5, 58, 132) and batch.payload.dtype == torch.uint8
    assert batch.present.tolist() == [True, False, True, True, False]  # 99 unknown, 13 failed its check
    assert batch.age_s.dtype == torch.float32 and batch.age_s.tolist() == [3600.0] * 5
    assert torch.equal(batch.payload[0], torch.from_numpy(reader.rows[11]))
    assert torch.equal(batch.payload[3], batch.payload[0])
    assert "integrity" in caplog.text and "crc32" in caplog.text
    assert reader.calls == [[10, 11, 13, 99]]  # each distinct user looked up once


def test_dedup_is_transparent(reader: InMemoryReader) -> None:
    ids = [12, 12, 10, 99, 12]
    a, b = fetch_dv365(reader, ids), fetch_dv365(reader, ids, dedup=False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert reader.calls[-1] == ids


def test_end_to_end_with_dv365_input(reader: InMemoryReader) -> None:
    dv_in = DV365Input()
    out = dv_in(*fetch_dv365(reader, [10, 99]))
    assert torch.equal(out.tokens[0], dequantize_rows(torch.from_numpy(reader.rows[10])))
    assert torch.equal(out.tokens[1], dv_in.default_embedding.detach())
    assert out.side[:, 0].tolist() == [0.0, 1.0]
    assert out.side[0, 1] > 0 and out.side[1, 1] == 0
    out2 = dv_in.forward_lookup(reader.get([10, 99]))
    for x, y in zip(out, out2):
        assert torch.equal(x, y)


def test_format_and_shape_errors(reader: InMemoryReader) -> None:
    with pytest.raises(AdapterError, match="snap-1.*row_format"):
        fetch_dv365(reader, [10], expected_format=RowFormat(bits=8))
    with pytest.raises(AdapterError, match="1-D integer"):
        fetch_dv365(reader, [[10]])  # type: ignore[list-item]
    bad = reader.get([10])
    bad = LookupResult(
        payload=bad.payload[:, :57],
        present=bad.present,
        snapshot_id="snap-2",
        age_s=0.0,
        row_format=bad.row_format,
        errors={},
    )
    with pytest.raises(AdapterError, match="snap-2.*payload"):
        batch_from_lookup(bad)


def test_empty_batch(reader: InMemoryReader) -> None:
    batch = fetch_dv365(reader, [])
    assert batch.payload.shape == (0, 58, 132) and batch.present.shape == (0,)
    assert DV365Input()(*batch).tokens.shape == (0, 58, 256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fetch_to_cuda(reader: InMemoryReader) -> None:
    batch = fetch_dv365(reader, [10, 99], device="cuda")
    assert all(t.device.type == "cuda" for t in batch)
