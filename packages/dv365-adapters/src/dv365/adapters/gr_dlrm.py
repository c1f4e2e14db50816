"""OPTIONAL: DV365 as a contextual feature of generative-recommenders' dlrm_v3 ranking model (``DlrmHSTU``).

Importable only where ``generative_recommenders`` (GR, commit ``6135bc3``) and its torchrec are; ``import
dv365.adapters`` never imports this module.

GR's ``DlrmHSTU`` takes its contextual features (``contextual_feature_to_max_length``) from its embedding
tables: ``preprocess`` looks the batch's KeyedJaggedTensors up, and ``_construct_payload`` turns
``seq_embeddings[name]`` (lengths, values) of every contextual feature into the ``seq_payloads`` its
``ContextualPreprocessor`` reads. :class:`DV365DlrmHSTU` is ``DlrmHSTU`` with one more such feature: its
``preprocess`` reads the batch's user ids (the one-id-per-user UIH feature ``user_id``), fetches their DV365 rows
from any :class:`dv365.core.lookup.EmbeddingReader` (a dv365-store client, a snapshot reader), de-quantizes them
(:class:`~dv365.adapters.DV365Input`: users the store lacks get the learned default embedding), projects them to
K tokens of ``hstu_embedding_table_dim`` (:class:`~dv365.adapters.LinearProjection`) and adds them as
``seq_embeddings[name]``. Everything after that is GR's own code path: its ``ContextualPreprocessor`` maps each
of the K positions to the HSTU dim and puts the tokens in front of the user's sequence, and its positional
encoder counts them (``contextual_seq_len`` = the sum of the model config's contextual lengths).

The two configs: GR's KuaiRand/MovieLens datasets build one KJT slot per name in the config's
``contextual_feature_to_max_length`` (``data[name]``) and reserve one sequence position per contextual feature,
so DV365 must not be in the dataset's config, and the dataset's ``max_seq_len`` must leave K positions for it.
:func:`model_config` is GR's config plus ``{name: K}`` (the model's), :func:`dataset_config` is GR's config with
``max_seq_len - K`` (the dataset's); ``DV365DlrmHSTU.dataset_hstu_config`` holds the latter.

Example::

    hstu_config = get_hstu_configs("kuairand-1k")             # GR's config, unchanged
    model = DV365DlrmHSTU(hstu_config, get_embedding_table_config("kuairand-1k"), is_inference=False,
                          dv365=DV365Feature(num_tokens=8), reader=open_store("lmdb:///srv/dv365"))
    dataset = DLRMv3KuaiRandDataset(hstu_config=model.dataset_hstu_config, ...)   # instead of hstu_config
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

try:
    from generative_recommenders.modules.dlrm_hstu import DlrmHSTU, DlrmHSTUConfig, SequenceEmbedding
except ImportError as exc:  # pragma: no cover - exercised only where GR is absent
    raise ImportError(
        "dv365.adapters.gr_dlrm needs generative-recommenders (commit 6135bc3) and torchrec on the path; see "
        "dv365.adapters.gr for how to install it"
    ) from exc

from dv365.adapters.dv365_input import DV365Input, DV365InputConfig
from dv365.adapters.errors import AdapterError
from dv365.adapters.fetch import fetch_dv365
from dv365.adapters.projection import LinearProjection

if TYPE_CHECKING:  # pragma: no cover
    from dv365.core.lookup import EmbeddingReader

__all__ = ["DV365Feature", "DV365DlrmHSTU", "dataset_config", "model_config"]


def _no_age() -> DV365InputConfig:
    return DV365InputConfig(use_age=False)


@dataclass(frozen=True)
class DV365Feature:
    """DV365 as one contextual feature of a ``DlrmHSTU``.

    Args:
        num_tokens: K, DV365 tokens in front of every user's sequence.
        name: the contextual-feature name (must not be a GR feature or embedding-table name).
        user_id_feature: the UIH feature holding each user's id (one id per user), the store's key. GR's
            datasets hash it (``id % num_embeddings`` of its table): the store must be keyed by the id that
            reaches the model.
        min_uih_length: GR's ``contextual_feature_to_min_uih_length`` for DV365 (users with a shorter
            sequence get zero DV365 inputs); 0: every user gets them.
        input: the :class:`~dv365.adapters.DV365InputConfig` (row format, learned default for missing users);
            DlrmHSTU has no dense-feature slot for its ``side`` output, so ``use_age`` is off by default.
    """

    num_tokens: int = 8
    name: str = "dv365"
    user_id_feature: str = "user_id"
    min_uih_length: int = 0
    input: DV365InputConfig = field(default_factory=_no_age)

    def __post_init__(self) -> None:
        if self.num_tokens <= 0:
            raise AdapterError(f"DV365Feature.num_tokens must be positive, got {self.num_tokens!r}")
        if self.min_uih_length < 0:
            raise AdapterError(f"DV365Feature.min_uih_length must be >= 0, got {self.min_uih_length!r}")


def _check(hstu_config: DlrmHSTUConfig, feature: DV365Feature) -> None:
    taken = {
        "contextual_feature_to_max_length": list(hstu_config.contextual_feature_to_max_length),
        "user_embedding_feature_names": hstu_config.user_embedding_feature_names,
        "item_embedding_feature_names": hstu_config.item_embedding_feature_names,
        "hstu_uih_feature_names": hstu_config.hstu_uih_feature_names,
    }
    for key, names in taken.items():
        if feature.name in names:
            raise AdapterError(
                f"DV365Feature.name={feature.name!r} is already in the GR config's {key} {names!r}: pass GR's "
                "config without DV365 (the model adds it) or choose another name"
            )
    if feature.user_id_feature not in hstu_config.hstu_uih_feature_names:
        raise AdapterError(
            f"DV365Feature.user_id_feature={feature.user_id_feature!r} is not one of the GR config's "
            f"hstu_uih_feature_names {hstu_config.hstu_uih_feature_names!r}"
        )


def model_config(hstu_config: DlrmHSTUConfig, feature: DV365Feature) -> DlrmHSTUConfig:
    """The model's config: a copy of GR's with ``{name: K}`` appended to ``contextual_feature_to_max_length``
    (and ``{name: min_uih_length}`` to ``contextual_feature_to_min_uih_length`` when > 0)."""
    _check(hstu_config, feature)
    max_len = {**hstu_config.contextual_feature_to_max_length, feature.name: feature.num_tokens}
    min_len = dict(hstu_config.contextual_feature_to_min_uih_length)
    if feature.min_uih_length > 0:
        min_len[feature.name] = feature.min_uih_length
    return dataclasses.replace(
        hstu_config, contextual_feature_to_max_length=max_len, contextual_feature_to_min_uih_length=min_len
    )


def dataset_config(hstu_config: DlrmHSTUConfig, feature: DV365Feature) -> DlrmHSTUConfig:
    """The config for GR's dataset: GR's own (no DV365 feature, whose ``data[name]`` no dataset has) with
    ``max_seq_len`` lowered by K, so that history + candidates + GR's contextual features + K DV365 tokens fit
    the model's ``max_seq_len`` (GR's datasets reserve one position per contextual feature they know of)."""
    _check(hstu_config, feature)
    reserved = hstu_config.max_num_candidates + len(hstu_config.contextual_feature_to_max_length) + feature.num_tokens
    if hstu_config.max_seq_len <= reserved:
        raise AdapterError(
            f"DlrmHSTUConfig.max_seq_len={hstu_config.max_seq_len} leaves no room for history: max_num_candidates="
            f"{hstu_config.max_num_candidates} + {len(hstu_config.contextual_feature_to_max_length)} contextual "
            f"features + DV365Feature.num_tokens={feature.num_tokens} = {reserved}"
        )
    return dataclasses.replace(hstu_config, max_seq_len=hstu_config.max_seq_len - feature.num_tokens)


def _check_tables(hstu_config: DlrmHSTUConfig, embedding_tables: dict[str, Any]) -> None:
    """Every contextual feature enters GR's per-position linear map at ``hstu_embedding_table_dim``; a table of
    another dim would fail inside GR at the first batch."""
    dim = hstu_config.hstu_embedding_table_dim
    for table in embedding_tables.values():
        used = set(table.feature_names) & set(hstu_config.contextual_feature_to_max_length)
        if used and table.embedding_dim != dim:
            raise AdapterError(
                f"embedding table {table.name!r} (features {sorted(used)}) has embedding_dim={table.embedding_dim} "
                f"but DlrmHSTUConfig.hstu_embedding_table_dim={dim}, the dim of every contextual token, DV365's "
                "included"
            )


class DV365DlrmHSTU(DlrmHSTU):  # type: ignore[misc]  # GR is untyped for mypy
    """GR's ``DlrmHSTU`` with K DV365 tokens as a contextual feature, fetched by user id in ``preprocess``.

    Args:
        hstu_configs: GR's ``DlrmHSTUConfig`` without DV365 (e.g. ``get_hstu_configs("kuairand-1k")``); the
            model uses :func:`model_config` of it, GR's dataset should get ``self.dataset_hstu_config``.
        embedding_tables: GR's embedding-table configs (unchanged).
        is_inference: GR's flag.
        dv365: a :class:`DV365Feature`.
        reader: any :class:`dv365.core.lookup.EmbeddingReader` (``get(user_ids) -> LookupResult``): a
            dv365-store client or a snapshot reader. :meth:`set_reader` swaps it (a new snapshot).
        is_dense, bf16_training: GR's.

    Example::

        model = DV365DlrmHSTU(get_hstu_configs("kuairand-1k"), get_embedding_table_config("kuairand-1k"),
                              is_inference=False, dv365=DV365Feature(num_tokens=8), reader=store)
        model(uih_kjt, candidates_kjt)        # as DlrmHSTU: every user's sequence has 6 + 8 contextual tokens
        model.dv365_projection                # LinearProjection 58 × 256 -> 8 × hstu_embedding_table_dim
        model.dv365_input.default_embedding   # [58, 256] learned, for users the store lacks
    """

    def __init__(
        self,
        hstu_configs: DlrmHSTUConfig,
        embedding_tables: dict[str, Any],
        is_inference: bool,
        dv365: DV365Feature,
        reader: EmbeddingReader,
        *,
        is_dense: bool = False,
        bf16_training: bool = True,
    ) -> None:
        config = model_config(hstu_configs, dv365)
        _check_tables(config, embedding_tables)
        super().__init__(
            hstu_configs=config,
            embedding_tables=embedding_tables,
            is_inference=is_inference,
            is_dense=is_dense,
            bf16_training=bf16_training,
        )
        self.dv365_feature: DV365Feature = dv365
        self.dataset_hstu_config: DlrmHSTUConfig = dataset_config(hstu_configs, dv365)
        fmt = dv365.input.row_format
        self.dv365_input = DV365Input(dv365.input)
        self.dv365_projection = LinearProjection(dv365.num_tokens, config.hstu_embedding_table_dim, fmt)
        self._dv365_reader: EmbeddingReader = reader

    def set_reader(self, reader: EmbeddingReader) -> None:
        """Reads DV365 from ``reader`` from the next batch on (e.g. a newly published snapshot's)."""
        self._dv365_reader = reader

    def dv365_tokens(self, user_ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` user ids -> ``[B, K, hstu_embedding_table_dim]`` projected DV365 tokens (store lookup, learned
        default for missing users, projection)."""
        device = self.dv365_input.default_embedding.device
        batch = fetch_dv365(
            self._dv365_reader, user_ids, device=device, expected_format=self.dv365_feature.input.row_format
        )
        tokens = self.dv365_input(batch.payload, batch.present, batch.age_s).tokens  # [B, 58, 256]
        out: torch.Tensor = self.dv365_projection(tokens)  # [B, K, D]
        return out

    def _user_ids(self, uih_features: Any) -> torch.Tensor:
        name = self.dv365_feature.user_id_feature
        ids = uih_features[name]
        lengths = ids.lengths()  # [B]
        if not bool((lengths == 1).all()):
            raise AdapterError(
                f"DV365DlrmHSTU: UIH feature {name!r} (DV365Feature.user_id_feature) must hold exactly one user id "
                f"per user, got lengths {lengths.tolist()[:8]}"
            )
        out: torch.Tensor = ids.values()  # [B]
        return out

    def preprocess(self, uih_features: Any, candidates_features: Any) -> tuple[Any, ...]:
        """GR's ``preprocess``, plus ``seq_embeddings[name]``: each user's K DV365 tokens (lengths K)."""
        out = super().preprocess(uih_features=uih_features, candidates_features=candidates_features)
        seq_embeddings = out[0]
        tokens = self.dv365_tokens(self._user_ids(uih_features))  # [B, K, D]
        batch, k = tokens.shape[0], tokens.shape[1]
        seq_embeddings[self.dv365_feature.name] = SequenceEmbedding(
            lengths=torch.full((batch,), k, dtype=torch.long, device=tokens.device),  # [B]
            embedding=tokens.reshape(batch * k, tokens.shape[2]),  # [B·K, D]
        )
        return tuple(out)
