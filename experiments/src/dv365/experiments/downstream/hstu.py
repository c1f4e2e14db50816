"""An HSTU sequence encoder in plain PyTorch, written from the HSTU paper (Zhai et al. 2024, arXiv 2402.17152).

One HSTU layer (paper Eq. 1-3)::

    U, V, Q, K = Split(SiLU(f1(LayerNorm(X))))            # pointwise projection
    A(X) V(X)  = SiLU(Q K^T + rab^{p,t}) V / n             # pointwise (not softmax) attention, causal
    Y          = f2(LayerNorm(A(X) V(X)) ⊙ U(X))           # gating by U
    X         <- X + Y

``rab^{p,t}`` is a learned relative attention bias: one term per bucket of the relative position
``i - j`` and one per bucket of the time gap ``t_i - t_j`` (both log-bucketed, so any length works), shared
by the heads. ``n`` is the padded sequence length (the paper / GR divide by the sequence length instead of a
softmax normalisation).

Sequences are **right-aligned** ``[B, L, D]`` with a ``valid [B, L]`` mask (padding at the front): the last
position is every sequence's last token (the ranking target, or the latest event), whose output is the
summary. Two attention paths give the same numbers (``tests/experiments/test_hstu.py``):

* ``chunk = 0``: the dense reference, ``[B, H, L, L]`` scores at once (O(L²) memory);
* ``chunk = C``: queries in blocks of ``C`` rows, keys up to the block's end (causal), O(C·L) memory. Time
  stays O(L²): this is what lets the encoders experiment *measure* HSTU's cost at long lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HSTUConfig:
    """Sizes of an :class:`HSTUEncoder`.

    Args:
        dim: model width D (input and output).
        num_layers: HSTU layers.
        num_heads: heads H.
        qk_dim: per-head query / key width.
        v_dim: per-head value (and gate U) width.
        position_buckets / time_buckets: log buckets of the relative position / time-gap bias.
        dropout: on each layer's output.
        chunk: query block size of the attention (0: dense reference).
    """

    dim: int = 32
    num_layers: int = 2
    num_heads: int = 2
    qk_dim: int = 16
    v_dim: int = 16
    position_buckets: int = 32
    time_buckets: int = 32
    dropout: float = 0.0
    chunk: int = 0


def log_bucket(x: torch.Tensor, buckets: int, base: float = 2.0) -> torch.Tensor:
    """``min(floor(log_base(1 + |x|)), buckets - 1)`` as int64 (relative position / seconds -> bucket)."""
    b = torch.floor(torch.log1p(x.abs().to(torch.float32)) / math.log(base))
    return b.clamp(0, buckets - 1).to(torch.int64)


class RelativeBias(nn.Module):
    """``rab^{p,t}``: learned bias per log-bucket of ``i - j`` plus per log-bucket of ``t_i - t_j`` (seconds).

    Args:
        position_buckets: buckets of the relative position.
        time_buckets: buckets of the time gap (base 2 in log seconds: bucket 20 is ~12 days).

    Example::

        rab = RelativeBias(32, 32)
        ts = torch.arange(5)[None].expand(2, 5)     # [B, L]
        rab(torch.arange(5), torch.arange(5), ts, ts).shape   # [2, 5, 5]
    """

    def __init__(self, position_buckets: int, time_buckets: int) -> None:
        super().__init__()
        self.position_buckets, self.time_buckets = position_buckets, time_buckets
        self.pos = nn.Parameter(torch.zeros(position_buckets))
        self.time = nn.Parameter(torch.zeros(time_buckets))

    def buckets(self, q0: int, q1: int, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket indices of query rows ``[q0, q1)`` over keys ``[0, q1)``: position ``[Lq, Lk]``, time
        ``[B, Lq, Lk]`` (``ts [B, L]``)."""
        pos = torch.arange(q1, device=ts.device)
        pb = log_bucket(pos[q0:q1, None] - pos[None, :], self.position_buckets)
        tb = log_bucket(ts[:, q0:q1, None] - ts[:, None, :q1], self.time_buckets)
        return pb, tb

    def bias(self, pb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        return self.time[tb] + self.pos[pb][None]  # [B, Lq, Lk]

    def forward(self, qpos: torch.Tensor, kpos: torch.Tensor, qts: torch.Tensor, kts: torch.Tensor) -> torch.Tensor:
        """qpos ``[Lq]``, kpos ``[Lk]`` positions; qts ``[B, Lq]``, kts ``[B, Lk]`` -> ``[B, Lq, Lk]``."""
        p = self.pos[log_bucket(qpos[:, None] - kpos[None, :], self.position_buckets)]  # [Lq, Lk]
        t = self.time[log_bucket(qts[:, :, None] - kts[:, None, :], self.time_buckets)]  # [B, Lq, Lk]
        return t + p[None]


class HSTULayer(nn.Module):
    """One HSTU layer (module docstring). Input / output ``[B, L, D]``.

    Args:
        cfg: an :class:`HSTUConfig`.

    Example::

        layer = HSTULayer(HSTUConfig(dim=32))
        x, valid = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.bool)
        ts = torch.arange(6)[None].expand(2, 6)
        layer(x, valid, ts).shape      # [2, 6, 32]
    """

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        H = cfg.num_heads
        self.cfg = cfg
        self.norm_in = nn.LayerNorm(cfg.dim)
        self.f1 = nn.Linear(cfg.dim, H * (2 * cfg.v_dim + 2 * cfg.qk_dim))
        self.norm_av = nn.LayerNorm(H * cfg.v_dim)
        self.f2 = nn.Linear(H * cfg.v_dim, cfg.dim)
        self.rab = RelativeBias(cfg.position_buckets, cfg.time_buckets)
        self.dropout = nn.Dropout(cfg.dropout)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor,
        ts: torch.Tensor,
        q0: int,
        q1: int,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """Attention output of query rows ``[q0, q1)`` over keys ``[0, q1)`` (causal): ``[B, q1-q0, H*dv]``.

        ``cache`` (dense path only): the bias buckets and the mask of ``(q0, q1)`` depend only on positions /
        timestamps, so the encoder computes them once and shares them between its layers."""
        B, L = valid.shape
        key = (q0, q1)
        if cache is not None and key in cache:
            pb, tb, maskf = cache[key]
        else:
            pb, tb = self.rab.buckets(q0, q1, ts)
            pos = torch.arange(L, device=q.device)
            causal = pos[q0:q1, None] >= pos[None, :q1]  # [Lq, Lk]
            maskf = ((causal[None] & valid[:, None, :q1]).to(q.dtype) / L)[:, None]  # [B, 1, Lq, Lk]
            if cache is not None:
                cache[key] = (pb, tb, maskf)
        scores = torch.einsum("bqhd,bkhd->bhqk", q[:, q0:q1], k[:, :q1])  # [B, H, Lq, Lk]
        scores = scores + self.rab.bias(pb, tb)[:, None]
        attn = F.silu(scores) * maskf  # [B, H, Lq, Lk]
        out = torch.einsum("bhqk,bkhd->bqhd", attn, v[:, :q1])  # [B, Lq, H, dv]
        return out.reshape(B, q1 - q0, -1)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, ts: torch.Tensor, q_from: int = 0, cache: dict | None = None
    ) -> torch.Tensor:
        """``[B, L, D]`` -> ``[B, L - q_from, D]``: the outputs of positions ``q_from..L-1`` (every position
        is still a key / value; ``q_from = L - 1`` gives the last position only, for the top layer)."""
        B, L, _ = x.shape
        c = self.cfg
        H = c.num_heads
        uvqk = F.silu(self.f1(self.norm_in(x)))  # [B, L, H*(2dv+2dqk)]
        u, v, q, k = torch.split(uvqk, [H * c.v_dim, H * c.v_dim, H * c.qk_dim, H * c.qk_dim], dim=-1)
        v = v.reshape(B, L, H, c.v_dim)
        q = q.reshape(B, L, H, c.qk_dim)
        k = k.reshape(B, L, H, c.qk_dim)
        step = c.chunk if c.chunk > 0 else L
        av = torch.cat(
            [self._attend(q, k, v, valid, ts, s, min(s + step, L), cache) for s in range(q_from, L, step)], dim=1
        )
        y = self.f2(self.norm_av(av) * u[:, q_from:])  # [B, L - q_from, D]
        return x[:, q_from:] + self.dropout(y)


