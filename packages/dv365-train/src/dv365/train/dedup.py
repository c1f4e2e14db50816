"""RecD-style deduplication (arXiv 2211.05239): rows of a batch with the same user slice run the tower once.

Many training rows share their user features: a request shows several items, and one user makes several
requests close in time. In DV365 the user tower's input is the user's timelines sliced at the row's
request time minus the 24 h gap (Eq. 9), so two rows have *identical* user features exactly when they
belong to the same user and the slicer keeps the same events in every window. :func:`slice_keys`
computes that as a key per row, from the spec alone (no slicing):

* per source (explicit, implicit): ``hi`` = the user's events with ``t <= ts - gap`` (the cut-off; the
  slicer then keeps the last ``cap`` of them), and for each finite window ``h`` (3 d, 7 d, ...) the
  first kept event with ``t >= ts - h``, clipped to the kept range ``[hi - cap, hi]``.

Distinct request times with no event between their cut-offs (and window starts) get the same key: the
key is the *effective* cut-off, not the request time. :func:`dedup_rows` turns keys into the unique rows
``[U]`` (first occurrence) and an inverse index ``[B]``; the collator slices the ``U`` unique rows only
and stores the inverse index in the KJT (torchrec's ``inverse_indices``, the field torchrec reserves for
RecD batches). :class:`~dv365.train.model.DV365UserTower` pools and summarises the ``U`` rows, then
:func:`expand` (``index_select``) gives the backbone ``[B, N_out, D]``; autograd sums the gradients of
repeated rows back onto the unique one, so outputs and gradients equal the undeduplicated run's
(tested, up to float summation order).

:func:`grouped_permutation` is the sampler side (``data.group_by_user``): an epoch order in which a user's
time-consecutive requests stay together in groups, so batches actually hold several rows per user.

Example::

    keys = slice_keys(timelines, user_row, request_ts, spec)     # [B, K] int64
    first, inverse = dedup_rows(keys)                            # [U], [B]: rows == first[inverse]
    kjt = with_inverse(slicer.slice(unique_timelines, ts[first]).to_kjt(), torch.from_numpy(inverse))
    tokens = expand(tower_arch(pooling(strip_inverse(kjt)[0])), inverse)    # [B, N_out, D]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dv365.core.slicing import SliceSpec
from dv365.core.timeline import EventTable, Timelines

SOURCES = ("explicit", "implicit")


def _searchsorted_rows(t: EventTable, urow: np.ndarray, thresholds: np.ndarray, side: str) -> np.ndarray:
    """Global event index of ``searchsorted(ts of user row urow[b], thresholds[b], side)`` for every b."""
    out = np.empty(len(urow), np.int64)
    users, inv = np.unique(urow, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(len(users) + 1))
    for j, u in enumerate(users):  # one vectorised searchsorted per distinct user of the batch
        sel = order[bounds[j] : bounds[j + 1]]
        lo, hi = int(t.offsets[u]), int(t.offsets[u + 1])
        out[sel] = lo + np.searchsorted(t.ts[lo:hi], thresholds[sel], side=side)  # type: ignore[call-overload]
    return out


def slice_keys(timelines: Timelines, urow: np.ndarray, request_ts: np.ndarray, spec: SliceSpec) -> np.ndarray:
    """``[B, 1 + 2 * (1 + W)]`` int64 keys: equal rows <=> identical sliced features (same user, same kept
    events in every window of every source). ``urow`` indexes the users of ``timelines``; ``W`` is the
    number of finite windows of ``spec``."""
    urow = np.asarray(urow, np.int64)
    ts = np.asarray(request_ts, np.int64)
    horizons = sorted(h for h in spec.windows.values() if h is not None)
    cols = [urow]
    for source in SOURCES:
        t: EventTable = getattr(timelines, source)
        hi = _searchsorted_rows(t, urow, ts - spec.gap_s, "right")  # events up to the cut-off
        lo = np.maximum(t.offsets[urow], hi - spec.cap)
        cols.append(hi)
        for h in horizons:
            start = _searchsorted_rows(t, urow, ts - h, "left")
            cols.append(np.clip(start, lo, hi))
    return np.stack(cols, axis=1)


def dedup_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first [U], inverse [B])`` of the distinct rows of ``keys`` (``[B, K]``): ``first`` holds the row of
    each key's first occurrence, in first-occurrence order, and ``keys[first[inverse]] == keys``."""
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique keys in first-occurrence order (batch order kept)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order].astype(np.int64), rank[np.asarray(inverse).reshape(-1)].astype(np.int64)


def expand(x: torch.Tensor, inverse: torch.Tensor | None) -> torch.Tensor:
    """``[U, ...] -> [B, ...]`` by ``index_select`` on dim 0 (its backward sums repeated rows' gradients)."""
    return x if inverse is None else x.index_select(0, inverse)


def _rebuilt(kjt: Any, inverse_indices: tuple[list[str], torch.Tensor] | None) -> Any:
    """The same KJT with ``inverse_indices`` set (or dropped when ``None``)."""
    from torchrec import KeyedJaggedTensor

    return KeyedJaggedTensor(
        keys=kjt.keys(),
        values=kjt.values(),
        weights=kjt.weights_or_none(),
        lengths=kjt.lengths_or_none(),
        offsets=kjt.offsets_or_none(),
        stride=kjt.stride(),
        length_per_key=kjt.length_per_key_or_none(),
        offset_per_key=kjt.offset_per_key_or_none(),
        inverse_indices=inverse_indices,
    )


def with_inverse(kjt: Any, inverse: torch.Tensor) -> Any:
    """The KJT (``U`` rows per key) with torchrec ``inverse_indices``: every key maps the ``B`` batch rows
    to its ``U`` unique rows (the same ``[B]`` map for every key)."""
    keys = kjt.keys()
    inv = inverse.to(torch.long).view(1, -1).expand(len(keys), -1).contiguous()  # [F, B]
    return _rebuilt(kjt, (keys, inv))


def strip_inverse(kjt: Any) -> tuple[Any, torch.Tensor | None]:
    """``(kjt without inverse indices, inverse [B] or None)``: the ``U``-row KJT to pool, and the map back."""
    found = kjt.inverse_indices_or_none()
    if found is None:
        return kjt, None
    return _rebuilt(kjt, None), found[1][0]


def grouped_permutation(user_ids: np.ndarray, ts: np.ndarray, group: int, rng: np.random.Generator) -> np.ndarray:
    """An epoch order of ``len(user_ids)`` rows in which each user's requests, sorted by time, form groups of
    up to ``group`` consecutive rows that stay together; the groups come in random order.

    Example::

        grouped_permutation(np.array([7, 7, 7, 9]), np.array([1, 2, 3, 1]), 2, rng)   # e.g. [3, 0, 1, 2]
    """
    n = len(user_ids)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((np.arange(n), ts, user_ids))  # by user, then time (ties: row order)
    u = user_ids[order]
    run_start = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    run_id = np.repeat(np.arange(len(run_start)), np.diff(np.r_[run_start, n]))
    pos = np.arange(n) - run_start[run_id]
    chunk = np.cumsum(pos % group == 0) - 1  # [n] group id, groups numbered in (user, time) order
    rank = rng.permutation(int(chunk[-1]) + 1)
    return order[np.argsort(rank[chunk], kind="stable")].astype(np.int64)


__all__ = ["dedup_rows", "expand", "grouped_permutation", "slice_keys", "strip_inverse", "with_inverse"]
