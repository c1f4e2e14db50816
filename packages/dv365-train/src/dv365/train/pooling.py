"""Sparse lookup + (weighted) mean pooling of the sliced features (paper §2.2): KJT -> ``[B, N, D]`` tokens.

The slicer (``dv365.core.slicing``) already put per-sample weights on every bag (``count/len`` for mean
pooling, ``s / sum(s)`` for the Eq. 5 weighted feature), so a weighted torchrec ``EmbeddingBagCollection``
with SUM pooling over the shared tables of ``embedding_bag_configs(spec, D)`` computes the paper's pooling.
The EBC returns features grouped by table; :class:`SlicedPooling` reorders them to the spec's feature order,
which is the token order the user tower sees (and the exported embedding keeps).

Two forward paths give the same numbers (tested); which one runs is the module's own state, its pooling
``mode`` (as generative-recommenders keeps its kernel choice on the module), never flipped by callers:

* ``mode="auto"`` (default): ``grouped`` while gradients can be recorded (training, and evaluation under
  ``torch.no_grad``), ``per_feature`` under ``torch.inference_mode`` (dv365-export, serving-side inference),
  where it is faster;
* ``mode="grouped"``: per *table*, over all the features sharing it (the KJT is permuted so each
  table's features are contiguous): the batch's unique ids are read once (:func:`unique_ids` +
  ``F.embedding``), then one ``embedding_bag`` pools every bag of those features from the ``[U, D]``
  rows. With ~200 features in ~18 tables that is ~11x fewer calls, and each table's (sparse) gradient
  has one row per *unique id of the batch* instead of one per lookup (a 64-request batch of synth users
  with ~4K events made 1.24M lookups into tables whose distinct rows are bounded by the 7,583-item
  catalog) -- what fbgemm's TBE does for sharded tables, in plain PyTorch.
* ``mode="per_feature"``: torchrec's ``EmbeddingBagCollection.forward`` (one call per feature), the reference,
  and the path a torchrec sharding plan (DMP) replaces with its sharded EBC: once ``self.ebc`` is sharded
  (:mod:`~dv365.train.distributed`), this path is taken whatever the mode says. It is also the faster one
  without gradients (inference): the grouped path's unique-id pass and CSR product pay off in the backward
  only. ``dv365 bench tower`` (D = 256, 200K-row tables, 1 thread): pooling 168-187 users/s here vs 61-77
  grouped, hence ``auto``.

A KJT with ``inverse_indices`` (RecD dedup, :mod:`~dv365.train.dedup`) is pooled on its unique rows and
expanded to the batch rows at the end.

Both use the parameters of the same torchrec EBC (``ebc.embedding_bags.<table>.weight``).

:meth:`SlicedPooling.item_embeddings` looks a *target item's* ids up in those same tables (one table per id
type, :func:`shared_item_tables`): the backbone's ``share_item_tables`` option (DIN-style sharing between
the history and the candidate), so the tables get gradients from both paths.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection

from dv365.core.kjt import embedding_bag_configs
from dv365.core.slicing import SliceSpec
from dv365.train.errors import TrainConfigError

POOLING_MODES = ("auto", "grouped", "per_feature")


class SlicedPooling(nn.Module):
    """Weighted ``EmbeddingBagCollection`` over the sliced KJT, output ``[B, N, D]`` in spec feature order.

    Args:
        spec: the slice spec (``N = len(spec.features)`` features in its shared tables).
        dim: ``D``, the embedding dim of every table.
        device: where the tables are allocated (``"meta"`` for a sharded plan later).
        mode: ``"auto"`` (default), ``"grouped"`` or ``"per_feature"`` (see the module doc); ``set_mode`` changes it.
        grouped: the older switch: ``True`` is ``mode="grouped"``, ``False`` ``mode="per_feature"``.

    Example::

        pooling = SlicedPooling(SliceSpec.load_default("kuairand"), dim=256)
        kjt = Slicer(spec, vocab).slice(timelines, request_ts).to_kjt()   # one key per feature, B bags each
        pooling(kjt).shape                                                 # [B, 201, 256]
    """

    def __init__(
        self,
        spec: SliceSpec,
        dim: int,
        device: torch.device | str | None = None,
        grouped: bool | None = None,
        mode: str = "auto",
    ) -> None:
        super().__init__()
        self.feature_names: list[str] = spec.feature_names
        self.num_tokens, self.dim = len(self.feature_names), dim
        tables = embedding_bag_configs(spec, dim)
        self.ebc = EmbeddingBagCollection(
            tables=tables, is_weighted=True, device=torch.device(device) if device is not None else None
        )
        ebc_order = {name: i for i, name in enumerate(n for t in tables for n in t.feature_names)}
        perm = torch.tensor([ebc_order[name] for name in self.feature_names], dtype=torch.long)
        self.register_buffer("perm", perm, persistent=False)  # EBC (table-grouped) position of each token
        self.mode = "auto"
        self.set_mode(mode if grouped is None else ("grouped" if grouped else "per_feature"))
        self._ebc_features = [list(t.feature_names) for t in tables]
        self._kjt_keys: list[str] | None = None
        self._kjt_perm: list[int] = []
        self._out_keys: list[str] | None = None
        self._out_perm = perm
        self.id_types = {t.name: t.id_type for t in spec.tables.values()}

    def set_mode(self, mode: str) -> SlicedPooling:
        """Sets the pooling ``mode`` (``auto``, ``grouped`` or ``per_feature``); returns ``self``."""
        if mode not in POOLING_MODES:
            raise TrainConfigError(f"pooling mode {mode!r}: use one of {POOLING_MODES}")
        self.mode = mode
        return self

    @property
    def grouped(self) -> bool:
        """Whether the next forward takes the table-grouped path (the mode, resolved for the current context)."""
        if self.mode == "auto":
            return not torch.is_inference_mode_enabled()
        return self.mode == "grouped"

    @grouped.setter
    def grouped(self, value: bool) -> None:  # the older switch
        self.set_mode("grouped" if value else "per_feature")

    def forward(self, kjt: Any) -> torch.Tensor:
        from dv365.train.dedup import expand, strip_inverse

        kjt, inverse = strip_inverse(kjt)  # a deduplicated KJT: pool its U rows, then expand to B
        if not self.grouped or not isinstance(self.ebc, EmbeddingBagCollection):  # the reference, or sharded (DMP)
            kt = self.ebc(kjt)  # KeyedTensor [U, N*D]: features grouped by table (a sharded EBC may order them
            pooled = kt.values()  # differently: its keys say how)
            U = pooled.shape[0]
            out = pooled.view(U, self.num_tokens, self.dim).index_select(1, self._token_perm(kt.keys()))  # [U, N, D]
        else:
            out = self._grouped_forward(kjt)
        return expand(out, inverse)  # [B, N, D]

    def item_embeddings(self, item_kjt: Any, lookups: Sequence[tuple[str, str]]) -> torch.Tensor:
        """The target items' ``[B, S, D]`` embeddings from this tower's tables, one per ``(id type, table)`` of
        ``lookups`` (:func:`shared_item_tables`): the mean of the table's rows of the item KJT key
        ``shared.item.<id type>`` (ids hashed like the history, ``id % hash_size``; several topics are
        averaged, an empty bag (unknown author) gives zeros). Gradients reach those tables (sparse ones when
        the tables are sparse), which the sliced features read too.

        Example::

            lookups = shared_item_tables(spec, "main")   # [("media", "explicit_pos_media"), ...]
            pooling.item_embeddings(batch.item_kjt, lookups).shape   # [B, 3, D]
        """
        if not isinstance(self.ebc, EmbeddingBagCollection):
            raise TrainConfigError(
                "model.backbone.share_item_tables: the tower's tables are sharded (DMP); "
                "item lookups into them are only supported unsharded"
            )
        d = item_kjt.to_dict()
        outs = []
        for id_type, table in lookups:
            key = f"shared.item.{id_type}"
            if key not in d or self.id_types.get(table) != id_type:
                raise TrainConfigError(
                    f"model.backbone.share_item_tables: no item key {key!r} or no {id_type!r} "
                    f"table {table!r} in the slice spec (tables: {self.id_types})"
                )
            bag = self.ebc.embedding_bags[table]
            jt = d[key]
            outs.append(
                F.embedding_bag(
                    jt.values(), bag.weight, jt.offsets(), mode="mean", sparse=bag.sparse, include_last_offset=True
                )
            )  # [B, D]
        return torch.stack(outs, dim=1)  # [B, S, D]

    def _token_perm(self, keys: list[str]) -> torch.Tensor:
        """Position in ``keys`` (an EBC output's key order) of each token, in spec order."""
        if list(keys) == [n for names in self._ebc_features for n in names]:
            return self.perm
        if self._out_keys != list(keys):
            pos = {k: i for i, k in enumerate(keys)}
            self._out_perm = torch.tensor(
                [pos[f] for f in self.feature_names], dtype=torch.long, device=self.perm.device
            )
            self._out_keys = list(keys)
        return self._out_perm

    def _grouped_forward(self, kjt: Any) -> torch.Tensor:
        keys = kjt.keys()
        if keys != self._kjt_keys:
            pos = {k: i for i, k in enumerate(keys)}
            self._kjt_perm = [pos[f] for names in self._ebc_features for f in names]
            self._kjt_keys = list(keys)
        g = kjt.permute(self._kjt_perm)  # each table's features now contiguous, in EBC order
        B = g.stride()
        values, weights, lengths, opk = g.values(), g.weights(), g.lengths(), g.offset_per_key()
        outs, f0 = [], 0
        for bag, names in zip(self.ebc.embedding_bags.values(), self._ebc_features):
            f1 = f0 + len(names)
            offsets = F.pad(lengths[f0 * B : f1 * B].long().cumsum(0), (1, 0))  # [nf*B + 1]
            ids, inverse = unique_ids(values[opk[f0] : opk[f1]], bag.num_embeddings)  # [U], [L]
            rows = F.embedding(ids, bag.weight, sparse=bag.sparse)  # [U, D]: each row read once per batch
            outs.append(bag_sums(rows, inverse, offsets, weights[opk[f0] : opk[f1]]))  # [nf*B, D]
            f0 = f1
        pooled = torch.cat(outs).view(self.num_tokens, B, self.dim)  # [N, B, D], EBC order
        return pooled.transpose(0, 1).index_select(1, self.perm)  # [B, N, D] in spec order


def bag_sums(rows: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[bags, D]``: bag ``j`` = ``sum_i weights[i] * rows[index[i]]`` over ``offsets[j] <= i < offsets[j+1]``.

    The same numbers as ``F.embedding_bag(index, rows, offsets, mode="sum", per_sample_weights=weights,
    include_last_offset=True)`` (tested, gradients included), computed on the CPU as a CSR sparse ``[bags, U]``
    times dense ``[U, D]`` product whose backward is the product with the transposed CSR, built by a stable
    sort of ``index`` (:class:`_CsrBagSums`): 9 ms instead of embedding_bag's 32 ms forward + backward for
    150K lookups into 2K rows (1 thread). On other devices ``embedding_bag`` is used. The weights get no
    gradient (they are data: the slicer's count / score weights).
    """
    if rows.device.type != "cpu" or not rows.dtype.is_floating_point:
        return F.embedding_bag(index, rows, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True)
    return _CsrBagSums.apply(rows, index, offsets, weights.to(rows.dtype))  # type: ignore[no-any-return]


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta" / "invariant checks are disabled", once per process
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=shape)


class _CsrBagSums(torch.autograd.Function):
    """``S @ rows`` with ``S`` the CSR matrix of the bags; backward ``S^T @ grad`` (no gradient for the weights)."""

    @staticmethod
    def forward(
        ctx: Any, rows: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(index, offsets, weights)
        ctx.num_rows = rows.shape[0]
        return _csr(offsets, index, weights, (len(offsets) - 1, rows.shape[0])) @ rows  # [bags, D]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        index, offsets, weights = ctx.saved_tensors
        U, bags = ctx.num_rows, len(offsets) - 1
        order = torch.argsort(index, stable=True)  # S^T in CSR: lookups grouped by row
        bag = torch.repeat_interleave(torch.arange(bags, device=index.device), offsets.diff())  # bag of each lookup
        crow = F.pad(torch.bincount(index, minlength=U).cumsum(0), (1, 0))
        return _csr(crow, bag[order], weights[order], (U, bags)) @ grad.contiguous(), None, None, None  # [U, D]


def shared_item_tables(spec: SliceSpec, mode: str = "main") -> list[tuple[str, str]]:
    """``(id type, table)`` of each lookup of a target item's ids in the tables of ``spec``
    (``model.backbone.share_item_tables``): ``main``: per id type, the table shared by the most features of
    that id type (kuairand: ``explicit_pos_*``; ties: the first in the spec); ``all``: every table, in spec
    order; ``none``: no lookup."""
    if mode == "none":
        return []
    if mode == "all":
        return [(t.id_type, t.name) for t in spec.tables.values()]
    if mode != "main":
        raise TrainConfigError(f"model.backbone.share_item_tables = {mode!r}: use none, main or all")
    best: dict[str, tuple[int, str]] = {}
    for t in spec.tables.values():
        if t.id_type not in best or len(t.features) > best[t.id_type][0]:
            best[t.id_type] = (len(t.features), t.name)
    return [(k, name) for k, (_, name) in best.items()]


def unique_ids(values: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(values, return_inverse=True)`` for ids in ``[0, num_rows)``, without a sort: a presence
    mask over the table's rows (O(L + rows)); ids come out ascending, like ``torch.unique``'s."""
    present = torch.zeros(num_rows, dtype=torch.bool, device=values.device)
    present[values] = True
    ids = present.nonzero().squeeze(1)  # [U] ascending
    remap = torch.empty(num_rows, dtype=torch.long, device=values.device)
    remap[ids] = torch.arange(len(ids), device=values.device)
    return ids, remap[values]  # [U], [L]


def embedding_bags(module: nn.Module) -> Iterator[nn.EmbeddingBag]:
    """Every ``nn.EmbeddingBag`` inside ``module`` (the tables of unsharded torchrec EBCs)."""
    for m in module.modules():
        if isinstance(m, nn.EmbeddingBag):
            yield m


def use_sparse_gradients(module: nn.Module, enabled: bool = True) -> None:
    """Makes every embedding table of ``module`` produce sparse gradients (only the rows a batch read).

    Unsharded torchrec EBCs hold plain ``nn.EmbeddingBag`` tables whose forward passes ``self.sparse`` to
    ``F.embedding_bag``; a sparse-aware optimizer (Adagrad, SparseAdam, SGD) then touches those rows only.
    Sharded training (DMP) replaces this with fbgemm's fused optimizers.
    """
    for bag in embedding_bags(module):
        bag.sparse = enabled
