"""HSTUPrefix / prepend_jagged: ragged batches (empty users included), order, timestamps, gradients, GR layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dv365.adapters import (
    AdapterError,
    HSTUPrefix,
    first_event_timestamps,
    offsets_from_lengths,
    prepend_jagged,
    prepend_jagged_reference,
)


def _batch(lengths: list[int], dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.long)
    values = torch.randn(int(lens.sum()), dim, generator=g)  # [ΣL, D]
    # per-user non-decreasing timestamps, different per user
    ts = (
        torch.cat([1000 * (b + 1) + torch.arange(n) * 7 for b, n in enumerate(lengths)])
        if lengths
        else torch.zeros(0, dtype=torch.long)
    )
    return values, lens, ts.to(torch.long)


def test_ragged_batch_by_hand() -> None:
    values, lengths, ts = _batch([2, 0, 3])
    prefix = torch.arange(3 * 2 * 8, dtype=torch.float32).reshape(3, 2, 8) + 100  # [B, K, D]
    v, lens, offs, t = prepend_jagged(prefix, values, offsets_from_lengths(lengths), ts)
    assert lens.tolist() == [4, 2, 5] and offs.tolist() == [0, 4, 6, 11]
    assert torch.equal(v[0:2], prefix[0]) and torch.equal(v[2:4], values[0:2])
    assert torch.equal(v[4:6], prefix[1])  # the empty user: its prefix only
    assert torch.equal(v[6:8], prefix[2]) and torch.equal(v[8:11], values[2:5])
    assert t.tolist() == [0, 0, 1000, 1007, 0, 0, 0, 0, 3000, 3007, 3014]  # prefix time 0, as GR's contextual tokens
    first = first_event_timestamps(offsets_from_lengths(lengths), ts)
    assert first.tolist() == [1000, 0, 3000]
    t_first = prepend_jagged(prefix, values, offsets_from_lengths(lengths), ts, first)[3]
    assert t_first.tolist() == [1000, 1000, 1000, 1007, 0, 0, 3000, 3000, 3000, 3007, 3014]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=7),
    st.integers(1, 4),
    st.booleans(),
    st.sampled_from([torch.int64, torch.int32]),
)
def test_matches_reference(lengths: list[int], k: int, given_ts: bool, dtype: torch.dtype) -> None:
    values, lens, ts = _batch(lengths, seed=len(lengths) + k)
    prefix = torch.randn(len(lengths), k, 8)
    offsets = offsets_from_lengths(lens).to(dtype)
    pts = torch.arange(len(lengths)) * 11 + 5 if given_ts else None
    got = prepend_jagged(prefix, values, offsets, ts, pts)
    ref = prepend_jagged_reference(prefix, values, offsets, ts, pts)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    # the events keep their order; removing the prefixes gives back the input
    keep = torch.ones(got[0].shape[0], dtype=torch.bool)
    for start in got[2][:-1].tolist():
        keep[int(start) : int(start) + k] = False
    assert torch.equal(got[0][keep], values) and torch.equal(got[3][keep], ts)


def test_all_users_empty_and_scalar_prefix_time() -> None:
    values, lengths, ts = _batch([0, 0])
    prefix = torch.randn(2, 3, 8)
    v, lens, offs, t = prepend_jagged(prefix, values, offsets_from_lengths(lengths), ts, torch.tensor(42))
    assert torch.equal(v, prefix.reshape(6, 8)) and lens.tolist() == [3, 3] and offs.tolist() == [0, 3, 6]
    assert t.tolist() == [42] * 6


def test_gradients_flow_to_values_prefix_and_projection() -> None:
    values, lengths, ts = _batch([3, 0, 1, 4], dim=16)
    values.requires_grad_(True)
    tokens = torch.randn(4, 58, 256, requires_grad=True)
    module = HSTUPrefix(embedding_dim=16, num_tokens=2)
    out = module(tokens, values, ts, lengths=lengths)
    weights = torch.randn_like(out.values)
    (out.values * weights).sum().backward()
    # each event's gradient is the weight at its new position
    keep = torch.ones(out.values.shape[0], dtype=torch.bool)
    for start in out.offsets[:-1].tolist():
        keep[start : start + 2] = False
    assert values.grad is not None and torch.equal(values.grad, weights[keep])
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    for p in module.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_module_outputs_and_gr_contextual_layout() -> None:
    values, lengths, ts = _batch([2, 0, 3], dim=16)
    module = HSTUPrefix(embedding_dim=16, num_tokens=4, name="dv")
    tokens = torch.randn(3, 58, 256)
    out = module(tokens, values, ts, lengths=lengths)
    by_offsets = module(tokens, values, ts, offsets=offsets_from_lengths(lengths))
    for a, b in zip(out, by_offsets):
        assert torch.equal(a, b)
    assert out.lengths.tolist() == [6, 4, 7] and out.offsets.tolist() == [0, 6, 10, 17]
    assert out.values.shape == (17, 16) and out.timestamps.shape == (17,)
    projected = module.projection(tokens)  # [B, K, D]
    assert torch.equal(out.contextual_values, projected.reshape(12, 16))
    assert out.contextual_offsets.tolist() == [0, 4, 8, 12]
    for b, start in enumerate(out.offsets[:-1].tolist()):
        assert torch.equal(out.values[start : start + 4], projected[b])
    payloads = module.seq_payloads(out)
    assert set(payloads) == {"dv", "dv_offsets"}
    # GR reads a contextual feature as jagged [B·K, D] values + [B+1] offsets, padded to K per user
    assert torch.equal(payloads["dv"].reshape(3, 4, 16), projected)


def test_prefix_time_modes_and_payloads_only_path() -> None:
    values, lengths, ts = _batch([2, 0, 3], dim=16)
    tokens = torch.randn(3, 58, 256)
    zero = HSTUPrefix(embedding_dim=16, num_tokens=2)
    first = HSTUPrefix(embedding_dim=16, num_tokens=2, prefix_time="first_event")
    first.load_state_dict(zero.state_dict())
    out_zero, out_first = zero(tokens, values, ts, lengths=lengths), first(tokens, values, ts, lengths=lengths)
    assert out_zero.timestamps.tolist() == [0, 0, 1000, 1007, 0, 0, 0, 0, 3000, 3007, 3014]
    assert out_first.timestamps.tolist() == [1000, 1000, 1000, 1007, 0, 0, 3000, 3000, 3000, 3007, 3014]
    assert torch.equal(out_zero.values, out_first.values)
    # the payloads-only path equals the payloads of the full prepend, without running it
    only = zero.contextual_payloads(tokens)
    full = zero.seq_payloads(out_zero)
    assert set(only) == {"dv365", "dv365_offsets"} and all(torch.equal(only[k], full[k]) for k in full)
    with pytest.raises(AdapterError, match="prefix_time"):
        HSTUPrefix(embedding_dim=16, prefix_time="cutoff")


def test_hstu_dim_is_a_deprecated_alias_of_embedding_dim() -> None:
    with pytest.warns(DeprecationWarning, match="embedding_dim"):
        old = HSTUPrefix(hstu_dim=16, num_tokens=2)
    assert old.embedding_dim == 16 and old.projection.embedding_dim == 16
    assert HSTUPrefix(16, 2).embedding_dim == 16  # positional use is unchanged
    with pytest.raises(AdapterError, match="not both"):
        HSTUPrefix(embedding_dim=16, hstu_dim=16)
    with pytest.raises(AdapterError, match="embedding_dim"):
        HSTUPrefix()


def test_bad_inputs() -> None:
    values, lengths, ts = _batch([2, 1])
    module = HSTUPrefix(embedding_dim=8, num_tokens=2)
    tokens = torch.randn(2, 58, 256)
    with pytest.raises(AdapterError, match="lengths"):
        module(tokens, values, ts)
    with pytest.raises(AdapterError, match="not both"):
        module(tokens, values, ts, lengths=lengths, offsets=offsets_from_lengths(lengths))
    with pytest.raises(AdapterError, match="values must be"):
        module(tokens, torch.randn(3, 9), ts, lengths=lengths)
    with pytest.raises(AdapterError, match="timestamps"):
        module(tokens, values, ts[:2], lengths=lengths)
    with pytest.raises(AdapterError, match=r"offsets must be \[B\+1\]"):
        prepend_jagged(torch.randn(3, 2, 8), values, offsets_from_lengths(lengths), ts)
    with pytest.raises(RuntimeError, match="offsets\\[-1\\]"):
        module(tokens, values, ts, lengths=torch.tensor([1, 1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    values, lengths, ts = _batch([3, 0, 2], dim=16)
    module = HSTUPrefix(embedding_dim=16, num_tokens=2)
    tokens = torch.randn(3, 58, 256)
    ref = module(tokens, values, ts, lengths=lengths)
    out = module.to("cuda")(tokens.cuda(), values.cuda(), ts.cuda(), lengths=lengths.cuda())
    for a, b in zip(out, ref):
        assert a.device.type == "cuda" and torch.allclose(a.cpu(), b, atol=1e-5)
