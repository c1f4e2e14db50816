"""Slice specs (paper §2.2, Eq. 2-6): the declarative description of every sliced feature, and its loader.

A :class:`SliceSpec` is data (YAML; the shipped ones are ``dv365/core/specs/*.yaml``, found with
``importlib.resources``): *families* of slices, each slice a filter on one timeline (explicit or implicit)
-- action / media type / surface sets (Eq. 2), dwell-time bands (Eq. 3), watch-ratio bands
``dwell / duration**beta`` (Eq. 4) or the duration-debiased weighted score
``s = ln(dwell + 1) / ln(gamma * duration + 1) > s0`` (Eq. 5) -- crossed with time windows (Eq. 6) and id
types (media / author / topic). Every (family, slice, window, id type) is one categorical *feature*, and
features share embedding tables by a name template (positive/negative, implicit/explicit, id type,
weighted...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dv365.core.errors import SliceSpecError
from dv365.core.vocab import Vocabulary

ID_TYPES = ("media", "author", "topic")
SOURCES = ("explicit", "implicit")
_SLICE_KEYS = {"action", "media_type", "surface", "dwell", "watch_ratio", "debiased", "polarity"}
_FAMILY_KEYS = {"name", "source", "windows", "ids", "table", "slices", "beta", "weighted"}


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
    def load_default(cls, name: str) -> SliceSpec:
        """A spec shipped with dv365-core: ``"kuairand"`` (201 features) or ``"movielens"``."""
        try:
            text = resources.files("dv365.core").joinpath("specs", f"{name}.yaml").read_text()
        except FileNotFoundError:
            raise SliceSpecError(f"no default slice spec named {name!r}; shipped: {default_spec_names()}") from None
        return cls.from_dict(yaml.safe_load(text))

    @classmethod
    def load(cls, name_or_path: str | Path) -> SliceSpec:
        """A shipped spec by name, or a YAML file path."""
        p = Path(name_or_path)
        if p.suffix in (".yaml", ".yml") or p.exists():
            if not p.exists():
                raise SliceSpecError(f"slice spec file not found: {p}")
            return cls.from_dict(yaml.safe_load(p.read_text()))
        return cls.load_default(str(name_or_path))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SliceSpec:
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
                        f"{table_ids[feat.table]!r} and {feat.id_type!r}; put {{id}} in the table template"
                    )
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
                        raise SliceSpecError(
                            f"feature {f.name!r}: {what} {v!r} is not in the dataset vocabulary {list(known)}"
                        )


def default_spec_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("dv365.core").joinpath("specs").iterdir() if p.name.endswith(".yaml")
    )


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


def _expand_family(
    fam: Mapping[str, Any], windows: Mapping[str, int | None], id_types: Mapping[str, tuple[int, bool]]
) -> Iterable[Feature]:
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
            raise SliceSpecError(
                f"feature {feature!r}: unknown slice keys {sorted(bad)}; allowed {sorted(_SLICE_KEYS)}"
            )
        flt = _parse_filter(feature, s, source, beta)
        if weighted != (flt.debiased is not None):
            raise SliceSpecError(
                f"feature {feature!r}: a weighted family needs a 'debiased' filter on every slice, "
                "and only weighted families may use one"
            )
        for w in fam_windows:
            for i in ids:
                try:
                    table = template.format(
                        id=i,
                        polarity=s.get("polarity", "neu"),
                        source=source,
                        family=fname,
                        weighted="w" if weighted else "u",
                    )
                except KeyError as e:
                    raise SliceSpecError(
                        f"family {fname!r}: table template {template!r} uses unknown field {e}"
                    ) from None
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
        actions=names("action"),
        media_types=names("media_type"),
        surfaces=names("surface"),
        dwell=_band(feature, "dwell", s["dwell"]) if "dwell" in s else None,
        watch_ratio=_band(feature, "watch_ratio", s["watch_ratio"]) if "watch_ratio" in s else None,
        beta=beta,
        debiased=deb,
    )
