"""The item universe of the generator: the REAL KuaiRand-Pure catalog prepared for fast sampling.

What is real: item ids, authors, tags (topics), video types and durations. What is simulated: each item's
popularity and quality (one draw per ``seed``, shared by all users), used to sample and to score items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dv365.core.catalog import Catalog
from dv365.core.vocab import Vocabulary

CATALOG_STREAM = 0  # SeedSequence spawn_key prefix of the catalog-level draws (users use 1)


@dataclass(frozen=True)
class ItemUniverse:
    """Catalog arrays re-indexed for vectorised sampling (``I`` items, ``K`` topics, ``A`` authors).

    Items are drawn by popularity with Walker alias tables (O(1) per draw): inside topic ``k`` from the block
    ``topic_start[k]:topic_start[k+1]`` of ``topic_rows``, or among all non-ad items (``explore_rows``).
    ``item_topics`` holds dense topic indices padded with ``K``; an untagged item has the single pseudo topic
    ``K+1`` (a topic weight vector extended as ``[theta, 0, 1/K]`` gives it the mean weight).
    """

    catalog: Catalog
    seed: int
    topics: np.ndarray  # [K] int64 catalog topic ids, ascending
    topic_prevalence: np.ndarray  # [K] float64: share of non-ad item-topic pairs (0: topic only on ads)
    item_topics: np.ndarray  # [I, W] int64 dense topic index, padded with K; untagged: [K+1, K, ...]
    item_ntopics: np.ndarray  # [I] int64 (untagged items: 1, the pseudo topic)
    author: np.ndarray  # [I] int64 dense author index
    author_offsets: np.ndarray  # [A+1] int64 CSR of items by author
    author_rows: np.ndarray  # [I] int64
    topic_rows: np.ndarray  # [P] item rows of the (non-ad item, topic) pairs, grouped by topic
    topic_prob: np.ndarray  # [P] alias acceptance probabilities (popularity within the topic)
    topic_alias: np.ndarray  # [P] alias positions (global in topic_rows)
    topic_start: np.ndarray  # [K+1] int64 block bounds in topic_rows
    explore_rows: np.ndarray  # [non-ad items] item rows
    explore_prob: np.ndarray  # alias table over explore_rows (global popularity)
    explore_alias: np.ndarray
    ad_rows: np.ndarray  # [ads] item rows
    popularity: np.ndarray  # [I] float64 (simulated)
    quality: np.ndarray  # [I] float32 (simulated): shifts watch and skip log-odds
    media_type: np.ndarray  # [I] int16 codes of the default Vocabulary
    duration: np.ndarray  # [I] float32 seconds, NaN: not a video (image / missing duration)
    is_ad: np.ndarray  # [I] bool

    @property
    def num_items(self) -> int:
        return len(self.author)

    @property
    def num_topics(self) -> int:
        return len(self.topics)

    @property
    def num_authors(self) -> int:
        return len(self.author_offsets) - 1

    def sample_topic_items(self, topic: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Item rows drawn by popularity inside each ``topic`` (dense index), one per uniform ``u``."""
        lo = self.topic_start[topic]
        pos = _alias_draw(self.topic_prob, self.topic_alias, lo, self.topic_start[topic + 1] - lo, u)
        return self.topic_rows[pos]

    def sample_author_items(self, author: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Item rows drawn uniformly among each ``author``'s (dense index) items."""
        lo = self.author_offsets[author]
        n = self.author_offsets[author + 1] - lo
        return self.author_rows[lo + np.minimum((u * n).astype(np.int64), n - 1)]

    def sample_popular_items(self, u: np.ndarray) -> np.ndarray:
        """Non-ad item rows drawn by global popularity."""
        return self.explore_rows[_alias_draw(self.explore_prob, self.explore_alias, 0, len(self.explore_rows), u)]

    def topic_mean(self, theta: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """Mean topic weight of each item (all items by default) for a topic vector ``theta`` [K]."""
        ext = np.concatenate([theta, [0.0, 1.0 / self.num_topics]]).astype(theta.dtype, copy=False)
        tops = self.item_topics if items is None else self.item_topics[items]
        nt = self.item_ntopics if items is None else self.item_ntopics[items]
        return ext[tops].sum(axis=1) / nt


def alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table of non-negative ``weights`` (local indices)."""
    m = len(weights)
    p = np.asarray(weights, np.float64) * (m / float(np.sum(weights)))
    prob = np.ones(m)
    alias = np.arange(m, dtype=np.int64)
    small = [i for i in range(m) if p[i] < 1.0]
    large = [i for i in range(m) if p[i] >= 1.0]
    pl = p.tolist()
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s], alias[s] = pl[s], g
        pl[g] = pl[g] + pl[s] - 1.0
        (small if pl[g] < 1.0 else large).append(g)
    return prob, alias


def _alias_draw(
    prob: np.ndarray, alias: np.ndarray, lo: np.ndarray | int, n: np.ndarray | int, u: np.ndarray
) -> np.ndarray:
    """Positions drawn from alias tables ``lo:lo+n`` (one uniform each: integer part picks, fraction accepts)."""
    x = u * n
    j = np.minimum(x.astype(np.int64), np.asarray(n) - 1)
    pos = lo + j
    return np.where(x - j < prob[pos], pos, alias[pos])


_CACHE: dict[tuple[int, int], ItemUniverse] = {}


def prepare_universe(catalog: Catalog, seed: int = 0) -> ItemUniverse:
    """Prepares (and caches per catalog object and seed) the sampling arrays of ``catalog``."""
    key = (id(catalog), int(seed))
    hit = _CACHE.get(key)
    if hit is not None and hit.catalog is catalog:
        return hit
    u = _build(catalog, int(seed))
    if len(_CACHE) > 8:
        _CACHE.clear()
    _CACHE[key] = u
    return u


def _build(catalog: Catalog, seed: int) -> ItemUniverse:
    n = len(catalog)
    if n == 0:
        raise ValueError("the item catalog is empty")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(CATALOG_STREAM,))))
    # simulated item quality and popularity (log-normal, correlated with quality)
    quality = rng.normal(0.0, 0.5, n)
    popularity = np.exp(1.0 * quality + rng.normal(0.0, 0.8, n))

    ntop = np.diff(catalog.tag_offsets).astype(np.int64)
    topics, dense = np.unique(catalog.tag_values, return_inverse=True)
    if len(topics) == 0:
        raise ValueError("the item catalog has no topics (tags)")
    k = len(topics)
    width = max(int(ntop.max()), 1)
    item_topics = np.full((n, width), k, dtype=np.int64)
    item_of_pair = np.repeat(np.arange(n), ntop)
    slot = np.arange(len(dense)) - np.repeat(catalog.tag_offsets[:-1], ntop)
    item_topics[item_of_pair, slot] = dense
    item_topics[ntop == 0, 0] = k + 1  # pseudo topic of untagged items

    video_type = np.asarray(catalog.video_type, dtype=object).astype(str)
    is_ad = video_type == "AD"
    duration = catalog.duration_s.astype(np.float32)
    duration = np.where(np.isfinite(duration) & (duration > 0), duration, np.nan).astype(np.float32)
    vocab = Vocabulary()
    media_type = np.where(
        is_ad,
        vocab.code("media_types", "ad"),
        np.where(np.isnan(duration), vocab.code("media_types", "image"), vocab.code("media_types", "video")),
    ).astype(np.int16)

    # topic blocks (ads excluded: they are drawn through ad slots only)
    pair_ok = ~is_ad[item_of_pair]
    p_item, p_topic = item_of_pair[pair_ok], dense[pair_ok]
    order = np.lexsort((p_item, p_topic))
    p_item, p_topic = p_item[order], p_topic[order]
    explore_rows = np.flatnonzero(~is_ad).astype(np.int64)
    if len(explore_rows) == 0 or len(p_item) == 0:
        raise ValueError("the item catalog has no tagged non-ad items")
    topic_start = np.searchsorted(p_topic, np.arange(k + 1)).astype(np.int64)
    prevalence = np.bincount(p_topic, minlength=k).astype(np.float64)
    prevalence /= prevalence.sum()  # 0 for topics carried only by ads: never drawn through interests
    topic_prob = np.ones(len(p_item))
    topic_alias = np.arange(len(p_item), dtype=np.int64)
    for t in range(k):
        lo, hi = int(topic_start[t]), int(topic_start[t + 1])
        if hi > lo:
            pr, al = alias_table(popularity[p_item[lo:hi]])
            topic_prob[lo:hi], topic_alias[lo:hi] = pr, al + lo

    authors, author = np.unique(catalog.author_id, return_inverse=True)
    author_rows = np.argsort(author, kind="stable").astype(np.int64)
    author_offsets = np.searchsorted(author[author_rows], np.arange(len(authors) + 1)).astype(np.int64)
    explore_prob, explore_alias = alias_table(popularity[explore_rows])
    return ItemUniverse(
        catalog=catalog,
        seed=seed,
        topics=topics.astype(np.int64),
        topic_prevalence=prevalence,
        item_topics=item_topics,
        item_ntopics=np.maximum(ntop, 1),
        author=author.astype(np.int64),
        author_offsets=author_offsets,
        author_rows=author_rows,
        topic_rows=p_item.astype(np.int64),
        topic_prob=topic_prob,
        topic_alias=topic_alias,
        topic_start=topic_start,
        explore_rows=explore_rows,
        explore_prob=explore_prob,
        explore_alias=explore_alias,
        ad_rows=np.flatnonzero(is_ad).astype(np.int64),
        popularity=popularity,
        quality=quality.astype(np.float32),
        media_type=media_type,
        duration=duration,
        is_ad=is_ad,
    )
