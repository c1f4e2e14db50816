"""User tower variants (paper §2.3.2, Table 1): shapes, Alg. 1's funnel pooling, token-wise parameter sharing."""

from __future__ import annotations

import pytest
import torch

from dv365.train.errors import TrainConfigError
from dv365.train.fsa import (
    TOKEN_WISE_KINDS,
    TOWER_KINDS,
    EncoderConfig,
    FunnelConfig,
    TowerConfig,
    build_user_tower,
    canonical_kind,
    funnel_pool,
    funnel_widths,
    token_split,
)

N, D, B = 201, 8, 3
CFG = TowerConfig(num_tokens=N, dim=D, encoder=EncoderConfig(num_heads=2, head_dim=8, num_layers=1))


@pytest.mark.parametrize("kind", TOWER_KINDS)
def test_every_variant_maps_201_tokens_to_58_and_pass_thru_keeps_them(kind: str) -> None:
    torch.manual_seed(0)
    tower = build_user_tower(kind, CFG).eval()
    out = tower(torch.randn(B, N, D))
    expect = N if kind == "pass_thru" else 58
    assert out.shape == (B, expect, D)
    assert tower.out_tokens == expect and tower.kind == kind


def test_default_split_is_51_funnel_plus_7_lce_tokens_and_n_out_is_configurable() -> None:
    assert funnel_widths(201, FunnelConfig()) == [201, 101, 51]
    assert token_split(CFG) == (51, 7)
    wide = TowerConfig(num_tokens=N, dim=D, n_out=64, encoder=CFG.encoder)
    assert token_split(wide) == (51, 13)
    for kind in ("lce", "mlp_d", "mlp_t", "tl_d", "tl_t", "fsa"):
        assert build_user_tower(kind, wide)(torch.randn(2, N, D)).shape == (2, 64, D)
    # four blocks of stride 2: 201 -> 101 -> 51 -> 26 funnel tokens + 32 LCE tokens
    deep = TowerConfig(num_tokens=N, dim=D, encoder=CFG.encoder, funnel=FunnelConfig(num_blocks=4))
    assert token_split(deep) == (26, 32)
    with pytest.raises(TrainConfigError, match="smaller than the funnel's output width 51"):
        token_split(TowerConfig(num_tokens=N, n_out=40))


def test_funnel_pool_is_a_strided_mean_over_the_token_dim() -> None:
    x = torch.arange(10.0).view(1, 2, 5)  # [B, D, N]
    torch.testing.assert_close(funnel_pool(x, 2), torch.tensor([[[0.5, 2.5, 4.0], [5.5, 7.5, 9.0]]]))
    y = torch.randn(4, 3, 201)
    manual = torch.stack([y[..., i : i + 3].mean(-1) for i in range(0, 201, 3)], dim=-1)
    torch.testing.assert_close(funnel_pool(y, 3), manual)


def test_funnel_follows_alg1_no_pool_before_block_1_then_pool_before_each_block() -> None:
    torch.manual_seed(0)
    fsa = build_user_tower("fsa", CFG).eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [blk.register_forward_hook(lambda m, i, o: seen.append((i[0], o))) for blk in fsa.funnel.blocks]
    x = torch.randn(B, N, D)
    out = fsa(x)
    for h in hooks:
        h.remove()
    assert [tuple(i.shape) for i, _ in seen] == [(B, D, 201), (B, D, 101), (B, D, 51)]
    torch.testing.assert_close(seen[0][0], x.transpose(1, 2))  # block 1 sees U itself, token-wise view
    for k in (1, 2):  # block k+1 sees Pool(output of block k, stride)
        torch.testing.assert_close(seen[k][0], funnel_pool(seen[k - 1][1], 2))
    torch.testing.assert_close(out[:, :51], seen[2][1].transpose(1, 2))  # funnel tokens first, then LCE
    torch.testing.assert_close(out[:, 51:], fsa.lce(x))


@pytest.mark.parametrize("kind", TOWER_KINDS)
def test_token_wise_variants_share_parameters_across_embedding_dims(kind: str) -> None:
    """Permuting the D dims of the input permutes the output's D dims the same way iff the arch is token-wise."""
    torch.manual_seed(1)
    tower = build_user_tower(kind, CFG).eval()
    x = torch.randn(B, N, D)
    perm = torch.randperm(D)
    with torch.no_grad():
        a, b = tower(x[..., perm]), tower(x)[..., perm]
    if kind in TOKEN_WISE_KINDS:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    else:  # dim-wise variants mix the D dims with their own parameters
        assert not torch.allclose(a, b, rtol=1e-3, atol=1e-3)


def test_table1_spellings_and_unknown_kinds() -> None:
    assert [canonical_kind(k) for k in ("T-L_t", "T-L_d", "MLP_d", "MLP_t", "FSA", "LCE", "pass_thru")] == [
        "tl_t",
        "tl_d",
        "mlp_d",
        "mlp_t",
        "fsa",
        "lce",
        "pass_thru",
    ]
    with pytest.raises(TrainConfigError, match="unknown"):
        build_user_tower("hstu", CFG)
    with pytest.raises(TrainConfigError, match="dim"):
        build_user_tower("fsa", TowerConfig(num_tokens=N, dim=0))


def test_fsa_has_fewer_parameters_than_the_token_wise_transformer_at_paper_sizes() -> None:
    """Paper §3.4: FSA ~ T-L_t in NE with fewer parameters (default sizes, N = 201, D = 256)."""
    cfg = TowerConfig(num_tokens=N, dim=256)
    count = {k: sum(p.numel() for p in build_user_tower(k, cfg).parameters()) for k in ("fsa", "tl_t")}
    assert count["fsa"] < count["tl_t"]
