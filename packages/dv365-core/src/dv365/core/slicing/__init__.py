"""Rule-based multi-slicing of UniTi timelines (paper §2.2, Eq. 2-6) into pooled-feature bags.

A :class:`SliceSpec` (:mod:`.spec`) says which features exist: *families* of slices, each a filter on one
timeline (action / media type / surface sets, dwell-time and watch-ratio bands, the duration-debiased score),
crossed with time windows and id types (media / author / topic).

For a batch of (timeline, request time) rows the slicer keeps events with ``t <= request - gap`` (the
24 h distant-interest gap), the most recent ``cap`` of them per timeline, and emits per feature and row a
*bag*: hashed ids (``id % hash_size``) with weights, as a :class:`SlicedBatch` (:mod:`.batch`). Mean pooling
of a bag is expressed exactly as count-weighted pooling of its unique ids (``w = count / len``), a weighted
feature as ``w = sum(s) / sum(s)`` over the bag, so each non-empty bag's weights sum to 1 and
``EmbeddingBagCollection(SUM)`` with per-sample weights computes the paper's pooling with fewer row reads
(see ENVIRONMENT notes: EBC cannot do weighted MEAN).

This module is the dispatcher: :class:`Slicer` prepares the spec once (:class:`~.plan.SlicePlan`) and hands
each batch to one backend, chosen when it is built:

* ``numpy`` (:mod:`.numpy_backend`): vectorised over the whole batch;
* ``numba`` (:mod:`.numba_backend`): fused per-row kernels, ~5x faster; optional
  (``pip install 'dv365-core[fast]'``).

``backend="auto"`` (the default) uses numba when it imports, else numpy. :func:`reference_slice`
(:mod:`.reference`) is a plain-Python reference of the same semantics; the tests hold both backends to it.

Semantics in one place (both backends and the reference follow them):

* kept events: ``t <= r - gap``; then the last ``cap`` per timeline; window ``W``: ``r - t <= W``.
* dwell band ``[lb, ub)``: ``lb <= dwell < ub`` (``ub`` null = no upper bound).
* watch-ratio band ``[lb, ub)`` and the debiased score apply to videos only (``duration > 0``).
* unknown authors (``-1``) are skipped; an event contributes each of its topic ids to ``topic`` bags.
* a bag lists unique hashed ids (``dedup: true``) or every occurrence in time order. The order of ids
  within a dedup'd bag is backend-specific and deterministic: ascending id (numpy backend, and
  :func:`reference_slice`), most recent occurrence first (numba backend). Values, weights, lengths and
  raw counts are the same (weights to float32 rounding); pooling is order-independent.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import numpy as np

from dv365.core.slicing.batch import SlicedBatch
from dv365.core.slicing.numpy_backend import NumpySlicer
from dv365.core.slicing.plan import BackendSlicer, SlicePlan
from dv365.core.slicing.reference import reference_slice
from dv365.core.slicing.spec import ID_TYPES, SOURCES, Feature, SliceFilter, SliceSpec, TableSpec, default_spec_names
from dv365.core.timeline import Timelines
from dv365.core.vocab import Vocabulary

__all__ = [
    "BACKENDS",
    "ID_TYPES",
    "SOURCES",
    "Feature",
    "SliceFilter",
    "SliceSpec",
    "SlicedBatch",
    "Slicer",
    "TableSpec",
    "default_spec_names",
    "reference_slice",
    "resolve_backend",
]

BACKENDS = ("auto", "numpy", "numba")


def _numba_backend() -> ModuleType:
    """The numba backend module, or ImportError with install advice when numba is missing."""
    try:
        return importlib.import_module("dv365.core.slicing.numba_backend")
    except ImportError as e:
        raise ImportError(
            "Slicer(backend='numba') needs numba: pip install 'dv365-core[fast]' "
            f"(or use backend='numpy'); import failed: {e}"
        ) from e


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"numba"`` when numba imports, else ``"numpy"``; checks the name."""
    if backend not in BACKENDS:
        raise ValueError(f"Slicer backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return "numpy"
    try:
        _numba_backend()
    except ImportError:
        if backend == "numba":
            raise
        return "numpy"
    return "numba"


class Slicer:
    """Multi-slicer: (timelines, request times) -> :class:`SlicedBatch`.

    Args:
        spec: the slice spec.
        vocab: the dataset's vocabulary (codes of actions / media types / surfaces).
        backend: ``"numpy"`` (vectorised numpy over the batch), ``"numba"`` (fused per-row kernels in
            :mod:`dv365.core.slicing.numba_backend`; needs ``pip install 'dv365-core[fast]'``) or ``"auto"``
            (the default: numba when importable, else numpy). Both give the same bags; the order of ids
            *within* a dedup'd bag is backend-specific and deterministic (numpy: ascending id; numba: most
            recent occurrence first). The first numba call per process compiles the kernels or loads them
            from numba's on-disk cache.

    Example::

        slicer = Slicer(SliceSpec.load_default("kuairand"), dataset.vocab)
        batch = slicer.slice(timelines, request_ts=np.array([...]))   # [B] unix seconds
        batch.lengths.reshape(len(batch.keys), len(timelines))        # [N, B] bag sizes
        slicer.backend                                                # "numba" or "numpy"
    """

    def __init__(self, spec: SliceSpec, vocab: Vocabulary, backend: str = "auto") -> None:
        spec.check_vocab(vocab)
        self.spec, self.vocab = spec, vocab
        self.backend = resolve_backend(backend)
        plan = SlicePlan.build(spec, vocab)
        self._impl: BackendSlicer = _numba_backend().NumbaSlicer(plan) if self.backend == "numba" else NumpySlicer(plan)

    def slice(self, timelines: Timelines, request_ts: Sequence[int] | np.ndarray) -> SlicedBatch:
        r = np.asarray(request_ts, dtype=np.int64).reshape(-1)
        B = len(timelines)
        if len(r) != B:
            raise ValueError(f"request_ts has {len(r)} entries for {B} timelines")
        return self._impl.slice(timelines, r)
