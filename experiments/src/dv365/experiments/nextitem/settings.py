"""Settings of ``dv365 eval nextitem``: one YAML per data set.

Shipped: ``dv365/experiments/configs/nextitem/<dataset>[-quick].yaml`` (``--config NAME|PATH`` for another one;
``--set key.sub=value`` overrides a key). A ``--dataset PATH`` (any UniTi folder) uses the ``movielens``
configs unless ``--config`` says otherwise. Unknown keys and wrong types are errors naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dv365.core.config import load_dataclass, resolve_config, shipped_file
from dv365.experiments.nextitem.arms import FUSIONS
from dv365.experiments.nextitem.data import NextItemError
from dv365.experiments.nextitem.encoders import ENCODERS
from dv365.experiments.nextitem.train import FitSettings
from dv365.experiments.upstream import SynthData as SynthSettings

CONFIG_PACKAGE, CONFIG_FOLDER = "dv365.experiments", "configs/nextitem"
DATASETS = ("movielens", "synth")


@dataclass(frozen=True)
class SequenceSettings:
    """Which events make the item sequence (``nextitem.data``) and the history cap of the ``full`` arm."""

    source: str = "explicit"
    actions: tuple[str, ...] = ("rate_high", "rate_mid", "rate_low")
    max_len: int = 200
    min_items: int = 3


@dataclass(frozen=True)
class ModelSettings:
    """The encoders' sizes (published GR ML-1M settings) and the DV365 prefix length."""

    dim: int = 50
    blocks: int = 2
    heads: int = 1
    ffn_hidden: int = 50
    dropout: float = 0.2
    prefix_tokens: int = 4


@dataclass(frozen=True)
class Settings:
    """One data set's next-item settings (the whole YAML).

    Args:
        dataset: name used in the report's file name.
        data_url: an existing UniTi data set (overrides the prepared one).
        synth: ``dv365 synth`` sizes for ``--dataset synth``.
        seeds: seeds 0..N-1 (``--seeds`` overrides).
        encoders: ``sasrec`` and / or ``hstu``.
        short: the K of the short arms.
        fusion: fusion modes tried for ``+mean`` and ``+dv365``; the one with the best validation HR@10 on the
            first ``fusion_select_seeds`` seeds is used for every seed.
        long_margin: the long-history subset is the users with more than K + ``long_margin`` items.
        provider: the upstream DV365 model of ``nextitem.distant.build_distant_provider`` (a dv365-train
            TrainConfig mapping); empty: its ``DEFAULT_SETTINGS``.
        provider_seed: the seed the (frozen) DV365 provider is built with, once per run.
        cost_users: test users whose batch-1 forward is timed per arm.
    """

    dataset: str = "movielens"
    data_url: str | None = None
    synth: SynthSettings = SynthSettings()
    seeds: int = 3
    sequence: SequenceSettings = SequenceSettings()
    model: ModelSettings = ModelSettings()
    train: FitSettings = FitSettings()
    encoders: tuple[str, ...] = ENCODERS
    short: tuple[int, ...] = (10, 20, 50)
    fusion: tuple[str, ...] = FUSIONS
    fusion_select_seeds: int = 1
    long_margin: int = 20
    provider: Mapping[str, Any] = field(default_factory=dict)
    provider_seed: int = 0
    cost_users: int = 16
    threads: int = 1

    def validate(self) -> None:
        bad = [e for e in self.encoders if e not in ENCODERS]
        if bad or not self.encoders:
            raise NextItemError(f"encoders = {list(self.encoders)}: use some of {list(ENCODERS)}")
        bad = [f for f in self.fusion if f not in FUSIONS]
        if bad or not self.fusion:
            raise NextItemError(f"fusion = {list(self.fusion)}: use some of {list(FUSIONS)}")
        if not self.short or min(self.short) < 1 or max(self.short) >= self.sequence.max_len:
            raise NextItemError(f"short = {list(self.short)}: K must be in 1..sequence.max_len-1")
        if self.seeds < 1:
            raise NextItemError(f"seeds = {self.seeds}: must be >= 1")
        if self.sequence.min_items < 3:
            raise NextItemError(f"sequence.min_items = {self.sequence.min_items}: leave-one-out needs >= 3")
        if self.model.dim % self.model.heads:
            raise NextItemError(f"model.dim = {self.model.dim} is not divisible by model.heads = {self.model.heads}")
        if self.train.full_epochs < 0:
            raise NextItemError(f"train.full_epochs = {self.train.full_epochs}: must be >= 0 (0: train.epochs)")
        if self.train.epochs < 1 or self.train.val_every < 1 or self.train.batch_size < 1:
            raise NextItemError(f"train = {self.train}: epochs, val_every and batch_size must be >= 1")
        if self.train.negatives_group < 1 or self.train.negatives < 1:
            raise NextItemError(
                f"train.negatives = {self.train.negatives}, train.negatives_group = {self.train.negatives_group}: "
                "both must be >= 1 (negatives_group 1: every position draws its own negatives)"
            )


def default_config(dataset: str, quick: bool) -> Path:
    """The shipped config of ``dataset``, ``-quick`` where it exists; for a dataset folder, the one of its family
    (``synth`` for the generator's output, else ``movielens``: pass ``--config`` / ``--set sequence.*`` for
    logs whose sequences are not rating events)."""
    if dataset in DATASETS:
        name = dataset
    else:
        from dv365.experiments.datasets import resolve_dataset

        name = "synth" if resolve_dataset(dataset, NextItemError).kind == "synth" else "movielens"
    p = shipped_file(CONFIG_PACKAGE, *CONFIG_FOLDER.split("/"), f"{name}{'-quick' if quick else ''}.yaml")
    return p if p.exists() or not quick else default_config(name, False)


def load_settings(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Reads one next-item YAML (a path or a shipped config's name), applies ``--set`` overrides, validates."""
    p = resolve_config(path, CONFIG_PACKAGE, CONFIG_FOLDER, NextItemError)
    s: Settings = load_dataclass(Settings, p, overrides, NextItemError, "next-item config")
    s.validate()
    return s
