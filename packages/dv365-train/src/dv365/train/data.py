"""Training examples: requests joined with the user's timelines, sliced at each request's own time.

An example is one request row of a UniTi dataset (``requests/``: user, request time ``ts``, the target
item, ``label_*`` columns). Its user features are the user's explicit + implicit timelines sliced by the
spec at *that row's* ``ts``: the slicer keeps only events with ``t <= ts - gap`` (24 h, the distant-interest
objective, Eq. 9), then the last ``cap`` per timeline, then the windows. Two requests of the same user at
different times therefore see different histories.

Splits are by request time: the latest ``eval_fraction`` of requests is the evaluation set, and
``train_range`` selects a time range of the rest (a newer model version trains on a later range).

Order: step ``s`` of a run reads the batch at position ``s mod batches_per_epoch`` of epoch
``s // batches_per_epoch``, whose order is a permutation drawn from ``SeedSequence([seed, epoch])``. The
batch of a step is a pure function of (data, seed, step), so a resumed run, or DataLoader workers, see
exactly the batches of an uninterrupted run. The last partial batch of an epoch is dropped.

Everything here runs on the CPU (numpy slicing, KJT construction); :meth:`Batch.to` moves a batch to the
training device. The timelines of the run's users are held in memory (fine up to ~1K users of paper-sized
histories on one host).

RecD dedup (``data.dedup``, :mod:`~dv365.train.dedup`): rows of a batch with identical user slices are
sliced once; ``data.group_by_user`` keeps a user's consecutive requests together in the epoch order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torchrec.streamable import Pipelineable

from dv365.core.errors import DatasetError
from dv365.core.slicing import Slicer, SliceSpec
from dv365.core.timeline import TimelineDataset, Timelines, take_rows
from dv365.train.backbone import ITEM_FEATURES, SHARED_ITEM_FEATURES, SMALL_ITEM_TABLES
from dv365.train.config import DataConfig
from dv365.train.dedup import dedup_rows, grouped_permutation, slice_keys, with_inverse
from dv365.train.errors import TrainConfigError
from dv365.train.features import UserFeatures
from dv365.train.losses import MultiTaskLoss, TaskSpec

NUM_DENSE = 6
DENSE_FEATURES = ("log1p_video_duration", "is_video", "hour_sin", "hour_cos", "weekday_sin", "weekday_cos")

logger = logging.getLogger(__name__)


def load_spec(cfg: DataConfig) -> SliceSpec:
    """The slice spec of ``cfg`` with its ``hash_sizes`` overrides applied."""
    spec = SliceSpec.load(cfg.spec)
    if not cfg.hash_sizes:
        return spec
    id_types = {k: dict(v or {}) for k, v in spec.raw["id_types"].items()}
    for id_type, rows in cfg.hash_sizes.items():
        if id_type not in id_types:
            raise TrainConfigError(
                f"data.hash_sizes.{id_type}: spec {spec.name!r} has no such id type; it has {sorted(id_types)}"
            )
        id_types[id_type]["hash_size"] = int(rows)
    return SliceSpec.from_dict({**spec.raw, "id_types": id_types})


def dense_features(request_ts: np.ndarray, video_duration: np.ndarray) -> np.ndarray:
    """Dense inputs of the backbone, ``[B, 6]`` float32 (:data:`DENSE_FEATURES`).

    x (target item): ``log1p(video duration s)`` and a video flag (0 for images / movies without a
    duration). c (request context, UTC): hour of day and day of week on the unit circle. No dense feature
    is derived from the long timelines, so the baseline without DV365 does not see them.
    """
    dur = np.nan_to_num(np.asarray(video_duration, np.float64), nan=0.0)
    ts = np.asarray(request_ts, np.int64)
    hour = (ts % 86_400) / 86_400 * 2 * np.pi
    weekday = ((ts // 86_400 + 3) % 7) / 7 * 2 * np.pi  # 1970-01-01 was a Thursday: Monday = 0
    cols = [
        np.log1p(np.maximum(dur, 0)),
        (dur > 0).astype(np.float64),
        np.sin(hour),
        np.cos(hour),
        np.sin(weekday),
        np.cos(weekday),
    ]
    return np.stack(cols, axis=1).astype(np.float32)


def infer_tasks(table: pa.Table) -> tuple[TaskSpec, ...]:
    """Tasks for every ``label_*`` column: binary if its values are all 0/1, else a regression task (on
    ``log1p`` when the values are non-negative)."""
    tasks = []
    for name in table.column_names:
        if not name.startswith("label_"):
            continue
        v = np.asarray(table.column(name).to_numpy(zero_copy_only=False), np.float64)
        if np.isin(v, (0.0, 1.0)).all():
            tasks.append(TaskSpec(name))
        else:
            tasks.append(TaskSpec(name, "regression", 1.0, "log1p" if (v >= 0).all() else "none"))
    return tuple(tasks)


@dataclass
class Batch(Pipelineable):
    """One collated batch (torchrec's ``Pipelineable``: movable across devices and streams).

    Attributes:
        user_kjt: the sliced features (weighted KJT, one key per spec feature), ``None`` for the baseline.
            With ``data.dedup`` and repeated user slices it holds ``U < B`` rows per key plus torchrec
            ``inverse_indices`` mapping the ``B`` batch rows to them (the user tower expands its output).
        item_kjt: the target item's ids, one key per :data:`ITEM_FEATURES`.
        dense: ``[B, NUM_DENSE]`` float32.
        labels: ``[B, K]`` float32, columns in task order.
    """

    user_kjt: Any | None
    item_kjt: Any
    dense: torch.Tensor
    labels: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        dev = torch.device(device)
        return Batch(
            None if self.user_kjt is None else self.user_kjt.to(dev, non_blocking=non_blocking),
            self.item_kjt.to(dev, non_blocking=non_blocking),
            self.dense.to(dev, non_blocking=non_blocking),
            self.labels.to(dev, non_blocking=non_blocking),
        )

    def record_stream(self, stream: Any) -> None:
        for x in (self.user_kjt, self.item_kjt, self.dense, self.labels):
            if x is not None:
                x.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            None if self.user_kjt is None else self.user_kjt.pin_memory(),
            self.item_kjt.pin_memory(),
            self.dense.pin_memory(),
            self.labels.pin_memory(),
        )


@dataclass
class Requests:
    """Request rows as numpy columns (sorted by request time), with the task labels ``[R, K]``."""

    user_id: np.ndarray
    ts: np.ndarray
    media_id: np.ndarray
    author_id: np.ndarray  # -1 = unknown
    topic_offsets: np.ndarray  # [R+1]
    topic_values: np.ndarray
    media_type: np.ndarray  # vocabulary codes
    surface: np.ndarray
    video_duration: np.ndarray  # NaN = not a video
    labels: np.ndarray  # [R, K] float32

    @classmethod
    def from_arrow(cls, table: pa.Table, tasks: Sequence[TaskSpec], vocab: Any) -> Requests:
        missing = [t.label for t in tasks if t.label not in table.column_names]
        if missing:
            have = [c for c in table.column_names if c.startswith("label_")]
            raise TrainConfigError(f"tasks: label columns {missing} are not in the dataset's requests; it has {have}")
        table = table.sort_by([("ts", "ascending"), ("user_id", "ascending"), ("media_id", "ascending")])

        def col(name: str) -> np.ndarray:
            return np.asarray(table.column(name).to_numpy(zero_copy_only=False))

        topics = table.column("topic_ids").combine_chunks()
        if topics.null_count:
            topics = topics.fill_null(pa.scalar([], topics.type))
        toff = topics.offsets.to_numpy().astype(np.int64)
        labels = (
            np.stack([col(t.label).astype(np.float32) for t in tasks], axis=1)
            if tasks
            else np.zeros((len(table), 0), np.float32)
        )
        if not np.isfinite(labels).all():
            bad = [t.label for k, t in enumerate(tasks) if not np.isfinite(labels[:, k]).all()]
            raise DatasetError(f"requests: label columns {bad} hold null / NaN / inf values")
        return cls(
            user_id=col("user_id").astype(np.int64),
            ts=col("ts").astype(np.int64),
            media_id=col("media_id").astype(np.int64),
            author_id=np.asarray(table.column("author_id").fill_null(-1).to_numpy(), np.int64),
            topic_offsets=toff - toff[0],
            topic_values=topics.flatten().to_numpy().astype(np.int64),
            media_type=vocab.codes("media_types", col("media_type")).astype(np.int64),
            surface=vocab.codes("surfaces", col("surface")).astype(np.int64),
            video_duration=np.asarray(table.column("video_duration").to_numpy(zero_copy_only=False), np.float64),
            labels=labels,
        )

    def __len__(self) -> int:
        return len(self.ts)


def item_kjt(
    req: Requests, rows: np.ndarray, item_hash_size: int, history_rows: Mapping[str, int] | None = None
) -> Any:
    """The target items of ``rows`` as a KJT over :data:`ITEM_FEATURES` (ids hashed to the table rows).

    ``history_rows`` (id type -> the slice spec's hash size): the KJT also holds the keys
    :data:`~dv365.train.backbone.SHARED_ITEM_FEATURES` of those id types, the ids hashed like the history
    (``id % hash_size``), for a backbone that looks the item up in the user tower's tables."""
    from torchrec import KeyedJaggedTensor

    B = len(rows)
    ones = np.ones(B, np.int64)
    author = req.author_id[rows]
    t0, t1 = req.topic_offsets[rows], req.topic_offsets[rows + 1]
    n_topics = t1 - t0
    topic_idx = np.arange(int(n_topics.sum()), dtype=np.int64) + np.repeat(
        t0 - (np.cumsum(n_topics) - n_topics), n_topics
    )
    per_key = [
        (req.media_id[rows] % item_hash_size, ones),
        (author[author >= 0] % item_hash_size, (author >= 0).astype(np.int64)),
        (req.topic_values[topic_idx] % SMALL_ITEM_TABLES["item.topic"], t1 - t0),
        (req.media_type[rows] % SMALL_ITEM_TABLES["item.media_type"], ones),
        (req.surface[rows] % SMALL_ITEM_TABLES["item.surface"], ones),
    ]
    keys = list(ITEM_FEATURES)
    raw = {
        "media": (req.media_id[rows], ones),
        "author": (author[author >= 0], (author >= 0).astype(np.int64)),
        "topic": (req.topic_values[topic_idx], t1 - t0),
    }
    for key, id_type in SHARED_ITEM_FEATURES.items():
        if history_rows and id_type in history_rows:
            ids, lengths = raw[id_type]
            per_key.append((ids % int(history_rows[id_type]), lengths))
            keys.append(key)
    lpk = [int(lengths.sum()) for _, lengths in per_key]
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate([v for v, _ in per_key]).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate([n for _, n in per_key]).astype(np.int32)),
        stride=B,
        length_per_key=lpk,
        offset_per_key=[0, *np.cumsum(lpk).tolist()],
    )


