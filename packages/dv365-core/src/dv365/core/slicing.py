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

:class:`Slicer` has two backends with the same semantics: ``numpy`` (vectorised over the whole batch)
and ``numba`` (fused per-row kernels in :mod:`dv365.core._slicing_numba`, ~5x faster; optional:
``pip install 'dv365-core[fast]'``); ``backend="auto"`` (the default) uses numba when it imports, else
numpy. (The numba backend was opt-in until a bug was fixed where two id types with the same hash size,
e.g. media and author at 20011 rows, shared one code table and produced out-of-range ids; the backend
agreement tests now cover that case.)
:func:`reference_slice` is a plain-Python reference of the same semantics, used by the tests.

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
import math
import threading
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


BACKENDS = ("auto", "numpy", "numba")


def _numba_kernels() -> Any:
    """The numba kernel module, or ImportError with install advice when numba is missing."""
    try:
        return importlib.import_module("dv365.core._slicing_numba")
    except ImportError as e:
        raise ImportError(
            "Slicer(backend='numba') needs numba: pip install 'dv365-core[fast]' "
            f"(or use backend='numpy'); import failed: {e}") from e


def resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"numba"`` when numba imports, else ``"numpy"``; checks the name."""
    if backend not in BACKENDS:
        raise ValueError(f"Slicer backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return "numpy"
    try:
        _numba_kernels()
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
            :mod:`dv365.core._slicing_numba`; needs ``pip install 'dv365-core[fast]'``) or ``"auto"``
            (the default: numba when importable, else numpy). Both give the same bags; the order of ids *within* a dedup'd bag is
            backend-specific and deterministic (numpy: ascending id; numba: most recent occurrence
            first). The first numba call per process compiles the kernels or loads them from numba's
            on-disk cache.

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
        order = sorted(spec.windows, key=lambda w: math.inf if spec.windows[w] is None else spec.windows[w])  # type: ignore[operator]
        self._win_level = {w: i for i, w in enumerate(order)}
        self._horizons = [spec.windows[w] for w in order]
        # features grouped by (source, filter, weighted) so each predicate is evaluated once per batch
        self._groups: dict[tuple[str, SliceFilter, bool], list[int]] = {}
        for k, f in enumerate(spec.features):
            self._groups.setdefault((f.source, f.filter, f.weighted), []).append(k)
        self._fused = _FusedPlan(self) if self.backend == "numba" else None

    def slice(self, timelines: Timelines, request_ts: Sequence[int] | np.ndarray) -> SlicedBatch:
        r = np.asarray(request_ts, dtype=np.int64).reshape(-1)
        B = len(timelines)
        if len(r) != B:
            raise ValueError(f"request_ts has {len(r)} entries for {B} timelines")
        if self._fused is not None:
            return self._fused.slice(timelines, r)
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


# ------------------------------------------------------------------------------------------------------
# Fused numba backend: the spec encoded as arrays for dv365.core._slicing_numba
# ------------------------------------------------------------------------------------------------------
def _pack_bits(passes: np.ndarray) -> np.ndarray:
    """``[..., G]`` bool -> ``[..., ceil(G/64)]`` uint64 words (bit ``g & 63`` of word ``g >> 6``)."""
    G = passes.shape[-1]
    W = max(1, (G + 63) // 64)
    out = np.zeros(passes.shape[:-1] + (W,), np.uint64)
    for g in range(G):
        out[..., g >> 6] |= passes[..., g].astype(np.uint64) << np.uint64(g & 63)
    return out


def _band_bins(groups: list[tuple[float, float | None] | None]) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds ``T`` (sorted unique) and ``pass[bin, g]`` for bands ``lb <= x < ub``, bin = #(T <= x).

    A group without a band (``None``) passes every bin; bin 0 (below every ``lb``, or NaN) fails every band.
    """
    thr = np.array(sorted({v for band in groups if band for v in band if v is not None}), np.float64)
    rank = {v: i for i, v in enumerate(thr.tolist())}
    bins = np.arange(len(thr) + 1)[:, None]
    passes = np.ones((len(thr) + 1, len(groups)), bool)
    for g, band in enumerate(groups):
        if band is not None:
            lb, ub = band
            ok = bins[:, 0] >= rank[lb] + 1
            if ub is not None:
                ok &= bins[:, 0] <= rank[ub]
            passes[:, g] = ok
    return thr, passes


def _padded(parts: list[tuple[np.ndarray, np.ndarray]], G: int) -> tuple[np.ndarray, np.ndarray]:
    """Per parameter value j: thresholds padded with +inf ``[J, M]`` and packed masks ``[J, M + 1, W]``."""
    M = max([len(t) for t, _ in parts], default=0)
    thr = np.full((len(parts), M), np.inf)
    passes = np.ones((len(parts), M + 1, G), bool)
    for j, (t, p) in enumerate(parts):
        thr[j, :len(t)] = t
        passes[j, :len(p)] = p
    return thr, _pack_bits(passes)


