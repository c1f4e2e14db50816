"""LinearProjection: shapes, the token-then-dim linear map, gradients, DLRM-style concatenation."""

from __future__ import annotations

import pytest
import torch

from dv365.adapters import AdapterError, LinearProjection
from dv365.core.quantize import RowFormat


def test_shape_and_formula() -> None:
    proj = LinearProjection(num_tokens=4, embedding_dim=32)
    x = torch.randn(5, 58, 256)  # [B, N, D_in]
    out = proj(x)  # [B, K, D]
    assert out.shape == (5, 4, 32)
    w_t, w_d, bias = proj.token_mix.weight, proj.dim_proj.weight, proj.dim_proj.bias  # [K, N], [D, D_in], [D]
    expect = torch.einsum("kn,bni,di->bkd", w_t, x, w_d) + bias
    assert torch.allclose(out, expect, atol=1e-4)
    # concatenated with a ranker's pooled sparse embeddings
    assert torch.cat([torch.randn(5, 26, 32), out], dim=1).shape == (5, 30, 32)


def test_gradients_and_custom_format() -> None:
    proj = LinearProjection(num_tokens=2, embedding_dim=8, row_format=RowFormat(dim=64, rows_per_user=10), bias=False)
    x = torch.randn(3, 10, 64, requires_grad=True)
    proj(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert proj.dim_proj.bias is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    with pytest.raises(AdapterError, match=r"\[B, 10, 64\]"):
        proj(torch.randn(3, 58, 256))
    with pytest.raises(AdapterError, match="positive"):
        LinearProjection(0, 8)
