"""Sequence encoders of the next-item experiment: SASRec (written from Kang & McAuley 2018, arXiv 1808.09781)
and HSTU (the project's :class:`~dv365.experiments.downstream.hstu.HSTUEncoder`, from arXiv 2402.17152).

Both take the same input: right-aligned ``x [B, L, D]`` (padding first), ``valid [B, L]`` and timestamps
``ts [B, L]``, and return ``[B, L, D]``: the output at position t depends only on positions <= t (causal), so
every position's output predicts the next item during training and the last position's output is the user
vector at serving time.

SASRec (paper §III-B..D), per block with pre-LayerNorm residuals ``g(x) = x + Dropout(g(LayerNorm(x)))``:

    S = softmax(Q K^T / sqrt(d) + causal mask) V,  Q, K, V = linear maps of the input   (self-attention)
    F = ReLU(S W1 + b1) W2 + b2                                                       (point-wise FFN)

then a final LayerNorm. Padding positions are zeroed in the input and never attended to (each position
also attends to itself, so a padding row is well defined and simply ignored downstream).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dv365.experiments.downstream.hstu import HSTUConfig, HSTUEncoder

ENCODERS = ("sasrec", "hstu")


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes of a next-item encoder (the published GR ML-1M settings by default: PROTOCOLS.md).

    Args:
        kind: ``sasrec`` or ``hstu``.
        dim: d, the item embedding / model width (50).
        blocks: attention blocks / HSTU layers (2).
        heads: attention heads (1).
        ffn_hidden: SASRec's FFN hidden width (50).
        dropout: 0.2.
    """

    kind: str = "sasrec"
    dim: int = 50
    blocks: int = 2
    heads: int = 1
    ffn_hidden: int = 50
    dropout: float = 0.2


class CausalSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention, causal, over valid keys. ``[B, L, D] -> [B, L, D]``.

    Args:
        dim: D.
        heads: H (D must be divisible by H).

    Example::

        att = CausalSelfAttention(50, 1)
        att(torch.randn(2, 7, 50), torch.ones(2, 7, dtype=torch.bool)).shape   # [2, 7, 50]
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        H = self.heads
        q, k, v = (f(x).reshape(B, L, H, D // H).transpose(1, 2) for f in (self.q, self.k, self.v))  # [B, H, L, d]
        pos = torch.arange(L, device=x.device)
        causal = pos[:, None] >= pos[None, :]  # [L, L]
        allowed = (causal[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=x.device)[None]
        scores = q @ k.transpose(-1, -2) / (D // H) ** 0.5  # [B, H, L, L]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v  # [B, H, L, d]
        return out.transpose(1, 2).reshape(B, L, D)


class SASRecBlock(nn.Module):
    """One SASRec block: pre-norm causal self-attention then a point-wise FFN, each with dropout + residual.

    Args:
        cfg: an :class:`EncoderConfig`.

    Example::

        blk = SASRecBlock(EncoderConfig())
        blk(torch.randn(2, 7, 50), torch.ones(2, 7, dtype=torch.bool)).shape   # [2, 7, 50]
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.norm_att, self.norm_ffn = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.att = CausalSelfAttention(cfg.dim, cfg.heads)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_hidden), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.ffn_hidden, cfg.dim)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.att(self.norm_att(x), valid))
        x = x + self.drop(self.ffn(self.norm_ffn(x)))
        return x * valid[..., None].to(x.dtype)


class SASRec(nn.Module):
    """SASRec's stack of blocks and final LayerNorm (the input embedding + positions live in the caller).

    Args:
        cfg: an :class:`EncoderConfig`.

    Example::

        enc = SASRec(EncoderConfig())
        x = torch.randn(3, 20, 50)                                          # [B, L, D] right-aligned
        valid = torch.arange(20)[None] >= torch.tensor([[0], [5], [19]])    # padding first
        enc(x, valid, torch.zeros(3, 20, dtype=torch.long))[:, -1].shape   # [3, 50]: user vectors
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([SASRecBlock(cfg) for _ in range(cfg.blocks)])
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        x = x * valid[..., None].to(x.dtype)
        for blk in self.blocks:
            x = blk(x, valid)
        return self.norm(x)


class HSTU(nn.Module):
    """The project's HSTU encoder with dqk = dv = d (one head by default), in this module's interface.

    Args:
        cfg: an :class:`EncoderConfig` (``blocks`` = HSTU layers).

    Example::

        enc = HSTU(EncoderConfig(kind="hstu"))
        ts = torch.arange(20)[None].expand(3, 20) * 60
        enc(torch.randn(3, 20, 50), torch.ones(3, 20, dtype=torch.bool), ts).shape   # [3, 20, 50]
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.dim // cfg.heads
        self.enc = HSTUEncoder(
            HSTUConfig(dim=cfg.dim, num_layers=cfg.blocks, num_heads=cfg.heads, qk_dim=d, v_dim=d, dropout=cfg.dropout)
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        return self.enc(x, valid, ts)


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    if cfg.kind == "sasrec":
        return SASRec(cfg)
    if cfg.kind == "hstu":
        return HSTU(cfg)
    raise ValueError(f"encoder {cfg.kind!r}: use one of {ENCODERS}")


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """L2 normalisation with eps 1e-6 (the published setting)."""
    return F.normalize(x, dim=-1, eps=1e-6)
