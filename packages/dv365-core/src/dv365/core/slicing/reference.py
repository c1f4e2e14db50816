"""The slicing semantics in plain Python, one event at a time: the reference every backend is tested against."""

from __future__ import annotations

import math
from collections.abc import Sequence

from dv365.core.slicing.spec import SliceFilter, SliceSpec
from dv365.core.timeline import EventTable, Timelines
from dv365.core.vocab import Vocabulary


def reference_slice(
    spec: SliceSpec, timelines: Timelines, request_ts: Sequence[int]
) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """The slicing semantics in plain Python: ``{(feature, row): [(hashed id, weight), ...]}``.

    Slow and obvious on purpose; every backend of :class:`~dv365.core.slicing.Slicer` must agree with it.
    """
    vocab = timelines.vocab
    out: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for b, r in enumerate(request_ts):
        r = int(r)
        for f in spec.features:
            t: EventTable = getattr(timelines, f.source)
            start, end = int(t.offsets[b]), int(t.offsets[b + 1])
            kept = [i for i in range(start, end) if int(t.ts[i]) <= r - spec.gap_s][-spec.cap :]
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
        if flt.watch_ratio is not None and not (video and _ref_band(dwell / dur**flt.beta, flt.watch_ratio)):
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
    return [int(x) for x in t.topic_values[t.topic_offsets[i] : t.topic_offsets[i + 1]]]
