"""dv365.adapters.gr against the real generative-recommenders (GR). SKIPPED where GR is not installed.

Known good: GR commit 6135bc3 with torch 2.13, torchrec 1.8, fbgemm-gpu-cpu 1.8 and triton installed; on CPU
the STU modules use the pure-PyTorch kernels (set_hammer_kernel(HammerKernel.PYTORCH)).
"""

from __future__ import annotations

import pytest
import torch

gr = pytest.importorskip("generative_recommenders")
pytest.importorskip("fbgemm_gpu")  # GR calls torch.ops.fbgemm.* (asynchronous_complete_cumsum)

from generative_recommenders.common import HammerKernel  # noqa: E402
from generative_recommenders.modules.hstu_transducer import HSTUTransducer  # noqa: E402
from generative_recommenders.modules.positional_encoder import HSTUPositionalEncoder  # noqa: E402
from generative_recommenders.modules.preprocessors import ContextualPreprocessor  # noqa: E402
from generative_recommenders.modules.stu import STULayer, STULayerConfig, STUStack  # noqa: E402

from dv365.adapters import AdapterError, DV365Input, HSTUPrefix  # noqa: E402
from dv365.adapters.gr import DV365ContextualPreprocessor, GRContextConfig, contextual_seq_len  # noqa: E402
from dv365.core.quantize import quantize_rows  # noqa: E402

D, K = 32, 4


def _inputs() -> dict[str, object]:
    uih, targets = torch.tensor([3, 0, 5]), torch.tensor([1, 1, 2])
    lengths = uih + targets
    total = int(lengths.sum())
    tokens = DV365Input()(
        quantize_rows(torch.randn(3, 58, 256)), torch.tensor([True, False, True]), torch.full((3,), 60.0)
    ).tokens  # [B, 58, 256]
    return dict(
        max_uih_len=5,
        max_targets=2,
        total_uih_len=int(uih.sum()),
        total_targets=int(targets.sum()),
        seq_lengths=lengths,
        seq_timestamps=torch.arange(total) + 100,
        seq_embeddings=torch.randn(total, D, requires_grad=True),
        num_targets=targets,
        seq_payloads={"dv365": tokens, "other": torch.zeros(1)},
    )


def test_preprocessor_puts_dv365_tokens_in_front() -> None:
    cfg = GRContextConfig(input_embedding_dim=D, hidden_dim=D, output_embedding_dim=D, num_tokens=K)
    pre = DV365ContextualPreprocessor(cfg)
    pre.set_hammer_kernel(HammerKernel.PYTORCH)
    x = _inputs()
    (max_len, total_uih, total_targets, lengths, offsets, ts, emb, num_targets, payloads) = pre(**x)
    assert max_len == 5 + 2 + K and total_uih == 8 + 3 * K and total_targets == 4
    assert lengths.tolist() == [4 + K, 1 + K, 7 + K] and offsets.tolist() == [0, 8, 13, 24]
    assert emb.shape == (24, D) and ts.shape == (24,)
    for start in offsets[:-1].tolist():
        assert ts[start : start + K].tolist() == [0] * K  # GR's contextual timestamps
    assert torch.equal(num_targets, x["num_targets"]) and "other" in payloads  # type: ignore[arg-type]
    # contextual token k of user b = GR's per-position linear map of our projected token
    projected = pre.projection(x["seq_payloads"]["dv365"])  # type: ignore[index]  # [B, K, D]
    w, bias = pre.inner._batched_contextual_linear_weights, pre.inner._batched_contextual_linear_bias
    for b, start in enumerate(offsets[:-1].tolist()):
        for k in range(K):
            assert torch.allclose(emb[start + k], projected[b, k] @ w[k] + bias[k], atol=1e-5)


def _stu(dim: int = D) -> STUStack:
    return STUStack(
        stu_list=[
            STULayer(
                STULayerConfig(
                    embedding_dim=dim, num_heads=2, hidden_dim=16, attention_dim=16, output_dropout_ratio=0.0
                ),
                is_inference=False,
            )
        ],
        is_inference=False,
    )


