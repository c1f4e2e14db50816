"""A slice spec prepared for slicing, and the interface every slicing backend implements."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dv365.core.slicing.batch import SlicedBatch
from dv365.core.slicing.spec import SliceFilter, SliceSpec
from dv365.core.timeline import Timelines
from dv365.core.vocab import Vocabulary


@dataclass(frozen=True)
class SlicePlan:
    """What every backend starts from: the spec, the vocabulary, windows as nested levels, features by predicate.

    Args:
        spec: the slice spec.
        vocab: the dataset's vocabulary (codes of actions / media types / surfaces).
        horizons: the spec's window horizons in seconds, ascending, ``None`` (all history) last; window
            *level* ``i`` holds the events within ``horizons[i]`` of the request, so levels are nested.
        win_level: window name -> its level.
        groups: feature indices by ``(source, filter, weighted)``, so each predicate is evaluated once per batch.
    """

    spec: SliceSpec
    vocab: Vocabulary
    horizons: list[int | None]
    win_level: dict[str, int]
    groups: dict[tuple[str, SliceFilter, bool], list[int]]

    @classmethod
    def build(cls, spec: SliceSpec, vocab: Vocabulary) -> SlicePlan:
        order = sorted(spec.windows, key=lambda w: math.inf if spec.windows[w] is None else spec.windows[w])  # type: ignore[operator]
        groups: dict[tuple[str, SliceFilter, bool], list[int]] = {}
        for k, f in enumerate(spec.features):
            groups.setdefault((f.source, f.filter, f.weighted), []).append(k)
        return cls(spec, vocab, [spec.windows[w] for w in order], {w: i for i, w in enumerate(order)}, groups)


class BackendSlicer(Protocol):
    """A backend's slicer, built from a :class:`SlicePlan`; ``r`` holds the request times, ``[B]`` int64."""

    def slice(self, timelines: Timelines, r: np.ndarray) -> SlicedBatch: ...
