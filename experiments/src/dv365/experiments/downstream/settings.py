"""Settings of the downstream experiments: one YAML per data set, shared by every experiment.

Shipped: ``dv365/experiments/configs/downstream/<dataset>[-quick].yaml`` (``--config NAME|PATH`` to use another
one; ``--set key.sub=value`` overrides a key). Unknown keys and wrong types are errors naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dv365.core.config import load_dataclass, resolve_config, shipped_file
from dv365.core.errors import Dv365Error
from dv365.experiments.upstream import SynthData as SynthSettings  # ``dv365 synth`` sizes (the same for eval upstream)
from dv365.train.fsa import TowerConfig

NO_PROJECTION_MODES = ("interact", "flatten")  # how the no_projection ranker uses the raw rows
CONFIG_PACKAGE, CONFIG_FOLDER = "dv365.experiments", "configs/downstream"
DATASETS = ("movielens", "synth", "kuairand")
EXPERIMENTS = ("ranking", "retrieval", "staleness", "encoders", "diagnose")


class ExperimentError(Dv365Error, ValueError):
    """A bad experiment setting (names the key and the value)."""


@dataclass(frozen=True)
class SplitSettings:
    """Fractions of the requests, by request time: ``upstream`` | downstream train | ``val`` | ``test``.

    ``windows``: the downstream period (everything after the upstream part) is cut into this many
    consecutive windows of equal request counts; a snapshot is exported at each window's start (the
    "fresh" schedule: a request reads the latest snapshot made before it).
    """

    upstream: float = 0.35
    val: float = 0.1
    test: float = 0.2
    windows: int = 6


@dataclass(frozen=True)
class HSTUSettings:
    layers: int = 2
    heads: int = 2
    qk_dim: int = 8
    v_dim: int = 8
    dropout: float = 0.0


@dataclass(frozen=True)
class DownstreamSettings:
    """The downstream ranker (Table 3; also the staleness model) and its training.

    Args:
        tasks: ``[{label, kind, weight, transform}]`` as in dv365-train.
        history: K, the short history: the last K events before the request (no gap).
        embedding_dim: E of every downstream embedding.
        item_hash_size: rows of the item / history media and author tables.
        over_arch: the DLRM over-arch MLP.
        proj_tokens: tokens of the DV365 linear projection / HSTU prefix.
        no_projection: how the ``no_projection`` ranker uses the raw de-quantized rows: ``interact`` (each
            row dotted with the ranker's own fields; needs the DV365 dim = ``embedding_dim``) or ``flatten``
            (concatenated after the interaction).
        standardize_dv365: standardise the de-quantized DV365 tokens per (row, dim) with statistics of the
            training requests' embeddings (dv365-adapters ``DV365InputConfig(standardize=True)``; ranker,
            staleness and two-tower models).
        dv365_dropout: in training, the share of examples whose DV365 input is read as a missing user's
            (dropout of the whole embedding; a regulariser chosen on validation).
        lr / batch_size / steps / val_every / eval_batch_size: Adam training with early stopping on the
            validation split (mean normalised loss over every task).
    """

    tasks: tuple[Mapping[str, Any], ...] = ()
    history: int = 64
    embedding_dim: int = 16
    item_hash_size: int = 20011
    over_arch: tuple[int, ...] = (64, 32)
    hstu: HSTUSettings = HSTUSettings()
    proj_tokens: int = 4
    no_projection: str = "interact"
    standardize_dv365: bool = False
    dv365_dropout: float = 0.0
    lr: float = 0.002
    batch_size: int = 128
    steps: int = 200
    val_every: int = 25
    eval_batch_size: int = 1024


@dataclass(frozen=True)
class RankingSettings:
    variants: tuple[str, ...] = ("no_projection", "linear", "hstu_prefix")


@dataclass(frozen=True)
class DiagnoseSettings:
    """``dv365 eval diagnose`` (:mod:`~dv365.experiments.downstream.diagnose`).

    Args:
        controls: DV365 content controls: ``shuffled`` (another present user's rows), ``constant`` (one
            user's rows for everyone).
        candidates: candidate fixes, each a mapping of ``downstream`` overrides for the ``linear`` ranker;
            the one with the lowest validation loss on returning requests is chosen.
        train_sample: training-split returning requests on which the training loss is measured.
    """

    controls: tuple[str, ...] = ("shuffled", "constant")
    candidates: tuple[Mapping[str, Any], ...] = (
        {"dv365_dropout": 0.25},
        {"dv365_dropout": 0.5},
        {"standardize_dv365": True},
        {"proj_tokens": 1},
    )
    train_sample: int = 5000


@dataclass(frozen=True)
class RetrievalSettings:
    """Two-tower retrieval (Table 4): ``tasks`` = labels whose positives are retrieval targets (plus
    ``next_item``: every request's item, the HSTU paper's next-item protocol), in-batch + sampled softmax."""

    tasks: tuple[str, ...] = ()
    next_item: bool = True
    variants: tuple[str, ...] = ("linear", "gatenet")
    dim: int = 32
    hidden: tuple[int, ...] = (64,)
    temperature: float = 0.05
    sampled_negatives: int = 256
    lr: float = 0.002
    batch_size: int = 256
    steps: int = 200
    val_every: int = 50


@dataclass(frozen=True)
class StalenessSettings:
    """Online training over the windows: evaluate on window w (before training on it), then train
    ``passes`` epochs on it. Models: baseline, fresh (snapshot of the window), stale (first snapshot)."""

    passes: int = 2
    variant: str = "linear"


@dataclass(frozen=True)
class EncoderSettings:
    """App. C: mean vs position-weighted pooling vs HSTU over the same slice at growing caps.

    Args:
        synth: a separate long-history generated data set (synth only; None: the experiment's data set).
        source: ``implicit`` or ``explicit`` timeline (the slice: its events before request - 24 h).
        caps: history caps; ``0`` stands for the longest history the data has.
        hstu_train_max: HSTU is trained only up to this cap (its O(L²) cost); beyond it only its cost is
            measured, up to ``cost_time_limit_s`` per user forward.
        cost_lengths: lengths at which the per-user forward time / memory of each encoder is measured
            (``0`` = the longest history).
        hstu_layers: HSTU layers of the encoder (the other HSTU sizes are ``downstream.hstu``'s); kept at 2
            even where the downstream ranker uses 1, so that HSTU's cost stays quadratic in the length.
    """

    synth: SynthSettings | None = None
    source: str = "implicit"
    caps: tuple[int, ...] = (1000, 4000, 16000, 0)
    hstu_train_max: int = 1000
    cost_lengths: tuple[int, ...] = (1000, 2000, 4000, 8000, 16000, 0)
    cost_time_limit_s: float = 20.0
    dim: int = 16
    tasks: tuple[str, ...] = ()
    steps: int = 150
    batch_size: int = 64
    lr: float = 0.005
    val_every: int = 25
    hstu_chunk: int = 512
    hstu_layers: int = 2


@dataclass(frozen=True)
class Settings:
    """One data set's experiment settings (the whole YAML)."""

    dataset: str
    data_url: str | None = None  # an existing UniTi data set (kuairand; or to override the prepared one)
    synth: SynthSettings = SynthSettings()
    seeds: int = 3
    split: SplitSettings = SplitSettings()
    upstream: Mapping[str, Any] = field(default_factory=dict)
    downstream: DownstreamSettings = DownstreamSettings()
    ranking: RankingSettings = RankingSettings()
    diagnose: DiagnoseSettings = DiagnoseSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    staleness: StalenessSettings = StalenessSettings()
    encoders: EncoderSettings = EncoderSettings()

    def validate(self) -> None:
        s = self.split
        if not (0 < s.upstream and 0 < s.val and 0 < s.test and s.upstream + s.val + s.test < 1):
            raise ExperimentError(f"split = {s}: fractions must be positive and sum to < 1")
        if not 0.0 <= self.downstream.dv365_dropout < 1.0:
            raise ExperimentError(f"downstream.dv365_dropout = {self.downstream.dv365_dropout}: must be in [0, 1)")
        if s.windows < 2:
            raise ExperimentError(f"split.windows = {s.windows}: must be >= 2")
        if self.seeds < 1:
            raise ExperimentError(f"seeds = {self.seeds}: must be >= 1")
        bad = [v for v in self.ranking.variants if v not in ("no_projection", "linear", "hstu_prefix")]
        if bad:
            raise ExperimentError(f"ranking.variants {bad}: use no_projection, linear, hstu_prefix")
        bad = [c for c in self.diagnose.controls if c not in ("shuffled", "constant")]
        if bad:
            raise ExperimentError(f"diagnose.controls {bad}: use shuffled, constant")
        known = set(DownstreamSettings.__dataclass_fields__)
        bad = sorted({k for cand in self.diagnose.candidates for k in cand} - known)
        if bad:
            raise ExperimentError(f"diagnose.candidates: unknown downstream keys {bad}; known: {sorted(known)}")
        bad = [v for v in self.retrieval.variants if v not in ("linear", "gatenet")]
        if bad:
            raise ExperimentError(f"retrieval.variants {bad}: use linear, gatenet")
        if self.staleness.variant not in ("no_projection", "linear", "hstu_prefix"):
            raise ExperimentError(f"staleness.variant {self.staleness.variant!r}: use a ranking variant")
        if self.downstream.no_projection not in NO_PROJECTION_MODES:
            raise ExperimentError(
                f"downstream.no_projection = {self.downstream.no_projection!r}: use one of {NO_PROJECTION_MODES}"
            )
        uses_raw = "no_projection" in self.ranking.variants or self.staleness.variant == "no_projection"
        tower_dim = ((self.upstream.get("model") or {}).get("tower") or {}).get("dim", TowerConfig.dim)
        if uses_raw and self.downstream.no_projection == "interact" and tower_dim != self.downstream.embedding_dim:
            raise ExperimentError(
                f"downstream.no_projection = interact dots the raw DV365 rows with the ranker's "
                f"embeddings: upstream.model.tower.dim ({tower_dim}) must equal "
                f"downstream.embedding_dim ({self.downstream.embedding_dim}); set "
                f"downstream.no_projection: flatten, or make the two equal"
            )
        if self.encoders.source not in ("implicit", "explicit"):
            raise ExperimentError(f"encoders.source {self.encoders.source!r}: use implicit or explicit")
        if not self.downstream.tasks:
            raise ExperimentError("downstream.tasks is empty: list the label columns to predict")


def default_config(dataset: str, quick: bool) -> Path:
    """The shipped config of ``dataset`` (``<dataset>-quick.yaml`` with ``quick`` where it exists)."""
    p = shipped_file(CONFIG_PACKAGE, *CONFIG_FOLDER.split("/"), f"{dataset}{'-quick' if quick else ''}.yaml")
    return p if p.exists() or not quick else default_config(dataset, False)  # kuairand: one config


def load_settings(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Reads one experiments YAML (a path or a shipped config's name), applies ``--set`` overrides, validates."""
    p = resolve_config(path, CONFIG_PACKAGE, CONFIG_FOLDER, ExperimentError)
    s: Settings = load_dataclass(Settings, p, overrides, ExperimentError, "experiment config")
    s.validate()
    return s
