"""The per-user generative model (SIMULATED): interests -> activity -> impressions -> dwell -> actions -> requests.

One user's data comes from one random stream, ``SeedSequence(cfg.seed, spawn_key=(1, user_id))``, in a
fixed order of draws, so it is deterministic and independent of the other users generated. Everything is
vectorised numpy over the user's events; see ``docs/synth.md`` for the model in words and formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from dv365.core.synth.config import SynthConfig
from dv365.core.synth.universe import ItemUniverse, _alias_draw, alias_table
from dv365.core.vocab import Vocabulary

USER_STREAM = 1
_VOCAB = Vocabulary()
# Surfaces a user browses, their base propensities (Dirichlet mean) and interest sources.
SURFACES: tuple[str, ...] = ("feed", "explore", "reels", "profile", "search")
SURFACE_CODES = np.array([_VOCAB.code("surfaces", s) for s in SURFACES], dtype=np.int16)
_SURFACE_ALPHA = np.array([3.0, 1.5, 2.5, 0.5, 0.5]) * 2.0
_AD_SURFACE = np.array([True, True, True, False, False])  # ads are shown on feed, explore and reels
_EXPLORE_FACTOR = np.array([1.0, 2.0, 1.0, 0.5, 0.5])  # exploration share multiplier per surface
TREND_AUTHORS = 5  # short-term "trending" authors per epoch
AFF_REF = 0.4  # affinity at which the action base rates apply
AUTHOR_BONUS_LONG, AUTHOR_BONUS_SHORT = 0.3, 0.15
SKIP_S = 3.0  # a dwell below this is a skip
LONG_VIEW = "long_view"


@dataclass(frozen=True)
class UserProfile:
    """A user's latent traits (what the histories are drawn from; exposed for tests and analyses).

    ``theta_long`` [K] is the stable long-term topic mixture (dense topic index, see
    :attr:`ItemUniverse.topics`); ``theta_short`` [E, K] the short-term mixture of each epoch, the epoch of
    day ``d`` being ``epoch_of_day[d]``; ``fav_authors`` are the long-term favourite authors (dense index).
    """

    user_id: int
    theta_long: np.ndarray  # [K]
    fav_authors: np.ndarray  # [F] dense author indices
    fav_weights: np.ndarray  # [F] Dirichlet(1) weights
    epoch_of_day: np.ndarray  # [days] int64
    theta_short: np.ndarray  # [E, K]
    trend_authors: np.ndarray  # [E, TREND_AUTHORS] dense author index
    propensity: np.ndarray  # [len(cfg.actions)] multiplicative action propensities
    skip_bias: float
    watch_bias: float
    surface_p: np.ndarray  # [len(SURFACES)]
    explicit_share: float  # drawn natural explicit share of the user's events
    n_events: int  # drawn total (explicit + implicit) events
    n_implicit: int
    n_explicit: int
    n_impressions: int  # full impression log (>= n_implicit; the implicit timeline keeps the most recent)

    def top_topics(self, universe: ItemUniverse, k: int = 3) -> np.ndarray:
        """Catalog topic ids of the user's ``k`` strongest long-term topics."""
        return universe.topics[np.argsort(-self.theta_long, kind="stable")[:k]]


@dataclass(frozen=True)
class _Tables:
    """Per-user lookup tables derived from a profile (transient: built per user, not kept)."""

    long_item_affinity: np.ndarray  # [I] float32: long-term part of the affinity (incl. favourite-author bonus)
    short_topic_table: np.ndarray  # [E, K+2] float32: w * theta_short / max, extended [..., 0, 1/K]
    short_cum: np.ndarray  # [E, K] row-normalised cumulative theta_short
    trend_table: np.ndarray  # [E, A] bool: author trending in the epoch
    long_alias: tuple[np.ndarray, np.ndarray]  # alias table of theta_long
    fav_alias: tuple[np.ndarray, np.ndarray]  # alias table of the favourite authors' weights


