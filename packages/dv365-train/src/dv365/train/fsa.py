"""The DV365 user tower's summarization arch (paper §2.3.2): Funnel Summarization Arch + Table-1 variants.

Input: the ``N`` pooled sliced-feature embeddings of a user, ``[B, N, D]`` (``N`` ~ 200 features in the
spec's order, ``D`` = 256 in the paper; :class:`~dv365.train.pooling.SlicedPooling` makes them).
Output: ``N_out`` user embeddings ``[B, N_out, D]`` (58 in the paper), what is exported and served.

**Token-wise view.** Transpose to ``U = [B, D, N]`` and apply the networks along the last (token) dim:
each of the ``D`` dims is a row of ``N`` token values, and every row goes through the same parameters.
Permuting the ``D`` dims of the input therefore permutes the output's ``D`` dims the same way (tested).
In a transformer on this view the *sequence* is the ``D`` dims (no positional encoding: they have no
order) and the *width* is the token dim.

**FSA** = funnel transformer (Alg. 1) on the token-wise view, in parallel with the Linear Compression
Encoder (LCE, a ``Linear(N -> n_lce)`` over the token dim), outputs stacked along the token dim.
Alg. 1: ``n`` blocks of ``m`` post-norm encoder layers (Eq. 11); before every block except the first the
token dim is mean-pooled with a stride (:func:`funnel_pool`), so block ``i`` works at width
``N_i = ceil(N_{i-1} / stride)``. Defaults: ``n = 3, m = 1, stride = 2``: widths 201 -> 101 -> 51, so the
funnel gives 51 tokens and the LCE the remaining ``N_out - 51 = 7`` (58 in all; :func:`token_split`).

Variants (Table 1), all built by :func:`build_user_tower` from one :class:`TowerConfig`:

==========  =====================================================================  ===========
kind        arch                                                                   N_out
==========  =====================================================================  ===========
pass_thru   no compression                                                         N
lce         token-wise Linear(N -> N_out)                                          N_out
mlp_d       dim-wise MLP on the flattened [N*D] -> [N_out*D]                       N_out
mlp_t       token-wise MLP N -> ff_mult*N -> N_out                                 N_out
tl_d        dim-wise transformer on [N, D] (+ learned feature positions), last     N_out
            ``N_out - n_lce`` outputs, + LCE
tl_t        token-wise transformer on [D, N], last ``N_out - n_lce`` token         N_out
            columns, + LCE
fsa         funnel transformer (token-wise) + LCE                                  N_out
==========  =====================================================================  ===========

Eq. 11 is implemented as the standard post-norm layer ``u = Norm(x + Att(x)); Norm(u + FF(u))``
(Vaswani et al.; the paper's one-line formula writes the outer residual as ``U``). Attention uses its own
head size (``num_heads x head_dim``), independent of the width, because the funnel widths (201, 101,
51...) are rarely divisible by a head count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from dv365.train.errors import TrainConfigError

TOWER_KINDS: tuple[str, ...] = ("pass_thru", "lce", "mlp_d", "mlp_t", "tl_d", "tl_t", "fsa")
TOKEN_WISE_KINDS: tuple[str, ...] = ("pass_thru", "lce", "mlp_t", "tl_t", "fsa")


@dataclass(frozen=True)
class EncoderConfig:
    """Layer sizes shared by the tower variants.

    Args:
        num_heads: attention heads.
        head_dim: size of each head (the attention inner width is ``num_heads * head_dim``).
        ff_mult: feed-forward / MLP hidden width, as a multiple of the layer's width (token-wise: the
            token width; ``mlp_d``: ``ff_mult * D``).
        dropout: dropout after attention and feed-forward (and in the MLPs).
        num_layers: depth of the vanilla transformers (``tl_d``, ``tl_t``).
    """

    num_heads: int = 4
    head_dim: int = 32
    ff_mult: int = 2
    dropout: float = 0.0
    num_layers: int = 2


@dataclass(frozen=True)
class FunnelConfig:
    """Alg. 1's funnel: ``num_blocks`` (n) blocks of ``layers_per_block`` (m) layers, pooling ``stride``."""

    num_blocks: int = 3
    layers_per_block: int = 1
    stride: int = 2


