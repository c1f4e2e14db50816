"""The numpy slicing backend: vectorised over the whole batch; the semantics' fast reference for other backends.

Per source, :class:`_Selection` keeps the events of every row at once (``t <= r - gap``, the last ``cap``),
numbers each event's smallest window (levels are nested), and factorises the (row, hashed id) pairs of each
id type into dense codes; then each feature group's predicate is one mask over the kept events, and each
feature's bags are a ``bincount`` over the codes of its passing events (:func:`_bags`). Within a dedup'd
bag ids come in ascending order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dv365.core.slicing.batch import SlicedBatch
from dv365.core.slicing.plan import SlicePlan
from dv365.core.slicing.spec import SOURCES, SliceFilter, SliceSpec
from dv365.core.timeline import EventTable, Timelines, _ranges


class NumpySlicer:
    """The numpy backend of :class:`~dv365.core.slicing.Slicer` (``backend="numpy"``).

    Args:
        plan: the spec prepared for slicing.

    Example::

        batch = NumpySlicer(SlicePlan.build(spec, vocab)).slice(timelines, request_ts)   # request_ts: [B] int64
    """

    def __init__(self, plan: SlicePlan) -> None:
        self.plan = plan

    def slice(self, timelines: Timelines, r: np.ndarray) -> SlicedBatch:
        plan, spec = self.plan, self.plan.spec
        B = len(r)
        sel = {s: _Selection(getattr(timelines, s), r, spec, plan.horizons) for s in SOURCES}
        N = len(spec.features)
        out_vals: list[np.ndarray | None] = [None] * N
        out_w: list[np.ndarray | None] = [None] * N
        lengths = np.zeros((N, B), dtype=np.int64)
        raw = np.zeros((N, B), dtype=np.int64)
        last = len(plan.horizons) - 1
        for (source, flt, _weighted), feats in plan.groups.items():
            s = sel[source]
            mask, w = self._predicate(s, flt)
            passing = np.flatnonzero(mask)
            for k in feats:
                f = spec.features[k]
                lvl = plan.win_level[f.window]
                if lvl == last and plan.horizons[lvl] is None:
                    pos = passing
                else:
                    within = s.positions_within(lvl)
                    pos = within[mask[within]]
                table = spec.tables[f.table]
                ids = s.codes(f.id_type, table.hash_size)
                codes, wts = ids.entries(pos, w)
                out_vals[k], out_w[k], lengths[k], raw[k] = _bags(codes, wts, ids, B, table.dedup)
        values = np.concatenate([v for v in out_vals if v is not None] or [np.zeros(0, np.int64)])
        weights = np.concatenate([v for v in out_w if v is not None] or [np.zeros(0, np.float32)])
        return SlicedBatch(
            list(spec.feature_names),
            B,
            values,
            weights.astype(np.float32, copy=False),
            lengths.reshape(-1),
            raw.reshape(-1),
            r,
            np.asarray(timelines.user_ids, np.int64),
        )

    def _predicate(self, s: _Selection, flt: SliceFilter) -> tuple[np.ndarray, np.ndarray | None]:
        vocab = self.plan.vocab
        mask = np.ones(len(s.idx), dtype=bool)
        for values, name, known in (
            (flt.actions, "action", vocab.actions),
            (flt.media_types, "media_type", vocab.media_types),
            (flt.surfaces, "surface", vocab.surfaces),
        ):
            if values is not None:
                lut = np.zeros(len(known), dtype=bool)
                lut[[known.index(v) for v in values]] = True
                mask &= lut[s.attr(name)]
        weights = None
        if flt.dwell is not None:
            mask &= _in_band(s.attr("dwell_time"), flt.dwell)
        if flt.watch_ratio is not None:
            mask &= _in_band(s.derived(("ratio", flt.beta)), flt.watch_ratio)  # NaN (not a video) fails
        if flt.debiased is not None:
            gamma, s0 = flt.debiased
            score = s.derived(("debiased", gamma))
            mask &= score > s0  # NaN / inf (not a video) fail
            weights = score
        return mask, weights


class _Selection:
    """Events of one source kept for a batch (positions ``p`` index ``idx``), with per-id-type dense codes.

    ``idx[p]`` is the event, ``row[p]`` its batch row, ``level[p]`` the smallest window holding it. For each
    id type, ``codes`` numbers the distinct (row, hashed id) pairs of the batch densely in (row, id)
    order, so a feature's bag is a ``bincount`` over codes instead of a sort of its ids.
    """

    def __init__(self, t: EventTable, request_ts: np.ndarray, spec: SliceSpec, horizons: list[int | None]) -> None:
        B = len(request_ts)
        self.t, self.B = t, B
        hi = _row_searchsorted(t, request_ts - spec.gap_s, side="right")
        lo = np.maximum(t.offsets[:-1], hi - spec.cap)
        n = hi - lo
        self.idx = _ranges(lo, n)
        self.row = np.repeat(np.arange(B, dtype=np.int64), n)
        level = np.zeros(len(self.idx), dtype=np.int8)
        for h in horizons:
            if h is not None:
                lo_w = np.maximum(lo, _row_searchsorted(t, request_ts - h, side="left"))
                level += (self.idx < lo_w[self.row]).astype(np.int8)
        self.level = level
        self._by_level: dict[int, np.ndarray] = {}
        self._codes: dict[str, _IdCodes] = {}
        self._cache: dict[tuple[str, Any], np.ndarray] = {}

    def attr(self, name: str) -> np.ndarray:
        """An event column gathered at the selected events (cached)."""
        key = ("attr", name)
        if key not in self._cache:
            col = getattr(self.t, name)
            self._cache[key] = col[self.idx].astype(np.float64) if col.dtype.kind == "f" else col[self.idx]
        return self._cache[key]

    def derived(self, key: tuple[str, float]) -> np.ndarray:
        """Eq. 4 ratio ``dwell / duration**beta`` or Eq. 5 score, NaN for non-videos (cached)."""
        if key not in self._cache:
            dwell, dur = self.attr("dwell_time"), self.attr("video_duration")
            video = dur > 0
            with np.errstate(divide="ignore", invalid="ignore"):
                if key[0] == "ratio":
                    v = dwell / np.power(dur, key[1])
                else:
                    v = np.log1p(dwell) / np.log1p(key[1] * dur)
            self._cache[key] = np.where(video & np.isfinite(v), v, np.nan)
        return self._cache[key]

    def positions_within(self, lvl: int) -> np.ndarray:
        """Positions of events inside window level ``lvl`` (cached)."""
        if lvl not in self._by_level:
            self._by_level[lvl] = np.flatnonzero(self.level <= lvl)
        return self._by_level[lvl]

    def codes(self, id_type: str, hash_size: int) -> _IdCodes:
        if id_type not in self._codes:
            self._codes[id_type] = _IdCodes(self, id_type, hash_size)
        return self._codes[id_type]


class _IdCodes:
    """Dense (row, hashed id) codes of every id entry of a selection, for one id type."""

    def __init__(self, sel: _Selection, id_type: str, hash_size: int) -> None:
        t = sel.t
        if id_type == "topic":
            ts, te = t.topic_offsets[sel.idx], t.topic_offsets[sel.idx + 1]
            counts = te - ts
            self.entry_start = np.concatenate([[0], np.cumsum(counts)])[:-1]
            self.entry_count = counts
            ids = t.topic_values[_ranges(ts, counts)]
            rows = np.repeat(sel.row, counts)
        else:
            ids = (t.media_id if id_type == "media" else t.author_id)[sel.idx]
            self.entry_start, self.entry_count = None, None
            rows = sel.row
        valid = ids >= 0  # unknown authors (-1) are skipped
        key = rows * hash_size + np.where(valid, ids, 0) % hash_size
        uniq, inv = np.unique(key, return_inverse=True)
        self.codes = np.where(valid, inv.reshape(-1), -1)
        self.uniq_row = uniq // hash_size
        self.uniq_hid = uniq - self.uniq_row * hash_size
        self.size = len(uniq)
        self.has_invalid = not bool(valid.all())

    def entries(self, pos: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Codes (and per-entry weights) of the id entries of the events at positions ``pos``."""
        if self.entry_start is None:
            c, ww = self.codes[pos], (w[pos] if w is not None else None)
        else:
            n = self.entry_count[pos]
            c = self.codes[_ranges(self.entry_start[pos], n)]
            ww = np.repeat(w[pos], n) if w is not None else None
        if self.has_invalid:
            ok = c >= 0
            c, ww = c[ok], (ww[ok] if ww is not None else None)
        return c, ww


