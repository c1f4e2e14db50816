"""Rule-based multi-slicing of UniTi timelines (paper §2.2, Eq. 2-6) into pooled-feature bags.

A :class:`SliceSpec` is data (YAML, see ``specs/*.yaml``): *families* of slices, each slice a filter on
one timeline (explicit or implicit) -- action / media type / surface sets (Eq. 2), dwell-time bands
(Eq. 3), watch-ratio bands ``dwell / duration**beta`` (Eq. 4) or the duration-debiased weighted score
``s = ln(dwell + 1) / ln(gamma * duration + 1) > s0`` (Eq. 5) -- crossed with time windows (Eq. 6) and id
types (media / author / topic). Every (family, slice, window, id type) is one categorical *feature*, and
features share embedding tables by a name template (positive/negative, implicit/explicit, id type,
weighted...).

For a batch of (timeline, request time) rows the slicer keeps events with ``t <= request - gap`` (the
24 h distant-interest gap), the most recent ``cap`` of them per timeline, and emits per feature and row a
*bag*: hashed ids (``id % hash_size``) with weights. Mean pooling of a bag is expressed exactly as
count-weighted pooling of its unique ids (``w = count / len``), a weighted feature as ``w = sum(s) / sum(s)``
over the bag, so each non-empty bag's weights sum to 1 and ``EmbeddingBagCollection(SUM)`` with
per-sample weights computes the paper's pooling with fewer row reads (see ENVIRONMENT notes: EBC cannot do
weighted MEAN).

:class:`Slicer` is the vectorised implementation (numpy over the whole batch);
:func:`reference_slice` is a plain-Python reference of the same semantics, used by the tests.

Semantics in one place (both implementations follow them):

* kept events: ``t <= r - gap``; then the last ``cap`` per timeline; window ``W``: ``r - t <= W``.
* dwell band ``[lb, ub)``: ``lb <= dwell < ub`` (``ub`` null = no upper bound).
* watch-ratio band ``[lb, ub)`` and the debiased score apply to videos only (``duration > 0``).
* unknown authors (``-1``) are skipped; an event contributes each of its topic ids to ``topic`` bags.
* a bag lists unique hashed ids in ascending order (``dedup: true``) or every occurrence in time order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import yaml

from dv365.core.errors import SliceSpecError
from dv365.core.timeline import EventTable, Timelines, _ranges
from dv365.core.vocab import Vocabulary

ID_TYPES = ("media", "author", "topic")
SOURCES = ("explicit", "implicit")
_SLICE_KEYS = {"action", "media_type", "surface", "dwell", "watch_ratio", "debiased", "polarity"}
_FAMILY_KEYS = {"name", "source", "windows", "ids", "table", "slices", "beta", "weighted"}


# ------------------------------------------------------------------------------------------------------
# Spec
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceFilter:
    """The event predicate of one slice. ``None`` fields do not filter.

    Args:
        actions / media_types / surfaces: allowed values (Eq. 2).
        dwell: ``(lb, ub)`` seconds, ``lb <= dwell < ub`` (Eq. 3); ``ub=None`` is unbounded.
        watch_ratio: ``(lb, ub)`` on ``dwell / duration**beta`` (Eq. 4), videos only.
        beta: the Eq. 4 exponent.
        debiased: ``(gamma, s0)``: keep ``s > s0`` with ``s = ln(dwell+1)/ln(gamma*duration+1)`` (Eq. 5).
    """

    actions: tuple[str, ...] | None = None
    media_types: tuple[str, ...] | None = None
    surfaces: tuple[str, ...] | None = None
    dwell: tuple[float, float | None] | None = None
    watch_ratio: tuple[float, float | None] | None = None
    beta: float = 1.0
    debiased: tuple[float, float] | None = None


@dataclass(frozen=True)
class Feature:
    """One sliced categorical feature: ``<family>.<slice>.<window>.<id_type>``."""

    name: str
    source: str
    filter: SliceFilter
    window: str
    id_type: str
    table: str
    weighted: bool = False


@dataclass(frozen=True)
class TableSpec:
    """An embedding table shared by several features (all of one id type)."""

    name: str
    id_type: str
    hash_size: int
    dedup: bool
    features: tuple[str, ...]


@dataclass(frozen=True)
class SliceSpec:
    """A declarative multi-slicing spec. Load with :meth:`load` / :meth:`load_default` / :meth:`from_dict`.

    Example::

        spec = SliceSpec.load_default("kuairand")
        len(spec.features)           # 201
        spec.tables["explicit_pos_author"].features[:2]
    """

    name: str
    gap_s: int
    cap: int
    windows: Mapping[str, int | None]  # seconds, None = all history
    features: tuple[Feature, ...]
    tables: Mapping[str, TableSpec]
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    # -- loading ---------------------------------------------------------------------------------------
    @classmethod
    def load_default(cls, name: str) -> "SliceSpec":
        """A spec shipped with dv365-core: ``"kuairand"`` (201 features) or ``"movielens"``."""
        try:
            text = resources.files("dv365.core").joinpath("specs", f"{name}.yaml").read_text()
        except FileNotFoundError:
            raise SliceSpecError(f"no default slice spec named {name!r}; shipped: {default_spec_names()}") from None
        return cls.from_dict(yaml.safe_load(text))

    @classmethod
    def load(cls, name_or_path: str | Path) -> "SliceSpec":
        """A shipped spec by name, or a YAML file path."""
        p = Path(name_or_path)
        if p.suffix in (".yaml", ".yml") or p.exists():
            if not p.exists():
                raise SliceSpecError(f"slice spec file not found: {p}")
            return cls.from_dict(yaml.safe_load(p.read_text()))
        return cls.load_default(str(name_or_path))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SliceSpec":
        if not isinstance(d, Mapping):
            raise SliceSpecError(f"a slice spec must be a mapping, got {type(d).__name__}")
        for key in ("name", "windows", "id_types", "families"):
            if key not in d:
                raise SliceSpecError(f"slice spec: missing top-level key {key!r}")
        unknown = set(d) - {"name", "gap_hours", "cap", "windows", "id_types", "families"}
        if unknown:
            raise SliceSpecError(f"slice spec {d['name']!r}: unknown top-level keys {sorted(unknown)}")
        windows = {str(k): (None if v is None else int(round(float(v) * 3600))) for k, v in d["windows"].items()}
        id_types = _parse_id_types(d["id_types"])
        features: list[Feature] = []
        table_ids: dict[str, str] = {}
        table_feats: dict[str, list[str]] = {}
        for fam in d["families"]:
            for feat in _expand_family(fam, windows, id_types):
                if feat.table in table_ids and table_ids[feat.table] != feat.id_type:
                    raise SliceSpecError(
                        f"feature {feat.name!r}: table {feat.table!r} would mix id types "
                        f"{table_ids[feat.table]!r} and {feat.id_type!r}; put {{id}} in the table template")
                table_ids[feat.table] = feat.id_type
                table_feats.setdefault(feat.table, []).append(feat.name)
                features.append(feat)
        names = [f.name for f in features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SliceSpecError(f"slice spec {d['name']!r}: duplicate feature names {dupes}")
        tables = {
            t: TableSpec(t, table_ids[t], id_types[table_ids[t]][0], id_types[table_ids[t]][1], tuple(fs))
            for t, fs in table_feats.items()
        }
        gap_h = float(d.get("gap_hours", 24))
        cap = int(d.get("cap", 35_000))
        if gap_h < 0 or cap <= 0:
            raise SliceSpecError(f"slice spec {d['name']!r}: gap_hours must be >= 0 and cap > 0")
        return cls(str(d["name"]), int(round(gap_h * 3600)), cap, windows, tuple(features), tables, raw=dict(d))

    def check_vocab(self, vocab: Vocabulary) -> None:
        """Every action / media type / surface named by the spec must be in ``vocab``."""
        for f in self.features:
            for values, known, what in (
                (f.filter.actions, vocab.actions, "action"),
                (f.filter.media_types, vocab.media_types, "media_type"),
                (f.filter.surfaces, vocab.surfaces, "surface"),
            ):
                for v in values or ():
                    if v not in known:
                        raise SliceSpecError(f"feature {f.name!r}: {what} {v!r} is not in the dataset vocabulary {list(known)}")


def default_spec_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("dv365.core").joinpath("specs").iterdir() if p.name.endswith(".yaml"))


def _parse_id_types(d: Mapping[str, Any]) -> dict[str, tuple[int, bool]]:
    out = {}
    for k, v in d.items():
        if k not in ID_TYPES:
            raise SliceSpecError(f"id_types: unknown id type {k!r}; known: {list(ID_TYPES)}")
        v = v or {}
        hs = int(v.get("hash_size", 0))
        if hs <= 0:
            raise SliceSpecError(f"id_types.{k}.hash_size must be a positive integer, got {v.get('hash_size')!r}")
        out[k] = (hs, bool(v.get("dedup", True)))
    return out


def _band(feature: str, key: str, v: Any) -> tuple[float, float | None]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise SliceSpecError(f"feature {feature!r}: {key} must be [lower, upper] (upper may be null), got {v!r}")
    lb, ub = float(v[0]), (None if v[1] is None else float(v[1]))
    if ub is not None and ub <= lb:
        raise SliceSpecError(f"feature {feature!r}: {key} upper bound {ub} must exceed lower bound {lb}")
    return lb, ub


def _expand_family(fam: Mapping[str, Any], windows: Mapping[str, int | None],
                   id_types: Mapping[str, tuple[int, bool]]) -> Iterable[Feature]:
    fname = fam.get("name")
    if not fname:
        raise SliceSpecError(f"a family has no name: {dict(fam)!r}")
    unknown = set(fam) - _FAMILY_KEYS
    if unknown:
        raise SliceSpecError(f"family {fname!r}: unknown keys {sorted(unknown)}; allowed {sorted(_FAMILY_KEYS)}")
    source = fam.get("source")
    if source not in SOURCES:
        raise SliceSpecError(f"family {fname!r}: source must be one of {SOURCES}, got {source!r}")
    fam_windows = list(fam.get("windows", ["all"]))
    for w in fam_windows:
        if w not in windows:
            raise SliceSpecError(f"family {fname!r}: unknown window {w!r}; defined: {list(windows)}")
    ids = list(fam.get("ids", []))
    for i in ids:
        if i not in id_types:
            raise SliceSpecError(f"family {fname!r}: id type {i!r} has no entry in id_types {list(id_types)}")
    weighted = bool(fam.get("weighted", False))
    beta = float(fam.get("beta", 1.0))
    template = str(fam.get("table", "{source}_{id}"))
    slices = fam.get("slices") or {}
    if not slices:
        raise SliceSpecError(f"family {fname!r}: no slices")
    for sname, s in slices.items():
        s = s or {}
        feature = f"{fname}.{sname}"
        bad = set(s) - _SLICE_KEYS
        if bad:
            raise SliceSpecError(f"feature {feature!r}: unknown slice keys {sorted(bad)}; allowed {sorted(_SLICE_KEYS)}")
        flt = _parse_filter(feature, s, source, beta)
        if weighted != (flt.debiased is not None):
            raise SliceSpecError(f"feature {feature!r}: a weighted family needs a 'debiased' filter on every slice, "
                                 "and only weighted families may use one")
        for w in fam_windows:
            for i in ids:
                try:
                    table = template.format(id=i, polarity=s.get("polarity", "neu"), source=source, family=fname,
                                            weighted="w" if weighted else "u")
                except KeyError as e:
                    raise SliceSpecError(f"family {fname!r}: table template {template!r} uses unknown field {e}") from None
                yield Feature(f"{feature}.{w}.{i}", source, flt, w, i, table, weighted)


def _parse_filter(feature: str, s: Mapping[str, Any], source: str, beta: float) -> SliceFilter:
    def names(key: str) -> tuple[str, ...] | None:
        v = s.get(key)
        if v is None:
            return None
        if isinstance(v, str):
            v = [v]
        return tuple(str(x) for x in v)

    implicit_only = [k for k in ("dwell", "watch_ratio", "debiased") if k in s]
    if source == "explicit" and implicit_only:
        raise SliceSpecError(f"feature {feature!r}: {implicit_only} need dwell/duration: use source implicit")
    if source == "implicit" and "action" in s:
        raise SliceSpecError(f"feature {feature!r}: 'action' filters apply to the explicit timeline only")
    deb = None
    if "debiased" in s:
        d = s["debiased"] or {}
        gamma, s0 = float(d.get("gamma", 1.0)), float(d.get("s0", 0.0))
        if gamma <= 0:
            raise SliceSpecError(f"feature {feature!r}: debiased.gamma must be > 0, got {gamma}")
        deb = (gamma, s0)
    return SliceFilter(
        actions=names("action"), media_types=names("media_type"), surfaces=names("surface"),
        dwell=_band(feature, "dwell", s["dwell"]) if "dwell" in s else None,
        watch_ratio=_band(feature, "watch_ratio", s["watch_ratio"]) if "watch_ratio" in s else None,
        beta=beta, debiased=deb,
    )


# ------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------
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
        return self.values[start:start + n], self.weights[start:start + n]

    def to_kjt(self) -> Any:
        """A torchrec ``KeyedJaggedTensor`` (needs the ``dv365-core[torchrec]`` extra)."""
        from dv365.core.kjt import to_kjt

        return to_kjt(self)


# ------------------------------------------------------------------------------------------------------
# Vectorised slicer
# ------------------------------------------------------------------------------------------------------
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

    def codes(self, id_type: str, hash_size: int) -> "_IdCodes":
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
    return np.array([t.offsets[b] + np.searchsorted(t.ts[t.offsets[b]:t.offsets[b + 1]], thresholds[b], side=side)
                     for b in range(B)], dtype=np.int64)


class Slicer:
    """Vectorised multi-slicer: (timelines, request times) -> :class:`SlicedBatch`.

    Args:
        spec: the slice spec.
        vocab: the dataset's vocabulary (codes of actions / media types / surfaces).

    Example::

        slicer = Slicer(SliceSpec.load_default("kuairand"), dataset.vocab)
        batch = slicer.slice(timelines, request_ts=np.array([...]))   # [B] unix seconds
        batch.lengths.reshape(len(batch.keys), len(timelines))        # [N, B] bag sizes
    """

    def __init__(self, spec: SliceSpec, vocab: Vocabulary) -> None:
        spec.check_vocab(vocab)
        self.spec, self.vocab = spec, vocab
        order = sorted(spec.windows, key=lambda w: math.inf if spec.windows[w] is None else spec.windows[w])  # type: ignore[operator]
        self._win_level = {w: i for i, w in enumerate(order)}
        self._horizons = [spec.windows[w] for w in order]
        # features grouped by (source, filter, weighted) so each predicate is evaluated once per batch
        self._groups: dict[tuple[str, SliceFilter, bool], list[int]] = {}
        for k, f in enumerate(spec.features):
            self._groups.setdefault((f.source, f.filter, f.weighted), []).append(k)

    def slice(self, timelines: Timelines, request_ts: Sequence[int] | np.ndarray) -> SlicedBatch:
        r = np.asarray(request_ts, dtype=np.int64).reshape(-1)
        B = len(timelines)
        if len(r) != B:
            raise ValueError(f"request_ts has {len(r)} entries for {B} timelines")
        sel = {s: _Selection(getattr(timelines, s), r, self.spec, self._horizons) for s in SOURCES}
        N = len(self.spec.features)
        out_vals: list[np.ndarray | None] = [None] * N
        out_w: list[np.ndarray | None] = [None] * N
        lengths = np.zeros((N, B), dtype=np.int64)
        raw = np.zeros((N, B), dtype=np.int64)
        last = len(self._horizons) - 1
        for (source, flt, weighted), feats in self._groups.items():
            s = sel[source]
            mask, w = self._predicate(s, flt)
            passing = np.flatnonzero(mask)
            for k in feats:
                f = self.spec.features[k]
                lvl = self._win_level[f.window]
                if lvl == last and self._horizons[lvl] is None:
                    pos = passing
                else:
                    within = s.positions_within(lvl)
                    pos = within[mask[within]]
                table = self.spec.tables[f.table]
                ids = s.codes(f.id_type, table.hash_size)
                codes, wts = ids.entries(pos, w)
                out_vals[k], out_w[k], lengths[k], raw[k] = _bags(codes, wts, ids, B, table.dedup)
        values = np.concatenate([v for v in out_vals if v is not None] or [np.zeros(0, np.int64)])
        weights = np.concatenate([v for v in out_w if v is not None] or [np.zeros(0, np.float32)])
        return SlicedBatch(list(self.spec.feature_names), B, values, weights.astype(np.float32, copy=False),
                           lengths.reshape(-1), raw.reshape(-1), r, np.asarray(timelines.user_ids, np.int64))

    def _predicate(self, s: _Selection, flt: SliceFilter) -> tuple[np.ndarray, np.ndarray | None]:
        mask = np.ones(len(s.idx), dtype=bool)
        for values, name, vocab in (
            (flt.actions, "action", self.vocab.actions),
            (flt.media_types, "media_type", self.vocab.media_types),
            (flt.surfaces, "surface", self.vocab.surfaces),
        ):
            if values is not None:
                lut = np.zeros(len(vocab), dtype=bool)
                lut[[vocab.index(v) for v in values]] = True
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


def _in_band(x: np.ndarray, band: tuple[float, float | None]) -> np.ndarray:
    lb, ub = band
    m = x >= lb
    if ub is not None:
        m &= x < ub
    return m


def _bags(codes: np.ndarray, w: np.ndarray | None, ids: _IdCodes, B: int,
          dedup: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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


# ------------------------------------------------------------------------------------------------------
# Reference (plain Python, one event at a time)
# ------------------------------------------------------------------------------------------------------
def reference_slice(spec: SliceSpec, timelines: Timelines, request_ts: Sequence[int]) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """The slicing semantics in plain Python: ``{(feature, row): [(hashed id, weight), ...]}``.

    Slow and obvious on purpose; the vectorised :class:`Slicer` must agree with it.
    """
    vocab = timelines.vocab
    out: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for b, r in enumerate(request_ts):
        r = int(r)
        for f in spec.features:
            t: EventTable = getattr(timelines, f.source)
            start, end = int(t.offsets[b]), int(t.offsets[b + 1])
            kept = [i for i in range(start, end) if int(t.ts[i]) <= r - spec.gap_s][-spec.cap:]
            horizon = spec.windows[f.window]
            occurrences: list[tuple[int, float]] = []
            for i in kept:
                if horizon is not None and r - int(t.ts[i]) > horizon:
                    continue
                ok, w = _ref_match(t, i, f.filter, vocab)
                if not ok:
                    continue
                for id_ in _ref_ids(t, i, f.id_type):
                    occurrences.append((id_ % spec.tables[f.table].hash_size, w))
            total = sum(w for _, w in occurrences)
            if spec.tables[f.table].dedup:
                acc: dict[int, float] = {}
                for id_, w in occurrences:
                    acc[id_] = acc.get(id_, 0.0) + w
                bag = [(id_, acc[id_] / total) for id_ in sorted(acc)]
            else:
                bag = [(id_, w / total) for id_, w in occurrences]
            out[(f.name, b)] = bag
    return out


def _ref_match(t: EventTable, i: int, flt: SliceFilter, vocab: Vocabulary) -> tuple[bool, float]:
    if flt.actions is not None and vocab.actions[t.action[i]] not in flt.actions:  # type: ignore[index]
        return False, 0.0
    if flt.media_types is not None and vocab.media_types[t.media_type[i]] not in flt.media_types:
        return False, 0.0
    if flt.surfaces is not None and vocab.surfaces[t.surface[i]] not in flt.surfaces:
        return False, 0.0
    w = 1.0
    if t.dwell_time is not None:
        dwell, dur = float(t.dwell_time[i]), float(t.video_duration[i])  # type: ignore[index]
        video = not math.isnan(dur) and dur > 0
        if flt.dwell is not None and not _ref_band(dwell, flt.dwell):
            return False, 0.0
        if flt.watch_ratio is not None and not (video and _ref_band(dwell / dur ** flt.beta, flt.watch_ratio)):
            return False, 0.0
        if flt.debiased is not None:
            gamma, s0 = flt.debiased
            if not video or gamma * dur == 0:
                return False, 0.0
            s = math.log1p(dwell) / math.log1p(gamma * dur)
            if not s > s0:
                return False, 0.0
            w = s
    return True, w


def _ref_band(x: float, band: tuple[float, float | None]) -> bool:
    return x >= band[0] and (band[1] is None or x < band[1])


def _ref_ids(t: EventTable, i: int, id_type: str) -> list[int]:
    if id_type == "media":
        return [int(t.media_id[i])]
    if id_type == "author":
        return [int(t.author_id[i])] if t.author_id[i] >= 0 else []
    return [int(x) for x in t.topic_values[t.topic_offsets[i]:t.topic_offsets[i + 1]]]
