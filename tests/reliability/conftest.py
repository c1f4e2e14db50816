"""Fixtures of the reliability tests: a small snapshot and a store holding it (store/adapter tests), a tiny
training config and a pipeline whose train/export/publish/retain steps do nothing (pipeline tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dv365.export.pipeline import Pipeline
from dv365.store import open_store
from dv365.store.synthetic import write_synthetic_snapshot

USERS = np.arange(1000, 1050, dtype=np.int64)


def tiny_train(**run: object) -> dict[str, object]:
    """A tiny FSA training config (8-dim tower, 499-row tables) for pipeline tests; ``run`` overrides its
    ``run`` section (steps 2, batch 16, CPU, one thread)."""
    return {
        "data": {"spec": "kuairand", "hash_sizes": {"media": 499, "author": 499, "topic": 97}},
        "model": {
            "kind": "fsa",
            "tower": {"dim": 8, "encoder": {"num_heads": 2, "head_dim": 8, "ff_mult": 2, "num_layers": 1}},
            "backbone": {"embedding_dim": 8, "item_hash_size": 499, "over_arch": [16]},
        },
        "run": {"steps": 2, "batch_size": 16, "device": "cpu", "threads": 1, "progress": False, **run},
    }


@pytest.fixture()
def stubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline whose train / export / publish / retain steps do nothing (the bookkeeping is under test)."""
    for step in ("train", "export", "publish", "retain"):
        monkeypatch.setattr(Pipeline, f"_step_{step}", lambda self, c: {})
    monkeypatch.setattr(Pipeline, "_describe", staticmethod(lambda step, out: ""))


@pytest.fixture
def snapshot(tmp_path: Path) -> str:
    """A complete simulated snapshot ``v1`` of 50 users."""
    path = str(tmp_path / "snaps" / "v1")
    write_synthetic_snapshot(path, "v1", USERS, seed=1)
    return path


@pytest.fixture
def store_url(tmp_path: Path, snapshot: str) -> str:
    """An embedded store with ``v1`` published and active."""
    url = f"lmdb://{tmp_path}/store"
    with open_store(url) as s:
        s.publish(snapshot)
    return url