@dataclass
class UserHistory:
    """One user's generated data: catalog item rows (not ids) and codes of the default Vocabulary."""

    user_id: int
    profile: UserProfile
    engagement_scale: float  # per-user factor on action probabilities that yields the drawn explicit count
    imp_ts: np.ndarray  # [n] int64 sorted
    imp_item: np.ndarray  # [n] int64 catalog rows
    imp_surface: np.ndarray  # [n] int16
    imp_dwell: np.ndarray  # [n] float32 seconds
    imp_affinity: np.ndarray  # [n] float32 (diagnostic: the affinity the dwell was drawn from)
    exp_ts: np.ndarray  # [m] int64 sorted
    exp_item: np.ndarray  # [m] int64
    exp_surface: np.ndarray  # [m] int16
    exp_action: np.ndarray  # [m] int16
    req_ts: np.ndarray  # [r] int64 sorted
    req_item: np.ndarray  # [r] int64
    req_surface: np.ndarray  # [r] int16
    req_affinity: np.ndarray  # [r] float32 (diagnostic)
    req_labels: dict[str, np.ndarray]  # label_* -> [r] float32


# --------------------------------------------------------------------------------------------------------
# counts
# --------------------------------------------------------------------------------------------------------
def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[clip(exp(mu + sigma Z), lo, hi)] for standard normal Z (closed form)."""
    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    mid = math.exp(mu + sigma * sigma / 2) * (_phi(b - sigma) - _phi(a - sigma))
    return lo * _phi(a) + mid + hi * (1.0 - _phi(b))


@lru_cache(maxsize=64)
def events_mu(mean: float, sigma: float, lo: float, hi: float) -> float:
    """The mu for which the clipped log-normal event count has mean ``mean`` (bisection)."""
    a, b = math.log(lo) - 10 * sigma, math.log(hi) + 10 * sigma
    for _ in range(200):
        m = 0.5 * (a + b)
        if clipped_lognormal_mean(m, sigma, lo, hi) < mean:
            a = m
        else:
            b = m
    return 0.5 * (a + b)


def split_counts(n_events: int, share: float, cap_implicit: int, cap_explicit: int) -> tuple[int, int, int]:
    """(implicit, explicit, impressions) for ``n_events`` stored events of a user whose natural explicit
    share is ``share``: the full impression log has ``impressions`` rows with ``share/(1-share)`` explicit
    events per impression; the stored implicit timeline keeps the most recent ``cap_implicit`` of them.
    The full log is bounded at 4x the implicit cap (heavier users get a higher explicit rate instead)."""
    rho = share / (1.0 - share)
    n_im = min(max(round(n_events / (1.0 + rho)), 1, n_events - cap_explicit), cap_implicit, n_events)
    n_ex = n_events - n_im
    n_full = n_im if n_im < cap_implicit else math.ceil(n_ex / rho)  # capped: the log behind the cap is longer
    return n_im, n_ex, min(max(n_full, n_im), max(4 * cap_implicit, n_im))


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
def _dirichlet(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """Dirichlet draws along the last axis; rows whose gammas all underflow fall back to alpha's mean."""
    g = rng.standard_gamma(alpha)
    s = g.sum(axis=-1, keepdims=True)
    mean = alpha / alpha.sum(axis=-1, keepdims=True)
    return np.where(s > 0, g / np.where(s > 0, s, 1.0), mean)


