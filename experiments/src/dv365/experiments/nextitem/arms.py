"""The arms of the next-item experiment and the model that serves all of them.

Arms (one encoder, one window length K):

* ``full``: the last ``max_len`` (200) items;
* ``short-K``: the last K items;
* ``short-K+mean``: plus the plain mean of the model's own (trainable) item embeddings of every item older than
  the window (``ts < cut_ts``, the window's first item's time);
* ``short-K+dv365``: plus the DV365 embedding of every event older than the window, from a frozen
  :class:`DistantHistoryProvider` (``[58, D]`` tokens, int4-quantized and de-quantized as served).

Fusion of the extra (``mean``: one ``[d]`` token; ``dv365``: ``[58, D]`` tokens):

* ``prefix``: projected to P tokens of width d (dv365-adapters :class:`~dv365.adapters.LinearProjection` for
  DV365, a Linear for the mean: one token) and prepended to the sequence, before the padding;
* ``linear``: user vector + Linear(flattened extra), at every position;
* ``gate``: user vector + a dv365-adapters :class:`~dv365.adapters.GateNet` (element-wise embedding gate,
  one gated hidden layer) over the two fields [sequence user vector, Linear(flattened extra)].

A window without a distant history (an empty mean, or a user the provider has no embedding for: ``present``
False) gets a learned default in place of the extra (as dv365-adapters' ``DV365Input`` does for missing users;
``DV365Input`` itself takes the stored uint8 rows, while the provider serves de-quantized floats). DV365 tokens
are standardised per (row, dim) with statistics of the training windows' embeddings (``DV365Input``'s
``standardize``), so the projection sees the user-specific part at unit scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dv365.adapters import GateNet, GateNetConfig, LinearProjection
from dv365.core.quantize import RowFormat
from dv365.experiments.nextitem.encoders import EncoderConfig, build_encoder, l2norm

EXTRAS = ("none", "mean", "dv365")
FUSIONS = ("prefix", "linear", "gate")


@runtime_checkable
class DistantHistoryProvider(Protocol):
    """The DV365 side: the frozen embedding of each user's events before a cut time (``nextitem.distant``)."""

    out_tokens: int
    dim: int

    def embed(self, user_ids: np.ndarray, cut_ts: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """float ``[N, out_tokens, dim]`` (int4-quantized and de-quantized, as served) and present bool ``[N]``:
        the DV365 embedding of each user's events with ``ts < cut_ts[i]``."""
        ...


def arm_name(k: int | None, extra: str) -> str:
    if k is None:
        return "full"
    return f"short-{k}" + ("" if extra == "none" else f"+{extra}")


@dataclass(frozen=True)
class ModelConfig:
    """A next-item model: encoder + item table + learned positions + the extra's fusion.

    Args:
        encoder: the sequence encoder's sizes.
        num_items: catalogue size (codes 1..num_items; 0 is padding).
        max_len: window length L (learned positions ``[L, d]``).
        extra: ``none``, ``mean`` or ``dv365``.
        fusion: ``prefix``, ``linear`` or ``gate`` (ignored without an extra).
        dv365_tokens / dv365_dim: the provider's ``[out_tokens, dim]``.
        prefix_tokens: P, DV365 prefix tokens (the mean is always one token).
    """

    encoder: EncoderConfig
    num_items: int
    max_len: int
    extra: str = "none"
    fusion: str = "linear"
    dv365_tokens: int = 58
    dv365_dim: int = 16
    prefix_tokens: int = 4


class NextItemModel(nn.Module):
    """Item embeddings + learned positions -> encoder -> (fusion with the extra) -> user vectors ``[B, L, d]``.

    Args:
        cfg: a :class:`ModelConfig`.

    Example::

        m = NextItemModel(ModelConfig(EncoderConfig(), num_items=100, max_len=20, extra="dv365", fusion="gate"))
        batch = {"items": torch.randint(1, 101, (4, 20)), "ts": torch.zeros(4, 20, dtype=torch.long),
                 "valid": torch.ones(4, 20, dtype=torch.bool),
                 "dv365": torch.randn(4, 58, 16), "present": torch.ones(4, dtype=torch.bool)}
        m(batch).shape            # [4, 20, 50]: L2-normalised user vector at every position
        m.item_vectors().shape    # [101, 50]: L2-normalised item embeddings (row 0 = padding)
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.encoder.dim
        self.item_emb = nn.Embedding(cfg.num_items + 1, d, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=d**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.drop = nn.Dropout(cfg.encoder.dropout)
        self.encoder = build_encoder(cfg.encoder)
        self.extra = cfg.extra
        self.fusion = cfg.fusion if cfg.extra != "none" else "none"
        if cfg.extra == "none":
            return
        tokens, width = (1, d) if cfg.extra == "mean" else (cfg.dv365_tokens, cfg.dv365_dim)
        self.default = nn.Parameter(torch.zeros(tokens, width))  # the extra of a window without one
        self.register_buffer("extra_mean", torch.zeros(tokens, width))
        self.register_buffer("extra_std", torch.ones(tokens, width))
        if self.fusion == "prefix":
            p = 1 if cfg.extra == "mean" else cfg.prefix_tokens
            self.proj: nn.Module = (
                nn.Linear(d, d)
                if cfg.extra == "mean"
                else LinearProjection(p, d, RowFormat(dim=width, bits=8, rows_per_user=tokens))
            )
            self.prefix_pos = nn.Parameter(torch.zeros(p, d))
        elif self.fusion in ("linear", "gate"):
            self.proj = nn.Linear(tokens * width, d)
            if self.fusion == "gate":
                self.gate = GateNet(
                    GateNetConfig(
                        num_fields=2, embedding_dim=d, output_dim=d, hidden_dims=(d,), embedding_gate="element"
                    )
                )
        else:
            raise ValueError(f"fusion {cfg.fusion!r}: use one of {FUSIONS}")

    def fit_standardization(self, tokens: torch.Tensor, present: torch.Tensor) -> None:
        """DV365 only: per-(row, dim) mean / std of the present training embeddings ``[N, T, D]``."""
        x = tokens[present.bool()].to(torch.float64)
        if self.extra != "dv365" or len(x) < 2:
            return
        self.extra_mean.copy_(x.mean(0))
        self.extra_std.copy_(x.std(0, unbiased=False).clamp(min=1e-6))

    def item_vectors(self) -> torch.Tensor:
        return l2norm(self.item_emb.weight)

    def extra_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, T, W]``: the window's extra (standardised DV365 tokens, or the distant mean as one token),
        the learned default where there is none."""
        if self.extra == "mean":
            mean = F.embedding_bag(batch["bag"], self.item_emb.weight, batch["bag_offsets"], mode="mean")  # [B, d]
            x, present = mean[:, None], batch["bag_len"] > 0
        else:
            x = (batch["dv365"] - self.extra_mean) / self.extra_std
            present = batch["present"]
        return torch.where(present[:, None, None], x, self.default[None])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, L, d]`` L2-normalised user vectors, one per window position (the last one serves)."""
        items, valid, ts = batch["items"], batch["valid"], batch["ts"]
        B, L = items.shape
        x = self.item_emb(items) + self.pos_emb.weight[-L:][None]  # [B, L, d]
        x = self.drop(x) * valid[..., None].to(x.dtype)
        extra = self.extra_tokens(batch) if self.extra != "none" else None
        if self.fusion == "prefix":
            assert extra is not None
            pre = self.proj(extra) + self.prefix_pos[None]  # [B, P, d]
            P = pre.shape[1]
            first_ts = ts.masked_fill(~valid, torch.iinfo(ts.dtype).max).min(dim=1).values  # [B]
            first_ts = torch.where(valid.any(1), first_ts, torch.zeros_like(first_ts))
            x = torch.cat([self.drop(pre), x], dim=1)  # [B, P + L, d]
            valid = torch.cat([torch.ones(B, P, dtype=torch.bool, device=valid.device), valid], dim=1)
            ts = torch.cat([first_ts[:, None].expand(B, P), ts], dim=1)
            h = self.encoder(x, valid, ts)[:, P:]  # [B, L, d]
        else:
            h = self.encoder(x, valid, ts)  # [B, L, d]
        if self.fusion == "linear":
            assert extra is not None
            h = h + self.proj(extra.flatten(1))[:, None]
        elif self.fusion == "gate":
            assert extra is not None
            e = self.proj(extra.flatten(1))[:, None].expand(B, L, -1)  # [B, L, d]
            fields = torch.stack([h, e], dim=2).reshape(B * L, 2, -1)  # [B·L, 2, d]
            h = h + self.gate(fields).reshape(B, L, -1)
        return l2norm(h)
