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
* interaction: ``dot`` (torchrec ``InteractionArch``: pairwise dots + the dense embedding) or ``dcn``
  (``InteractionDCNArch`` with a low-rank DCN-v2 ``LowRankCrossNet``, :data:`DCN_LAYERS` layers of rank
  :data:`DCN_RANK`);
* over-arch: an MLP trunk shared by the tasks, then one linear head per task. The heads start at zero
  weight with a bias set from the training data (:meth:`MultiTaskDLRM.init_head_bias`: base-rate logits,
  target means), so step 0 predicts the base rates (NE = 1) instead of noise.

The baseline model (Table 1 "no DV365") is the same backbone built with ``user_tokens=None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from dv365.train.errors import TrainConfigError
from dv365.train.losses import TaskSpec

ITEM_FEATURES: tuple[str, ...] = ("item.media", "item.author", "item.topic", "item.media_type", "item.surface")
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
    """

    embedding_dim: int = 64
    item_hash_size: int = 100_003
    interaction: str = "dot"
    over_arch: tuple[int, ...] = (256, 128)
    token_mode: str = "interact"

    def __post_init__(self) -> None:
        if self.interaction not in ("dot", "dcn"):
            raise TrainConfigError(f"model.backbone.interaction = {self.interaction!r}: use dot or dcn")
        if self.token_mode not in ("interact", "flatten"):
            raise TrainConfigError(f"model.backbone.token_mode = {self.token_mode!r}: use interact or flatten")
        if self.embedding_dim < 1 or self.item_hash_size < 1 or not self.over_arch or min(self.over_arch) < 1:
            raise TrainConfigError(f"model.backbone: sizes must be >= 1 and over_arch non-empty, got {self}")


def item_embedding_configs(cfg: BackboneConfig) -> list[Any]:
    """One mean-pooled table per item feature (:data:`ITEM_FEATURES`)."""
    from torchrec import EmbeddingBagConfig
    from torchrec.modules.embedding_configs import PoolingType

    return [EmbeddingBagConfig(name=f.replace(".", "_"), embedding_dim=cfg.embedding_dim,
                               num_embeddings=SMALL_ITEM_TABLES.get(f, cfg.item_hash_size), feature_names=[f],
                               pooling=PoolingType.MEAN)
            for f in ITEM_FEATURES]


class MultiTaskDLRM(nn.Module):
    """Multi-task DLRM over item features, dense features and (optionally) the DV365 user tokens.

    Args:
        cfg: backbone sizes.
        num_dense: number of dense input features (x's and c's together).
        tasks: one head per task, in this order (the output columns).
        user_tokens: ``(N_out, D)`` of the user tower, or ``None`` for the baseline without DV365.

    Example::

        bb = MultiTaskDLRM(BackboneConfig(embedding_dim=64), num_dense=6, tasks=tasks, user_tokens=(58, 256))
        out = bb(item_kjt, dense, tokens)     # item KJT (B bags per ITEM_FEATURES key), [B, 6], [B, 58, 256]
        out.shape                             # [B, K]: a logit per binary task, a prediction per regression
    """

    def __init__(self, cfg: BackboneConfig, num_dense: int, tasks: Sequence[TaskSpec],
                 user_tokens: tuple[int, int] | None) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection
        from torchrec.models.dlrm import DenseArch, InteractionArch, InteractionDCNArch, SparseArch
        from torchrec.modules.crossnet import LowRankCrossNet
        from torchrec.modules.mlp import MLP

        E = cfg.embedding_dim
        self.cfg, self.task_names = cfg, [t.label for t in tasks]
        self.sparse_arch = SparseArch(EmbeddingBagCollection(tables=item_embedding_configs(cfg)))
        self.dense_arch = DenseArch(num_dense, [2 * E, E])
        n_tok, D = user_tokens if user_tokens is not None else (0, 0)
        self.interact_tokens = user_tokens is not None and cfg.token_mode == "interact"
        self.token_proj = nn.Linear(D, E) if self.interact_tokens else None
        F = len(ITEM_FEATURES) + (n_tok if self.interact_tokens else 0)
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

    def forward(self, item_kjt: Any, dense: torch.Tensor, user_tokens: torch.Tensor | None = None) -> torch.Tensor:
        d = self.dense_arch(dense)  # [B, E]
        s = self.sparse_arch(item_kjt)  # [B, F_x, E]
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
