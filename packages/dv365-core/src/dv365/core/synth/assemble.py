"""From generated users to UniTi data: in-memory :class:`Timelines`, request tables, and a dataset on disk.

All output of this module is SIMULATED (see ``docs/synth.md``); datasets are written with
``simulated=True``, source ``synth:kuairand-pure`` and a ``simulated`` note in their metadata.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from dv365.core.catalog import Catalog, load_kuairand_catalog
from dv365.core.synth.config import SIMULATED_NOTE, SOURCE, SynthConfig
from dv365.core.synth.universe import ItemUniverse, prepare_universe
from dv365.core.synth.user import UserHistory, generate_user_history, label_names
from dv365.core.timeline import REQUEST_SCHEMA, DatasetMeta, DatasetWriter, EventTable, Timelines
from dv365.core.vocab import Vocabulary

UserIds = Sequence[int] | np.ndarray | None


def universe_for(cfg: SynthConfig, catalog: Catalog | ItemUniverse | None = None) -> ItemUniverse:
    """The prepared item universe: the shipped KuaiRand-Pure catalog unless ``catalog`` is given."""
    if isinstance(catalog, ItemUniverse):
        if catalog.seed != cfg.seed:
            return prepare_universe(catalog.catalog, cfg.seed)
        return catalog
    return prepare_universe(catalog if catalog is not None else load_kuairand_catalog(), cfg.seed)


def _user_ids(cfg: SynthConfig, user_ids: UserIds) -> np.ndarray:
    ids = np.arange(cfg.users, dtype=np.int64) if user_ids is None else np.asarray(user_ids, dtype=np.int64).reshape(-1)
    if len(ids) and ids.min() < 0:
        raise ValueError(f"user ids must be >= 0, got {int(ids.min())}")
    return ids


def generate_user(cfg: SynthConfig, catalog: Catalog | ItemUniverse | None = None, user_id: int = 0) -> UserHistory:
    """One user's SIMULATED explicit + implicit timelines and requests (catalog rows, vocabulary codes).

    Example::

        h = generate_user(SynthConfig(mean_events=2_000), user_id=7)
        h.imp_ts.shape, h.exp_action.shape, h.req_labels["label_like"].shape   # [n], [m], [requests_per_user]
    """
    return generate_user_history(cfg, universe_for(cfg, catalog), int(user_id))


def iter_users(
    cfg: SynthConfig, catalog: Catalog | ItemUniverse | None = None, user_ids: UserIds = None
) -> Iterator[UserHistory]:
    """Generates users one at a time (``user_ids`` default: ``0..cfg.users-1``)."""
    uni = universe_for(cfg, catalog)
    for u in _user_ids(cfg, user_ids).tolist():
        yield generate_user_history(cfg, uni, u)


# --------------------------------------------------------------------------------------------------------
# numpy -> EventTable / Arrow
# --------------------------------------------------------------------------------------------------------
def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each (s, c)."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - counts), counts)


def _topics(uni: ItemUniverse, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets [n+1], values) of the catalog topic ids of ``items``."""
    cat = uni.catalog
    lens = np.diff(cat.tag_offsets)[items]
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return offsets, cat.tag_values[_ranges(cat.tag_offsets[items], lens)]


def _event_table(
    kind: str,
    uni: ItemUniverse,
    user_ids: np.ndarray,
    lengths: np.ndarray,
    ts: np.ndarray,
    items: np.ndarray,
    surface: np.ndarray,
    extra: np.ndarray,
) -> EventTable:
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    toff, tval = _topics(uni, items)
    t = EventTable(
        kind,
        user_ids,
        offsets,
        ts,
        uni.catalog.video_id[items],
        uni.catalog.author_id[items],
        toff,
        tval,
        uni.media_type[items],
        surface,
    )
    if kind == "explicit":
        t.action, t.value = extra, np.full(len(items), np.nan, dtype=np.float32)
    else:
        t.video_duration, t.dwell_time = uni.duration[items], extra
    return t


def histories_to_timelines(
    histories: Sequence[UserHistory], catalog: Catalog | ItemUniverse, vocab: Vocabulary | None = None
) -> Timelines:
    """Row-aligned :class:`Timelines` of generated users (built from numpy directly, no Arrow round trip)."""
    uni = catalog if isinstance(catalog, ItemUniverse) else prepare_universe(catalog)
    ids = np.array([h.user_id for h in histories], dtype=np.int64)

    def cat(name: str, dtype: type) -> np.ndarray:
        arrays = [getattr(h, name) for h in histories]
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

    ex = _event_table(
        "explicit",
        uni,
        ids,
        np.array([len(h.exp_ts) for h in histories], np.int64),
        cat("exp_ts", np.int64),
        cat("exp_item", np.int64),
        cat("exp_surface", np.int16),
        cat("exp_action", np.int16),
    )
    im = _event_table(
        "implicit",
        uni,
        ids,
        np.array([len(h.imp_ts) for h in histories], np.int64),
        cat("imp_ts", np.int64),
        cat("imp_item", np.int64),
        cat("imp_surface", np.int16),
        cat("imp_dwell", np.float32),
    )
    return Timelines(ids, ex, im, vocab or Vocabulary())


