"""The one data path from stored timelines to the user tower's input: read -> slice -> KJT.

Training (:class:`~dv365.train.data.ExampleSource`), the export (:class:`dv365.export.encode.UserEncoder` and
the export job) and the evaluations (``dv365 eval upstream``) all go through this module, so they slice with
the same backend, check the slicer's output the same way and build the same KJT:

* :class:`UserFeatures` owns the slicer (``backend="auto"``: the numba kernels when numba imports, else the
  numpy reference) and turns ``(timelines, cut-offs)`` into a checked :class:`~dv365.core.slicing.SlicedBatch`
  or a weighted ``KeyedJaggedTensor``.
* :meth:`TimelineDataset.read_users <dv365.core.timeline.TimelineDataset.read_users>` reads given users'
  timelines, bucket by bucket, only the columns the slicer needs, and only the row groups that can hold them.
* :func:`tower_batches` is the streaming side used by the export: fixed-size tower batches of users are read
  and sliced in worker processes (a torch ``DataLoader``; ``workers=0`` runs them inline) ahead of the tower,
  a bounded number at a time (``prefetch``), so the tower's core does not wait for Parquet or the slicer and
  a worker's memory holds one batch of users, however many users the dataset has. With a CUDA ``device`` the
  batches arrive in pinned memory and are copied to the GPU asynchronously; the CPU workers keep feeding it
  (not verified on a GPU here).

Every stage is timed (:class:`StageSeconds`), which ``dv365 bench export`` reports per user.

Example::

    feats = UserFeatures(spec, dataset.vocab)                   # numba when available
    kjt = feats.kjt(dataset.read_users([3, 17]), cutoffs)       # the tower's input
    for b in tower_batches(dataset.url, feats, [np.array([3, 17])], cutoff_ts=cut, batch_users=2, workers=1):
        y = tower(b.kjt)                                         # [2, N_out, D]
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dv365.core.errors import DatasetError
from dv365.core.slicing import SlicedBatch, Slicer, SliceSpec
from dv365.core.slicing.canonical import canonical_order, dedup_keys
from dv365.core.timeline import TimelineDataset, Timelines, take_rows
from dv365.core.vocab import Vocabulary

STAGES = ("read", "slice", "kjt")


@dataclass
class StageSeconds:
    """Seconds spent per stage of the data path (summed over batches; workers' time included)."""

    read: float = 0.0
    slice: float = 0.0
    kjt: float = 0.0

    def add(self, other: StageSeconds | dict[str, float]) -> None:
        d = other if isinstance(other, dict) else other.__dict__
        for k in STAGES:
            setattr(self, k, getattr(self, k) + float(d.get(k, 0.0)))

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in STAGES}