@dataclass(frozen=True)
class TowerConfig:
    """Sizes of a user tower.

    Args:
        num_tokens: ``N``, pooled features per user (0: set from the slice spec by the model builder).
        dim: ``D``, embedding dim of every token.
        n_out: ``N_out``, output tokens of the compressing variants (58 in the paper).
        encoder: attention / feed-forward sizes.
        funnel: the funnel geometry (also fixes the FSA / T-L split between main and LCE tokens).
    """

    num_tokens: int = 0
    dim: int = 256
    n_out: int = 58
    encoder: EncoderConfig = EncoderConfig()
    funnel: FunnelConfig = FunnelConfig()

    def with_tokens(self, num_tokens: int) -> TowerConfig:
        return replace(self, num_tokens=num_tokens)


def canonical_kind(kind: str) -> str:
    """Normalises Table-1 names: ``"T-L_t"`` -> ``"tl_t"``, ``"MLP_d"`` -> ``"mlp_d"``, ``"FSA"`` -> ``"fsa"``."""
    k = kind.strip().lower().replace("-", "").replace(" ", "")
    k = {"passthru": "pass_thru", "pass_through": "pass_thru"}.get(k, k)
    if k not in TOWER_KINDS:
        raise TrainConfigError(
            f"user tower kind {kind!r} is unknown; choose one of {list(TOWER_KINDS)} "
            "(or 'baseline' for the model without a tower)"
        )
    return k


def funnel_widths(num_tokens: int, funnel: FunnelConfig) -> list[int]:
    """Token widths of the funnel's blocks (Alg. 1): ``[N, ceil(N/s), ceil(N/s^2), ...]``, one per block."""
    widths = [num_tokens]
    for _ in range(funnel.num_blocks - 1):
        widths.append(math.ceil(widths[-1] / funnel.stride))
    return widths


def token_split(cfg: TowerConfig) -> tuple[int, int]:
    """``(main, lce)`` output tokens of the "+ LCE" variants: main = the funnel's output width, lce = rest.

    >>> token_split(TowerConfig(num_tokens=201))   # 201 -> 101 -> 51 funnel tokens, + 7 LCE tokens = 58
    (51, 7)
    """
    main = funnel_widths(cfg.num_tokens, cfg.funnel)[-1]
    lce = cfg.n_out - main
    if lce < 0:
        raise TrainConfigError(
            f"model.tower.n_out = {cfg.n_out} is smaller than the funnel's output width {main} "
            f"(N = {cfg.num_tokens}, {cfg.funnel.num_blocks} blocks, stride {cfg.funnel.stride}); "
            "add funnel blocks, raise the stride or raise n_out"
        )
    return main, lce


def _check(cfg: TowerConfig) -> None:
    e, f = cfg.encoder, cfg.funnel
    for name, v in (
        ("num_tokens", cfg.num_tokens),
        ("dim", cfg.dim),
        ("n_out", cfg.n_out),
        ("encoder.num_heads", e.num_heads),
        ("encoder.head_dim", e.head_dim),
        ("encoder.ff_mult", e.ff_mult),
        ("encoder.num_layers", e.num_layers),
        ("funnel.num_blocks", f.num_blocks),
        ("funnel.layers_per_block", f.layers_per_block),
        ("funnel.stride", f.stride),
    ):
        if v < 1:
            raise TrainConfigError(f"model.tower.{name} = {v}: must be >= 1")
    if not 0.0 <= e.dropout < 1.0:
        raise TrainConfigError(f"model.tower.encoder.dropout = {e.dropout}: must be in [0, 1)")