class _FusedSource:
    """One source's feature groups as look-up tables and thresholds (see ``_slicing_numba._word_mask``)."""

    def __init__(self, slicer: Slicer, source: str) -> None:
        spec, vocab = slicer.spec, slicer.vocab
        groups = [(flt, feats) for (src, flt, _w), feats in slicer._groups.items() if src == source]
        G, L = len(groups), len(slicer._horizons)
        flts = [flt for flt, _ in groups]
        self.feat = np.full((G, L, len(ID_TYPES)), -1, np.int64)
        self.aliases: list[tuple[int, int]] = []  # (feature, identical earlier feature of the same group)
        for g, (_flt, feats) in enumerate(groups):
            for k in feats:
                f = spec.features[k]
                slot = (g, slicer._win_level[f.window], ID_TYPES.index(f.id_type))
                if self.feat[slot] >= 0:
                    self.aliases.append((k, int(self.feat[slot])))
                else:
                    self.feat[slot] = k

        def lut(values: list[tuple[str, ...] | None], names: tuple[str, ...]) -> np.ndarray:
            passes = np.ones((len(names), G), bool)
            for g, allowed in enumerate(values):
                if allowed is not None:
                    passes[:, g] = [n in allowed for n in names]
            return _pack_bits(passes)

        actions = [f.actions for f in flts]
        self.act_m = lut(actions, vocab.actions) if any(a is not None for a in actions) else np.zeros((0, max(1, (G + 63) // 64)), np.uint64)
        self.mt_m = lut([f.media_types for f in flts], vocab.media_types)
        self.sf_m = lut([f.surfaces for f in flts], vocab.surfaces)
        d_thr, d_pass = _band_bins([f.dwell for f in flts])
        self.d_thr, self.d_m = d_thr[None, :], _pack_bits(d_pass)[None]
        betas = sorted({f.beta for f in flts if f.watch_ratio is not None})
        self.betas = np.array(betas, np.float64)
        self.r_thr, self.r_m = _padded([_band_bins([f.watch_ratio if f.watch_ratio is not None and f.beta == b else None
                                                    for f in flts]) for b in betas], G)
        gammas = sorted({f.debiased[0] for f in flts if f.debiased is not None})
        self.gammas = np.array(gammas, np.float64)
        deb = []
        for gm in gammas:  # s > s0  <=>  #(S < s) >= rank(s0) + 1
            s0s = np.array(sorted({x.debiased[1] for x in flts if x.debiased is not None and x.debiased[0] == gm}))
            passes = np.ones((len(s0s) + 1, G), bool)
            for g, x in enumerate(flts):
                if x.debiased is not None and x.debiased[0] == gm:
                    passes[:, g] = np.arange(len(s0s) + 1) >= int(np.searchsorted(s0s, x.debiased[1])) + 1
            deb.append((s0s, passes))
        self.s_thr, self.s_m = _padded(deb, G)
        self.g_gamma = np.array([gammas.index(x.debiased[0]) if x.debiased is not None else -1 for x in flts], np.int64)
        if not betas:
            self.r_m = np.zeros((0, 1, self.d_m.shape[-1]), np.uint64)
            self.r_thr = np.zeros((0, 0))
        if not gammas:
            self.s_m = np.zeros((0, 1, self.d_m.shape[-1]), np.uint64)
            self.s_thr = np.zeros((0, 0))
        self.empty = G == 0


_DURATION_CACHE = 1 << 15  # slots of the per-thread duration cache (768 KB with one beta and one gamma)
# Per-thread scratch shared by every numba Slicer of the thread: direct-mapped id -> code tables (4 MB for
# a 1M hash size; all -1 between calls) and the row-major bag buffers (reused: no page faults per batch).
_WORKSPACE = threading.local()


class _FusedPlan:
    """The spec as arrays for the numba kernels, plus per-thread caches."""

    def __init__(self, slicer: Slicer) -> None:
        self.nb = _numba_kernels()
        self.spec = slicer.spec
        self.sources = [_FusedSource(slicer, s) for s in SOURCES]
        self.horizons = np.array([-1 if h is None else h for h in slicer._horizons], np.int64)
        hs = {t.id_type: t.hash_size for t in self.spec.tables.values()}
        dd = {t.id_type: t.dedup for t in self.spec.tables.values()}
        self.hash_size = np.array([hs.get(i, 0) for i in ID_TYPES], np.int64)  # 0: id type not in the spec
        self.dedup = np.array([dd.get(i, True) for i in ID_TYPES], np.bool_)
        self.direct = np.array([i in hs and hs[i] <= self.nb.DIRECT_MAX for i in ID_TYPES], np.bool_)
        self.seg_src = np.array([SOURCES.index(f.source) for f in self.spec.features], np.int64)
        self._local = threading.local()
        #: derive author / topic bags from media bags where a row allows it (exact; False = always count)
        self.derive = True

    def __getstate__(self) -> dict[str, Any]:  # picklable (DataLoader workers): no module, no thread-local
        return {k: v for k, v in self.__dict__.items() if k not in ("nb", "_local")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.nb = _numba_kernels()
        self._local = threading.local()

    def _cmaps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This thread's direct-mapped code tables for our hash sizes (all -1 between kernel calls)."""
        # keyed by (id type, size): one table per id type even when two id types share a hash size (the
        # kernels fill the media, author and topic tables at the same time; a shared table mixed their codes)
        maps: dict[tuple[int, int], np.ndarray] = _WORKSPACE.__dict__.setdefault("cmaps", {})
        out = []
        for i, (h, d) in enumerate(zip(self.hash_size.tolist(), self.direct.tolist())):
            if d and (i, h) not in maps:
                maps[(i, h)] = np.full(h, -1, np.int32)
            out.append(maps[(i, h)] if d else np.zeros(0, np.int32))
        return out[0], out[1], out[2]

    def _duration_cache(self, src: _FusedSource) -> np.ndarray:
        """This thread's cache of ``duration**beta`` / ``log1p(gamma * duration)`` (see ``_duration_slot``)."""
        key = f"dcache_{id(src)}"
        cache = getattr(self._local, key, None)
        if cache is None:
            size = _DURATION_CACHE if (len(src.betas) or len(src.gammas)) else 1
            cache = np.full((size + 1, 1 + len(src.betas) + len(src.gammas)), -1.0)
            cache[-1] = np.nan  # the row for non-videos
            setattr(self._local, key, cache)
        assert isinstance(cache, np.ndarray)
        return cache

    @staticmethod
    def _buffers(source: str, guess: int) -> tuple[np.ndarray, np.ndarray]:
        """This thread's row-major bag buffers of one source."""
        bufs: tuple[np.ndarray, np.ndarray] | None = getattr(_WORKSPACE, f"buf_{source}", None)
        if bufs is None or len(bufs[0]) < guess // 4:  # first batch, or much larger batches than before
            bufs = np.empty(max(1024, guess), np.int64), np.empty(max(1024, guess), np.float32)
        return bufs

    def slice(self, timelines: Timelines, r: np.ndarray) -> SlicedBatch:
        N, B = len(self.spec.features), len(r)
        seg_start = np.zeros((N, B), np.int64)
        seg_len = np.zeros((N, B), np.int64)
        seg_raw = np.zeros((N, B), np.int64)
        cmaps = self._cmaps()
        bufs: list[np.ndarray] = []
        for source, src in zip(SOURCES, self.sources):
            t: EventTable = getattr(timelines, source)
            vals, wts = np.zeros(0, np.int64), np.zeros(0, np.float32)
            if not src.empty:
                vals, wts = self._buffers(source, 4 * t.num_events)
                try:
                    vals, wts, _used = self.nb.slice_source(
                        _i64(t.ts), _i64(t.offsets), _i64(t.media_id), _i64(t.author_id), _i64(t.topic_offsets),
                        _i64(t.topic_values), _i16(t.action), _i16(t.media_type), _i16(t.surface),
                        _f32(t.dwell_time), _f32(t.video_duration), _i64(r), self.spec.gap_s, self.spec.cap,
                        self.horizons, src.act_m, src.mt_m, src.sf_m, src.d_thr, src.d_m, src.betas, src.r_thr,
                        src.r_m, src.gammas, src.s_thr, src.s_m, src.g_gamma, src.feat, self.hash_size,
                        self.dedup, self.direct, cmaps, self.derive, self._duration_cache(src), seg_start, seg_len,
                        seg_raw, vals, wts)
                except BaseException:  # e.g. MemoryError mid-row: the code tables may not be all -1 any more
                    _WORKSPACE.__dict__.pop("cmaps", None)
                    raise
                setattr(_WORKSPACE, f"buf_{source}", (vals, wts))  # kept (grown) for the next batch
                for k, first in src.aliases:
                    seg_start[k], seg_len[k], seg_raw[k] = seg_start[first], seg_len[first], seg_raw[first]
            bufs.extend((vals, wts))
        values, weights = self.nb.assemble(self.seg_src, seg_start, seg_len, *bufs)
        return SlicedBatch(list(self.spec.feature_names), B, values, weights, seg_len.reshape(-1),
                           seg_raw.reshape(-1), r, np.asarray(timelines.user_ids, np.int64))


def _ro(a: np.ndarray) -> np.ndarray:
    """A read-only view: numba compiles separately for read-only arrays (columns that are zero-copy views
    of Arrow buffers are read-only), so every input column is passed read-only -> one compiled kernel."""
    v = a.view()
    v.flags.writeable = False
    return v


def _i64(a: np.ndarray) -> np.ndarray:
    return _ro(np.ascontiguousarray(a, np.int64))


def _i16(a: np.ndarray | None) -> np.ndarray:
    return _ro(np.zeros(0, np.int16) if a is None else np.ascontiguousarray(a, np.int16))


def _f32(a: np.ndarray | None) -> np.ndarray:
    return _ro(np.zeros(0, np.float32) if a is None else np.ascontiguousarray(a, np.float32))


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
