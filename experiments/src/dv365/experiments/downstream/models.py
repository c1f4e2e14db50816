"""Downstream models of the experiments, plain PyTorch (no torchrec): they consume DV365 only through
dv365-adapters (:class:`~dv365.adapters.DV365Input`, :class:`~dv365.adapters.LinearProjection`,
:class:`~dv365.adapters.HSTUPrefix`, :class:`~dv365.adapters.GateNet`), as a downstream team would.

* :class:`DownstreamRanker` (Table 3): a multi-task DLRM whose user history (the last K events, no gap) is
  encoded by HSTU together with the target item; DV365 enters as ``no_projection`` (the de-quantized rows
  themselves, no learned projection: each row dotted with the model's other fields, or flattened after
  the interaction), ``linear`` (LinearProjection tokens in the dot interaction) or ``hstu_prefix`` (tokens
  prepended to the HSTU sequence); ``none`` is the control.
* :class:`TwoTower` (Table 4): user tower = HSTU over the history + request context (+ DV365 tokens) through
  a plain MLP (``linear``) or a GateNet (``gatenet``); item tower = id / author / topic embeddings.
* :class:`SliceEncoder` (App. C): mean pooling, learned position-weighted pooling or HSTU over one slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dv365.adapters import DV365Input, DV365InputConfig, GateNet, GateNetConfig, HSTUPrefix, LinearProjection
from dv365.experiments.downstream.context import ACTION_ROWS
from dv365.experiments.downstream.hstu import HSTUConfig, HSTUEncoder, right_align
from dv365.experiments.downstream.settings import NO_PROJECTION_MODES

DV365_MODES = ("none", "no_projection", "linear", "hstu_prefix", "gatenet")
NUM_DENSE = 6
TOPIC_ROWS = 1009


@dataclass(frozen=True)
class DownstreamConfig:
    """Sizes of a downstream model.

    Args:
        num_tasks: output columns (ranker) / retrieval heads (two-tower).
        embedding_dim: E.
        item_hash_size: rows of the media / author tables.
        hstu: the history encoder (``dim`` must be E).
        dv365: how DV365 enters (:data:`DV365_MODES`).
        row_format: the snapshot's row format (DV365 variants).
        proj_tokens: K of the projection / prefix.
        raw_tokens: how ``no_projection`` uses the N de-quantized rows: ``interact`` (each row is a field of
            the dot interaction, dotted with the model's own fields (item, dense, user) but not with the other
            DV365 rows, whose dots are the same for every request of a user; needs the DV365 dim = E) or
            ``flatten`` (the N·D values concatenated after the interaction, into the over-arch).
        standardize: standardise the DV365 tokens (``DV365InputConfig.standardize``; the statistics are set
            with ``model.dv_input.fit_standardization`` before training).
        dv365_dropout: in training, the share of examples whose DV365 input is dropped (read as a missing user:
            the learned default), so the model cannot lean on a per-user vector as on a user id.
        over_arch: ranker over-arch / two-tower user MLP hidden sizes.
        out_dim: two-tower embedding dim.
    """

    num_tasks: int
    embedding_dim: int = 16
    item_hash_size: int = 20011
    hstu: HSTUConfig = field(default_factory=HSTUConfig)
    dv365: str = "none"
    row_format: Any = None
    proj_tokens: int = 4
    raw_tokens: str = "interact"
    standardize: bool = False
    dv365_dropout: float = 0.0
    over_arch: tuple[int, ...] = (64, 32)
    out_dim: int = 32


class ItemEmbedding(nn.Module):
    """Target-item fields ``[B, 5, E]``: media, author, topic, media type, surface (ids hashed in the data)."""

    def __init__(self, E: int, H: int) -> None:
        super().__init__()
        self.media, self.author = nn.Embedding(H, E), nn.Embedding(H + 1, E)
        self.topic, self.media_type, self.surface = (
            nn.Embedding(TOPIC_ROWS, E),
            nn.Embedding(16, E),
            nn.Embedding(16, E),
        )
        for m in (self.media, self.author, self.topic, self.media_type, self.surface):
            nn.init.normal_(m.weight, std=0.05)

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(
            [
                self.media(b["media"]),
                self.author(b["author"]),
                self.topic(b["topic"]),
                self.media_type(b["media_type"]),
                self.surface(b["surface"]),
            ],
            dim=1,
        )


class HistoryEncoder(nn.Module):
    """History tokens (media + action embeddings, sharing the item media table) -> HSTU."""

    def __init__(self, cfg: HSTUConfig, media: nn.Embedding) -> None:
        super().__init__()
        self.media = media
        self.action = nn.Embedding(ACTION_ROWS, cfg.dim, padding_idx=0)
        nn.init.normal_(self.action.weight, std=0.05)
        self.hstu = HSTUEncoder(cfg)

    def tokens(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.media(b["h_media"]) + self.action(b["h_action"])  # [B, K, E]

    def encode(
        self,
        x: torch.Tensor,
        valid: torch.Tensor,
        ts: torch.Tensor,
        prefix: HSTUPrefix | None,
        dv_tokens: torch.Tensor | None,
    ) -> torch.Tensor:
        """Output at the last position of ``x [B, L, E]`` (right-aligned), optionally with DV365 tokens
        prepended through :class:`HSTUPrefix` (jagged, GR layout)."""
        if prefix is None:
            return self.hstu(x, valid, ts, last_only=True)[:, -1]
        lengths = valid.sum(1)  # [B]
        out = prefix(dv_tokens, x[valid], ts[valid], lengths=lengths)  # jagged, K tokens in front
        xs, vs, tss = right_align(out.values, out.offsets, out.timestamps, x.shape[1] + prefix.num_tokens)
        return self.hstu(xs, vs, tss, last_only=True)[:, -1]


def _dv365_input(cfg: DownstreamConfig) -> DV365Input:
    return DV365Input(DV365InputConfig(row_format=cfg.row_format, standardize=cfg.standardize))


def _dv365_features(model: nn.Module, b: dict[str, torch.Tensor]) -> Any:
    """The batch's DV365 features; in training, ``cfg.dv365_dropout`` of the examples read as missing users."""
    present = b["present"]
    p = model.cfg.dv365_dropout
    if model.training and p > 0:
        present = present & (torch.rand(present.shape, device=present.device) >= p)
    return model.dv_input(b["payload"], present, b["age_s"])


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class DownstreamRanker(nn.Module):
    """Multi-task DLRM with an HSTU short-history encoder and optional DV365 input (module docstring).

    Args:
        cfg: a :class:`DownstreamConfig` (``dv365`` in none / no_projection / linear / hstu_prefix).

    Example::

        m = DownstreamRanker(DownstreamConfig(num_tasks=3, hstu=HSTUConfig(dim=16)))
        out = m(batch)           # batch: Context.batch(rows) -> [B, 3] logits / predictions
    """

    def __init__(self, cfg: DownstreamConfig) -> None:
        super().__init__()
        E = cfg.embedding_dim
        self.cfg = cfg
        self.items = ItemEmbedding(E, cfg.item_hash_size)
        self.history = HistoryEncoder(cfg.hstu, self.items.media)
        self.target_marker = nn.Parameter(torch.zeros(E))
        use_dv = cfg.dv365 != "none"
        self.dv_input = _dv365_input(cfg) if use_dv else None
        self.dense = nn.Sequential(nn.Linear(NUM_DENSE + (2 if use_dv else 0), E), nn.ReLU())
        self.projection = LinearProjection(cfg.proj_tokens, E, cfg.row_format) if cfg.dv365 == "linear" else None
        self.prefix = (
            HSTUPrefix(E, cfg.proj_tokens, cfg.row_format, prefix_time="first_event")
            if cfg.dv365 == "hstu_prefix"
            else None
        )
        n_fields = 5 + 1 + 1 + (cfg.proj_tokens if self.projection is not None else 0)
        self.raw = cfg.raw_tokens if cfg.dv365 == "no_projection" else ""
        if self.raw and self.raw not in NO_PROJECTION_MODES:
            raise ValueError(f"DownstreamConfig.raw_tokens = {cfg.raw_tokens!r}: use one of {NO_PROJECTION_MODES}")
        if self.raw == "interact" and cfg.row_format.dim != E:
            raise ValueError(
                f"no_projection with raw_tokens = 'interact' dots the DV365 rows with the model's "
                f"embeddings: the DV365 dim ({cfg.row_format.dim}) must equal embedding_dim ({E}); "
                f"use raw_tokens = 'flatten' or the linear projection"
            )
        N = cfg.row_format.rows_per_user
        extra = {"interact": N * n_fields, "flatten": N * cfg.row_format.dim, "": 0}[self.raw]
        width = E + n_fields * (n_fields - 1) // 2 + extra
        self.over = _mlp((width, *cfg.over_arch))
        self.heads = nn.Linear(cfg.over_arch[-1] if cfg.over_arch else width, cfg.num_tasks)
        nn.init.zeros_(self.heads.weight)
        iu = torch.triu_indices(n_fields, n_fields, offset=1)
        self.register_buffer("_iu", iu, persistent=False)

    def init_head_bias(self, bias: Sequence[float]) -> None:
        with torch.no_grad():
            self.heads.bias.copy_(torch.tensor(list(bias), dtype=self.heads.bias.dtype))

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        item = self.items(b)  # [B, 5, E]
        dense_in = b["dense"]
        dv = None
        if self.dv_input is not None:
            dv = _dv365_features(self, b)
            dense_in = torch.cat([dense_in, dv.side], dim=1)
        dense = self.dense(dense_in)  # [B, E]
        target = item[:, 0] + item[:, 1] + item[:, 2] + self.target_marker  # [B, E]
        x = torch.cat([self.history.tokens(b), target[:, None]], dim=1)  # [B, K+1, E]
        valid = torch.cat([b["h_valid"], torch.ones_like(b["h_valid"][:, :1])], dim=1)
        ts = torch.cat([b["h_ts"], b["ts"][:, None]], dim=1)
        user = self.history.encode(x, valid, ts, self.prefix, dv.tokens if dv is not None else None)  # [B, E]
        fields = [item, dense[:, None], user[:, None]]
        if self.projection is not None:
            fields.append(self.projection(dv.tokens))  # [B, K, E]
        f = torch.cat(fields, dim=1)  # [B, F, E]
        dots = torch.bmm(f, f.transpose(1, 2))[:, self._iu[0], self._iu[1]]  # [B, F(F-1)/2]
        parts = [dense, dots]
        if self.raw == "interact":
            parts.append(torch.bmm(dv.tokens, f.transpose(1, 2)).flatten(1))  # [B, N·F]: each row · each field
        elif self.raw == "flatten":
            parts.append(dv.tokens.flatten(1))
        out: torch.Tensor = self.heads(self.over(torch.cat(parts, dim=1)))
        return out


