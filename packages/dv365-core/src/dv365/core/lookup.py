"""The read contract between embedding stores and their consumers.

dv365-store's clients (embedded, Redis, gRPC) implement :class:`EmbeddingReader`; dv365-adapters'
fetch helpers accept any :class:`EmbeddingReader`, so neither package imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from dv365.core.quantize import RowFormat


@dataclass(frozen=True)
class LookupResult:
    """The answer to one batched ``get``.

    Attributes:
        payload: ``[B, rows_per_user, row_bytes]`` uint8 in the :mod:`dv365.core.quantize` format; rows of
            missing users are zero. It may be read-only (the gRPC store client answers with a view of the
            received message, without copying it): copy it before writing into it.
        present: ``[B]`` bool, False where the store has no embedding for the user (or it failed its check).
        snapshot_id: the snapshot every row of this batch comes from (one version per batch).
        age_s: seconds between the snapshot's data cut-off and the time of the lookup.
        row_format: the format of ``payload``.
        errors: ``{batch position: message}`` for users whose stored value failed its integrity check.
    """

    payload: np.ndarray
    present: np.ndarray
    snapshot_id: str
    age_s: float
    row_format: RowFormat
    errors: dict[int, str]


@runtime_checkable
class EmbeddingReader(Protocol):
    """Anything that returns DV365 embeddings by user id (every dv365-store backend client)."""

    def get(self, user_ids: Sequence[int] | np.ndarray) -> LookupResult:
        """Batched lookup; never raises for unknown users (they are ``present == False``)."""
        ...