class HSTUEncoder(nn.Module):
    """A stack of :class:`HSTULayer` with a final LayerNorm; ``[B, L, D]`` -> ``[B, L, D]``.

    Args:
        cfg: an :class:`HSTUConfig`.

    Example::

        enc = HSTUEncoder(HSTUConfig(dim=32, num_layers=2))
        x = torch.randn(4, 10, 32)                                  # [B, L, D] right-aligned
        valid = torch.arange(10)[None] >= torch.tensor([[0], [3], [9], [5]])   # padding at the front
        ts = torch.arange(10)[None].expand(4, 10) * 60
        enc(x, valid, ts)[:, -1].shape                              # [4, 32]: each sequence's summary
    """

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([HSTULayer(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, ts: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``[B, L, D]`` -> ``[B, L, D]``; ``last_only``: ``[B, 1, D]``, the last position's output only (the
        same numbers: the top layer computes only its last query row, which is all a summary needs)."""
        L = x.shape[1]
        x = x * valid[..., None].to(x.dtype)
        cache: dict | None = {} if self.cfg.chunk <= 0 or self.cfg.chunk >= L else None  # dense: share buckets
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x, valid, ts, q_from=L - 1 if last_only and i == n - 1 else 0, cache=cache)
        if last_only and n == 0:
            x = x[:, -1:]
        return self.norm_out(x)


def right_align(
    values: torch.Tensor, offsets: torch.Tensor, timestamps: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jagged ``values [ΣL, D]`` (user-major, ``offsets [B+1]``) -> right-aligned ``[B, length, D]``, ``valid``
    and timestamps; each user's last ``length`` rows are kept (no Python loop over users)."""
    B = offsets.numel() - 1
    lens = (offsets[1:] - offsets[:-1]).to(torch.int64)  # [B]
    keep = lens.clamp(max=length)
    col = torch.arange(length, device=values.device)[None, :]  # [1, length]
    valid = col >= (length - keep)[:, None]  # [B, length]
    src = offsets[:-1, None].to(torch.int64) + lens[:, None] - length + col  # [B, length]
    src = torch.where(valid, src, torch.zeros_like(src))
    out = values[src.reshape(-1)].reshape(B, length, -1) * valid[..., None].to(values.dtype)
    t = torch.where(valid, timestamps[src.reshape(-1)].reshape(B, length), torch.zeros_like(src))
    return out, valid, t