def _sample_cat(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index drawn from an unnormalised cumulative ``cum`` for each uniform ``u``."""
    return np.minimum(np.searchsorted(cum, u * cum[-1], side="right"), len(cum) - 1)


def _sample_rows(cum2d: np.ndarray, row: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Column drawn from row ``row`` of a row-wise normalised cumulative matrix [R, K], per uniform ``u``."""
    r, k = cum2d.shape
    flat = (cum2d + np.arange(r)[:, None]).ravel()
    pos = np.searchsorted(flat, row + u, side="right")
    return np.clip(pos - row * k, 0, k - 1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------------------
def _draw_profile(cfg: SynthConfig, uni: ItemUniverse, rng: np.random.Generator, user_id: int) -> UserProfile:
    k, eps = uni.num_topics, 1e-3
    ok = uni.topic_prevalence > 0
    theta_l = _dirichlet(rng, np.where(ok, cfg.long_term_concentration * k * uni.topic_prevalence + eps, 0.0))
    cum_l = np.cumsum(theta_l)
    # favourite authors: authors of items the long-term interests lead to, Dirichlet(1) weights
    u = rng.random((cfg.favourite_authors, 2))
    fav = np.unique(uni.author[uni.sample_topic_items(_sample_cat(cum_l, u[:, 0]), u[:, 1])])
    fav_w = _dirichlet(rng, np.ones(len(fav)))
    # short-term epochs: a new epoch starts on a day with probability 1/short_term_days
    new = rng.random(cfg.days) < 1.0 / cfg.short_term_days
    new[0] = True
    epoch_of_day = np.cumsum(new) - 1
    n_ep = int(epoch_of_day[-1]) + 1
    base = 0.5 * uni.topic_prevalence + 0.5 * theta_l
    steps = _dirichlet(rng, np.tile(np.where(ok, cfg.short_term_concentration * k * base + eps, 0.0), (n_ep, 1)))
    theta_s = np.empty_like(steps)
    theta_s[0] = steps[0]
    rho = cfg.short_term_drift
    for e in range(1, n_ep):  # random walk of the short-term mixture (E ~ days / short_term_days steps)
        theta_s[e] = (1.0 - rho) * theta_s[e - 1] + rho * steps[e]
    cum_s = np.cumsum(theta_s, axis=1)
    cum_s /= cum_s[:, -1:]
    u = rng.random((n_ep * TREND_AUTHORS, 2))
    ep = np.repeat(np.arange(n_ep), TREND_AUTHORS)
    trend = uni.author[uni.sample_topic_items(_sample_rows(cum_s, ep, u[:, 0]), u[:, 1])].reshape(n_ep, TREND_AUTHORS)
    propensity = np.exp(rng.normal(0.0, 0.5, len(cfg.actions)))
    skip_bias, watch_bias = rng.normal(0.0, 0.4, 2)
    surface_p = _dirichlet(rng, _SURFACE_ALPHA)
    f, c = cfg.explicit_fraction, cfg.explicit_concentration
    share = float(np.clip(rng.beta(f * c, (1.0 - f) * c), 0.02, 0.8))
    cap = cfg.events_cap
    lo, hi = float(min(cfg.min_events, cap)), float(cap)
    mu = events_mu(float(cfg.mean_events), cfg.events_sigma, lo, hi)
    n_events = int(np.clip(round(math.exp(mu + cfg.events_sigma * rng.standard_normal())), lo, hi))
    n_im, n_ex, n_full = split_counts(n_events, share, cfg.max_implicit, cfg.max_explicit)
    return UserProfile(
        user_id=user_id,
        theta_long=theta_l,
        fav_authors=fav,
        fav_weights=fav_w,
        epoch_of_day=epoch_of_day,
        theta_short=theta_s,
        trend_authors=trend,
        propensity=propensity,
        skip_bias=float(skip_bias),
        watch_bias=float(watch_bias),
        surface_p=surface_p,
        explicit_share=share,
        n_events=n_im + n_ex,
        n_implicit=n_im,
        n_explicit=n_ex,
        n_impressions=n_full,
    )


def _user_tables(cfg: SynthConfig, uni: ItemUniverse, prof: UserProfile) -> _Tables:
    """Lookup tables of :func:`affinity` and of item sampling for one user."""
    k, n_ep = uni.num_topics, len(prof.theta_short)
    w = cfg.short_term_weight
    fav = np.zeros(uni.num_authors, dtype=bool)
    fav[prof.fav_authors] = True
    long_aff = (1.0 - w) * uni.topic_mean(prof.theta_long) / prof.theta_long.max() + AUTHOR_BONUS_LONG * fav[uni.author]
    th_s = np.concatenate([prof.theta_short, np.zeros((n_ep, 1)), np.full((n_ep, 1), 1.0 / k)], axis=1)
    short_table = (w * th_s / prof.theta_short.max(axis=1, keepdims=True)).astype(np.float32)
    cum_s = np.cumsum(prof.theta_short, axis=1)
    cum_s /= cum_s[:, -1:]
    trend = np.zeros((n_ep, uni.num_authors), dtype=bool)
    trend[np.repeat(np.arange(n_ep), TREND_AUTHORS), prof.trend_authors.ravel()] = True
    return _Tables(
        long_item_affinity=long_aff.astype(np.float32),
        short_topic_table=short_table,
        short_cum=cum_s,
        trend_table=trend,
        long_alias=alias_table(prof.theta_long),
        fav_alias=alias_table(prof.fav_weights),
    )


# --------------------------------------------------------------------------------------------------------
# activity: days, sessions, surfaces
# --------------------------------------------------------------------------------------------------------
def _draw_sessions(
    cfg: SynthConfig, rng: np.random.Generator, prof: UserProfile, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per event (in session order): day, session index; per session: planned start ts, surface index."""
    d = cfg.days
    first_day = cfg.start_ts // 86_400
    dow = (first_day + np.arange(d) + 3) % 7  # 0 = Monday (1970-01-01 was a Thursday)
    weekend = math.exp(rng.normal(0.1, 0.2))
    trend = rng.normal(0.0, 0.5)
    p_off = rng.beta(1.0, 12.0)
    w = rng.gamma(2.0, 0.5, d) * np.where(dow >= 5, weekend, 1.0) * np.exp(trend * (np.arange(d) / d - 0.5))
    w[rng.random(d) < p_off] = 0.0
    w[0], w[-1] = max(w[0], 0.5), max(w[-1], 0.5)  # active on the first and last day: the full span
    counts = rng.multinomial(n, w / w.sum())
    for day in (0, d - 1):
        if counts[day] == 0 and n >= 2:
            counts[int(np.argmax(counts))] -= 1
            counts[day] += 1
    sess_mean = cfg.session_events * math.exp(rng.normal(0.0, 0.4))
    n_sess = np.where(counts > 0, np.minimum(1 + rng.poisson(counts / sess_mean), counts), 0)
    sess_off = np.concatenate([[0], np.cumsum(n_sess)])
    n_s = int(sess_off[-1])
    sess_day = np.repeat(np.arange(d), n_sess)
    peaks = np.array([rng.normal(12.5, 1.0), rng.normal(20.5, 1.0)])
    w_noon = rng.beta(2.0, 4.0)
    hour = peaks[(rng.random(n_s) > w_noon).astype(np.int64)] + rng.normal(0.0, 1.5, n_s)
    sess_start = np.sort(cfg.start_ts + sess_day * 86_400 + (np.mod(hour, 24.0) * 3600.0).astype(np.int64))
    sess_surface = _sample_cat(np.cumsum(prof.surface_p), rng.random(n_s))
    ev_day = np.repeat(np.arange(d), counts)
    local = (rng.random(n) * n_sess[ev_day]).astype(np.int64)
    ev_sess = np.sort(sess_off[ev_day] + local)
    return ev_day, ev_sess, sess_start, sess_surface


def _session_timestamps(cfg: SynthConfig, ev_sess: np.ndarray, sess_start: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Event times: a session's events follow each other by ``step`` (dwell + scroll gap) seconds; a session
    that would start before the previous one ended is pushed back to its end, so times come out sorted."""
    before = np.cumsum(step) - step
    first = np.searchsorted(ev_sess, np.arange(len(sess_start)), side="left")
    sess_len = np.bincount(ev_sess, weights=step, minlength=len(sess_start))
    done = np.cumsum(sess_len) - sess_len  # time spent in earlier sessions
    start = done + np.maximum.accumulate(sess_start - done)
    offset = before - before[np.minimum(first, len(step) - 1)][ev_sess]
    return np.minimum((start[ev_sess] + offset).astype(np.int64), cfg.end_ts - 1)


# --------------------------------------------------------------------------------------------------------
# items, affinity, watching, actions (shared by impressions and requests)
# --------------------------------------------------------------------------------------------------------
def _source_tables(cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per surface: cumulative (long, short, explore) source probabilities, and the author share."""
    eps = np.minimum(cfg.explore_weight * _EXPLORE_FACTOR, 1.0)
    interest = 1.0 - cfg.explore_weight
    scale = np.where(interest > 0, (1.0 - eps) / max(interest, 1e-12), 0.0)
    p = np.stack([(1.0 - cfg.short_term_weight - cfg.explore_weight) * scale, cfg.short_term_weight * scale, eps], 1)
    author = np.full(len(SURFACES), cfg.author_weight)
    author[SURFACES.index("profile")] = max(cfg.author_weight, 0.8)
    return np.cumsum(p, axis=1), author


def _draw_items(
    cfg: SynthConfig,
    uni: ItemUniverse,
    prof: UserProfile,
    tab: _Tables,
    rng: np.random.Generator,
    epoch: np.ndarray,
    surface: np.ndarray,
) -> np.ndarray:
    """Catalog rows of impressions: ads, long-term / short-term interests (topic or author), exploration."""
    n = len(epoch)
    u_src, u_way, u_a, u_b, u_ad = rng.random((5, n))
    src_cum, author_share = _source_tables(cfg)
    src = (u_src > src_cum[surface, 0]).astype(np.int8) + (u_src > src_cum[surface, 1])
    by_author = u_way < author_share[surface]
    items = np.empty(n, dtype=np.int64)
    by_topic = ~by_author & (src < 2)
    topic = np.empty(n, dtype=np.int64)  # used where by_topic
    m = by_topic & (src == 0)  # long-term topics
    topic[m] = _alias_draw(*tab.long_alias, 0, uni.num_topics, u_a[m])
    m = by_topic & (src == 1)  # short-term topics of the event's epoch
    topic[m] = _sample_rows(tab.short_cum, epoch[m], u_a[m])
    items[by_topic] = uni.sample_topic_items(topic[by_topic], u_b[by_topic])
    via_author = by_author & (src < 2)
    author = np.empty(n, dtype=np.int64)  # used where via_author
    m = via_author & (src == 0)  # long-term favourite authors
    author[m] = prof.fav_authors[_alias_draw(*tab.fav_alias, 0, len(prof.fav_authors), u_a[m])]
    m = via_author & (src == 1)  # short-term trending authors of the epoch
    author[m] = prof.trend_authors[epoch[m], np.minimum((u_a[m] * TREND_AUTHORS).astype(np.int64), TREND_AUTHORS - 1)]
    items[via_author] = uni.sample_author_items(author[via_author], u_b[via_author])
    m = src == 2  # exploration by global popularity
    items[m] = uni.sample_popular_items(u_a[m])
    n_ads = len(uni.ad_rows)
    is_ad = (u_ad < cfg.ad_rate) & _AD_SURFACE[surface] if n_ads else np.zeros(n, dtype=bool)
    items[is_ad] = uni.ad_rows[np.minimum((u_b[is_ad] * n_ads).astype(np.int64), n_ads - 1)]
    return items


def affinity(
    cfg: SynthConfig,
    uni: ItemUniverse,
    prof: UserProfile,
    items: np.ndarray,
    epoch: np.ndarray,
    tables: _Tables | None = None,
) -> np.ndarray:
    """Affinity of the user to each item (catalog rows) at its epoch: float32, ~0 = none, 1 = top interest.

    ``(1-w) * m_long + w * m_short + 0.3 [favourite author] + 0.15 [author trending in the epoch]`` with
    ``w = cfg.short_term_weight``; a match ``m`` is the item's mean topic weight divided by the user's
    strongest topic weight (long-term mixture, or the short-term mixture of the epoch). Max 1.45.
    """
    tab = tables if tables is not None else _user_tables(cfg, uni, prof)
    k2 = uni.num_topics + 2
    flat = tab.short_topic_table.ravel()
    short = flat[epoch[:, None] * k2 + uni.item_topics[items]].sum(axis=1) / uni.item_ntopics[items].astype(np.float32)
    trend = tab.trend_table.ravel()[epoch * uni.num_authors + uni.author[items]]
    return tab.long_item_affinity[items] + short + np.float32(AUTHOR_BONUS_SHORT) * trend


def _watch(
    uni: ItemUniverse, prof: UserProfile, items: np.ndarray, aff: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dwell seconds float32, skipped, watch ratio float32) per impression: the watch model of docs/synth.md."""
    n = len(items)
    f32 = np.float32
    q = uni.quality[items]
    ad = uni.is_ad[items]
    dur = uni.duration[items]
    video = ~np.isnan(dur)
    d = np.where(video, dur, f32(1.0))
    u_skip, u_dwell = rng.random((2, n), dtype=f32)
    noise = rng.standard_normal(n, dtype=f32) * f32(0.8)
    centred = f32(3.0) * (aff - f32(AFF_REF)) + q
    skip = u_skip < _sigmoid(f32(-0.4 + prof.skip_bias) - centred + ad.astype(f32))
    ratio = _sigmoid(f32(0.3 + prof.watch_bias) + centred - f32(0.8) * ad + noise)
    loop = video & (d < 30.0) & (ratio > 0.85)
    loops = np.zeros(n, dtype=f32)
    loops[loop] = rng.poisson(0.2 + 0.8 * np.maximum(aff[loop], 0.0))
    video_dwell = np.maximum(d * (ratio + loops), f32(SKIP_S))
    image_dwell = np.maximum(
        np.exp(np.log(f32(1.5) + f32(8.0) * np.maximum(aff, f32(0.0))) + f32(0.5) * q + f32(0.75) * noise), f32(SKIP_S)
    )
    skip_dwell = f32(0.2) + u_dwell * np.where(video, f32(SKIP_S - 0.2), f32(1.3))
    dwell = np.where(skip, skip_dwell, np.where(video, video_dwell, image_dwell))
    dwell = np.minimum(dwell, f32(4 * 3600.0))
    ratio = np.where(video, np.minimum(dwell / d, f32(3.0)), np.where(skip, f32(0.0), ratio))
    return dwell, skip, ratio


def action_names(cfg: SynthConfig) -> tuple[str, ...]:
    """Columns of :func:`_action_probs`: ``cfg.actions`` then ``long_view``."""
    return tuple(a.name for a in cfg.actions) + (LONG_VIEW,)


def _action_probs(
    cfg: SynthConfig,
    uni: ItemUniverse,
    prof: UserProfile,
    items: np.ndarray,
    aff: np.ndarray,
    skip: np.ndarray,
    ratio: np.ndarray,
) -> np.ndarray:
    """[A+1, n] float32 unscaled probabilities of each explicit action (``cfg.actions`` then long_view)."""
    f32 = np.float32
    specs = cfg.actions
    out = np.empty((len(specs) + 1, len(items)), dtype=f32)
    da = aff - f32(AFF_REF)
    dr = np.minimum(ratio, f32(1.5)) - f32(0.5)
    for j, a in enumerate(specs):  # rows are contiguous: one pass per action over the events
        np.exp(f32(a.affinity_slope) * da + f32(a.watch_slope) * dr, out=out[j])
        out[j] *= np.where(skip, f32(a.rate * prof.propensity[j] * a.skip_factor), f32(a.rate * prof.propensity[j]))
    video = ~np.isnan(uni.duration[items])
    out[-1] = np.where(video & ~skip, _sigmoid(f32(12.0) * (ratio - f32(cfg.long_view_ratio))), f32(0.0))
    return out


# --------------------------------------------------------------------------------------------------------
# one user
# --------------------------------------------------------------------------------------------------------
def user_rng(cfg: SynthConfig, user_id: int) -> np.random.Generator:
    """The user's random stream: independent of every other user and of how many users are generated."""
    if user_id < 0:
        raise ValueError(f"user ids must be >= 0, got {user_id}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(cfg.seed, spawn_key=(USER_STREAM, int(user_id)))))


def generate_user_history(cfg: SynthConfig, uni: ItemUniverse, user_id: int) -> UserHistory:
    """Generates one user's explicit and implicit timelines and training requests (SIMULATED)."""
    rng = user_rng(cfg, user_id)
    prof = _draw_profile(cfg, uni, rng, user_id)
    tab = _user_tables(cfg, uni, prof)
    n = prof.n_impressions
    ev_day, ev_sess, sess_start, sess_surface = _draw_sessions(cfg, rng, prof, n)
    epoch = prof.epoch_of_day[ev_day]
    surface = sess_surface[ev_sess]
    items = _draw_items(cfg, uni, prof, tab, rng, epoch, surface)
    aff = affinity(cfg, uni, prof, items, epoch, tab)
    dwell, skip, ratio = _watch(uni, prof, items, aff, rng)
    ts = _session_timestamps(cfg, ev_sess, sess_start, dwell + rng.exponential(2.0, n))
    # explicit actions: a per-user scale makes the expected count the drawn explicit length (+3% headroom)
    probs = _action_probs(cfg, uni, prof, items, aff, skip, ratio)
    scale = _engagement_scale(probs, 1.03 * prof.n_explicit)
    act, imp = np.nonzero(rng.random(probs.shape, dtype=np.float32) < probs * np.float32(scale))
    if len(imp) > prof.n_explicit:  # uniform thinning to the exact drawn count
        keep = rng.choice(len(imp), prof.n_explicit, replace=False)
        act, imp = act[keep], imp[keep]
    key = np.sort(imp * probs.shape[0] + act)  # impression order, then action order
    imp, act = key // probs.shape[0], key % probs.shape[0]
    at_end = act == len(cfg.actions)  # long_view is logged when the view ends, others during it
    frac = np.where(at_end, 1.0, rng.random(len(imp)))
    ex_ts = np.minimum(ts[imp] + (frac * dwell[imp]).astype(np.int64), cfg.end_ts - 1)
    ex_order = np.argsort(ex_ts, kind="stable")  # only needed among the actions of one impression
    imp, act, ex_ts = imp[ex_order], act[ex_order], ex_ts[ex_order]
    keep_imp = slice(n - prof.n_implicit, n)  # the implicit timeline keeps the most recent impressions
    req = _requests(cfg, uni, prof, tab, rng, scale)
    return UserHistory(
        user_id=int(user_id),
        profile=prof,
        engagement_scale=scale,
        imp_ts=ts[keep_imp],
        imp_item=items[keep_imp],
        imp_surface=SURFACE_CODES[surface[keep_imp]],
        imp_dwell=dwell[keep_imp],
        imp_affinity=aff[keep_imp],
        exp_ts=ex_ts,
        exp_item=items[imp],
        exp_surface=SURFACE_CODES[surface[imp]],
        exp_action=_action_codes(cfg)[act],
        **req,
    )


def _engagement_scale(probs: np.ndarray, target: float) -> float:
    """Factor ``c`` with ``sum(min(c * probs, 1)) ~= target`` (a few fixed-point steps where ``c * p`` saturates)."""
    total = float(probs.sum(dtype=np.float64))
    if total <= 0.0 or target <= 0.0:
        return 0.0
    c = target / total
    if c * float(probs.max()) <= 1.0:  # nothing saturates: the expectation is exact
        return c
    for _ in range(6):
        expected = float(np.minimum(probs * np.float32(c), np.float32(1.0)).sum(dtype=np.float64))
        if expected >= 0.995 * target:
            break
        c *= target / max(expected, 1e-12)
    return c


@lru_cache(maxsize=16)
def _action_codes(cfg: SynthConfig) -> np.ndarray:
    return np.array([_VOCAB.code("actions", a) for a in action_names(cfg)], dtype=np.int16)


def _requests(
    cfg: SynthConfig, uni: ItemUniverse, prof: UserProfile, tab: _Tables, rng: np.random.Generator, scale: float
) -> dict[str, Any]:
    """Training requests: target drawn like an impression, labels from the same affinity/watch/action model."""
    r = cfg.requests_per_user
    if r == 0:
        z = np.zeros(0, np.int64)
        return {
            "req_ts": z,
            "req_item": z,
            "req_surface": np.zeros(0, np.int16),
            "req_affinity": np.zeros(0, np.float32),
            "req_labels": {name: np.zeros(0, np.float32) for name in label_names(cfg)},
        }
    lo, hi = cfg.request_window()
    ts = np.sort(rng.integers(lo, hi, r))
    epoch = prof.epoch_of_day[np.minimum((ts - cfg.start_ts) // 86_400, cfg.days - 1)]
    surface = _sample_cat(np.cumsum(prof.surface_p), rng.random(r))
    items = _draw_items(cfg, uni, prof, tab, rng, epoch, surface)
    aff = affinity(cfg, uni, prof, items, epoch, tab)
    dwell, skip, ratio = _watch(uni, prof, items, aff, rng)
    probs = _action_probs(cfg, uni, prof, items, aff, skip, ratio) * np.float32(scale)
    hits = (rng.random(probs.shape, dtype=np.float32) < probs).astype(np.float32)
    labels = {f"label_{a}": hits[j] for j, a in enumerate(action_names(cfg))}
    labels["label_watch_time"] = dwell
    return {
        "req_ts": ts.astype(np.int64),
        "req_item": items,
        "req_surface": SURFACE_CODES[surface],
        "req_affinity": aff,
        "req_labels": labels,
    }


def label_names(cfg: SynthConfig) -> tuple[str, ...]:
    """Label columns of the requests: ``label_<action>`` for every modelled action, then ``label_watch_time``."""
    return tuple(f"label_{a}" for a in action_names(cfg)) + ("label_watch_time",)