def _row_searchsorted(t: EventTable, thresholds: np.ndarray, side: str) -> np.ndarray:
    """Per row b, the global index of searchsorted(ts[row b], thresholds[b], side)."""
    B = len(t.user_ids)
    if B == 0:
        return np.zeros(0, np.int64)
    # ts are sorted within each row: shift rows apart so one global searchsorted answers all of them
    tmin = int(min(t.ts.min(initial=0), thresholds.min(initial=0)))
    tmax = int(max(t.ts.max(initial=0), thresholds.max(initial=0)))
    span = tmax - tmin + 2
    if B * span < 2**62:
        row = np.repeat(np.arange(B, dtype=np.int64), np.diff(t.offsets))
        key = row * span + (t.ts - tmin)
        q = np.arange(B, dtype=np.int64) * span + (np.asarray(thresholds, np.int64) - tmin)
        return np.searchsorted(key, q, side=side).astype(np.int64)  # type: ignore[call-overload]
    return np.array(
        [
            t.offsets[b] + np.searchsorted(t.ts[t.offsets[b] : t.offsets[b + 1]], thresholds[b], side=side)
            for b in range(B)
        ],
        dtype=np.int64,
    )


def _in_band(x: np.ndarray, band: tuple[float, float | None]) -> np.ndarray:
    lb, ub = band
    m = x >= lb
    if ub is not None:
        m &= x < ub
    return m