class TwoTower(nn.Module):
    """Two-tower retrieval with one user embedding per task (module docstring).

    Args:
        cfg: a :class:`DownstreamConfig` (``dv365`` in none / linear / gatenet; ``over_arch`` = the user
            MLP's hidden sizes).

    Example::

        m = TwoTower(DownstreamConfig(num_tasks=2, hstu=HSTUConfig(dim=16), out_dim=32))
        u = m.user(batch)                       # [B, 2, 32], L2-normalised
        v = m.item(media, author, topic)        # [C, 32]
    """

    def __init__(self, cfg: DownstreamConfig) -> None:
        super().__init__()
        E = cfg.embedding_dim
        self.cfg = cfg
        self.items = ItemEmbedding(E, cfg.item_hash_size)
        self.item_proj = nn.Linear(3 * E, cfg.out_dim)
        self.history = HistoryEncoder(cfg.hstu, self.items.media)
        use_dv = cfg.dv365 != "none"
        self.dv_input = _dv365_input(cfg) if use_dv else None
        self.projection = LinearProjection(cfg.proj_tokens, E, cfg.row_format) if use_dv else None
        self.dense = nn.Sequential(nn.Linear(NUM_DENSE + (2 if use_dv else 0), E), nn.ReLU())
        n_fields = 2 + (cfg.proj_tokens if use_dv else 0)
        gated = cfg.dv365 == "gatenet"
        self.tower = GateNet(
            GateNetConfig(
                num_fields=n_fields,
                embedding_dim=E,
                output_dim=cfg.out_dim * cfg.num_tasks,
                hidden_dims=tuple(cfg.over_arch),
                embedding_gate="field" if gated else None,
                hidden_gate=gated,
            )
        )

    def item(self, media: torch.Tensor, author: torch.Tensor, topic: torch.Tensor) -> torch.Tensor:
        e = torch.cat([self.items.media(media), self.items.author(author), self.items.topic(topic)], dim=-1)
        return F.normalize(self.item_proj(e), dim=-1)

    def user(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        dense_in = b["dense"]
        fields = []
        if self.dv_input is not None:
            dv = _dv365_features(self, b)
            dense_in = torch.cat([dense_in, dv.side], dim=1)
        h = self.history.encode(self.history.tokens(b), b["h_valid"], b["h_ts"], None, None)  # [B, E]
        fields = [h[:, None], self.dense(dense_in)[:, None]]
        if self.projection is not None:
            fields.append(self.projection(dv.tokens))
        u = self.tower(torch.cat(fields, dim=1))  # [B, T*d]
        return F.normalize(u.reshape(u.shape[0], self.cfg.num_tasks, self.cfg.out_dim), dim=-1)


class SliceEncoder(nn.Module):
    """One slice (a user's events before request - 24 h, capped) -> ``[B, D]`` (App. C).

    ``mean``: mean of the event embeddings (``F.embedding_bag``, memory O(events));
    ``position``: ``Σ w_r e / Σ w_r`` with a learned weight ``w_r = exp(p_r)`` per recency rank r (the
    paper's "learn a positional weight for each item"; p = 0 at init = mean pooling);
    ``hstu``: :class:`HSTUEncoder` over the right-aligned sequence, output at the latest event.

    Args:
        kind: ``mean``, ``position`` or ``hstu``.
        dim: D.
        rows: media table rows.
        cap: the longest slice (position weights).
        hstu: HSTU sizes (``kind = hstu``).
    """

    def __init__(self, kind: str, dim: int, rows: int, cap: int, hstu: HSTUConfig | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(rows, dim)
        nn.init.normal_(self.emb.weight, std=0.05)
        self.pos = nn.Parameter(torch.zeros(cap)) if kind == "position" else None
        self.hstu = HSTUEncoder(hstu or HSTUConfig(dim=dim)) if kind == "hstu" else None

    def forward(self, s: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.hstu is not None:
            x = self.emb(s["seq"]) * s["valid"][..., None]
            return self.hstu(x, s["valid"], s["seq_ts"], last_only=True)[:, -1]
        ids, offsets, rank = s["ids"], s["offsets"], s["rank"]  # flat [n], [B+1], [n]
        B = offsets.numel() - 1
        seg = torch.repeat_interleave(torch.arange(B), offsets[1:] - offsets[:-1])
        w = torch.exp(self.pos[rank]) if self.pos is not None else torch.ones(ids.shape, dtype=torch.float32)
        denom = torch.zeros(B).index_add_(0, seg, w).clamp(min=1e-9)
        return F.embedding_bag(ids, self.emb.weight, offsets[:-1], mode="sum", per_sample_weights=w / denom[seg])


class EncoderModel(nn.Module):
    """A :class:`SliceEncoder` user vector + the target item -> one logit per task."""

    def __init__(self, encoder: SliceEncoder, dim: int, num_tasks: int) -> None:
        super().__init__()
        self.encoder, self.dim = encoder, dim
        self.mlp = nn.Sequential(nn.Linear(3 * dim, 32), nn.ReLU())
        self.heads = nn.Linear(32, num_tasks)
        nn.init.zeros_(self.heads.weight)

    def init_head_bias(self, bias: Sequence[float]) -> None:
        with torch.no_grad():
            self.heads.bias.copy_(torch.tensor(list(bias), dtype=self.heads.bias.dtype))

    def forward(self, s: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.score(self.encoder(s), s["target"])

    def score(self, u: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Logits from user vectors ``u`` [B, dim] (computed once per distinct history) and target item ids."""
        v = self.encoder.emb(target)
        return self.heads(self.mlp(torch.cat([u, v, u * v], dim=1)))  # type: ignore[no-any-return]


def head_bias(labels: torch.Tensor, tasks: Sequence[Any]) -> list[float]:
    """Base-rate logits (binary) / target means (regression) of the training labels (dv365-train's rule)."""
    from dv365.train.data import head_bias_from_labels

    return head_bias_from_labels(labels.cpu().numpy(), tasks)
