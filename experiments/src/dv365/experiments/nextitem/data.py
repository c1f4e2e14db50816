"""Next-item data: each user's chronological item sequence, the leave-one-out split and the arms' windows.

Sequence (config ``sequence``): the events of one UniTi timeline (``source``: ``explicit`` or ``implicit``),
for ``explicit`` only the listed ``actions`` (MovieLens: the ratings ``rate_high`` / ``rate_mid`` /
``rate_low``, not the ``tag`` events), sorted by (ts, stored order); every event is one item.

Split (leave-one-out, per user of n >= ``min_items`` items): item n-1 is the test target, item n-2 the
validation target, items 1..n-3 the training targets (each predicted from the items before it). Users with
fewer items are dropped and counted.

Windows. A window is ``(user, start, end)``: the flat positions ``[start, end)`` of the inputs. A training
window's targets are the items at ``start+1 .. end`` (each position predicts the next item); an evaluation
window's single target is the item at ``end``. The *distant* history of a window is every event with
``ts < cut_ts = ts[start]`` (the window's first item): by construction no item of the window or later is in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dv365.core.errors import Dv365Error


class NextItemError(Dv365Error, ValueError):
    """A bad next-item setting or data set (names the key and the value)."""


@dataclass
class Sequences:
    """Every kept user's item sequence, user-major and chronological.

    ``items`` are codes 1..num_items (0 = padding): the rank of the item id in ``item_ids``.
    """

    user_ids: np.ndarray  # [U] original user ids
    offsets: np.ndarray  # [U+1]
    items: np.ndarray  # [n] int64 codes >= 1
    ts: np.ndarray  # [n] int64
    item_ids: np.ndarray  # [num_items] sorted original item ids
    dropped_users: int = 0

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_events(cls, user: np.ndarray, item: np.ndarray, ts: np.ndarray, min_items: int = 3) -> Sequences:
        """Events in stored order -> per-user sequences sorted by (ts, stored order); users below
        ``min_items`` dropped (their items still count in the item vocabulary: they are catalogue items)."""
        user, item, ts = (np.asarray(a, np.int64) for a in (user, item, ts))
        order = np.lexsort((np.arange(len(user)), ts, user))
        user, item, ts = user[order], item[order], ts[order]
        item_ids = np.unique(item)
        uids, counts = np.unique(user, return_counts=True)
        keep_u = counts >= min_items
        keep = np.repeat(keep_u, counts)
        offsets = np.concatenate([[0], np.cumsum(counts[keep_u])]).astype(np.int64)
        codes = np.searchsorted(item_ids, item[keep]) + 1
        return cls(uids[keep_u], offsets, codes.astype(np.int64), ts[keep], item_ids, int((~keep_u).sum()))

    # -- split ----------------------------------------------------------------------------------------
    def target_pos(self, split: str) -> np.ndarray:
        """``[U]`` flat position of each user's ``val`` (second-to-last) or ``test`` (last) target."""
        if split == "test":
            return self.offsets[1:] - 1
        if split == "val":
            return self.offsets[1:] - 2
        raise NextItemError(f"split {split!r}: use val or test")

    def eval_windows(self, split: str, k: int) -> Windows:
        """One window per user: the last ``k`` items before the ``split`` target."""
        end = self.target_pos(split)
        start = np.maximum(self.offsets[:-1], end - k)
        return self._windows(np.arange(len(self.user_ids)), start, end, k)

    def train_windows(self, k: int) -> Windows:
        """Each user's training inputs (items 0..n-4: their next items are the training targets 1..n-3) cut
        into consecutive non-overlapping chunks of ``k`` items, aligned to the end (the oldest chunk may be
        shorter)."""
        n_in = self.lengths - 3  # inputs whose next item is a training target
        n_chunks = np.where(n_in > 0, -(-n_in // k), 0)
        urow = np.repeat(np.arange(len(self.user_ids)), n_chunks)
        first = np.cumsum(n_chunks) - n_chunks  # chunk index of each user's first chunk
        j = np.arange(int(n_chunks.sum())) - np.repeat(first, n_chunks)  # 0 = newest chunk
        end = self.offsets[urow] + n_in[urow] - j * k
        start = np.maximum(self.offsets[urow], end - k)
        return self._windows(urow, start, end, k)

    def _windows(self, urow: np.ndarray, start: np.ndarray, end: np.ndarray, k: int) -> Windows:
        return Windows(urow.astype(np.int64), start.astype(np.int64), end.astype(np.int64), k, self.cut_ts(start))

    def cut_ts(self, start: np.ndarray) -> np.ndarray:
        return self.ts[start]

    def distant_end(self, urow: np.ndarray, cut_ts: np.ndarray) -> np.ndarray:
        """Flat end of each user's items with ``ts < cut_ts`` (they are ``[offsets[urow], end)``)."""
        big = np.int64(1) << np.int64(40)
        base = self.ts.min() if len(self.ts) else 0
        uidx = np.repeat(np.arange(len(self.user_ids), dtype=np.int64), self.lengths)
        keys = uidx * big + (self.ts - base)
        return np.searchsorted(keys, urow.astype(np.int64) * big + (np.asarray(cut_ts, np.int64) - base), side="left")


@dataclass
class Windows:
    """Windows of one arm (module docstring): inputs at flat positions ``[start, end)``, right-aligned to ``k``."""

    urow: np.ndarray  # [W]
    start: np.ndarray  # [W]
    end: np.ndarray  # [W]
    k: int
    cut_ts: np.ndarray  # [W] ts of the window's first item: the distant history is every event before it

    def __len__(self) -> int:
        return len(self.urow)

    def take(self, idx: np.ndarray) -> Windows:
        return Windows(self.urow[idx], self.start[idx], self.end[idx], self.k, self.cut_ts[idx])


def gather(seqs: Sequences, w: Windows, train: bool) -> dict[str, torch.Tensor]:
    """A batch of windows, right-aligned ``[B, k]``: ``items``, ``ts``, ``valid``; ``targets`` (0 where
    none) for training windows (the next item of every position), ``target [B]`` for evaluation windows."""
    length = w.end - w.start
    col = np.arange(w.k)[None, :]
    valid = col >= (w.k - length)[:, None]
    idx = np.where(valid, w.start[:, None] + col - (w.k - length)[:, None], 0)
    out = {
        "items": torch.from_numpy(np.where(valid, seqs.items[idx], 0)),
        "ts": torch.from_numpy(np.where(valid, seqs.ts[idx], 0)),
        "valid": torch.from_numpy(valid),
    }
    if train:
        out["targets"] = torch.from_numpy(np.where(valid, seqs.items[np.minimum(idx + 1, len(seqs.items) - 1)], 0))
    else:
        out["target"] = torch.from_numpy(seqs.items[w.end])
    return out


def ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenation of ``arange(s, e)`` per row and the ``[B]`` bag offsets (vectorised)."""
    counts = np.maximum(np.asarray(ends, np.int64) - np.asarray(starts, np.int64), 0)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else np.zeros(0, np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64), offsets
    return np.repeat(np.asarray(starts, np.int64) - offsets, counts) + np.arange(total, dtype=np.int64), offsets


def load_sequences(url: str, source: str, actions: tuple[str, ...], min_items: int) -> tuple[Sequences, bool]:
    """The sequences of a UniTi data set and whether it is SIMULATED (``meta.simulated``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from dv365.core.timeline import TimelineDataset

    if source not in ("explicit", "implicit"):
        raise NextItemError(f"sequence.source = {source!r}: use explicit or implicit")
    ds = TimelineDataset(url)
    t = ds.read_table(source)
    if source == "explicit" and actions:
        known = set(ds.vocab.actions)
        unknown = [a for a in actions if a not in known]
        if unknown:
            raise NextItemError(f"sequence.actions {unknown}: not in the data set's actions {sorted(known)}")
        t = t.filter(pc.is_in(t.column("action"), value_set=pa.array(list(actions))))
    cols = [t.column(c).to_numpy(zero_copy_only=False) for c in ("user_id", "media_id", "ts")]
    seqs = Sequences.from_events(*cols, min_items=min_items)
    if not len(seqs.user_ids):
        raise NextItemError(f"{url}: no user has >= {min_items} {source} events of actions {list(actions)}")
    return seqs, bool(ds.meta.simulated)
