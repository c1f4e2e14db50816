"""The row format: pure-PyTorch quantizer / de-quantizer bit-exact with fbgemm; error bounds; sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dv365.core.quantize import FP16_MAX, RowFormat, dequantize_rows, quantize_rows

fbgemm_gpu = pytest.importorskip("fbgemm_gpu")


def _zero_bias_unsigned(q: torch.Tensor) -> torch.Tensor:
    """Rows with the sign bit of a zero fp16 bias cleared."""
    out = q.clone()
    zero = out[:, -2:].contiguous().view(torch.float16).squeeze(-1) == 0
    out[zero, -1] &= 0x7F
    return out


def _fb_q(x: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(x, bits)


def _fb_dq(q: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q, bits)


def test_paper_sizes() -> None:
    fmt = RowFormat()
    assert (fmt.row_bytes, fmt.user_bytes) == (132, 7656)
    assert fmt.user_bytes <= 7656 and 200 * 256 * 4 / fmt.user_bytes > 26
    assert RowFormat(bits=8).row_bytes == 260
    assert RowFormat.from_dict(fmt.to_dict()) == fmt
    with pytest.raises(ValueError, match="does not match"):
        RowFormat.from_dict({**fmt.to_dict(), "user_bytes": 7888})
    with pytest.raises(ValueError, match="bits must be one of"):
        RowFormat(bits=3)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1.0, 30.0, 1e3, 6e4])
def test_bit_exact_with_fbgemm(bits: int, scale: float) -> None:
    g = torch.Generator().manual_seed(int(scale * 1000) + bits)
    x = torch.randn(512, 256, generator=g) * scale * torch.rand(512, 1, generator=g)
    x = x.clamp(-FP16_MAX, FP16_MAX)
    x[0] = 0.0  # constant row: scale falls back to 1
    x[1] = 3.3
    q = quantize_rows(x, bits)
    assert torch.equal(q, _fb_q(x, bits))
    assert torch.equal(dequantize_rows(q, bits), _fb_dq(q, bits))


@settings(max_examples=200, deadline=None)
@given(
    arrays(
        "float32",
        st.tuples(st.integers(1, 6), st.sampled_from([4, 8, 64, 256])),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
    st.sampled_from([4, 8]),
)
def test_bit_exact_property(x_np, bits: int) -> None:  # type: ignore[no-untyped-def]
    x = torch.from_numpy(x_np)
    q = quantize_rows(x, bits)
    fb = _fb_q(x, bits)
    # Documented exception: when a row's minimum is a zero, fbgemm's vectorised min and torch.amin may
    # disagree on its sign; the bias bytes then differ only in the fp16 sign bit of 0 and every decoded
    # value is identical.
    assert torch.equal(_zero_bias_unsigned(q), _zero_bias_unsigned(fb))
    assert torch.equal(dequantize_rows(q, bits), _fb_dq(fb, bits))
    assert torch.equal(dequantize_rows(q, bits), _fb_dq(q, bits))
    # round-trip bound: half a quantization step plus the fp16 rounding of the bias
    step = (x.amax(1) - x.amin(1)) / ((1 << bits) - 1)
    err = (dequantize_rows(q, bits) - x).abs().amax(1)
    assert torch.all(err <= step * 0.5 + 1e-3 * x.abs().amax(1) + 1e-6 + step * 1e-3)


def test_signed_zero_minimum_decodes_identically() -> None:
    x = torch.ones(1, 64)
    x[0, 8], x[0, 32] = 0.0, -0.0
    q, fb = quantize_rows(x), _fb_q(x, 4)
    assert torch.equal(_zero_bias_unsigned(q), _zero_bias_unsigned(fb))
    assert torch.equal(dequantize_rows(q), _fb_dq(fb, 4))


def test_batched_shapes_and_user_layout() -> None:
    x = torch.randn(3, 58, 256)
    q = quantize_rows(x)
    assert q.shape == (3, 58, 132) and q.dtype == torch.uint8
    assert dequantize_rows(q).shape == (3, 58, 256)
    assert torch.equal(q.reshape(-1, 132), _fb_q(x.reshape(-1, 256), 4))


def test_empty_batches() -> None:
    assert quantize_rows(torch.zeros(0, 58, 256)).shape == (0, 58, 132)
    assert dequantize_rows(torch.zeros(0, 58, 132, dtype=torch.uint8)).shape == (0, 58, 256)


def test_bad_input_is_a_clear_error() -> None:
    x = torch.zeros(4, 8)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="row 2 has a non-finite value"):
        quantize_rows(x)
    with pytest.raises(ValueError, match="fp16 range"):
        quantize_rows(torch.full((1, 8), 1e5))
    with pytest.raises(TypeError):
        dequantize_rows(torch.zeros(2, 12))
    with pytest.raises(ValueError, match="even number of bytes"):
        quantize_rows(torch.zeros(2, 6), 4)