def requests_table(
    histories: Sequence[UserHistory], catalog: Catalog | ItemUniverse, cfg: SynthConfig, vocab: Vocabulary | None = None
) -> pa.Table:
    """Training requests of generated users: ``REQUEST_SCHEMA`` columns plus float32 ``label_*`` columns."""
    uni = catalog if isinstance(catalog, ItemUniverse) else prepare_universe(catalog)
    vocab = vocab or Vocabulary()
    lens = [len(h.req_ts) for h in histories]

    def cat(get: object, dtype: type) -> np.ndarray:
        arrays = [get(h) for h in histories]  # type: ignore[operator]
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

    items = cat(lambda h: h.req_item, np.int64)
    dur = uni.duration[items]
    cols: dict[str, pa.Array] = {
        "user_id": pa.array(np.repeat([h.user_id for h in histories], lens).astype(np.int64), pa.int64()),
        "ts": pa.array(cat(lambda h: h.req_ts, np.int64), pa.int64()),
        "media_id": pa.array(uni.catalog.video_id[items], pa.int64()),
        "author_id": pa.array(uni.catalog.author_id[items], pa.int64()),
        "topic_ids": uni.catalog.topic_lists(items),
        "media_type": pa.array(np.asarray(vocab.media_types, dtype=object)[uni.media_type[items]], pa.string()),
        "surface": pa.array(
            np.asarray(vocab.surfaces, dtype=object)[cat(lambda h: h.req_surface, np.int16)], pa.string()
        ),
        "video_duration": pa.array(dur, pa.float32(), mask=np.isnan(dur)),
    }
    arrays = [cols[f.name] for f in REQUEST_SCHEMA]
    names = list(REQUEST_SCHEMA.names)
    for name in label_names(cfg):
        arrays.append(pa.array(cat(lambda h, k=name: h.req_labels[k], np.float32), pa.float32()))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


# --------------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------------
def generate(
    cfg: SynthConfig, catalog: Catalog | ItemUniverse | None = None, user_ids: UserIds = None
) -> tuple[Timelines, pa.Table]:
    """SIMULATED timelines and training requests of ``user_ids`` (default ``0..cfg.users-1``), in memory."""
    uni = universe_for(cfg, catalog)
    hs = list(iter_users(cfg, uni, user_ids))
    return histories_to_timelines(hs, uni), requests_table(hs, uni, cfg)


def generate_timelines(
    cfg: SynthConfig, catalog: Catalog | ItemUniverse | None = None, user_ids: UserIds = None
) -> Timelines:
    """SIMULATED explicit + implicit :class:`Timelines` of ``user_ids`` (default ``0..cfg.users-1``), in memory.

    Example::

        tl = generate_timelines(SynthConfig(users=10))   # paper sizes: ~40K events per user over 400 days
        tl.lengths()                                     # [10] events per user
    """
    uni = universe_for(cfg, catalog)
    return histories_to_timelines(list(iter_users(cfg, uni, user_ids)), uni)


def generate_requests(
    cfg: SynthConfig, catalog: Catalog | ItemUniverse | None = None, user_ids: UserIds = None
) -> pa.Table:
    """SIMULATED training requests with labels (same users and values as :func:`generate`; this regenerates
    the users' histories, whose draws precede the requests in each user's random stream)."""
    uni = universe_for(cfg, catalog)
    return requests_table(list(iter_users(cfg, uni, user_ids)), uni, cfg)


def _chunks(ids: np.ndarray, size: int) -> Iterable[np.ndarray]:
    for s in range(0, len(ids), size):
        yield ids[s : s + size]


def write_synth_dataset(
    cfg: SynthConfig,
    out_url: str,
    catalog: Catalog | ItemUniverse | None = None,
    progress: bool = True,
    *,
    num_buckets: int = 16,
    user_ids: UserIds = None,
    chunk_events: int = 1_000_000,
) -> DatasetMeta:
    """Generates users in chunks of about ``chunk_events`` events and streams them into a UniTi dataset.

    The dataset is labelled SIMULATED: ``simulated=True``, source ``synth:kuairand-pure``, and
    ``extra["simulated"]`` (a note), ``extra["synth_config"]``, ``extra["requests"]`` in ``_dataset.json``.
    Returns the dataset's :class:`DatasetMeta` (``stats``: users, mean/max events, span_days, ...).
    """
    from tqdm.auto import tqdm

    uni = universe_for(cfg, catalog)
    ids = _user_ids(cfg, user_ids)
    vocab = Vocabulary()
    extra = {
        "simulated": SIMULATED_NOTE,
        "generator": "dv365.core.synth",
        "catalog": "KuaiRand-Pure video_features_basic_pure.csv (real items; CC BY-SA 4.0)",
        "synth_config": cfg.to_dict(),
        "labels": list(label_names(cfg)),
    }
    writer = DatasetWriter(out_url, vocab=vocab, num_buckets=num_buckets, source=SOURCE, simulated=True, extra=extra)
    per_chunk = max(1, int(chunk_events // max(cfg.mean_events, 1)))
    n_ex = n_im = n_req = 0
    t0 = time.perf_counter()
    with tqdm(total=len(ids), unit="user", desc="synth (SIMULATED)", disable=not progress, dynamic_ncols=True) as bar:
        for chunk in _chunks(ids, per_chunk):
            hs = [generate_user_history(cfg, uni, int(u)) for u in chunk]
            tl = histories_to_timelines(hs, uni, vocab)
            req = requests_table(hs, uni, cfg, vocab)
            writer.add(
                explicit=tl.explicit.to_arrow(vocab), implicit=tl.implicit.to_arrow(vocab), requests=req, source=SOURCE
            )
            n_ex, n_im, n_req = n_ex + tl.explicit.num_events, n_im + tl.implicit.num_events, n_req + req.num_rows
            bar.update(len(chunk))
            bar.set_postfix_str(f"{(n_ex + n_im) / max(time.perf_counter() - t0, 1e-9):,.0f} events/s")
    writer.meta.extra["requests"] = n_req
    writer.meta.extra["generation_s"] = round(time.perf_counter() - t0, 3)
    return writer.close()
