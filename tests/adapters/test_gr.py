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
from generative_recommenders.modules.stu import STULayer, STULayerConfig, STUStack  # noqa: E402

from dv365.adapters import DV365Input  # noqa: E402
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


def test_full_hstu_transducer_forward_backward() -> None:
    cfg = GRContextConfig(input_embedding_dim=D, hidden_dim=D, output_embedding_dim=D, num_tokens=K)
    stu = STUStack(
        stu_list=[
            STULayer(
                STULayerConfig(embedding_dim=D, num_heads=2, hidden_dim=16, attention_dim=16, output_dropout_ratio=0.0),
                is_inference=False,
            )
        ],
        is_inference=False,
    )
    transducer = HSTUTransducer(
        stu_module=stu,
        input_preprocessor=DV365ContextualPreprocessor(cfg),
        positional_encoder=HSTUPositionalEncoder(
            num_position_buckets=8192,
            num_time_buckets=2048,
            embedding_dim=D,
            contextual_seq_len=contextual_seq_len(cfg),
            is_inference=False,
        ),
        is_inference=False,
        return_full_embeddings=True,
    )
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
    from generative_recommenders.modules.preprocessors import ContextualPreprocessor

    from dv365.adapters import AdapterError

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