# ------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------
def funnel_pool(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Mean pooling of the last (token) dim in windows of ``stride``; a partial last window is averaged
    over the tokens it has. ``[..., W] -> [..., ceil(W / stride)]``.

    Example::

        funnel_pool(torch.arange(5.).view(1, 5), 2)    # tensor([[0.5, 2.5, 4.0]])
    """
    w = x.shape[-1]
    full = w // stride
    parts = []
    if full:
        parts.append(x[..., : full * stride].unflatten(-1, (full, stride)).mean(-1))
    if w % stride:
        parts.append(x[..., full * stride :].mean(-1, keepdim=True))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


class SelfAttention(nn.Module):
    """Multi-head self-attention over a ``[B, L, W]`` sequence with inner width ``num_heads * head_dim``.

    Args:
        width: ``W``, feature width of the sequence elements.
        cfg: heads, head size and dropout.

    Example::

        att = SelfAttention(201, EncoderConfig(num_heads=4, head_dim=32))
        att(torch.randn(8, 256, 201)).shape    # [8, 256, 201]
    """

    def __init__(self, width: int, cfg: EncoderConfig) -> None:
        super().__init__()
        self.h, self.dh, self.dropout = cfg.num_heads, cfg.head_dim, cfg.dropout
        self.qkv = nn.Linear(width, 3 * self.h * self.dh)
        self.out = nn.Linear(self.h * self.dh, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, dh]
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(a.transpose(1, 2).reshape(B, L, self.h * self.dh))  # [B, L, W]


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (Eq. 11): ``u = Norm(x + Att(x)); Norm(u + FF(u))``.

    Args:
        width: feature width ``W`` (token-wise view: the number of tokens).
        cfg: attention / feed-forward sizes.

    Example::

        layer = EncoderLayer(201, EncoderConfig())
        layer(torch.randn(8, 256, 201)).shape    # [8, 256, 201]: [B, D, N] in the token-wise view
    """

    def __init__(self, width: int, cfg: EncoderConfig) -> None:
        super().__init__()
        self.att = SelfAttention(width, cfg)
        self.ff = nn.Sequential(nn.Linear(width, cfg.ff_mult * width), nn.GELU(), nn.Linear(cfg.ff_mult * width, width))
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm1(x + self.drop(self.att(x)))  # [B, L, W]
        return self.norm2(u + self.drop(self.ff(u)))  # [B, L, W]


class FunnelEncoder(nn.Module):
    """Alg. 1 on the token-wise view: ``n`` blocks of ``m`` encoder layers, token-dim pooling between blocks.

    Args:
        num_tokens: ``N``, the input width.
        funnel: blocks, layers per block, stride.
        encoder: layer sizes.

    Example::

        enc = FunnelEncoder(201, FunnelConfig(num_blocks=3, stride=2), EncoderConfig())
        enc.widths                                  # [201, 101, 51]
        enc(torch.randn(8, 256, 201)).shape         # [8, 256, 51]: [B, D, N_funnel]
    """

    def __init__(self, num_tokens: int, funnel: FunnelConfig, encoder: EncoderConfig) -> None:
        super().__init__()
        self.stride = funnel.stride
        self.widths = funnel_widths(num_tokens, funnel)
        self.blocks = nn.ModuleList(
            nn.Sequential(*(EncoderLayer(w, encoder) for _ in range(funnel.layers_per_block))) for w in self.widths
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if i > 0:  # Alg. 1: no pooling before the first block
                u = funnel_pool(u, self.stride)  # [B, D, N_i]
            u = block(u)  # [B, D, N_i]
        return u


class LinearCompression(nn.Module):
    """The Linear Compression Encoder (LCE): a ``Linear(N -> n)`` over the token dim, shared by all D dims.

    Args:
        num_tokens: ``N``.
        out_tokens: ``n``.

    Example::

        lce = LinearCompression(201, 7)
        lce(torch.randn(8, 201, 256)).shape      # [8, 7, 256]
    """

    def __init__(self, num_tokens: int, out_tokens: int) -> None:
        super().__init__()
        self.proj = nn.Linear(num_tokens, out_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(1, 2)).transpose(1, 2)  # [B, N, D] -> [B, D, n] -> [B, n, D]


# ------------------------------------------------------------------------------------------------------
# Table-1 variants: [B, N, D] -> [B, N_out, D]
# ------------------------------------------------------------------------------------------------------
class UserTowerArch(nn.Module):
    """Base of the variants: ``forward([B, N, D]) -> [B, out_tokens, D]``; ``kind`` names the Table-1 row."""

    kind: str = ""
    out_tokens: int = 0


class PassThru(UserTowerArch):
    """No compression: the ``N`` pooled tokens are the user embedding (Table 1 ``pass_thru``).

    Args:
        cfg: only ``num_tokens`` is used.

    Example::

        PassThru(TowerConfig(num_tokens=201))(torch.randn(8, 201, 16)).shape   # [8, 201, 16]
    """

    kind = "pass_thru"

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.out_tokens = cfg.num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x  # [B, N, D]


class LCETower(UserTowerArch):
    """LCE alone (Table 1 ``LCE``): token-wise ``Linear(N -> N_out)``.

    Args:
        cfg: ``num_tokens``, ``n_out``.

    Example::

        LCETower(TowerConfig(num_tokens=201))(torch.randn(8, 201, 16)).shape   # [8, 58, 16]
    """

    kind = "lce"

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.out_tokens = cfg.n_out
        self.lce = LinearCompression(cfg.num_tokens, cfg.n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lce(x)  # [B, N_out, D]


class DimWiseMLP(UserTowerArch):
    """Dim-wise MLP (Table 1 ``MLP_d``): ``[B, N*D] -> ff_mult*D -> [B, N_out*D]``, no parameter sharing.

    Args:
        cfg: ``num_tokens``, ``dim``, ``n_out``, ``encoder.ff_mult``, ``encoder.dropout``.

    Example::

        DimWiseMLP(TowerConfig(num_tokens=201, dim=16))(torch.randn(8, 201, 16)).shape   # [8, 58, 16]
    """

    kind = "mlp_d"

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.out_tokens, self.dim = cfg.n_out, cfg.dim
        hidden = cfg.encoder.ff_mult * cfg.dim
        self.mlp = nn.Sequential(
            nn.Linear(cfg.num_tokens * cfg.dim, hidden),
            nn.GELU(),
            nn.Dropout(cfg.encoder.dropout),
            nn.Linear(hidden, cfg.n_out * cfg.dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.flatten(1)).view(x.shape[0], self.out_tokens, self.dim)  # [B, N*D] -> [B, N_out, D]


class TokenWiseMLP(UserTowerArch):
    """Token-wise MLP (Table 1 ``MLP_t``): ``N -> ff_mult*N -> N_out`` over the token dim, shared by all D dims.

    Args:
        cfg: ``num_tokens``, ``n_out``, ``encoder.ff_mult``, ``encoder.dropout``.

    Example::

        TokenWiseMLP(TowerConfig(num_tokens=201))(torch.randn(8, 201, 16)).shape   # [8, 58, 16]
    """

    kind = "mlp_t"

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.out_tokens = cfg.n_out
        hidden = cfg.encoder.ff_mult * cfg.num_tokens
        self.mlp = nn.Sequential(
            nn.Linear(cfg.num_tokens, hidden), nn.GELU(), nn.Dropout(cfg.encoder.dropout), nn.Linear(hidden, cfg.n_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)  # [B, D, N] -> [B, D, N_out] -> [B, N_out, D]


class DimWiseTransformer(UserTowerArch):
    """Dim-wise transformer + LCE (Table 1 ``T-L_d``): the usual view, a sequence of ``N`` tokens of width
    ``D`` plus learned feature-position embeddings; keeps the last ``N_out - n_lce`` outputs and stacks the
    LCE's ``n_lce`` tokens after them.

    Args:
        cfg: ``num_tokens``, ``dim``, ``n_out``, ``encoder`` (``num_layers`` deep), ``funnel`` (the split).

    Example::

        DimWiseTransformer(TowerConfig(num_tokens=201, dim=16))(torch.randn(8, 201, 16)).shape   # [8, 58, 16]
    """

    kind = "tl_d"

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.main, n_lce = token_split(cfg)
        self.out_tokens = cfg.n_out
        self.pos = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.dim))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.Sequential(*(EncoderLayer(cfg.dim, cfg.encoder) for _ in range(cfg.encoder.num_layers)))
        self.lce = LinearCompression(cfg.num_tokens, n_lce) if n_lce else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(x + self.pos)[:, -self.main :, :]  # [B, N, D] -> [B, main, D]
        return h if self.lce is None else torch.cat([h, self.lce(x)], dim=1)  # [B, N_out, D]


class TokenWiseTransformer(UserTowerArch):
    """Token-wise transformer + LCE (Table 1 ``T-L_t``): ``num_layers`` encoder layers on ``[B, D, N]`` (no
    pooling); keeps the last ``N_out - n_lce`` token columns and stacks the LCE tokens after them.

    Args:
        cfg: ``num_tokens``, ``n_out``, ``encoder``, ``funnel`` (the split).

    Example::

        TokenWiseTransformer(TowerConfig(num_tokens=201))(torch.randn(8, 201, 16)).shape   # [8, 58, 16]
    """

    kind = "tl_t"

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.main, n_lce = token_split(cfg)
        self.out_tokens = cfg.n_out
        self.layers = nn.Sequential(*(EncoderLayer(cfg.num_tokens, cfg.encoder) for _ in range(cfg.encoder.num_layers)))
        self.lce = LinearCompression(cfg.num_tokens, n_lce) if n_lce else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.layers(x.transpose(1, 2))[:, :, -self.main :]  # [B, D, N] -> [B, D, main]
        h = u.transpose(1, 2)  # [B, main, D]
        return h if self.lce is None else torch.cat([h, self.lce(x)], dim=1)  # [B, N_out, D]


class FunnelSummarization(UserTowerArch):
    """FSA (paper §2.3.2): funnel transformer on the token-wise view (Alg. 1) + LCE in parallel, stacked.

    Args:
        cfg: ``num_tokens`` (N), ``n_out`` (N_out), ``encoder`` (layer sizes), ``funnel`` (n, m, stride).
            The funnel yields ``funnel_widths(N)[-1]`` tokens, the LCE ``N_out`` minus that.

    Example::

        fsa = FunnelSummarization(TowerConfig(num_tokens=201, dim=256))
        fsa.funnel.widths, fsa.n_lce                 # [201, 101, 51], 7
        fsa(torch.randn(8, 201, 256)).shape          # [8, 58, 256]
    """

    kind = "fsa"

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        main, self.n_lce = token_split(cfg)
        self.out_tokens = cfg.n_out
        self.funnel = FunnelEncoder(cfg.num_tokens, cfg.funnel, cfg.encoder)
        self.lce = LinearCompression(cfg.num_tokens, self.n_lce) if self.n_lce else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.funnel(x.transpose(1, 2)).transpose(1, 2)  # [B, D, N] -> [B, D, N_funnel] -> [B, N_funnel, D]
        return h if self.lce is None else torch.cat([h, self.lce(x)], dim=1)  # [B, N_out, D]


_ARCHS: dict[str, type[UserTowerArch]] = {
    "pass_thru": PassThru,
    "lce": LCETower,
    "mlp_d": DimWiseMLP,
    "mlp_t": TokenWiseMLP,
    "tl_d": DimWiseTransformer,
    "tl_t": TokenWiseTransformer,
    "fsa": FunnelSummarization,
}


def build_user_tower(kind: str, cfg: TowerConfig) -> UserTowerArch:
    """The summarization arch of a Table-1 variant: ``[B, N, D] -> [B, N_out, D]``.

    Args:
        kind: ``pass_thru``, ``lce``, ``mlp_d``, ``mlp_t``, ``tl_d``, ``tl_t`` or ``fsa`` (Table-1 spellings
            such as ``"T-L_t"`` or ``"MLP_d"`` are accepted).
        cfg: sizes; ``cfg.num_tokens`` must be set (the spec's feature count).

    Example::

        tower = build_user_tower("fsa", TowerConfig(num_tokens=201, dim=256))
        tower(torch.randn(4, 201, 256)).shape    # [4, 58, 256]
    """
    k = canonical_kind(kind)
    _check(cfg)
    return _ARCHS[k](cfg)
