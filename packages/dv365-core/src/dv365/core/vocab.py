"""Categorical vocabularies of UniTi events (actions, media types, surfaces).

Actions define slices (paper Eq. 2), so an unknown action is an error. Media types and surfaces are
open-ended in practice: values outside the vocabulary map to ``"other"`` (documented in docs/validation.md).
Codes are the index in the tuple; they are what the slicer compares, so a vocabulary is part of a
dataset's metadata and is stored with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dv365.core.errors import TimelineError

OTHER = "other"

DEFAULT_ACTIONS: tuple[str, ...] = (
    # KuaiRand / Instagram-style engagement
    "like",
    "follow",
    "comment",
    "forward",
    "save",
    "hate",
    "long_view",
    "profile_enter",
    # MovieLens: rating bands and tag applications
    "rate_high",  # rating >= 4
    "rate_mid",  # 2 < rating < 4
    "rate_low",  # rating <= 2
    "tag",
)
DEFAULT_MEDIA_TYPES: tuple[str, ...] = (OTHER, "video", "image", "movie", "live", "ad")
DEFAULT_SURFACES: tuple[str, ...] = (OTHER, "feed", "explore", "reels", "profile", "search", "stories", "web")


@dataclass(frozen=True)
class Vocabulary:
    """Action, media-type and surface vocabularies.

    Args:
        actions: every allowed explicit action type; anything else is rejected.
        media_types: known media types; first entry must be ``"other"`` (unknown values map there).
        surfaces: known surfaces; first entry must be ``"other"``.

    Example::

        vocab = Vocabulary()
        vocab.action_codes(np.array(["like", "tag"], dtype=object))  # array([0, 11], dtype=int16)
    """

    actions: tuple[str, ...] = DEFAULT_ACTIONS
    media_types: tuple[str, ...] = DEFAULT_MEDIA_TYPES
    surfaces: tuple[str, ...] = DEFAULT_SURFACES
    _lookup: dict[str, dict[str, int]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("media_types", "surfaces"):
            values = getattr(self, name)
            if not values or values[0] != OTHER:
                raise ValueError(f"Vocabulary.{name} must start with {OTHER!r}, got {values!r}")
        for name in ("actions", "media_types", "surfaces"):
            values = tuple(getattr(self, name))
            if len(set(values)) != len(values):
                raise ValueError(f"Vocabulary.{name} has duplicates: {values!r}")
            object.__setattr__(self, name, values)
            self._lookup[name] = {v: i for i, v in enumerate(values)}

    # --- codes -------------------------------------------------------------------------------------
    def code(self, kind: str, value: str) -> int:
        """Code of one value; ``kind`` is ``"actions"``, ``"media_types"`` or ``"surfaces"``."""
        table = self._lookup[kind]
        if value in table:
            return table[value]
        if kind == "actions":
            raise TimelineError("action", value, "unknown_action", detail=f"known actions: {list(self.actions)}")
        return 0

    def codes(self, kind: str, values: np.ndarray | Sequence[Any]) -> np.ndarray:
        """Vectorised :meth:`code` over an array of strings; unknown actions raise for the first one."""
        table = self._lookup[kind]
        arr = np.asarray(values, dtype=object)
        uniq, inverse = np.unique(arr.astype(str), return_inverse=True)
        mapped = np.empty(len(uniq), dtype=np.int16)
        for i, u in enumerate(uniq):
            mapped[i] = self.code(kind, str(u)) if kind == "actions" else table.get(str(u), 0)
        return mapped[inverse.reshape(-1)]

    def to_dict(self) -> dict[str, list[str]]:
        d = asdict(self)
        d.pop("_lookup", None)
        return {k: list(v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[str]]) -> Vocabulary:
        unknown = set(d) - {"actions", "media_types", "surfaces"}
        if unknown:
            raise ValueError(f"unknown vocabulary keys {sorted(unknown)}")
        return cls(**{k: tuple(v) for k, v in d.items()})  # type: ignore[arg-type]
