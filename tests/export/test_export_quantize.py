"""The export's fbgemm quantization: its bytes are core's row format, decoded bit-exactly by core's pure-PyTorch
de-quantizer (downstream teams need no fbgemm); 4-bit and 8-bit; paper sizes; bad tower outputs are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dv365.core.quantize import RowFormat, dequantize_rows, quantize_rows
from dv365.export.encode import quantize, quantize_fbgemm
from dv365.export.errors import ExportError


@pytest.mark.parametrize("bits", [4, 8])
def test_fbgemm_bytes_are_the_core_row_format(bits: int) -> None:
    fmt = RowFormat(bits=bits)  # 58 x 256
    x = torch.randn(3, fmt.rows_per_user, fmt.dim, generator=torch.Generator().manual_seed(bits)) * 0.7
    q = quantize_fbgemm(x, bits)
    assert q.dtype == torch.uint8 and q.shape == (3, fmt.rows_per_user, fmt.row_bytes)
    assert q.reshape(3, -1).shape[1] == fmt.user_bytes
    decoded = dequantize_rows(q, bits)  # pure PyTorch
    fb = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q.reshape(-1, fmt.row_bytes), bits)
    assert torch.equal(decoded.reshape(-1, fmt.dim), fb)  # bit-exact with fbgemm's own de-quantizer
    # core's quantizer writes the same bytes for these rows (no zero minimum here)
    assert torch.equal(quantize_rows(x, bits), q)
    assert torch.equal(quantize(x, bits, "torch"), q)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / ((1 << bits) - 1)
    assert bool(((decoded - x).abs() <= step * 0.5 + 1e-3 * x.abs().amax(-1, keepdim=True)).all())


def test_paper_sizes_at_58_x_256() -> None:
    fmt = RowFormat()
    assert (fmt.row_bytes, fmt.user_bytes) == (132, 7656)
    assert quantize_fbgemm(torch.zeros(1, 58, 256)).shape == (1, 58, 132)
    assert 200 * 256 * 4 / fmt.user_bytes > 26.7  # bytes, vs the paper's 200 x 256 fp32 pooled input
    assert RowFormat(bits=8).user_bytes == 58 * 260


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        "float32", st.tuples(st.integers(1, 5), st.sampled_from([8, 64, 256])), elements=st.floats(-300, 300, width=32)
    ),
    st.sampled_from([4, 8]),
)
def test_core_decodes_fbgemm_bytes_exactly(x_np: np.ndarray, bits: int) -> None:
    x = torch.from_numpy(x_np)
    q = quantize_fbgemm(x, bits)
    fb = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q, bits)
    assert torch.equal(dequantize_rows(q, bits), fb)
    # core's quantizer decodes to the same values (its bytes may differ only in the sign of a zero bias)
    assert torch.equal(dequantize_rows(quantize_rows(x, bits), bits), fb)


def test_bad_bits_and_quantizer_are_refused() -> None:
    with pytest.raises(ExportError, match="--bits must be 4 or 8"):
        quantize_fbgemm(torch.zeros(1, 8), 3)
    with pytest.raises(ExportError, match="--quantizer"):
        quantize(torch.zeros(1, 8), 4, "int4-magic")
