"""Fixtures of the store/adapter reliability tests: a small snapshot and a store holding it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dv365.store import open_store
from dv365.store.synthetic import write_synthetic_snapshot

USERS = np.arange(1000, 1050, dtype=np.int64)


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