class UserFeatures:
    """Timelines + cut-offs -> the user tower's sliced input (one slicer, one check, one KJT builder).

    Args:
        spec: the slice spec the tower was trained with (its ``hash_sizes`` applied).
        vocab: the dataset's vocabulary.
        backend: slicer backend, ``auto`` (default: numba when it imports), ``numba`` or ``numpy`` (the
            reference the tests hold numba to).
        canonical: sort the ids inside every dedup'd bag ascending
            (:func:`~dv365.core.slicing.canonical.canonical_order`), so the output, and the tower's floats, are
            bit-identical whatever the backend (the export's setting). Off for training, whose batches only need
            the same bags (a pooled sum's last bit may then depend on the backend).

    Example::

        feats = UserFeatures(load_spec(cfg.data), dataset.vocab)
        sliced = feats.slice(timelines, request_ts)       # SlicedBatch, ids checked against the tables
        kjt = feats.kjt(timelines, request_ts)            # KeyedJaggedTensor, B = len(timelines)
    """

    def __init__(self, spec: SliceSpec, vocab: Vocabulary, backend: str = "auto", canonical: bool = False) -> None:
        self.spec, self.vocab = spec, vocab
        self.slicer = Slicer(spec, vocab, backend=backend)
        self.max_rows = max(t.hash_size for t in spec.tables.values())
        # the numpy backend already lists dedup'd bags ascending
        self._dedup = dedup_keys(spec) if canonical and self.slicer.backend != "numpy" else None

    @property
    def backend(self) -> str:
        return self.slicer.backend

    def slice(self, timelines: Timelines, cutoffs: int | np.ndarray, chunk: int = 0) -> SlicedBatch:
        """Bags of every feature for every row of ``timelines`` at its cut-off (one for all, or one per row).

        ``chunk > 0`` slices ``chunk`` rows at a time and joins the results (the same batch): the slicer's and
        the canonical sort's working memory then follow the chunk, not the batch."""
        cuts = np.ascontiguousarray(np.broadcast_to(np.asarray(cutoffs, np.int64), (len(timelines),)))
        if 0 < chunk < len(timelines):
            parts = []
            for s in range(0, len(timelines), chunk):
                rows = np.arange(s, min(s + chunk, len(timelines)))
                sub = Timelines(
                    timelines.user_ids[rows],
                    take_rows(timelines.explicit, rows),
                    take_rows(timelines.implicit, rows),
                    timelines.vocab,
                )
                parts.append(self.slice(sub, cuts[rows]))
            return join_batches(parts)
        sliced = self.slicer.slice(timelines, cuts)
        v = sliced.values
        if len(v) and (v.min() < 0 or v.max() >= self.max_rows):
            raise DatasetError(
                f"the slicer ({self.backend} backend) produced ids outside [0, {self.max_rows}) for users "
                f"{np.unique(timelines.user_ids)[:5].tolist()}...: a slicer bug; try the numpy backend"
            )
        if self._dedup is not None:
            canonical_order(sliced, self._dedup)
        return sliced

    def warm_up(self) -> float:
        """Slices a tiny made-up timeline once, so the slicer's (and the canonical sort's) compiled kernels are
        loaded in this process -- and in the loader workers it forks later -- before the first real batch.
        Returns the seconds it took (numba's compile or cache load; ~0 for numpy)."""
        import pyarrow as pa

        t0 = time.perf_counter()
        ts0 = 1_600_000_000
        common = {
            "user_id": pa.array([1, 1], pa.int64()),
            "ts": pa.array([ts0, ts0 + 60], pa.int64()),
            "media_id": pa.array([11, 12], pa.int64()),
            "author_id": pa.array([5, None], pa.int64()),
            "topic_ids": pa.array([[1, 2], []], pa.list_(pa.int64())),
            "media_type": pa.array([self.vocab.media_types[-1]] * 2, pa.string()),
            "surface": pa.array([self.vocab.surfaces[-1]] * 2, pa.string()),
        }
        explicit = pa.table(
            {**common, "action": pa.array([self.vocab.actions[0]] * 2), "value": pa.array([1.0, None], pa.float32())}
        )
        implicit = pa.table(
            {
                **common,
                "video_duration": pa.array([30.0, None], pa.float32()),
                "dwell_time": pa.array([12.0, 3.0], pa.float32()),
            }
        )
        tl = Timelines.from_arrow(explicit, implicit, self.vocab, [1, 2], validate=False)
        self.slice(tl, ts0 + 30 * 86_400)
        return time.perf_counter() - t0

    def kjt(
        self,
        timelines: Timelines,
        cutoffs: int | np.ndarray,
        device: torch.device | str | None = None,
        chunk: int = 0,
    ) -> Any:
        """The weighted ``KeyedJaggedTensor`` of :meth:`slice` (on ``device`` when given)."""
        from dv365.core.kjt import to_kjt

        return to_kjt(self.slice(timelines, cutoffs, chunk), device)


def join_batches(parts: Sequence[SlicedBatch]) -> SlicedBatch:
    """Row-wise concatenation of sliced batches of the same keys, in KJT key-major layout (feature ``k``'s bags
    of every part, part after part)."""
    if len(parts) == 1:
        return parts[0]
    N = len(parts[0].keys)
    lens = [p.lengths.reshape(N, p.batch_size) for p in parts]
    per_key = [L.sum(axis=1) for L in lens]  # [N] values of each key in each part
    starts = [np.concatenate([[0], np.cumsum(k)[:-1]]) for k in per_key]
    order = [(i, int(starts[i][k]), int(per_key[i][k])) for k in range(N) for i in range(len(parts))]
    values = np.concatenate([parts[i].values[a : a + n] for i, a, n in order])
    weights = np.concatenate([parts[i].weights[a : a + n] for i, a, n in order])
    return SlicedBatch(
        keys=list(parts[0].keys),
        batch_size=sum(p.batch_size for p in parts),
        values=values,
        weights=weights,
        lengths=np.concatenate(lens, axis=1).reshape(-1),
        raw_counts=np.concatenate([p.raw_counts.reshape(N, p.batch_size) for p in parts], axis=1).reshape(-1),
        request_ts=np.concatenate([p.request_ts for p in parts]),
        user_ids=np.concatenate([p.user_ids for p in parts]),
    )


