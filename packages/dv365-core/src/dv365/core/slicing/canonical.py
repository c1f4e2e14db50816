"""One order for the ids inside a dedup'd bag, whatever backend sliced it: ascending id.

The backends agree on every bag's ids, weights and counts but not on the order of the ids inside a dedup'd bag
(numpy and the reference: ascending id; numba: most recent occurrence first). Pooling sums the bag, so a
different order can change the last bit of a pooled float, and, rarely, a quantized byte of an exported
embedding. :func:`canonical_order` sorts each dedup'd bag by id (weights alongside, in place), after which the
numba backend's output is bit-identical to the numpy reference's (tested), so an export's bytes do not depend
on the backend. Bags of non-dedup tables (every occurrence, in time order) are left as they are: both backends
already emit them in the same order.

With numba the pass is one stable LSD radix sort of the whole batch by ``(bag, id)`` (two passes of <= 14-bit digits
for a 32-user batch of 20K-row tables); without it a vectorised ``lexsort`` over (bag, id) does the same.
"""

from __future__ import annotations

import numpy as np

from dv365.core.slicing.batch import SlicedBatch
from dv365.core.slicing.spec import SliceSpec


def dedup_keys(spec: SliceSpec) -> np.ndarray:
    """``[N]`` bool: whether feature ``k`` (spec order = the batch's key order) lists unique ids."""
    return np.array([bool(spec.tables[f.table].dedup) for f in spec.features], dtype=bool)


def _sort_bags_numpy(values: np.ndarray, weights: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
    lengths = ends - starts
    if not len(lengths) or int(lengths.sum()) == 0:
        return
    total = int(lengths.sum())
    cum = np.cumsum(lengths)
    idx = np.repeat(starts - (cum - lengths), lengths) + np.arange(total)  # positions of the bags' ids
    bag = np.repeat(np.arange(len(lengths)), lengths)
    order = idx[np.lexsort((values[idx], bag))]
    values[idx] = values[order]
    weights[idx] = weights[order]


try:  # numba is optional (dv365-core[fast])
    import numba

    @numba.njit(cache=True, nogil=True)
    def _radix_order(keys: np.ndarray, bits: int, perm: np.ndarray) -> np.ndarray:
        """Stable LSD radix sort of ``keys`` (< 2**bits) in passes of at most 14-bit digits, starting from the
        permutation ``perm`` (``arange``): the sorted permutation. Keys travel with their positions (sequential
        reads, bucketed writes); ``keys`` and ``perm`` are reused as buffers."""
        n = len(keys)
        passes = max((bits + 13) // 14, 1)
        width = (bits + passes - 1) // passes
        mask = (1 << width) - 1
        k_in = keys
        k_out = np.empty_like(keys)
        p_out = np.empty_like(perm)
        count = np.empty(mask + 2, np.int64)
        for q in range(passes):
            shift = q * width
            count[:] = 0
            for i in range(n):
                count[((k_in[i] >> shift) & mask) + 1] += 1
            for d in range(mask + 1):
                count[d + 1] += count[d]
            for i in range(n):
                d = (k_in[i] >> shift) & mask
                c = count[d]
                k_out[c] = k_in[i]
                p_out[c] = perm[i]
                count[d] = c + 1
            k_in, k_out = k_out, k_in
            perm, p_out = p_out, perm
        return perm

    @numba.njit(cache=True, nogil=True)
    def _bag_keys(values: np.ndarray, lengths: np.ndarray, sort_bag: np.ndarray, vbits: int, keys: np.ndarray) -> None:
        o = 0
        for j in range(len(lengths)):
            hi = j << vbits
            for i in range(o, o + lengths[j]):
                keys[i] = hi | values[i] if sort_bag[j] else hi  # non-dedup bags keep their (time) order
            o += lengths[j]

    def _sort_bags_numba(values: np.ndarray, weights: np.ndarray, lengths: np.ndarray, sort_bag: np.ndarray) -> None:
        n = len(values)
        if not n:
            return
        vbits = max(int(values.max()).bit_length(), 1)
        bits = vbits + max(len(lengths).bit_length(), 1)
        narrow = bits <= 32 and n < 2**31  # 32-bit keys and positions: half the memory traffic
        keys = np.empty(n, np.uint32 if narrow else np.int64)
        _bag_keys(values, lengths, sort_bag, vbits, keys)
        perm = _radix_order(keys, bits, np.arange(n, dtype=np.int32 if narrow else np.int64))
        values[:] = values[perm]
        weights[:] = weights[perm]

except ImportError:  # pragma: no cover - exercised only without numba
    _sort_bags_numba = None


def canonical_order(batch: SlicedBatch, dedup: np.ndarray) -> SlicedBatch:
    """Sorts every dedup'd bag of ``batch`` by id, in place (``dedup``: :func:`dedup_keys` of its spec);
    returns the batch."""
    N, B = len(batch.keys), batch.batch_size
    if len(dedup) != N:
        raise ValueError(f"dedup mask has {len(dedup)} entries for {N} features")
    lengths = batch.lengths.astype(np.int64, copy=False)
    sort_bag = np.repeat(np.asarray(dedup, bool), B)  # key-major: feature k owns bags k*B .. k*B+B-1
    if not batch.values.flags.writeable:
        batch.values = batch.values.copy()
    if not batch.weights.flags.writeable:
        batch.weights = batch.weights.copy()
    if _sort_bags_numba is not None:
        _sort_bags_numba(batch.values, batch.weights, lengths, sort_bag)
    else:
        ends = np.cumsum(lengths)
        starts = ends - lengths
        _sort_bags_numpy(batch.values, batch.weights, starts[sort_bag], ends[sort_bag])
    return batch
