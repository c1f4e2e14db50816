"""DV365Input: bit-exact de-quantization against fbgemm, missing users, staleness feature, input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dv365.adapters import AdapterError, DV365Input, DV365InputConfig
from dv365.core.lookup import LookupResult
from dv365.core.quantize import RowFormat, dequantize_rows, quantize_rows


def _payload(batch: int, fmt: RowFormat = RowFormat(), seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, fmt.rows_per_user, fmt.dim, generator=g) * scale
    return quantize_rows(x, fmt.bits)  # [B, N, row_bytes]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_bit_exact_with_fbgemm(bits: int, scale: float) -> None:
    pytest.importorskip("fbgemm_gpu")  # only this test needs fbgemm (the package never imports it)
    fmt = RowFormat(bits=bits)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6 * fmt.rows_per_user, fmt.dim, generator=g) * scale * torch.rand(6 * 58, 1, generator=g)
    x[0] = 0.0  # constant row
    q_fb = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(x, bits)  # [R, row_bytes]
    ref = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q_fb, bits)  # [R, D]
    out = DV365Input(DV365InputConfig(row_format=fmt, use_age=False))(q_fb.reshape(6, 58, fmt.row_bytes))
    assert out.tokens.dtype == torch.float32
    assert torch.equal(out.tokens, ref.reshape(6, 58, fmt.dim))
    assert not out.missing.any() and torch.equal(out.side, torch.zeros(6, 1))


def test_missing_users_get_the_learned_default() -> None:
    q = _payload(4)
    q[1] = 0  # what a store returns for a missing user
    dv_in = DV365Input(DV365InputConfig(use_age=False, default_init_std=0.1))
    present = torch.tensor([True, False, True, False])
    out = dv_in(q, present)
    deq = dequantize_rows(q)
    assert torch.equal(out.tokens[0], deq[0]) and torch.equal(out.tokens[2], deq[2])
    assert torch.equal(out.tokens[1], dv_in.default_embedding.detach())
    assert torch.equal(out.tokens[3], dv_in.default_embedding.detach())
    assert out.missing.tolist() == [False, True, False, True]
    assert out.side[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    # gradients reach the default embedding, once per missing user
    (out.tokens * 2.0).sum().backward()
    assert dv_in.default_embedding.grad is not None
    assert torch.allclose(dv_in.default_embedding.grad, torch.full((58, 256), 4.0))


def test_all_present_has_no_default_gradient() -> None:
    dv_in = DV365Input(DV365InputConfig(use_age=False))
    dv_in(_payload(3)).tokens.sum().backward()
    assert dv_in.default_embedding.grad is not None and not dv_in.default_embedding.grad.any()


def test_staleness_feature() -> None:
    dv_in = DV365Input()
    assert dv_in.num_side_features == 2
    present = torch.tensor([True, True, False])
    age = torch.tensor([0.0, 86400.0, 3600.0])
    out = dv_in(_payload(3), present, age)
    assert out.side.shape == (3, 2)
    assert out.side[:, 0].tolist() == [0.0, 0.0, 1.0]
    assert out.side[0, 1] == 0.0
    assert math.isclose(float(out.side[1, 1]), math.log1p(24.0), rel_tol=1e-6)
    assert out.side[2, 1] == 0.0  # a missing user has no age
    # a scalar age (LookupResult.age_s: one snapshot per batch) broadcasts; negative ages clamp to 0
    out2 = DV365Input(DV365InputConfig(age_unit_s=60.0))(_payload(2), None, torch.tensor(-5.0))
    assert out2.side[:, 1].tolist() == [0.0, 0.0]
    out3 = DV365Input(DV365InputConfig(age_unit_s=60.0))(_payload(2), None, torch.tensor(120.0))
    assert torch.allclose(out3.side[:, 1], torch.full((2,), math.log1p(2.0)))
    with pytest.raises(AdapterError, match="age_s is required"):
        dv_in(_payload(2))


def test_input_errors_name_the_problem() -> None:
    dv_in = DV365Input(DV365InputConfig(use_age=False))
    with pytest.raises(AdapterError, match="uint8"):
        dv_in(torch.zeros(2, 58, 132))
    with pytest.raises(AdapterError, match=r"\[B, 58, 132\]"):
        dv_in(torch.zeros(2, 58, 136, dtype=torch.uint8))
    with pytest.raises(AdapterError, match="present"):
        dv_in(_payload(2), torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(AdapterError, match="age_unit_s"):
        DV365InputConfig(age_unit_s=0)


def test_forward_lookup_and_dtype_follow_the_module() -> None:
    q = _payload(3, seed=3)
    result = LookupResult(
        payload=q.numpy(),
        present=np.array([True, False, True]),
        snapshot_id="s1",
        age_s=7200.0,
        row_format=RowFormat(),
        errors={},
    )
    dv_in = DV365Input().to(torch.float64)
    out = dv_in.forward_lookup(result)
    assert out.tokens.dtype == torch.float64 and out.tokens.shape == (3, 58, 256)
    assert torch.equal(out.tokens[0], dequantize_rows(q[0]).double())
    assert out.missing.tolist() == [False, True, False]
    assert math.isclose(float(out.side[0, 1]), math.log1p(2.0), rel_tol=1e-9)
    with pytest.raises(AdapterError, match="row_format"):
        DV365Input(DV365InputConfig(row_format=RowFormat(bits=8))).forward_lookup(result)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    q, present, age = _payload(4), torch.tensor([True, False, True, True]), torch.full((4,), 60.0)
    dv_in = DV365Input(DV365InputConfig(default_init_std=0.1))
    ref = dv_in(q, present, age)
    out = dv_in.to("cuda")(q.cuda(), present.cuda(), age.cuda())
    for a, b in zip(out, ref):
        assert a.device.type == "cuda" and torch.equal(a.cpu(), b)


def test_standardization_centres_and_scales_the_fitted_users() -> None:
    fmt = RowFormat(rows_per_user=6, dim=8)
    g = torch.Generator().manual_seed(3)
    x = 5.0 + torch.randn(64, 6, 8, generator=g) * torch.linspace(0.1, 2.0, 8)  # common offset, per-dim scales
    q = quantize_rows(x, fmt.bits)
    dv_in = DV365Input(DV365InputConfig(row_format=fmt, use_age=False, standardize=True, default_init_std=0.1))
    raw = dv_in(q).tokens
    assert torch.equal(raw, dequantize_rows(q, fmt.bits))  # identity until fitted
    present = torch.ones(64, dtype=torch.bool)
    present[:4] = False  # left out of the statistics
    assert dv_in.fit_standardization(q, present) is dv_in
    z = dv_in(q[4:]).tokens
    assert torch.allclose(z.mean(0), torch.zeros(6, 8), atol=1e-5)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(6, 8), atol=1e-4)
    out = dv_in(q[:3], torch.tensor([True, False, True]))
    assert torch.equal(out.tokens[1], dv_in.default_embedding.detach())  # missing: the learned default, as is
    state = dv_in.state_dict()  # the statistics are saved with the model
    assert torch.equal(state["token_mean"], dv_in.token_mean) and torch.equal(state["token_std"], dv_in.token_std)
    fresh = DV365Input(DV365InputConfig(row_format=fmt, use_age=False, standardize=True))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(q[4:]).tokens, z)


def test_standardization_errors_name_the_problem() -> None:
    fmt = RowFormat(rows_per_user=6, dim=8)
    q = quantize_rows(torch.randn(4, 6, 8), fmt.bits)
    with pytest.raises(AdapterError, match="standardize=True"):
        DV365Input(DV365InputConfig(row_format=fmt)).fit_standardization(q)
    dv_in = DV365Input(DV365InputConfig(row_format=fmt, standardize=True))
    with pytest.raises(AdapterError, match=r"\[U, 6, 8\]"):
        dv_in.fit_standardization(q[:, :3])
    with pytest.raises(AdapterError, match="at least 2 present users"):
        dv_in.fit_standardization(q, torch.tensor([True, False, False, False]))