def _bags(
    codes: np.ndarray, w: np.ndarray | None, ids: _IdCodes, B: int, dedup: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bags per row from dense codes: (values, weights, lengths [B], occurrences [B]).

    ``codes`` are ordered by row (positions are row-major), so without dedup the bags are already in
    KJT order; with dedup a ``bincount`` over the dense code space merges repeats in (row, id) order.
    """
    occ_rows = ids.uniq_row[codes]
    raw = np.bincount(occ_rows, minlength=B)
    wsrc = np.ones(len(codes), dtype=np.float64) if w is None else w.astype(np.float64)
    if not dedup:
        total = np.bincount(occ_rows, weights=wsrc, minlength=B)
        with np.errstate(invalid="ignore", divide="ignore"):
            return ids.uniq_hid[codes], (wsrc / total[occ_rows]).astype(np.float32), raw, raw
    if len(codes) * 8 < ids.size:  # small bag set: sorting it beats scanning the whole code space
        uniq, inv = np.unique(codes, return_inverse=True)
        sums = np.bincount(inv.reshape(-1), weights=wsrc, minlength=len(uniq))
    else:
        sums_all = np.bincount(codes, weights=wsrc, minlength=ids.size)
        uniq = np.flatnonzero(sums_all if w is None else np.bincount(codes, minlength=ids.size))
        sums = sums_all[uniq]
    urow = ids.uniq_row[uniq]
    total = np.bincount(urow, weights=sums, minlength=B)
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = (sums / total[urow]).astype(np.float32)
    return ids.uniq_hid[uniq], weights, np.bincount(urow, minlength=B), raw
