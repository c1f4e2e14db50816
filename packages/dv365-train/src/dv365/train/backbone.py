"""The backbone simulation network (paper §2.3.1, Eq. 10): a multi-task DLRM ``Phi_phi(eta(E), x, c)``.

torchrec's ``DLRM`` is single-task and has no user-tower input, so the arches are composed here:

* **x**, the target item: sparse ids (:data:`ITEM_FEATURES`: media, author, topics, media type, surface)
  through a small mean-pooled ``EmbeddingBagCollection`` (torchrec ``SparseArch``) -> ``[B, F_x, E]``, and
  dense item features;
* **c**, other user / request features (dense); x's and c's dense values go through ``DenseArch`` -> ``[B, E]``
  (which ones: :func:`dv365.train.data.dense_features`);
* the DV365 user tokens ``[B, N_out, D]``: ``token_mode: interact`` projects each token to ``E`` with one
  shared ``Linear(D, E)`` and appends them to the sparse embeddings of the interaction (the downstream
  "linear projection, concatenated with the other sparse embeddings" style); ``token_mode: flatten``
  appends the flattened tokens ``[B, N_out*D]`` to the interaction's output instead;
* ``share_item_tables`` (``main`` or ``all``): the target item's media / author / topic ids are looked up in
  the user tower's history tables of the same id type (DIN-style; the paper shares tables across sliced
  features) instead of the backbone's own tables: the caller passes those ``[B, S, D]`` embeddings
  (:data:`SHARED_ITEM_FEATURES`, :func:`dv365.train.pooling.shared_item_tables`: ``main`` = one table per id
  type, ``all`` = every table), they go through the same ``Linear(D, E)`` as the tokens, so "does the
  target's topic appear in my history" is a dot product of rows of one table from step 0. The baseline
  (no tower) keeps its own item tables;
* interaction: ``dot`` (torchrec ``InteractionArch``: pairwise dots + the dense embedding) or ``dcn``
  (``InteractionDCNArch`` with a low-rank DCN-v2 ``LowRankCrossNet``, :data:`DCN_LAYERS` layers of rank
  :data:`DCN_RANK`);
* over-arch: an MLP trunk shared by the tasks, then one linear head per task. The heads start at zero
  weight with a bias set from the training data (:meth:`MultiTaskDLRM.init_head_bias`: base-rate logits,
  target means), so step 0 predicts the base rates (NE = 1) instead of noise.

The baseline model (Table 1 "no DV365") is the same backbone built with ``user_tokens=None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dv365.train.errors import TrainConfigError
from dv365.train.losses import TaskSpec

ITEM_FEATURES: tuple[str, ...] = ("item.media", "item.author", "item.topic", "item.media_type", "item.surface")
# item-KJT keys of the target's ids hashed like the history (``id % spec hash size``), per id type: what a
# tower-sharing backbone looks up in the user tower's tables instead of its own item.media/author/topic tables
SHARED_ITEM_FEATURES: dict[str, str] = {
    "shared.item.media": "media",
    "shared.item.author": "author",
    "shared.item.topic": "topic",
}
OWN_WHEN_SHARED = {"item.media": "media", "item.author": "author", "item.topic": "topic"}
# rows of the item tables that are not cfg.item_hash_size (media type / surface are vocabulary codes)
SMALL_ITEM_TABLES = {"item.topic": 1009, "item.media_type": 16, "item.surface": 16}
DCN_LAYERS = 3
DCN_RANK = 64


@dataclass(frozen=True)
class BackboneConfig:
    """Sizes of the DLRM backbone.

    Args:
        embedding_dim: ``E``, dim of the item embeddings, the dense embedding and the projected tokens.
        item_hash_size: rows of the item media / author tables (ids are hashed ``id % rows``).
        interaction: ``dot`` or ``dcn``.
        over_arch: hidden sizes of the shared over-arch MLP trunk.
        token_mode: how the DV365 tokens enter: ``interact`` (projected to E, part of the interaction) or
            ``flatten`` (concatenated after the interaction).
        share_item_tables: ``none`` (own item tables), ``main`` or ``all``: look the target item's media /
            author / topic up in the user tower's history tables (``main``: the table of each id type shared
            by the most features; ``all``: every table of the id type, one embedding each;
            :func:`dv365.train.pooling.shared_item_tables`) instead of own tables. YAML ``true`` = ``main``.
            Only for models with a tower; the baseline keeps its own tables. The exported tower is unchanged.
    """

    embedding_dim: int = 64
    item_hash_size: int = 100_003
    interaction: str = "dot"
    over_arch: tuple[int, ...] = (256, 128)
    token_mode: str = "interact"
    share_item_tables: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.share_item_tables, bool):  # YAML true / false
            object.__setattr__(self, "share_item_tables", "main" if self.share_item_tables else "none")
        if self.share_item_tables not in ("none", "main", "all"):
            raise TrainConfigError(
                f"model.backbone.share_item_tables = {self.share_item_tables!r}: use none, main or all (true = main)"
            )
        if self.interaction not in ("dot", "dcn"):
            raise TrainConfigError(f"model.backbone.interaction = {self.interaction!r}: use dot or dcn")
        if self.token_mode not in ("interact", "flatten"):
            raise TrainConfigError(f"model.backbone.token_mode = {self.token_mode!r}: use interact or flatten")
        if self.embedding_dim < 1 or self.item_hash_size < 1 or not self.over_arch or min(self.over_arch) < 1:
            raise TrainConfigError(f"model.backbone: sizes must be >= 1 and over_arch non-empty, got {self}")


def item_embedding_configs(cfg: BackboneConfig, shared_id_types: Sequence[str] = ()) -> list[Any]:
    """One mean-pooled table per item feature (:data:`ITEM_FEATURES`), except those whose id type is in
    ``shared_id_types`` (looked up in the user tower's tables instead)."""
    from torchrec import EmbeddingBagConfig
    from torchrec.modules.embedding_configs import PoolingType

    return [
        EmbeddingBagConfig(
            name=f.replace(".", "_"),
            embedding_dim=cfg.embedding_dim,
            num_embeddings=SMALL_ITEM_TABLES.get(f, cfg.item_hash_size),
            feature_names=[f],
            pooling=PoolingType.MEAN,
        )
        for f in own_item_features(shared_id_types)
    ]


def own_item_features(shared_id_types: Sequence[str] = ()) -> list[str]:
    """The :data:`ITEM_FEATURES` the backbone looks up in its own tables."""
    return [f for f in ITEM_FEATURES if OWN_WHEN_SHARED.get(f) not in set(shared_id_types)]


class MultiTaskDLRM(nn.Module):
    """Multi-task DLRM over item features, dense features and (optionally) the DV365 user tokens.

    Args:
        cfg: backbone sizes.
        num_dense: number of dense input features (x's and c's together).
        tasks: one head per task, in this order (the output columns).
        user_tokens: ``(N_out, D)`` of the user tower, or ``None`` for the baseline without DV365.
        shared_lookups: ``(id type, tower table)`` of each ``[B, S, D]`` target-item embedding the caller
            passes (``item_shared``, from the tower's tables; ``cfg.share_item_tables``; needs ``user_tokens``);
            the backbone has no own table for those id types (``media``, ``author``, ``topic``).

    Example::

        bb = MultiTaskDLRM(BackboneConfig(embedding_dim=64), num_dense=6, tasks=tasks, user_tokens=(58, 256))
        out = bb(item_kjt, dense, tokens)     # item KJT (B bags per ITEM_FEATURES key), [B, 6], [B, 58, 256]
        out.shape                             # [B, K]: a logit per binary task, a prediction per regression
    """

    def __init__(
        self,
        cfg: BackboneConfig,
        num_dense: int,
        tasks: Sequence[TaskSpec],
        user_tokens: tuple[int, int] | None,
        shared_lookups: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection
        from torchrec.models.dlrm import DenseArch, InteractionArch, InteractionDCNArch, SparseArch
        from torchrec.modules.crossnet import LowRankCrossNet
        from torchrec.modules.mlp import MLP

        E = cfg.embedding_dim
        self.cfg, self.task_names = cfg, [t.label for t in tasks]
        if shared_lookups and user_tokens is None:
            raise TrainConfigError("model.backbone.share_item_tables needs a user tower (the baseline has none)")
        self.shared_lookups = tuple((str(i), str(t)) for i, t in shared_lookups)
        shared_id_types = sorted({i for i, _ in self.shared_lookups})
        self.sparse_arch = SparseArch(EmbeddingBagCollection(tables=item_embedding_configs(cfg, shared_id_types)))
        self.dense_arch = DenseArch(num_dense, [2 * E, E])
        n_tok, D = user_tokens if user_tokens is not None else (0, 0)
        self.interact_tokens = user_tokens is not None and cfg.token_mode == "interact"
        self.token_proj = nn.Linear(D, E) if self.interact_tokens else None
        # shared item rows live in the tower's D space: the tokens' projection (interact) or their own
        self.item_proj = nn.Linear(D, E) if shared_lookups and not self.interact_tokens else None
        F = len(own_item_features(shared_id_types)) + len(shared_lookups) + (n_tok if self.interact_tokens else 0)
        if cfg.interaction == "dot":
            self.interaction: nn.Module = InteractionArch(num_sparse_features=F)
            width = E + F * (F + 1) // 2
        else:
            cross = LowRankCrossNet(in_features=(F + 1) * E, num_layers=DCN_LAYERS, low_rank=DCN_RANK)
            self.interaction = InteractionDCNArch(num_sparse_features=F, crossnet=cross)
            width = (F + 1) * E
        if user_tokens is not None and not self.interact_tokens:
            width += n_tok * D
        self.over_arch = MLP(width, list(cfg.over_arch))
        self.heads = nn.ModuleDict({t.label: nn.Linear(cfg.over_arch[-1], 1) for t in tasks})
        for head in self.heads.values():  # start as the constant predictor (bias: init_head_bias)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(
        self,
        item_kjt: Any,
        dense: torch.Tensor,
        user_tokens: torch.Tensor | None = None,
        item_shared: torch.Tensor | None = None,
    ) -> torch.Tensor:
        d = self.dense_arch(dense)  # [B, E]
        s = self.sparse_arch(item_kjt)  # [B, F_x, E]
        if self.shared_lookups:
            if item_shared is None or item_shared.shape[1] != len(self.shared_lookups):
                raise TrainConfigError(
                    f"this backbone reads the item's ids in the user tower's tables "
                    f"{list(self.shared_lookups)}: pass item_shared [B, S, D] (DV365Model does)"
                )
            proj = self.token_proj if self.token_proj is not None else self.item_proj
            assert proj is not None
            s = torch.cat([s, proj(item_shared)], dim=1)  # [B, F_x + S, E]
        if user_tokens is not None and self.token_proj is not None:
            s = torch.cat([s, self.token_proj(user_tokens)], dim=1)  # [B, F_x + N_out, E]
        z = self.interaction(d, s)  # [B, I]
        if user_tokens is not None and self.token_proj is None:
            z = torch.cat([z, user_tokens.flatten(1)], dim=1)  # [B, I + N_out*D]
        h = self.over_arch(z)  # [B, H]
        return torch.cat([head(h) for head in self.heads.values()], dim=1)  # [B, K]

    @torch.no_grad()
    def init_head_bias(self, values: Sequence[float]) -> None:
        """Sets each head's bias (a base-rate logit for binary tasks, a target mean for regression)."""
        for head, v in zip(self.heads.values(), values):
            head.bias.fill_(float(v))