def _transducer(cfg: GRContextConfig, pre: DV365ContextualPreprocessor) -> HSTUTransducer:
    return HSTUTransducer(
        stu_module=_stu(cfg.output_embedding_dim),
        input_preprocessor=pre,
        positional_encoder=HSTUPositionalEncoder(
            num_position_buckets=8192,
            num_time_buckets=2048,
            embedding_dim=cfg.output_embedding_dim,
            contextual_seq_len=contextual_seq_len(cfg),
            is_inference=False,
        ),
        is_inference=False,
        return_full_embeddings=True,
    )


def test_full_hstu_transducer_forward_backward() -> None:
    cfg = GRContextConfig(input_embedding_dim=D, hidden_dim=D, output_embedding_dim=D, num_tokens=K)
    transducer = _transducer(cfg, DV365ContextualPreprocessor(cfg))
    transducer.set_hammer_kernel(HammerKernel.PYTORCH)
    x = _inputs()
    x.pop("seq_payloads")
    payloads = {"dv365": _inputs()["seq_payloads"]["dv365"]}  # type: ignore[index]
    candidates, full = transducer(seq_payloads=payloads, **x)
    assert candidates.shape == (4, D) and full is not None and full.shape == (24, D)
    candidates.sum().backward()
    proj = transducer._input_preprocessor.projection
    assert proj.dim_proj.weight.grad is not None and proj.dim_proj.weight.grad.abs().sum() > 0


def test_inner_preprocessor_must_know_the_feature() -> None:
    cfg = GRContextConfig(
        input_embedding_dim=D, hidden_dim=D, output_embedding_dim=D, num_tokens=K, other_contextual=(("age", 1),)
    )
    assert cfg.contextual_feature_to_max_length() == {"age": 1, "dv365": K} and contextual_seq_len(cfg) == K + 1
    inner = ContextualPreprocessor(
        input_embedding_dim=D,
        hidden_dim=D,
        output_embedding_dim=D,
        contextual_feature_to_max_length={"age": 1},
        contextual_feature_to_min_uih_length={},
        is_inference=False,
    )
    with pytest.raises(AdapterError, match="dv365"):
        DV365ContextualPreprocessor(cfg, inner=inner)


def _inner(d_in: int, d_out: int, max_len: dict[str, int], min_len: dict[str, int]) -> ContextualPreprocessor:
    return ContextualPreprocessor(
        input_embedding_dim=d_in,
        hidden_dim=d_in,
        output_embedding_dim=d_out,
        contextual_feature_to_max_length=max_len,
        contextual_feature_to_min_uih_length=min_len,
        is_inference=False,
    )


def test_projection_init_survives_the_transducer_xavier_reinit() -> None:
    cfg = GRContextConfig(input_embedding_dim=D, hidden_dim=D, output_embedding_dim=D, num_tokens=K)
    pre = DV365ContextualPreprocessor(cfg)
    with torch.no_grad():  # the user's own init, e.g. a projection warm-started from another model
        pre.projection.dim_proj.weight.fill_(0.01)
        pre.projection.token_mix.weight.copy_(torch.eye(K, 58))
    mine = {k: v.clone() for k, v in pre.projection.state_dict().items()}
    gr_mlp = pre.inner._content_embedding_mlp[0].weight.clone()
    _transducer(cfg, pre)  # HSTUTransducer.__init__ runs xavier_normal_ on every nn.Linear outside the STU stack
    assert not torch.equal(pre.inner._content_embedding_mlp[0].weight, gr_mlp)  # GR's own layers: re-initialised
    for key, value in pre.projection.state_dict().items():
        assert torch.equal(value, mine[key]), key  # DV365's projection: kept


