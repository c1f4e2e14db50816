# mypy: disable-error-code="no-any-return"
# (kernels index untyped ndarrays: their scalars are Any to mypy)
"""The numba slicing backend (``Slicer(..., backend="numba")``): fused per-row kernels, ~5x the numpy backend.

Imported by :mod:`dv365.core.slicing` only when this backend is chosen: numba is an optional dependency
(``pip install 'dv365-core[fast]'``), and importing this module without it raises ImportError. The kernels
follow exactly the semantics of the numpy backend (``docs/slicing.md``), which the tests hold them to; only
the order of ids inside a dedup'd bag differs: here unique ids come in order of their most recent
occurrence, newest first (ties inside one event: reverse topic-list order). :class:`NumbaSlicer` encodes
the spec as arrays (categorical look-up tables and band thresholds, feature groups as bit masks) and keeps
per-thread scratch between batches.

Single-threaded, row by row, with small scratch arrays (sizes for the 40K-event profile):

1. kept range ``[lo, hi)`` and each window's first event: binary searches (windows are suffixes of the
   kept range because events are time-sorted);
2. hashed ids factorised into dense per-row codes ``0..nu-1`` (items ~5K, topics ~50) through a
   direct-mapped ``int32[hash_size]`` scratch reset through the row's unique ids, or an open-addressing
   table for hash sizes above :data:`DIRECT_MAX`. When every event of an item has the item's author and
   topic list (true whenever they are attributes of the item; checked exactly per row,
   :func:`_same_as_first`), only the item's first event is factorised for author / topics: ``amap``
   (item -> author code) and ``smap`` (item -> topic-list signature, :func:`_pack_topics`);
3. per event a bit mask of the feature groups (one group = one distinct filter) it passes
   (:func:`_word_mask`), from categorical LUTs (action / media type / surface) and one *bin* per
   continuous quantity (:func:`_event_bins`: dwell, watch ratio per beta, debiased score per gamma) =
   how many of the spec's thresholds the value reaches, so every band test of every group is one table
   look-up. ``duration**beta`` and ``log1p(gamma * duration)`` are computed once per item (and cached
   across batches by duration); ``log1p(dwell)`` uses :func:`_log1p_fast` and the score is recomputed
   with ``math.log1p`` within 1e-12 of a threshold, so the threshold decisions are numpy's;
4. per group its passing events ``P`` (:func:`_passing`), then one pass from the newest event backwards
   counting item codes (``cnt[code]`` + a ``touched`` list: no sort, no scan of the code space); windows
   are nested suffixes, so a window's bag is emitted when the pass crosses its start
   (:func:`_media_bags`). Author and topic bags are derived from the item bag (``count(author) =
   sum of count(item)`` over its items: one step per unique item instead of one per occurrence), or, in
   rows where items are not consistent, counted from their own occurrences (:func:`_direct_bags`).

Bags are written row-major into growable buffers with a (feature, row) segment table; :func:`assemble`
copies them into the KJT key-major layout.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

from dv365.core.slicing.batch import SlicedBatch
from dv365.core.slicing.plan import SlicePlan
from dv365.core.slicing.spec import ID_TYPES, SOURCES
from dv365.core.timeline import EventTable, Timelines

#: hash sizes up to this use a direct-mapped ``int32[hash_size]`` scratch per id type (reset per row
#: through the row's unique ids); larger ones an open-addressing table sized by the row.
DIRECT_MAX = 1 << 24
#: relative distance of the fast debiased score to a threshold under which it is recomputed exactly
#: (the fast score's error is ~2e-16 relative)
_EXACT_TOL = 1e-12

_NJIT_OPTS: dict[str, Any] = dict(nogil=True, error_model="numpy", boundscheck=False)
#: False when numba found no writable cache directory (then kernels compile once per process)
CACHE_ENABLED = True

MEDIA, AUTHOR, TOPIC = 0, 1, 2


def _inline(fn: Callable[..., Any]) -> Any:
    """A small helper inlined into its callers at numba-IR level (no separate compilation)."""
    return njit(inline="always", **_NJIT_OPTS)(fn)


def _jit(fn: Callable[..., Any]) -> Any:
    """``njit(cache=True)``: compiled once per machine, then loaded from numba's on-disk cache.

    numba looks for a writable cache directory (``NUMBA_CACHE_DIR``, else ``__pycache__`` beside this
    file, else the user cache directory) when a function is decorated, and raises ``RuntimeError`` if it
    finds none (e.g. a read-only site-packages with a read-only home). Then the cache goes to a per-user
    directory under the system temp dir; if even that fails, the kernels compile in every process (with
    a warning: the first slice then takes tens of seconds).
    """
    global CACHE_ENABLED
    if CACHE_ENABLED:
        try:
            return njit(cache=True, **_NJIT_OPTS)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available for file ..."
            if _fallback_cache_dir():
                try:
                    return njit(cache=True, **_NJIT_OPTS)(fn)
                except RuntimeError:
                    pass
            CACHE_ENABLED = False
            warnings.warn(
                "dv365 slicing: numba found no writable cache directory (set NUMBA_CACHE_DIR); the numba "
                "kernels will be compiled in every process",
                RuntimeWarning,
                stacklevel=2,
            )
    return njit(cache=False, **_NJIT_OPTS)(fn)


def _fallback_cache_dir() -> bool:
    """Points numba's cache at ``<tmp>/dv365-numba-cache-<uid>`` unless the user chose a directory."""
    from numba.core import config

    if getattr(config, "CACHE_DIR", ""):
        return False
    path = os.path.join(tempfile.gettempdir(), f"dv365-numba-cache-{os.getuid() if hasattr(os, 'getuid') else 0}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    config.CACHE_DIR = path
    return True


@_inline
def _nn(x: int) -> int:
    """``x`` for an index base known to be >= 0, in a form LLVM can see is >= 0.

    numba wraps negative indices (``a[i]`` reads ``a[i + len]`` when ``i < 0``): a compare-and-select per
    access, which also keeps LLVM from vectorising a loop over ``a[base + p]``. With ``base = _nn(base)``
    the sum is provably non-negative and the select (and the scalar loop) disappears; the value is the
    same (callers only pass non-negative bases).
    """
    return max(x, 0)


# ------------------------------------------------------------------------------------------------------
# Per-row factorisation of hashed ids into dense local codes
# ------------------------------------------------------------------------------------------------------
@_inline
def _search(ts: np.ndarray, a: int, z: int, x: int, right: bool) -> int:
    """``a + searchsorted(ts[a:z], x, side)``."""
    lo, hi = a, z
    while lo < hi:
        mid = (lo + hi) >> 1
        v = ts[mid]
        if v < x or (right and v == x):
            lo = mid + 1
        else:
            hi = mid
    return lo


@_jit
def _codes_of(
    hid: np.ndarray,
    m: int,
    direct: bool,
    cmap: np.ndarray,
    keys: np.ndarray,
    kval: np.ndarray,
    slots: np.ndarray,
    uniq: np.ndarray,
    codes: np.ndarray,
    first: np.ndarray,
) -> int:
    """``codes[j]`` = dense code of hashed id ``hid[j]`` (-1 stays -1), in first-seen order; returns #unique.
    ``uniq[c]`` is code c's id and ``first[c]`` its first position; ``uniq`` may be ``hid`` (in place)."""
    nu = 0
    if direct:
        for j in range(m):
            h = hid[j]
            if h < 0:
                codes[j] = -1
                continue
            c = cmap[h]
            if c < 0:
                c = nu
                cmap[h] = c
                uniq[nu] = h
                first[nu] = j
                nu += 1
            codes[j] = c
    else:
        mask = keys.size - 1
        for j in range(m):
            h = hid[j]
            if h < 0:
                codes[j] = -1
                continue
            s = np.int64((np.uint64(h) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & mask
            while True:
                k = keys[s]
                if k == h:
                    codes[j] = kval[s]
                    break
                if k < 0:
                    keys[s] = h
                    kval[s] = nu
                    slots[nu] = s
                    uniq[nu] = h
                    first[nu] = j
                    codes[j] = nu
                    nu += 1
                    break
                s = (s + 1) & mask
    return nu


@_inline
def _uncode(nu: int, direct: bool, cmap: np.ndarray, keys: np.ndarray, slots: np.ndarray, uniq: np.ndarray) -> None:
    """Resets only the scratch entries the row touched."""
    if direct:
        for u in range(nu):
            cmap[uniq[u]] = -1
    else:
        for u in range(nu):
            keys[slots[u]] = -1


@_inline
def _hash_flat(ids: np.ndarray, lo: int, hi: int, hs: int, hid: np.ndarray) -> None:
    """``hid[p] = ids[lo + p] % hs``, -1 for invalid (negative) ids such as unknown authors."""
    lo = _nn(lo)
    for p in range(hi - lo):
        x = ids[lo + p]
        hid[p] = -1 if x < 0 else (x if x < hs else x % hs)


@_jit
def _hash_csr(toff: np.ndarray, tval: np.ndarray, lo: int, hi: int, hs: int, eoff: np.ndarray, hid: np.ndarray) -> int:
    """Valid hashed topic ids of events ``lo..hi`` as CSR (``eoff`` relative); returns #entries."""
    base = toff[lo]
    ne = toff[hi] - base
    bad = 0
    for e in range(ne):  # one flat loop over the entries (no per-event inner loop)
        x = tval[base + e]
        hid[e] = x if x < hs else x % hs
        bad += x < 0
    for p in range(hi - lo + 1):
        eoff[p] = toff[lo + p] - base
    if bad == 0:
        return ne
    o = 0  # rare: drop invalid (negative) ids
    for p in range(hi - lo):
        a, z = eoff[p], eoff[p + 1]
        eoff[p] = o
        for e in range(a, z):
            if tval[base + e] >= 0:
                hid[o] = hid[e]
                o += 1
    eoff[hi - lo] = o
    return o


@_inline
def _same_as_first(
    n: int, mcode: np.ndarray, nu: int, first: np.ndarray, arr: np.ndarray, off: int, ref: np.ndarray
) -> bool:
    """Whether every event p of the row has ``arr[off + p]`` equal to that of the first event of its media
    code (author ids, packed topic lists): then author / topic bags can be derived from media bags.
    ``ref[m]`` gets the value of media code m's first event (``nu`` codes); one branch-free pass."""
    off = _nn(off)
    for m in range(nu):
        ref[m] = arr[off + first[m]]
    ok = True
    for p in range(n):
        m = mcode[p]
        ok &= (m >= 0) & (arr[off + p] == ref[max(m, 0)])
    return ok


@_jit
def _pack_topics(toff: np.ndarray, tval: np.ndarray, lo: int, hi: int, hs: int, tkey: np.ndarray) -> int:
    """``tkey[p]``: the hashed topic list of event ``lo + p`` packed as ``kt`` fields of ``bits`` bits
    (hashed id + 1; 0 = none or invalid). Returns the layout ``bits * 64 + kt``, or -1 when the lists do
    not fit in 63 bits (then no derivation)."""
    lo = _nn(lo)
    if tval.size == 0:  # no topics at all
        for p in range(hi - lo):
            tkey[p] = 0
        return 21 * 64 + 3
    kt = 1
    for i in range(lo, hi):
        kt = max(kt, toff[i + 1] - toff[i])
    mn, mx = 0, 0
    for e in range(toff[lo], toff[hi]):
        mn = min(mn, tval[e])
        mx = max(mx, tval[e])
    last = tval.size - 1
    if kt <= 3 and mn >= 0 and mx < hs and hs < (1 << 20):  # common case: unrolled, no modulo
        for p in range(hi - lo):
            a = toff[lo + p]
            ln = toff[lo + p + 1] - a
            k = (tval[min(a, last)] + 1) if ln > 0 else 0
            k |= ((tval[min(a + 1, last)] + 1) if ln > 1 else 0) << 21
            k |= ((tval[min(a + 2, last)] + 1) if ln > 2 else 0) << 42
            tkey[p] = k
        return 21 * 64 + 3
    bits = 63 // kt
    if bits < 1 or hs + 1 >= (1 << bits):
        return -1
    for p in range(hi - lo):  # fixed-width loop: no data-dependent trip count
        a = toff[lo + p]
        ln = toff[lo + p + 1] - a
        key = np.int64(0)
        for j in range(kt):
            x = tval[min(a + j, last)]
            v = (x if x < hs else x % hs) + 1
            key |= (v if (j < ln and x >= 0) else 0) << (bits * j)
        tkey[p] = key
    return bits * 64 + kt


@_jit
def _expand_sigs(
    st: np.ndarray,
    ns: int,
    scnt: np.ndarray,
    sacc: np.ndarray,
    weighted: bool,
    sig_codes: np.ndarray,
    kt: int,
    cnt: np.ndarray,
    acc: np.ndarray,
    touched: np.ndarray,
) -> int:
    """A topic bag from a bag of topic-list signatures: each signature's count (and weight) goes to each
    of its topics (``sig_codes[s * kt + j]``, -1 = none), read in reverse list order."""
    nt = 0
    for t in range(ns):
        s_ = st[t]
        for j in range(kt - 1, -1, -1):
            c = sig_codes[s_ * kt + j]
            if c < 0:
                continue
            v = cnt[c]
            touched[nt] = c
            nt += v == 0
            cnt[c] = v + scnt[s_]
            if weighted:
                acc[c] += sacc[s_]
    return nt


@_jit
def _author_codes(
    author: np.ndarray,
    lo: int,
    hi: int,
    hs: int,
    direct: bool,
    cmap: np.ndarray,
    keys: np.ndarray,
    kval: np.ndarray,
    slots: np.ndarray,
    uniq: np.ndarray,
    nus: np.ndarray,
    may_derive: bool,
    cev: np.ndarray,
    nu_m: int,
    first: np.ndarray,
    hid: np.ndarray,
    amap: np.ndarray,
    fdummy: np.ndarray,
) -> bool:
    """Author codes of the row: per media code (``amap``, returns True) when every event of an item has
    the item's author, else per event (``cev[AUTHOR]``)."""
    n = hi - lo
    if may_derive and _same_as_first(n, cev[MEDIA], nu_m, first, author, lo, fdummy):
        for m in range(nu_m):
            x = fdummy[m]  # the author of media code m (before _codes_of reuses fdummy)
            hid[m] = -1 if x < 0 else (x if x < hs else x % hs)
        nus[AUTHOR] = _codes_of(hid, nu_m, direct, cmap, keys, kval, slots, uniq, amap, fdummy)
        for m in range(nu_m):
            if amap[m] < 0:  # unknown author: a sink slot that never enters a bag
                amap[m] = nus[AUTHOR]
        return True
    _hash_flat(author, lo, hi, hs, hid)
    nus[AUTHOR] = _codes_of(hid, n, direct, cmap, keys, kval, slots, uniq, cev[AUTHOR], fdummy)
    return False


@_jit
def _topic_codes(
    toff: np.ndarray,
    tval: np.ndarray,
    lo: int,
    hi: int,
    hs: int,
    direct: bool,
    cmap: np.ndarray,
    keys: np.ndarray,
    kval: np.ndarray,
    slots: np.ndarray,
    uniq: np.ndarray,
    nus: np.ndarray,
    may_derive: bool,
    mcode: np.ndarray,
    nu_m: int,
    first: np.ndarray,
    tkey: np.ndarray,
    skeys: np.ndarray,
    skval: np.ndarray,
    sslots: np.ndarray,
    sig_key: np.ndarray,
    smap: np.ndarray,
    sig_codes: np.ndarray,
    sig_hid: np.ndarray,
    teoff: np.ndarray,
    tcodes: np.ndarray,
    hid: np.ndarray,
    fdummy: np.ndarray,
) -> tuple[bool, int, np.ndarray, np.ndarray]:
    """Topic codes of the row. When every event of an item has the item's topic list: per media code its
    topic-list *signature* (``smap``), and per signature its topic codes (``sig_codes[s * kt + j]``, -1 =
    none); returns ``(True, kt, sig_codes, sig_hid)`` (the last two possibly reallocated). Else per event,
    CSR ``teoff`` / ``tcodes``."""
    n = hi - lo
    layout = _pack_topics(toff, tval, lo, hi, hs, tkey) if may_derive else -1
    if layout >= 0 and _same_as_first(n, mcode, nu_m, first, tkey, np.int64(0), fdummy):
        for m in range(nu_m):
            sig_hid[m] = fdummy[m]  # the packed topic list of media code m
        no_map = np.empty(0, np.int32)  # signatures: always the open-addressing table ("direct and False",
        # not a literal False, so that _codes_of is compiled once), its first ``cap`` slots: sized by the
        # row's items (load <= 1/2), so that the probes stay in cache
        cap = 1
        while cap < 2 * nu_m + 2:
            cap *= 2
        ns = _codes_of(sig_hid, nu_m, direct and False, no_map, skeys[:cap], skval[:cap], sslots, sig_key, smap, fdummy)
        for s_ in range(ns):
            skeys[sslots[s_]] = -1
        bits, kt = layout // 64, layout % 64
        if ns * kt > sig_codes.size:
            sig_codes = np.empty(2 * ns * kt, np.int32)
            sig_hid = np.empty(2 * ns * kt, np.int64)
        fmask = (1 << bits) - 1
        for s_ in range(ns):  # the topics of each signature, factorised
            for j in range(kt):
                sig_hid[s_ * kt + j] = ((sig_key[s_] >> (bits * j)) & fmask) - 1
        nus[TOPIC] = _codes_of(sig_hid, ns * kt, direct, cmap, keys, kval, slots, uniq, sig_codes, fdummy)
        return True, kt, sig_codes, sig_hid
    ne = _hash_csr(toff, tval, lo, hi, hs, teoff, hid)
    nus[TOPIC] = _codes_of(hid, ne, direct, cmap, keys, kval, slots, uniq, tcodes, fdummy)
    return False, 0, sig_codes, sig_hid


# ------------------------------------------------------------------------------------------------------
# Masks: one bit per feature group
# ------------------------------------------------------------------------------------------------------
@_jit
def _bins_le(n: int, thr: np.ndarray, j: int, m: int, x: np.ndarray, out: np.ndarray, o: int) -> None:
    """``out[j, o + p]`` = #thresholds ``thr[j, :m]`` with ``thr <= x[p]`` (NaN reaches none).
    One vectorised pass over the events per threshold."""
    row = out[_nn(j)]
    o = _nn(o)
    for p in range(n):
        row[o + p] = 0
    for t in range(m):
        th = thr[j, t]
        for p in range(n):
            row[o + p] += th <= x[p]


@_jit
def _bins_lt(n: int, thr: np.ndarray, j: int, m: int, x: np.ndarray, out: np.ndarray, o: int) -> None:
    """As :func:`_bins_le` with ``thr < x[p]`` (the strict ``score > s0``)."""
    row = out[_nn(j)]
    o = _nn(o)
    for p in range(n):
        row[o + p] = 0
    for t in range(m):
        th = thr[j, t]
        for p in range(n):
            row[o + p] += th < x[p]


_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
_LG = (
    6.666666666666735130e-01,
    3.999999999940941908e-01,
    2.857142874366239149e-01,
    2.222219843214978396e-01,
    1.818357216161805012e-01,
    1.531383769920937332e-01,
    1.479819860511658591e-01,
)


@_jit
def _log1p_fast(x: np.ndarray, n: int, u: np.ndarray, mb: np.ndarray, kf: np.ndarray, out: np.ndarray) -> None:
    """``out[p] = log1p(x[p])`` within ~1 ulp (measured <= 2.3e-16 relative): fdlibm's ``log`` kernel on
    ``u = 1 + x`` written as branch-free array passes (so they vectorise), plus the correction
    ``-((u - 1) - x) / u`` for the rounding of ``u``. Values outside ``[0, 1e300)`` use ``math.log1p``."""
    for p in range(n):
        u[p] = 1.0 + x[p]
    ui = u.view(np.int64)
    mi = mb.view(np.int64)
    for p in range(n):  # u = 2**k * m with m in [sqrt(2)/2, sqrt(2))
        bits = ui[p]
        man = bits & 0x000FFFFFFFFFFFFF
        big = man > 0x6A09E667F3BCC
        mi[p] = man | (np.int64(0x3FE0000000000000) if big else np.int64(0x3FF0000000000000))
        kf[p] = np.float64((bits >> 52) - 1023 + big)
    for p in range(n):
        f = mb[p] - 1.0
        s = f / (2.0 + f)
        z = s * s
        w = z * z
        r = z * (_LG[0] + w * (_LG[2] + w * (_LG[4] + w * _LG[6]))) + w * (_LG[1] + w * (_LG[3] + w * _LG[5]))
        hfsq = 0.5 * f * f
        k = kf[p]
        out[p] = k * _LN2_HI - ((hfsq - (s * (hfsq + r) + k * _LN2_LO)) - f) - ((u[p] - 1.0) - x[p]) / u[p]
    for p in range(n):
        if not (x[p] >= 0.0 and x[p] < 1e300):
            out[p] = math.log1p(x[p])


@_inline
def _duration_slot(dd: float, bits: int, betas: np.ndarray, gammas: np.ndarray, dcache: np.ndarray) -> int:
    """The row of ``dcache`` holding ``(duration, duration**beta_j..., log1p(gamma_k * duration)...)`` for
    a video's duration: a direct-mapped cache hashed by the duration's bits, kept across batches
    (durations repeat, as items do); a miss computes the terms exactly as numpy would. The last row is
    reserved (NaNs, for non-videos)."""
    d = np.float64(dd)
    slot = _dslot(bits, dcache.shape[0] - 2)
    if dcache[slot, 0] != d:
        _fill_duration(dcache, slot, d, betas, gammas)
    return slot


@_inline
def _dslot(bits: int, mask: int) -> int:
    """The duration cache slot of a duration's float32 bits (``mask`` = slots - 1)."""
    return np.int64((np.uint64(bits) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & mask


@_jit
def _fill_duration(dcache: np.ndarray, slot: int, d: float, betas: np.ndarray, gammas: np.ndarray) -> None:
    """A duration cache miss: ``dcache[slot] = (d, d**beta_j..., log1p(gamma_k * d)...)``, as numpy computes them."""
    J = betas.size
    dcache[slot, 0] = d
    for j in range(J):
        dcache[slot, 1 + j] = d ** betas[j]
    for k in range(gammas.size):
        dcache[slot, 1 + J + k] = math.log1p(gammas[k] * d)


@_inline
def _duration_terms(
    dd: float,
    bits: int,
    betas: np.ndarray,
    gammas: np.ndarray,
    dcache: np.ndarray,
    pw: np.ndarray,
    lgw: np.ndarray,
    p: int,
) -> None:
    """``pw[j, p] = duration**beta_j``, ``lgw[k, p] = log1p(gamma_k * duration)``; NaN for non-videos."""
    slot = _duration_slot(dd, bits, betas, gammas, dcache) if dd > 0 else dcache.shape[0] - 1
    for j in range(betas.size):
        pw[j, p] = dcache[slot, 1 + j]
    for k in range(gammas.size):
        lgw[k, p] = dcache[slot, 1 + betas.size + k]


#: events per block of :func:`_event_bins` (its scratch columns stay in L1/L2)
BLOCK = 1024


@_jit
def _event_bins(
    lo: int,
    hi: int,
    dwell: np.ndarray,
    dur: np.ndarray,
    d_thr: np.ndarray,
    betas: np.ndarray,
    r_thr: np.ndarray,
    gammas: np.ndarray,
    s_thr: np.ndarray,
    dcache: np.ndarray,
    mcode: np.ndarray,
    nu_m: int,
    first: np.ndarray,
    m_dur: np.ndarray,
    m_pow: np.ndarray,
    m_lg: np.ndarray,
    xs: np.ndarray,
    vs: np.ndarray,
    pw: np.ndarray,
    lgw: np.ndarray,
    tmp: np.ndarray,
    dbins: np.ndarray,
    rbins: np.ndarray,
    sbins: np.ndarray,
    score: np.ndarray,
) -> None:
    """Bins of events ``lo..hi``: dwell ``dbins[0, p]``, watch ratio per beta ``rbins[j, p]``, debiased
    score per gamma ``sbins[k, p]`` (0 = below every lower bound, NaN, or not a video), and the scores
    ``score[k, p]`` (NaN where none). Values are computed as numpy does (``dwell / duration**beta``,
    ``log1p(dwell) / log1p(gamma * duration)`` in float64). ``duration**beta`` and ``log1p(gamma *
    duration)`` are computed once per media code of the row (``nu_m`` codes, ``first[m]`` its first
    event; ``m_dur`` the duration's bits) and gathered per event, with a fix-up for events whose duration
    differs from their item's first event; values come from :func:`_duration_terms`. The score uses
    :func:`_log1p_fast` and is recomputed with
    ``math.log1p`` within ``_EXACT_TOL`` of a threshold, so every bin is exact. Works in blocks of
    :data:`BLOCK` events (scratch ``xs``, ``vs``, ``pw``, ``lgw``, ``tmp`` of that size)."""
    md, J, K = d_thr.shape[1], betas.size, gammas.size
    if md == 0 and J == 0 and K == 0:
        return
    lo = _nn(lo)
    dbits = dur.view(np.int32)
    ms = s_thr.shape[1]
    if J > 0 or K > 0:  # once per item of the row: one pass, each value read right after its look-up
        nan_slot = dcache.shape[0] - 1  # the last row holds NaNs (non-videos)
        smask = dcache.shape[0] - 2
        for m in range(nu_m):
            i = lo + first[m]
            m_dur[m] = dbits[i]
            slot = nan_slot
            if dur[i] > 0:  # _duration_slot written out: as an inlined call this loop ran at half the speed
                d = np.float64(dur[i])
                slot = _dslot(dbits[i], smask)
                if dcache[slot, 0] != d:
                    _fill_duration(dcache, slot, d, betas, gammas)
            for j in range(J):
                m_pow[j, m] = dcache[slot, 1 + j]
            for k in range(K):
                m_lg[k, m] = dcache[slot, 1 + J + k]
    for b0 in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - b0)
        o = _nn(b0 - lo)
        for p in range(n):
            xs[p] = dwell[b0 + p]
        if md > 0:
            _bins_le(n, d_thr, np.int64(0), md, xs, dbins, o)
        if J == 0 and K == 0:
            continue
        bad = n if nu_m == 0 else 0
        if nu_m > 0:  # denominators: the item's, gathered (simple loops, no branches)
            for j in range(J):
                for p in range(n):
                    pw[j, p] = m_pow[j, max(mcode[o + p], 0)]
            for k in range(K):
                for p in range(n):
                    lgw[k, p] = m_lg[k, max(mcode[o + p], 0)]
            for p in range(n):
                c = mcode[o + p]
                bad += (c < 0) | (m_dur[max(c, 0)] != dbits[b0 + p])
        if bad > 0:  # events whose duration is not their item's first one (or without media code)
            for p in range(n):
                c = mcode[o + p] if nu_m > 0 else -1
                if c < 0 or m_dur[c] != dbits[b0 + p]:
                    _duration_terms(dur[b0 + p], dbits[b0 + p], betas, gammas, dcache, pw, lgw, p)
        for j in range(J):
            for p in range(n):
                v = xs[p] / pw[j, p]  # = dwell / duration**beta, as numpy
                vs[p] = v if v - v == 0.0 else math.nan  # inf -> NaN (fails every band, as numpy)
            _bins_le(n, r_thr, j, r_thr.shape[1], vs, rbins, o)
        if K == 0:
            continue
        _log1p_fast(xs, n, tmp[0], tmp[1], tmp[2], vs)
        sk = tmp[0]
        for k in range(K):
            for p in range(n):
                s = vs[p] / lgw[k, p]
                sk[p] = s if s - s == 0.0 else math.nan
            near = 0
            for t in range(ms):  # one vectorised pass per threshold
                th = s_thr[k, t]
                tol = _EXACT_TOL * abs(th) + 1e-300
                for p in range(n):
                    near += abs(sk[p] - th) <= tol
            if near > 0:  # rare: the exact numpy score decides near a threshold
                for p in range(n):
                    s = tmp[0, p]
                    for t in range(ms):
                        if abs(s - s_thr[k, t]) <= _EXACT_TOL * abs(s_thr[k, t]) + 1e-300:
                            s = math.log1p(xs[p]) / lgw[k, p]
                            tmp[0, p] = s if s - s == 0.0 else math.nan
                            break
            for p in range(n):
                score[k, o + p] = tmp[0, p]
            _bins_lt(n, s_thr, k, ms, tmp[0], sbins, o)


@_jit
def _word_mask(
    w: int,
    lo: int,
    hi: int,
    act: np.ndarray,
    mtype: np.ndarray,
    surf: np.ndarray,
    act_m: np.ndarray,
    mt_m: np.ndarray,
    sf_m: np.ndarray,
    d_m: np.ndarray,
    r_m: np.ndarray,
    s_m: np.ndarray,
    dbins: np.ndarray,
    rbins: np.ndarray,
    sbins: np.ndarray,
    emask: np.ndarray,
) -> None:
    """``emask[p]`` = bits of groups ``64w .. 64w + 63`` passed by event ``lo + p`` (from the LUTs and bins)."""
    n = hi - lo
    lo = _nn(lo)
    w = _nn(w)
    has_a, has_d, J, K = act_m.shape[0] > 0, d_m.shape[1] > 1, r_m.shape[0], s_m.shape[0]
    if J <= 1 and K <= 1:  # the common case (at most one beta and one gamma): one pass, one store per event
        for p in range(n):
            e = mt_m[mtype[lo + p], w] & sf_m[surf[lo + p], w]
            if has_a:
                e &= act_m[act[lo + p], w]
            if has_d:
                e &= d_m[0, dbins[0, p], w]
            if J == 1:
                e &= r_m[0, rbins[0, p], w]
            if K == 1:
                e &= s_m[0, sbins[0, p], w]
            emask[p] = e
        return
    if has_a:
        for p in range(n):
            emask[p] = mt_m[mtype[lo + p], w] & sf_m[surf[lo + p], w] & act_m[act[lo + p], w]
    else:
        for p in range(n):
            emask[p] = mt_m[mtype[lo + p], w] & sf_m[surf[lo + p], w]
    if has_d:  # some dwell band (else one all-pass bin)
        for p in range(n):
            emask[p] &= d_m[0, dbins[0, p], w]
    for j in range(J):
        for p in range(n):
            emask[p] &= r_m[j, rbins[j, p], w]
    for k in range(K):
        for p in range(n):
            emask[p] &= s_m[k, sbins[k, p], w]


@_jit
def _passing(
    emask: np.ndarray, g: int, n: int, wstart: np.ndarray, lo: int, L: int, P: np.ndarray, cuts: np.ndarray
) -> None:
    """``P[:cuts[0]]``: the row's events passing group g (ascending; ``emask`` is g's 64-group word);
    ``cuts[lvl + 1]``: first one inside window lvl (so window lvl holds ``P[cuts[lvl + 1]:cuts[0]]``)."""
    bit = np.uint64(1) << np.uint64(g & 63)
    npos = 0
    for p in range(n):
        P[npos] = p
        npos += (emask[p] & bit) != 0
    cuts[0] = npos
    for lvl in range(L):
        x = wstart[lvl] - lo
        l2, h2 = 0, npos
        while l2 < h2:
            mid = (l2 + h2) >> 1
            if P[mid] < x:
                l2 = mid + 1
            else:
                h2 = mid
        cuts[lvl + 1] = l2


# ------------------------------------------------------------------------------------------------------
# Accumulation (newest first) and emission of dedup'd bags
# ------------------------------------------------------------------------------------------------------
@_jit
def _acc_flat(
    P: np.ndarray,
    q_hi: int,
    q_lo: int,
    cev: np.ndarray,
    weighted: bool,
    sc: np.ndarray,
    cnt: np.ndarray,
    acc: np.ndarray,
    touched: np.ndarray,
    nt: int,
) -> int:
    """Counts the one-id-per-event codes ``cev`` of ``P[q_lo:q_hi]``, newest first; returns the new #touched."""
    q = q_hi
    if weighted:
        while q > q_lo:
            q -= 1
            p = P[q]
            c = cev[p]
            if c >= 0:
                v = cnt[c]
                touched[nt] = c
                nt += v == 0
                cnt[c] = v + 1
                acc[c] += sc[p]
    else:
        while q > q_lo:
            q -= 1
            c = cev[P[q]]
            if c >= 0:
                v = cnt[c]
                touched[nt] = c
                nt += v == 0
                cnt[c] = v + 1
    return nt


@_jit
def _acc_csr(
    P: np.ndarray,
    q_hi: int,
    q_lo: int,
    eoff: np.ndarray,
    codes: np.ndarray,
    weighted: bool,
    sc: np.ndarray,
    cnt: np.ndarray,
    acc: np.ndarray,
    touched: np.ndarray,
    nt: int,
) -> int:
    """As :func:`_acc_flat` for several ids per event (topics), each event's list read backwards."""
    q = q_hi
    while q > q_lo:
        q -= 1
        p = P[q]
        a = eoff[p]
        e = eoff[p + 1]
        s = sc[p] if weighted else 0.0
        while e > a:
            e -= 1
            c = codes[e]
            v = cnt[c]
            touched[nt] = c
            nt += v == 0
            cnt[c] = v + 1
            acc[c] += s
    return nt


@_jit
def _derive(
    mt: np.ndarray,
    nt_m: int,
    mcnt: np.ndarray,
    macc: np.ndarray,
    weighted: bool,
    xmap: np.ndarray,
    sink: int,
    cnt: np.ndarray,
    acc: np.ndarray,
    touched: np.ndarray,
) -> int:
    """A bag of codes ``xmap[m]`` (authors, or topic-list signatures) from a media bag: each media's count
    (and weight) goes to its code; one step per unique media instead of one per occurrence."""
    nt = 0
    for t in range(nt_m):
        m = mt[t]
        c = np.uint32(xmap[m])  # codes are >= 0: unsigned indices (no wraparound select)
        v = cnt[c]
        touched[nt] = c
        nt += (v == 0) & (c != sink)  # the sink (unknown author) never enters the bag
        cnt[c] = v + mcnt[m]
        if weighted:
            acc[c] += macc[m]
    cnt[sink] = 0
    acc[sink] = 0.0
    return nt


@_jit
def _derive2(
    mt: np.ndarray,
    nt_m: int,
    mcnt: np.ndarray,
    macc: np.ndarray,
    weighted: bool,
    amap: np.ndarray,
    a_sink: int,
    acnt: np.ndarray,
    aacc: np.ndarray,
    atouched: np.ndarray,
    smap: np.ndarray,
    s_sink: int,
    scnt: np.ndarray,
    sacc: np.ndarray,
    stouched: np.ndarray,
) -> tuple[int, int]:
    """:func:`_derive` for authors and topic-list signatures in one pass over the media bag."""
    na = 0
    ns = 0
    for t in range(nt_m):
        m = mt[t]
        cm = mcnt[m]
        a = np.uint32(amap[m])  # codes are >= 0: unsigned indices (no wraparound select)
        v = acnt[a]
        atouched[na] = a
        na += (v == 0) & (a != a_sink)
        acnt[a] = v + cm
        g = np.uint32(smap[m])
        v2 = scnt[g]
        stouched[ns] = g
        ns += v2 == 0
        scnt[g] = v2 + cm
        if weighted:
            aacc[a] += macc[m]
            sacc[g] += macc[m]
    acnt[a_sink] = 0
    aacc[a_sink] = 0.0
    return na, ns


@_inline
def _grow(vals: np.ndarray, wts: np.ndarray, used: int, need: int) -> tuple[np.ndarray, np.ndarray]:
    if used + need <= vals.size:
        return vals, wts
    cap = max(2 * vals.size, used + need, 1024)
    v2 = np.empty(cap, np.int64)
    w2 = np.empty(cap, np.float32)
    for t in range(used):  # element loops, not slice assignment: much cheaper to compile
        v2[t] = vals[t]
        w2[t] = wts[t]
    return v2, w2


@_jit
def _emit(
    touched: np.ndarray,
    nt: int,
    cnt: np.ndarray,
    acc: np.ndarray,
    weighted: bool,
    uniq: np.ndarray,
    k: int,
    b: int,
    seg_start: np.ndarray,
    seg_len: np.ndarray,
    seg_raw: np.ndarray,
    vals: np.ndarray,
    wts: np.ndarray,
    used: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Writes one bag: ids ``uniq[touched]``, weights ``count / occurrences`` or ``sum(s) / sum(s)``."""
    vals, wts = _grow(vals, wts, used, nt)
    used = _nn(used)
    nocc = 0
    if weighted:
        tot = 0.0
        for t in range(nt):
            c = touched[t]
            nocc += cnt[c]
            tot += acc[c]
        for t in range(nt):
            c = touched[t]
            vals[used + t] = uniq[c]
            wts[used + t] = np.float32(acc[c] / tot)
    else:  # one gather pass (counts are exact in float32 below 2**24), then a sequential scaling pass
        for t in range(nt):
            c = touched[t]
            vals[used + t] = uniq[c]
            wts[used + t] = cnt[c]
            nocc += cnt[c]
        inv = 1.0 / nocc if nt > 0 else 0.0
        for t in range(used, used + nt):
            wts[t] = np.float32(np.float64(wts[t]) * inv)
    seg_start[k, b] = used
    seg_len[k, b] = nt
    seg_raw[k, b] = nocc
    return vals, wts, used + nt


@_inline
def _reset(touched: np.ndarray, nt: int, cnt: np.ndarray, acc: np.ndarray, weighted: bool) -> None:
    """Zeroes the scratch entries of a bag's codes (``acc`` is only written for weighted bags)."""
    for t in range(nt):
        cnt[touched[t]] = 0
    if weighted:
        for t in range(nt):
            acc[touched[t]] = 0.0


@_jit
def _bags_plain(
    P: np.ndarray,
    cuts: np.ndarray,
    feat_row: np.ndarray,
    flat: bool,
    cev: np.ndarray,
    eoff: np.ndarray,
    codes: np.ndarray,
    uniq: np.ndarray,
    weighted: bool,
    sc: np.ndarray,
    b: int,
    seg_start: np.ndarray,
    seg_len: np.ndarray,
    seg_raw: np.ndarray,
    vals: np.ndarray,
    wts: np.ndarray,
    used: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """No dedup: every occurrence, in time order, one bag per window that has a feature."""
    for lvl in range(feat_row.size):
        k = feat_row[lvl]
        if k < 0:
            continue
        n_occ = 0
        tot = 0.0
        for q in range(cuts[lvl + 1], cuts[0]):
            p = P[q]
            ne = (cev[p] >= 0) if flat else eoff[p + 1] - eoff[p]
            n_occ += ne
            tot += (sc[p] if weighted else 1.0) * ne
        vals, wts = _grow(vals, wts, used, n_occ)
        o = used
        for q in range(cuts[lvl + 1], cuts[0]):
            p = P[q]
            wt = np.float32((sc[p] if weighted else 1.0) / tot)
            if flat:
                if cev[p] >= 0:
                    vals[o] = uniq[cev[p]]
                    wts[o] = wt
                    o += 1
            else:
                for e in range(eoff[p], eoff[p + 1]):
                    vals[o] = uniq[codes[e]]
                    wts[o] = wt
                    o += 1
        seg_start[k, b] = used
        seg_len[k, b] = n_occ
        seg_raw[k, b] = n_occ
        used = o
    return vals, wts, used


@_jit
def _media_bags(
    P: np.ndarray,
    cuts: np.ndarray,
    fr: np.ndarray,
    dedup: np.ndarray,
    der_a: bool,
    der_t: bool,
    weighted: bool,
    sc: np.ndarray,
    mcode: np.ndarray,
    cnt: np.ndarray,
    acc: np.ndarray,
    touched: np.ndarray,
    uniqs: np.ndarray,
    amap: np.ndarray,
    a_sink: int,
    smap: np.ndarray,
    s_sink: int,
    scnt: np.ndarray,
    sacc: np.ndarray,
    stouched: np.ndarray,
    sig_codes: np.ndarray,
    kt: int,
    b: int,
    seg_start: np.ndarray,
    seg_len: np.ndarray,
    seg_raw: np.ndarray,
    vals: np.ndarray,
    wts: np.ndarray,
    used: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One group's media pass (newest first); at each window start its media bag, and the author / topic
    bags derived from it (``der_a`` / ``der_t``). ``fr[id_type, lvl]``: the group's features."""
    nlev = 0
    for lvl in range(fr.shape[1]):
        if (
            (fr[MEDIA, lvl] >= 0 and dedup[MEDIA])
            or (der_a and fr[AUTHOR, lvl] >= 0)
            or (der_t and fr[TOPIC, lvl] >= 0)
        ):
            nlev = lvl + 1
    nt = np.int64(0)
    for lvl in range(nlev):
        nt = _acc_flat(
            P,
            cuts[0] if lvl == 0 else cuts[lvl],
            cuts[lvl + 1],
            mcode,
            weighted,
            sc,
            cnt[MEDIA],
            acc[MEDIA],
            touched[MEDIA],
            nt,
        )
        if fr[MEDIA, lvl] >= 0 and dedup[MEDIA]:
            vals, wts, used = _emit(
                touched[MEDIA],
                nt,
                cnt[MEDIA],
                acc[MEDIA],
                weighted,
                uniqs[MEDIA],
                fr[MEDIA, lvl],
                b,
                seg_start,
                seg_len,
                seg_raw,
                vals,
                wts,
                used,
            )
        da = der_a and fr[AUTHOR, lvl] >= 0
        dt = der_t and fr[TOPIC, lvl] >= 0
        na = nsb = np.int64(0)
        if da and dt:  # one pass over the media bag for both
            na, nsb = _derive2(
                touched[MEDIA],
                nt,
                cnt[MEDIA],
                acc[MEDIA],
                weighted,
                amap,
                a_sink,
                cnt[AUTHOR],
                acc[AUTHOR],
                touched[AUTHOR],
                smap,
                s_sink,
                scnt,
                sacc,
                stouched,
            )
        elif da:
            na = _derive(
                touched[MEDIA],
                nt,
                cnt[MEDIA],
                acc[MEDIA],
                weighted,
                amap,
                a_sink,
                cnt[AUTHOR],
                acc[AUTHOR],
                touched[AUTHOR],
            )
        elif dt:
            nsb = _derive(touched[MEDIA], nt, cnt[MEDIA], acc[MEDIA], weighted, smap, s_sink, scnt, sacc, stouched)
        if da:
            vals, wts, used = _emit(
                touched[AUTHOR],
                na,
                cnt[AUTHOR],
                acc[AUTHOR],
                weighted,
                uniqs[AUTHOR],
                fr[AUTHOR, lvl],
                b,
                seg_start,
                seg_len,
                seg_raw,
                vals,
                wts,
                used,
            )
            _reset(touched[AUTHOR], na, cnt[AUTHOR], acc[AUTHOR], weighted)
        if dt:  # media -> signatures -> topics
            nx = _expand_sigs(
                stouched, nsb, scnt, sacc, weighted, sig_codes, kt, cnt[TOPIC], acc[TOPIC], touched[TOPIC]
            )
            _reset(stouched, nsb, scnt, sacc, weighted)
            vals, wts, used = _emit(
                touched[TOPIC],
                nx,
                cnt[TOPIC],
                acc[TOPIC],
                weighted,
                uniqs[TOPIC],
                fr[TOPIC, lvl],
                b,
                seg_start,
                seg_len,
                seg_raw,
                vals,
                wts,
                used,
            )
            _reset(touched[TOPIC], nx, cnt[TOPIC], acc[TOPIC], weighted)
    _reset(touched[MEDIA], nt, cnt[MEDIA], acc[MEDIA], weighted)
    return vals, wts, used


@_jit
def _direct_bags(
    P: np.ndarray,
    cuts: np.ndarray,
    fr: np.ndarray,
    dedup: np.ndarray,
    need_m: bool,
    der_a: bool,
    der_t: bool,
    weighted: bool,
    sc: np.ndarray,
    cev: np.ndarray,
    teoff: np.ndarray,
    tcodes: np.ndarray,
    cnt: np.ndarray,
    acc: np.ndarray,
    touched: np.ndarray,
    uniqs: np.ndarray,
    b: int,
    seg_start: np.ndarray,
    seg_len: np.ndarray,
    seg_raw: np.ndarray,
    vals: np.ndarray,
    wts: np.ndarray,
    used: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One group's bags of the id types not covered by :func:`_media_bags`: each from its own pass over
    the occurrences (no-dedup tables: every occurrence in time order)."""
    L = fr.shape[1]
    for it in range(3):
        if it == MEDIA and not need_m:
            continue
        if (it == AUTHOR and der_a) or (it == TOPIC and der_t) or (it == MEDIA and dedup[MEDIA]):
            continue
        if not dedup[it]:
            vals, wts, used = _bags_plain(
                P,
                cuts,
                fr[it],
                it != TOPIC,
                cev[min(it, 1)],
                teoff,
                tcodes,
                uniqs[it],
                weighted,
                sc,
                b,
                seg_start,
                seg_len,
                seg_raw,
                vals,
                wts,
                used,
            )
            continue
        nt = np.int64(0)
        for lvl in range(L):
            if fr[it, lvl] < 0:
                continue
            q_hi = cuts[0]
            for prev in range(lvl - 1, -1, -1):  # continue from the last window emitted
                if fr[it, prev] >= 0:
                    q_hi = cuts[prev + 1]
                    break
            if it == TOPIC:
                nt = _acc_csr(P, q_hi, cuts[lvl + 1], teoff, tcodes, weighted, sc, cnt[it], acc[it], touched[it], nt)
            else:
                nt = _acc_flat(P, q_hi, cuts[lvl + 1], cev[it], weighted, sc, cnt[it], acc[it], touched[it], nt)
            vals, wts, used = _emit(
                touched[it],
                nt,
                cnt[it],
                acc[it],
                weighted,
                uniqs[it],
                fr[it, lvl],
                b,
                seg_start,
                seg_len,
                seg_raw,
                vals,
                wts,
                used,
            )
        _reset(touched[it], nt, cnt[it], acc[it], weighted)
    return vals, wts, used


# ------------------------------------------------------------------------------------------------------
# One source (explicit or implicit) of a batch
# ------------------------------------------------------------------------------------------------------
@_jit
def slice_source(
    ts: np.ndarray,
    offsets: np.ndarray,
    media: np.ndarray,
    author: np.ndarray,
    toff: np.ndarray,
    tval: np.ndarray,
    act: np.ndarray,
    mtype: np.ndarray,
    surf: np.ndarray,
    dwell: np.ndarray,
    dur: np.ndarray,
    request: np.ndarray,
    gap: int,
    cap: int,
    horizons: np.ndarray,
    act_m: np.ndarray,
    mt_m: np.ndarray,
    sf_m: np.ndarray,
    d_thr: np.ndarray,
    d_m: np.ndarray,
    betas: np.ndarray,
    r_thr: np.ndarray,
    r_m: np.ndarray,
    gammas: np.ndarray,
    s_thr: np.ndarray,
    s_m: np.ndarray,
    g_gamma: np.ndarray,
    feat: np.ndarray,
    hash_size: np.ndarray,
    dedup: np.ndarray,
    direct: np.ndarray,
    cmaps: Any,
    allow_derive: bool,
    dcache: np.ndarray,
    seg_start: np.ndarray,
    seg_len: np.ndarray,
    seg_raw: np.ndarray,
    vals: np.ndarray,
    wts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Bags of every feature of one source for every row; fills ``seg_*[k, b]`` for this source's features.

    ``feat[g, lvl, id_type]`` is the feature of group g, window level lvl and id type (-1: none);
    ``dcache``: the duration cache of :func:`_duration_slot` (``[2**k + 1, 1 + #betas + #gammas]``: -1 =
    empty, last row NaN).
    Returns ``(vals, wts, used)``: the (possibly reallocated) row-major buffers and their fill.
    """
    B = request.size
    G, L, _ = feat.shape
    # (np.int64(0), not 0: a literal 0 would compile the callees it reaches a second time)
    n_max = np.int64(0)
    t_max = np.int64(0)
    for b in range(B):  # scratch sized by the largest row (before the gap / cap cut)
        n_max = max(n_max, offsets[b + 1] - offsets[b])
        t_max = max(t_max, toff[offsets[b + 1]] - toff[offsets[b]])
    e_max = max(n_max, t_max)
    has = np.zeros(3, np.bool_)
    for g in range(G):
        for lvl in range(L):
            for it in range(3):
                has[it] |= feat[g, lvl, it] >= 0
    # media codes are also needed to derive author / topic bags from media bags
    want_derive = allow_derive and hash_size[MEDIA] > 0
    need_m = has[MEDIA] or (want_derive and ((has[AUTHOR] and dedup[AUTHOR]) or (has[TOPIC] and dedup[TOPIC])))
    need_m = need_m and hash_size[MEDIA] > 0
    need = (need_m, has[AUTHOR], has[TOPIC])
    tab_cap = 1
    while tab_cap < 2 * e_max + 2:
        tab_cap *= 2
    tsz = 1  # open-addressing tables only for id types whose hash size is above DIRECT_MAX
    for it in range(3):
        if need[it] and not direct[it]:
            tsz = tab_cap
    # per-id-type scratch as rows of 2-d arrays (not tuples of arrays: much less code to compile)
    keys = np.full((3, tsz), -1, np.int64)
    kval = np.empty((3, tsz), np.int32)
    slots = np.empty((3, e_max), np.int64)
    hid = np.empty(e_max, np.int64)
    cev = np.empty((2, n_max), np.int32)  # media / author code per event (-1: none)
    teoff = np.empty(n_max + 1, np.int64)
    tcodes = np.empty(t_max, np.int32)
    uniqs = np.empty((3, e_max), np.int64)
    nus = np.zeros(3, np.int64)
    first = np.empty(e_max + 1, np.int64)  # first position of each code (media: first event of the item)
    fdummy = np.empty(e_max + 1, np.int64)
    amap = np.empty(n_max, np.int32)  # media code -> author code (derived mode)
    smap = np.empty(n_max, np.int32)  # media code -> topic-list signature (derived mode)
    tkey = np.empty(n_max, np.int64)  # packed hashed topic list per event
    sig_key = np.empty(n_max, np.int64)
    sig_codes = np.empty(n_max, np.int32)
    sig_hid = np.empty(n_max, np.int64)
    skeys = np.full(tab_cap, -1, np.int64)
    skval = np.empty(tab_cap, np.int32)
    sslots = np.empty(n_max, np.int64)
    scnt = np.zeros(n_max + 1, np.int32)
    sacc = np.zeros(n_max + 1, np.float64)
    stouched = np.empty(n_max + 1, np.uint32)  # codes (>= 0): unsigned, so indexing by them needs no wraparound
    # counts per code, plus sink slots for unknown authors / topic-list padding
    cnt = np.zeros((3, e_max + 1), np.int32)
    acc = np.zeros((3, e_max + 1), np.float64)
    touched = np.empty((3, e_max + 1), np.uint32)
    emask = np.empty(n_max, np.uint64)
    K = gammas.size
    score = np.zeros((max(K, 1), n_max), np.float64)
    m_dur = np.empty(n_max, np.int32)  # per media code: duration bits, duration**beta, log1p(gamma * duration)
    m_pow = np.empty((betas.size, n_max), np.float64)
    m_lg = np.empty((K, n_max), np.float64)
    xs = np.empty(BLOCK, np.float64)
    vs = np.empty(BLOCK, np.float64)
    pw = np.empty((betas.size, BLOCK), np.float64)
    lgw = np.empty((K, BLOCK), np.float64)
    tmp = np.empty((3, BLOCK), np.float64)
    dbins = np.empty((1, n_max), np.int32)
    rbins = np.empty((betas.size, n_max), np.int32)
    sbins = np.empty((K, n_max), np.int32)
    P = np.empty(n_max, np.uint32)  # event positions in the row
    cuts = np.empty(L + 1, np.int64)
    wstart = np.empty(L, np.int64)
    fr = np.empty((3, L), np.int64)
    used = np.int64(0)
    zero = np.int64(0)
    for b in range(B):
        a0, z0 = offsets[b], offsets[b + 1]
        r = request[b]
        hi = _search(ts, a0, z0, r - gap, True)
        lo = max(a0, hi - cap)
        n = hi - lo
        for lvl in range(L):
            h = horizons[lvl]
            wstart[lvl] = lo if h < 0 else max(lo, _search(ts, a0, z0, r - h, False))
        nu_m = zero
        if need_m:
            _hash_flat(media, lo, hi, hash_size[MEDIA], hid)
            nu_m = _codes_of(
                hid,
                n,
                direct[MEDIA],
                cmaps[MEDIA],
                keys[MEDIA],
                kval[MEDIA],
                slots[MEDIA],
                uniqs[MEDIA],
                cev[MEDIA],
                first,
            )
            nus[MEDIA] = nu_m
        # author / topic bags derivable from media bags in this row? (then only the first event of each
        # media code needs its author / topics factorised)
        der_a = False
        if has[AUTHOR]:
            der_a = _author_codes(
                author,
                lo,
                hi,
                hash_size[AUTHOR],
                direct[AUTHOR],
                cmaps[AUTHOR],
                keys[AUTHOR],
                kval[AUTHOR],
                slots[AUTHOR],
                uniqs[AUTHOR],
                nus,
                need_m and want_derive and dedup[AUTHOR],
                cev,
                nu_m,
                first,
                hid,
                amap,
                fdummy,
            )
        der_t = False
        kt = zero
        if has[TOPIC]:
            der_t, kt, sig_codes, sig_hid = _topic_codes(
                toff,
                tval,
                lo,
                hi,
                hash_size[TOPIC],
                direct[TOPIC],
                cmaps[TOPIC],
                keys[TOPIC],
                kval[TOPIC],
                slots[TOPIC],
                uniqs[TOPIC],
                nus,
                need_m and want_derive and dedup[TOPIC],
                cev[MEDIA],
                nu_m,
                first,
                tkey,
                skeys,
                skval,
                sslots,
                sig_key,
                smap,
                sig_codes,
                sig_hid,
                teoff,
                tcodes,
                hid,
                fdummy,
            )
        _event_bins(
            lo,
            hi,
            dwell,
            dur,
            d_thr,
            betas,
            r_thr,
            gammas,
            s_thr,
            dcache,
            cev[MEDIA],
            nu_m,
            first,
            m_dur,
            m_pow,
            m_lg,
            xs,
            vs,
            pw,
            lgw,
            tmp,
            dbins,
            rbins,
            sbins,
            score,
        )
        for g in range(G):
            if g & 63 == 0:
                _word_mask(
                    g >> 6, lo, hi, act, mtype, surf, act_m, mt_m, sf_m, d_m, r_m, s_m, dbins, rbins, sbins, emask
                )
            for it in range(3):
                for lvl in range(L):
                    fr[it, lvl] = feat[g, lvl, it]
            kw = g_gamma[g]
            weighted = kw >= 0
            sc = score[max(kw, 0)]
            _passing(emask, g, n, wstart, lo, L, P, cuts)
            vals, wts, used = _media_bags(
                P,
                cuts,
                fr,
                dedup,
                der_a,
                der_t,
                weighted,
                sc,
                cev[MEDIA],
                cnt,
                acc,
                touched,
                uniqs,
                amap,
                nus[AUTHOR],
                smap,
                n_max,
                scnt,
                sacc,
                stouched,
                sig_codes,
                kt,
                b,
                seg_start,
                seg_len,
                seg_raw,
                vals,
                wts,
                used,
            )
            vals, wts, used = _direct_bags(
                P,
                cuts,
                fr,
                dedup,
                need_m,
                der_a,
                der_t,
                weighted,
                sc,
                cev,
                teoff,
                tcodes,
                cnt,
                acc,
                touched,
                uniqs,
                b,
                seg_start,
                seg_len,
                seg_raw,
                vals,
                wts,
                used,
            )
        if need[MEDIA]:
            _uncode(nus[MEDIA], direct[MEDIA], cmaps[MEDIA], keys[MEDIA], slots[MEDIA], uniqs[MEDIA])
        if need[AUTHOR]:
            _uncode(nus[AUTHOR], direct[AUTHOR], cmaps[AUTHOR], keys[AUTHOR], slots[AUTHOR], uniqs[AUTHOR])
        if need[TOPIC]:
            _uncode(nus[TOPIC], direct[TOPIC], cmaps[TOPIC], keys[TOPIC], slots[TOPIC], uniqs[TOPIC])
    return vals, wts, int(used)


@_jit
def assemble(
    seg_src: np.ndarray,
    seg_start: np.ndarray,
    seg_len: np.ndarray,
    vals0: np.ndarray,
    wts0: np.ndarray,
    vals1: np.ndarray,
    wts1: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Key-major (KJT) values/weights from the two sources' row-major buffers."""
    N, B = seg_len.shape
    total = 0
    for k in range(N):
        for b in range(B):
            total += seg_len[k, b]
    values = np.empty(total, np.int64)
    weights = np.empty(total, np.float32)
    o = 0
    for k in range(N):
        for b in range(B):
            n = seg_len[k, b]
            if seg_src[k] == 0:
                _copy_bag(vals0, wts0, seg_start[k, b], values, weights, o, n)
            else:
                _copy_bag(vals1, wts1, seg_start[k, b], values, weights, o, n)
            o += n
    return values, weights


@_inline
def _copy_bag(sv: np.ndarray, sw: np.ndarray, s: int, dv: np.ndarray, dw: np.ndarray, o: int, n: int) -> None:
    """``dv[o:o + n] = sv[s:s + n]`` and the same for weights, as vectorised loops (see :func:`_nn`)."""
    s, o = _nn(s), _nn(o)
    for t in range(n):
        dv[o + t] = sv[s + t]
    for t in range(n):
        dw[o + t] = sw[s + t]


# ------------------------------------------------------------------------------------------------------
# Host side: the spec encoded as arrays for the kernels, per-thread scratch, the backend's slicer
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
        thr[j, : len(t)] = t
        passes[j, : len(p)] = p
    return thr, _pack_bits(passes)


class _FusedSource:
    """One source's feature groups as look-up tables and thresholds (see :func:`_word_mask`)."""

    def __init__(self, plan: SlicePlan, source: str) -> None:
        spec, vocab = plan.spec, plan.vocab
        groups = [(flt, feats) for (src, flt, _w), feats in plan.groups.items() if src == source]
        G, L = len(groups), len(plan.horizons)
        flts = [flt for flt, _ in groups]
        self.feat = np.full((G, L, len(ID_TYPES)), -1, np.int64)
        self.aliases: list[tuple[int, int]] = []  # (feature, identical earlier feature of the same group)
        for g, (_flt, feats) in enumerate(groups):
            for k in feats:
                f = spec.features[k]
                slot = (g, plan.win_level[f.window], ID_TYPES.index(f.id_type))
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
        self.act_m = (
            lut(actions, vocab.actions)
            if any(a is not None for a in actions)
            else np.zeros((0, max(1, (G + 63) // 64)), np.uint64)
        )
        self.mt_m = lut([f.media_types for f in flts], vocab.media_types)
        self.sf_m = lut([f.surfaces for f in flts], vocab.surfaces)
        d_thr, d_pass = _band_bins([f.dwell for f in flts])
        self.d_thr, self.d_m = d_thr[None, :], _pack_bits(d_pass)[None]
        betas = sorted({f.beta for f in flts if f.watch_ratio is not None})
        self.betas = np.array(betas, np.float64)
        self.r_thr, self.r_m = _padded(
            [
                _band_bins([f.watch_ratio if f.watch_ratio is not None and f.beta == b else None for f in flts])
                for b in betas
            ],
            G,
        )
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


class NumbaSlicer:
    """The numba backend of :class:`~dv365.core.slicing.Slicer` (``backend="numba"``): the spec as arrays for the
    kernels of this module, plus per-thread caches.

    Args:
        plan: the spec prepared for slicing.

    Example::

        batch = NumbaSlicer(SlicePlan.build(spec, vocab)).slice(timelines, request_ts)   # request_ts: [B] int64
    """

    def __init__(self, plan: SlicePlan) -> None:
        self.spec = plan.spec
        self.sources = [_FusedSource(plan, s) for s in SOURCES]
        self.horizons = np.array([-1 if h is None else h for h in plan.horizons], np.int64)
        hs = {t.id_type: t.hash_size for t in self.spec.tables.values()}
        dd = {t.id_type: t.dedup for t in self.spec.tables.values()}
        self.hash_size = np.array([hs.get(i, 0) for i in ID_TYPES], np.int64)  # 0: id type not in the spec
        self.dedup = np.array([dd.get(i, True) for i in ID_TYPES], np.bool_)
        self.direct = np.array([i in hs and hs[i] <= DIRECT_MAX for i in ID_TYPES], np.bool_)
        self.seg_src = np.array([SOURCES.index(f.source) for f in self.spec.features], np.int64)
        self._local = threading.local()
        #: derive author / topic bags from media bags where a row allows it (exact; False = always count)
        self.derive = True

    def __getstate__(self) -> dict[str, Any]:  # picklable (DataLoader workers): no thread-local
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _cmaps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This thread's direct-mapped code tables for our hash sizes (all -1 between kernel calls)."""
        # keyed by (id type, size), not size alone: the kernels fill the three id types' tables at the same time
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
                    vals, wts, _used = slice_source(
                        _i64(t.ts),
                        _i64(t.offsets),
                        _i64(t.media_id),
                        _i64(t.author_id),
                        _i64(t.topic_offsets),
                        _i64(t.topic_values),
                        _i16(t.action),
                        _i16(t.media_type),
                        _i16(t.surface),
                        _f32(t.dwell_time),
                        _f32(t.video_duration),
                        _i64(r),
                        self.spec.gap_s,
                        self.spec.cap,
                        self.horizons,
                        src.act_m,
                        src.mt_m,
                        src.sf_m,
                        src.d_thr,
                        src.d_m,
                        src.betas,
                        src.r_thr,
                        src.r_m,
                        src.gammas,
                        src.s_thr,
                        src.s_m,
                        src.g_gamma,
                        src.feat,
                        self.hash_size,
                        self.dedup,
                        self.direct,
                        cmaps,
                        self.derive,
                        self._duration_cache(src),
                        seg_start,
                        seg_len,
                        seg_raw,
                        vals,
                        wts,
                    )
                except BaseException:  # e.g. MemoryError mid-row: the code tables may not be all -1 any more
                    _WORKSPACE.__dict__.pop("cmaps", None)
                    raise
                setattr(_WORKSPACE, f"buf_{source}", (vals, wts))  # kept (grown) for the next batch
                for k, first in src.aliases:
                    seg_start[k], seg_len[k], seg_raw[k] = seg_start[first], seg_len[first], seg_raw[first]
            bufs.extend((vals, wts))
        values, weights = assemble(self.seg_src, seg_start, seg_len, *bufs)
        return SlicedBatch(
            list(self.spec.feature_names),
            B,
            values,
            weights,
            seg_len.reshape(-1),
            seg_raw.reshape(-1),
            r,
            np.asarray(timelines.user_ids, np.int64),
        )


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