@dataclass
class TowerBatch:
    """One tower call's input: ``kjt`` has exactly ``batch_users`` rows, the first ``n`` are ``user_ids``
    (a short batch is padded by repeating its first user, so a user's output does not depend on its batch)."""

    user_ids: np.ndarray  # [n]
    n: int
    kjt: Any
    seconds: dict[str, float] = field(default_factory=dict)
    private_mb: float = 0.0  # the reader process's private memory (MB) after it made this batch (0: unknown)


class _BatchSource(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Item ``i``: batch ``i``'s users read, padded and sliced, as numpy arrays (a DataLoader worker turns
    them into tensors, which travel to the main process through shared memory)."""

    def __init__(
        self,
        url: str,
        features: UserFeatures,
        batches: Sequence[np.ndarray],
        cutoffs: Sequence[np.ndarray],
        batch_users: int,
    ) -> None:
        self.url, self.features, self.batches, self.cutoffs = url, features, list(batches), list(cutoffs)
        self.batch_users = batch_users
        self._ds: TimelineDataset | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self._item(i)
        except Exception as e:  # noqa: BLE001 - carried to the main process and raised there as itself
            try:
                blob = pickle.dumps(e)
                pickle.loads(blob)
            except Exception:  # noqa: BLE001 - an exception that does not survive pickling
                blob = pickle.dumps(DatasetError(f"{type(e).__name__}: {e}"))
            return {"error": np.frombuffer(blob, np.uint8).copy()}

    def _item(self, i: int) -> dict[str, Any]:
        if self._ds is None:  # opened in the worker (the metadata is read once per worker)
            self._ds = TimelineDataset(self.url)
        ids = np.asarray(self.batches[i], np.int64)
        n, B = len(ids), self.batch_users
        t0 = time.perf_counter()
        tl = self._ds.read_users(ids)  # each bucket once, the UniTi columns, the row groups that hold them
        if n < B:  # fixed batch size: pad by repeating the first user
            pad = np.concatenate([np.arange(n), np.zeros(B - n, np.int64)])
            tl = Timelines(tl.user_ids[pad], take_rows(tl.explicit, pad), take_rows(tl.implicit, pad), tl.vocab)
        cuts = np.asarray(self.cutoffs[i], np.int64)
        cuts = np.concatenate([cuts, np.full(B - n, cuts[0])]) if n < B else cuts
        t1 = time.perf_counter()
        sb = self.features.slice(tl, cuts)
        t2 = time.perf_counter()
        return {
            "private_mb": private_mb(),
            "user_ids": ids,
            "n": n,
            "keys": list(sb.keys),
            "values": np.ascontiguousarray(sb.values, np.int64),
            "weights": np.ascontiguousarray(sb.weights, np.float32),
            "lengths": np.ascontiguousarray(sb.lengths, np.int32),
            "length_per_key": sb.length_per_key().astype(np.int64),
            "seconds": {"read": t1 - t0, "slice": t2 - t1},
        }


def _as_batch(item: dict[str, Any], batch_users: int, device: torch.device | str | None) -> TowerBatch:
    from torchrec import KeyedJaggedTensor

    if "error" in item:  # raised in a reader: the same exception here
        err = item["error"]
        raise pickle.loads((err.numpy() if isinstance(err, torch.Tensor) else err).tobytes())
    t0 = time.perf_counter()

    def tensor(x: Any) -> torch.Tensor:
        return x if isinstance(x, torch.Tensor) else torch.from_numpy(x)

    lpk = [int(x) for x in tensor(item["length_per_key"]).tolist()]
    kjt = KeyedJaggedTensor(
        keys=list(item["keys"]),
        values=tensor(item["values"]),
        weights=tensor(item["weights"]),
        lengths=tensor(item["lengths"]),
        stride=batch_users,
        length_per_key=lpk,
        offset_per_key=[0, *np.cumsum(lpk).tolist()],
    )
    if device is not None and torch.device(device).type != "cpu":
        kjt = kjt.to(torch.device(device), non_blocking=True)  # from pinned memory when the loader pinned it
    secs = dict(item["seconds"])
    secs["kjt"] = time.perf_counter() - t0
    ids = item["user_ids"]
    ids = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    return TowerBatch(ids.astype(np.int64, copy=False), int(item["n"]), kjt, secs, float(item["private_mb"]))


def tower_batches(
    url: str,
    features: UserFeatures,
    batches: Sequence[np.ndarray],
    *,
    cutoff_ts: int | Sequence[np.ndarray],
    batch_users: int,
    workers: int = 1,
    prefetch: int = 2,
    device: torch.device | str | None = None,
) -> Iterator[TowerBatch]:
    """Tower batches of the users ``batches[i]`` (each at most ``batch_users`` users) of the dataset at
    ``url``, in order, read and sliced ``workers`` processes ahead (``0``: inline), at most
    ``workers * prefetch`` batches in flight.

    Args:
        cutoff_ts: one data cut-off for every user, or one array per batch (a cut-off per user).

    In a daemonic process (a ``multiprocessing.Pool`` worker), which may not start processes, the batches are
    made inline.
    """
    for i, b in enumerate(batches):
        if not 0 < len(b) <= batch_users:
            raise ValueError(f"batch {i} has {len(b)} users; each batch needs 1..{batch_users} (batch_users)")
    if isinstance(cutoff_ts, (int, np.integer)):
        cuts = [np.full(len(b), int(cutoff_ts), np.int64) for b in batches]
    else:
        cuts = [np.asarray(c, np.int64) for c in cutoff_ts]
        if len(cuts) != len(batches) or any(len(c) != len(b) for c, b in zip(cuts, batches)):
            raise ValueError("cutoff_ts: one array of cut-offs per batch, one per user, is needed")
    import multiprocessing as mp

    source = _BatchSource(url, features, batches, cuts, batch_users)
    if mp.current_process().daemon:  # a daemonic process (a Pool worker) may not have children
        workers = 0
    if workers <= 0 or len(batches) <= 1:
        for i in range(len(source)):
            yield _as_batch(source[i], batch_users, device)
        return
    # fork where the platform has it, whatever this process's default start method (a process started with
    # "spawn" would otherwise spawn its workers too: seconds of imports each, before the first batch)
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    loader = torch.utils.data.DataLoader(
        source,
        multiprocessing_context=ctx,
        batch_size=None,
        shuffle=False,
        num_workers=min(workers, len(batches)),
        prefetch_factor=max(1, prefetch),
        persistent_workers=False,
        worker_init_fn=_worker_init,
        pin_memory=device is not None and torch.device(device).type == "cuda",  # async host -> GPU copies
    )
    for item in loader:
        yield _as_batch(item, batch_users, device)


def private_mb() -> float:
    """This process's private memory in MB (Private_Clean + Private_Dirty of /proc/self/smaps_rollup): what a
    forked loader worker adds, unlike its RSS, which counts the pages it shares with the main process. 0.0
    where the file does not exist (not Linux)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kb = sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))
    except OSError:
        return 0.0
    return kb / 1024


def host_cores() -> int:
    """CPU cores this process may run on."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_loader_workers() -> int:
    """Reader/slicer processes beside the tower: half the host's cores (one on 2 cores), none on one core."""
    cores = host_cores()
    return max(1, cores // 2) if cores > 1 else 0


def _worker_init(_: int) -> None:
    """A loader worker uses one core: one torch thread (the DataLoader's default), one Arrow thread; its
    batches' buffers are reused from the heap (Arrow's through the system allocator) instead of being mapped and
    page-faulted in again for every batch (:func:`dv365.core.process.keep_heap_memory`)."""
    import pyarrow as pa

    from dv365.core.process import keep_heap_memory

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    if keep_heap_memory():
        pa.set_memory_pool(pa.system_memory_pool())