def head_bias_from_labels(labels: np.ndarray, tasks: Sequence[TaskSpec]) -> list[float]:
    """Initial head biases for ``labels [R, K]`` (raw label columns): the base-rate logit of each binary task
    (clamped to [1e-4, 1 - 1e-4]), the mean (transformed) target of each regression task."""
    y = MultiTaskLoss(tasks).targets(torch.from_numpy(labels).double())
    out = []
    for k, t in enumerate(tasks):
        m = float(y[:, k].mean()) if len(y) else 0.0
        if t.kind == "binary":
            p = min(max(m, 1e-4), 1 - 1e-4)
            out.append(math.log(p / (1 - p)))
        else:
            out.append(m)
    return out


def sample_per_user(table: pa.Table, n: int, seed: int) -> pa.Table:
    """At most ``n`` rows of each ``user_id``, drawn uniformly at random with ``seed``; rows keep their order.

    Example::

        sample_per_user(requests, 2, 0)     # every user's requests, at most 2 of each
    """
    users = table.column("user_id").to_numpy()
    order = np.lexsort((np.random.default_rng(seed).random(len(users)), users))  # by user, random within
    sorted_users = users[order]
    first = np.r_[0, np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1]
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    return table.take(np.sort(order[rank < n]))


class ExampleSource:
    """The examples of a run: a dataset's requests joined with its users' timelines.

    Args:
        cfg: dataset URL, spec, splits.
        tasks: label columns (output order); empty: :func:`infer_tasks`.
        spec: the slice spec, or ``None`` when no user tower is trained (the baseline: no slicing at all).
        item_hash_size: rows of the item media / author tables.
        canonical: one order inside dedup'd bags (:class:`~dv365.train.features.UserFeatures`): the batches,
            and so the results, are bit-identical whatever the slicer backend.

    Example::

        src = ExampleSource(DataConfig(url="data/synth"), tasks, load_spec(cfg), 100_003)
        batch = src.collate(src.train_rows[:256])    # Batch on the CPU
        len(src.train_rows), len(src.eval_rows)
    """

    def __init__(
        self,
        cfg: DataConfig,
        tasks: Sequence[TaskSpec],
        spec: SliceSpec | None,
        item_hash_size: int,
        canonical: bool = False,
    ) -> None:
        if not cfg.url:
            raise TrainConfigError(
                "data.url is not set: name a UniTi dataset with requests (dv365 synth / dv365 import)"
            )
        self.dataset = TimelineDataset(cfg.url)
        table = self.dataset.requests()
        if table.num_rows == 0:
            raise DatasetError(f"{cfg.url}: the dataset has no requests (training examples)")
        if cfg.max_requests_per_user > 0:
            table = sample_per_user(table, cfg.max_requests_per_user, cfg.sample_seed)
        self.tasks = tuple(tasks) or infer_tasks(table)
        self.requests = Requests.from_arrow(table, self.tasks, self.dataset.vocab)
        R = len(self.requests)
        n_eval = math.ceil(cfg.eval_fraction * R) if cfg.eval_fraction > 0 else 0
        pool = R - n_eval
        lo, hi = (int(math.floor(f * pool)) for f in cfg.train_range)
        self.train_rows = np.arange(lo, hi, dtype=np.int64)
        self.eval_rows = np.arange(pool, R, dtype=np.int64)
        self.item_hash_size = item_hash_size
        self.cfg = cfg
        self.spec = spec
        self.slicer: Slicer | None = None
        self.features: UserFeatures | None = None
        if spec is not None:  # the one data path (dv365.train.features) slices and checks
            self.features = UserFeatures(spec, self.dataset.vocab, backend=cfg.slicer, canonical=canonical)
            _warn_small_dense_tables(self.dataset, spec, cfg.url)
            self.slicer = self.features.slicer
        # the target's ids hashed like the history too (share_item_tables), when there is a history
        self.history_rows = {t.id_type: t.hash_size for t in spec.tables.values()} if spec is not None else None
        self.timelines: Timelines | None = None
        self._user_row = np.zeros(0, np.int64)
        if spec is not None:
            users = np.unique(self.requests.user_id[np.concatenate([self.train_rows, self.eval_rows])])
            self.timelines = self.dataset.read_users(users)
            self._users = users

    @property
    def simulated(self) -> bool:
        return bool(self.dataset.meta.simulated)

    def collate(self, rows: np.ndarray, dedup: bool | None = None) -> Batch:
        """Slices each row's user at the row's request time and builds the KJTs (CPU tensors).

        With dedup (``data.dedup``, or the ``dedup`` argument), rows whose slices are identical (same user,
        same effective cut-off: :func:`~dv365.train.dedup.slice_keys`) are sliced once: the user KJT then
        has ``U < B`` rows and ``inverse_indices`` (a batch without repeats is built exactly as without dedup).
        """
        rows = np.asarray(rows, np.int64)
        req = self.requests
        user_kjt = None
        if self.features is not None and self.timelines is not None and self.spec is not None:
            tl = self.timelines
            urow = np.searchsorted(self._users, req.user_id[rows])
            ts = req.ts[rows]
            inverse = None
            if (self.cfg.dedup if dedup is None else dedup) and len(rows) > 1:
                first, inv = dedup_rows(slice_keys(tl, urow, ts, self.spec))
                if len(first) < len(rows):
                    urow, ts, inverse = urow[first], ts[first], inv
            batch_tl = Timelines(
                tl.user_ids[urow], take_rows(tl.explicit, urow), take_rows(tl.implicit, urow), tl.vocab
            )
            user_kjt = self.features.kjt(batch_tl, ts)
            if inverse is not None:
                user_kjt = with_inverse(user_kjt, torch.from_numpy(inverse))
        return Batch(
            user_kjt,
            item_kjt(req, rows, self.item_hash_size, self.history_rows),
            torch.from_numpy(dense_features(req.ts[rows], req.video_duration[rows])),
            torch.from_numpy(np.ascontiguousarray(req.labels[rows])),
        )

    def head_bias(self) -> list[float]:
        """Initial head biases from the training rows: base-rate logits (binary), target means (regression)."""
        return head_bias_from_labels(self.requests.labels[self.train_rows], self.tasks)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The evaluation rows in time order (the last batch may be partial)."""
        for s in range(0, len(self.eval_rows), batch_size):
            yield self.collate(self.eval_rows[s : s + batch_size])


class TrainBatches(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Map-style dataset: ``batches[step]`` is the collated training batch of that step.

    Args:
        source: the examples.
        batch_size: examples per step.
        seed: data-order seed.
        group_by_user: keep each user's time-consecutive requests together in groups of this many rows
            (:func:`~dv365.train.dedup.grouped_permutation`); ``None``: ``data.group_by_user`` of the source.
        part: ``(rank, world_size)``: ``batches[step]`` collates only this rank's contiguous part of the
            step's global batch (multi-process training); ``rows(step)`` is always the whole batch.

    Example::

        batches = TrainBatches(src, 256, seed=0)
        loader = DataLoader(batches, batch_size=None, sampler=range(start, steps), num_workers=2)
    """

    def __init__(
        self,
        source: ExampleSource,
        batch_size: int,
        seed: int,
        group_by_user: int | None = None,
        part: tuple[int, int] = (0, 1),
    ) -> None:
        n = len(source.train_rows)
        if n < batch_size:
            raise TrainConfigError(f"run.batch_size = {batch_size} but the training range has only {n} requests")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.group_by_user = source.cfg.group_by_user if group_by_user is None else group_by_user
        self.part = part
        self.batches_per_epoch = n // batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch within the epoch)`` of a step."""
        return divmod(step, self.batches_per_epoch)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            if self.group_by_user > 0:
                rows = self.source.train_rows
                perm = grouped_permutation(
                    self.source.requests.user_id[rows], self.source.requests.ts[rows], self.group_by_user, rng
                )
            else:
                perm = rng.permutation(len(self.source.train_rows))
            self._perm = (epoch, perm)
        return self._perm[1]

    def rows(self, step: int) -> np.ndarray:
        """Request rows of the step's batch."""
        epoch, b = self.position(step)
        idx = self.permutation(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
        return self.source.train_rows[idx]

    def local_rows(self, step: int) -> np.ndarray:
        """This rank's part of the step's batch (all of it in a single process)."""
        rank, world = self.part
        n = self.batch_size // world
        return self.rows(step)[rank * n : (rank + 1) * n]

    def __getitem__(self, step: int) -> Batch:
        return self.source.collate(self.local_rows(step))

    def __len__(self) -> int:
        return self.batches_per_epoch


def _warn_small_dense_tables(ds: TimelineDataset, spec: SliceSpec, url: str) -> None:
    """A dataset with dense ids (``--dense-ids``) names how many rows each id type needs: a table with fewer
    rows wraps ids (``id % hash_size``), i.e. collides, which the dense ids were written to avoid."""
    rows = {t.id_type: t.hash_size for t in spec.tables.values()}
    for id_type in ds.dense_id_types:
        if id_type not in rows:
            continue
        n, size = len(ds.id_map(id_type)), rows[id_type]
        if size < n:
            logger.warning(
                f"{url}: {n:,} dense {id_type} ids but the {id_type} table has {size:,} rows: ids from "
                f"{size:,} on share rows (set data.hash_sizes.{id_type} >= {n:,} for none)"
            )