def test_inner_dims_are_checked_at_construction() -> None:
    cfg = GRContextConfig(input_embedding_dim=16, hidden_dim=16, output_embedding_dim=D, num_tokens=K)
    with pytest.raises(AdapterError, match=r"input_embedding_dim=32 but GRContextConfig.input_embedding_dim=16"):
        DV365ContextualPreprocessor(cfg, inner=_inner(D, D, {"dv365": K}, {}))
    with pytest.raises(AdapterError, match=r"output_embedding_dim=16 but GRContextConfig.output_embedding_dim=32"):
        DV365ContextualPreprocessor(cfg, inner=_inner(16, 16, {"dv365": K}, {}))
    with pytest.raises(AdapterError, match=r"min_uih_length=0"):
        DV365ContextualPreprocessor(cfg, inner=_inner(16, D, {"dv365": K}, {"dv365": 3}))
    pre = DV365ContextualPreprocessor(cfg, inner=_inner(16, D, {"dv365": K}, {}))  # D_in 16 -> HSTU dim 32
    pre.set_hammer_kernel(HammerKernel.PYTORCH)
    x = _inputs()
    x["seq_embeddings"] = torch.randn(12, 16)
    assert pre(**x)[6].shape == (12 + 3 * K, D)
    with pytest.raises(AdapterError, match="num_tokens"):
        GRContextConfig(input_embedding_dim=16, hidden_dim=16, output_embedding_dim=D, num_tokens=0)


def test_min_uih_length_is_passed_to_gr() -> None:
    cfg = GRContextConfig(
        input_embedding_dim=D,
        hidden_dim=D,
        output_embedding_dim=D,
        num_tokens=K,
        min_uih_length=5,
        other_contextual=(("age", 1),),
        other_min_uih_length=(("age", 2),),
    )
    assert cfg.contextual_feature_to_min_uih_length() == {"age": 2, "dv365": 5}
    pre = DV365ContextualPreprocessor(cfg)
    pre.set_hammer_kernel(HammerKernel.PYTORCH)
    assert pre.inner._contextual_feature_to_min_uih_length == {"age": 2, "dv365": 5}
    x = _inputs()  # sequence lengths (history + targets) 4, 1, 7
    x["seq_payloads"].update(age=torch.randn(3, D), age_offsets=torch.arange(4))  # type: ignore[attr-defined]
    _, _, _, _, offsets, _, emb, _, _ = pre(**x)
    projected = pre.projection(x["seq_payloads"]["dv365"])  # type: ignore[index]  # [B, K, D]
    w, bias = pre.inner._batched_contextual_linear_weights, pre.inner._batched_contextual_linear_bias
    for b, start in enumerate(offsets[:-1].tolist()):
        for k in range(K):  # DV365 is contextual position 1 + k, after "age"
            want = bias[1 + k] if b < 2 else projected[b, k] @ w[1 + k] + bias[1 + k]  # users 0, 1: shorter than 5
            assert torch.allclose(emb[start + 1 + k], want, atol=1e-5)
    with pytest.raises(AdapterError, match="other_min_uih_length"):
        GRContextConfig(input_embedding_dim=D, hidden_dim=D, output_embedding_dim=D, other_min_uih_length=(("x", 1),))


def test_raw_prefix_path_matches_gr_contextual_path() -> None:
    """HSTUPrefix (no GR needed) and GR's ContextualPreprocessor put the same tokens in the same places with the
    same timestamps (0); its payloads-only output is what GR's contextual path reads, at GR's *input* dim."""
    d_in, d_hstu = 16, D  # HSTUPrefix.embedding_dim is GR's input_embedding_dim, not the HSTU dim
    prefix = HSTUPrefix(embedding_dim=d_in, num_tokens=K)
    inner = _inner(d_in, d_hstu, {"dv365": K}, {})
    inner.set_hammer_kernel(HammerKernel.PYTORCH)
    x = _inputs()
    tokens = x["seq_payloads"]["dv365"]  # type: ignore[index]
    x["seq_embeddings"] = torch.randn(12, d_in)
    x["seq_payloads"] = prefix.contextual_payloads(tokens)
    _, _, _, lengths, offsets, ts, emb, _, _ = inner(**x)
    out = prefix(tokens, x["seq_embeddings"], x["seq_timestamps"], lengths=x["seq_lengths"])  # type: ignore[arg-type]
    assert torch.equal(out.lengths, lengths) and torch.equal(out.offsets, offsets)
    assert torch.equal(out.timestamps, ts)  # prefix tokens at 0, as GR's contextual tokens
    w, bias = inner._batched_contextual_linear_weights, inner._batched_contextual_linear_bias
    for start in offsets[:-1].tolist():
        for k in range(K):  # GR maps prefix token k (the same values HSTUPrefix prepends) with its position-k map
            assert torch.allclose(emb[start + k], out.values[start + k] @ w[k] + bias[k], atol=1e-5)
