"""The slicer's output: every feature's bags for a batch of rows, in torchrec's KJT (key-major) layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class SlicedBatch:
    """Bags of every feature for a batch, in KJT (key-major) layout.

    ``lengths[k * B + b]`` is the bag size of feature ``k`` for row ``b``; ``values``/``weights`` hold the
    bags in that order. ``raw_counts`` (same shape as ``lengths``) counts id occurrences before dedup.
    """

    keys: list[str]
    batch_size: int
    values: np.ndarray  # [total] int64 hashed ids
    weights: np.ndarray  # [total] float32, each non-empty bag sums to 1
    lengths: np.ndarray  # [N * B] int64
    raw_counts: np.ndarray  # [N * B] int64
    request_ts: np.ndarray  # [B] int64
    user_ids: np.ndarray  # [B] int64

    def length_per_key(self) -> np.ndarray:
        return self.lengths.reshape(len(self.keys), self.batch_size).sum(axis=1)

    def bag(self, key: str, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, weights) of one feature for one row."""
        k = self.keys.index(key)
        flat = k * self.batch_size + row
        start = int(self.lengths[:flat].sum())
        n = int(self.lengths[flat])
        return self.values[start : start + n], self.weights[start : start + n]

    def to_kjt(self) -> Any:
        """A torchrec ``KeyedJaggedTensor`` (needs the ``dv365-core[torchrec]`` extra; see :mod:`dv365.core.kjt`)."""
        from dv365.core.kjt import to_kjt

        return to_kjt(self)
