"""The distant history of the next-item evaluation: a user's DV365 embedding of the events before a cut time.

The next-item evaluation (``dv365 eval nextitem``) asks, per (user, cut time), for what serving would hand a
downstream model: the int4 DV365 embedding of the user's events strictly before the cut. This module makes
that embedding without letting anything at or after a user's validation target reach the model:

1. **Upstream training** (:func:`build_distant_provider`): the DV365 model (user tower inside the multi-task
   DLRM, dv365-train's :class:`~dv365.train.trainer.Trainer`) trains on a filtered copy of the data set
   (:func:`write_filtered_dataset`): every event, but only the requests with ``ts < val_target_ts[user]``
   (users without a target contribute no request). The slicer keeps events with ``t <= request - gap``, so
   no event at or after a user's target can reach training either (tested: the trained weights do not
   change when those events are deleted). The checkpoint is cached under ``work_dir``, keyed by a digest of
   (data set, targets, settings, seed).
2. **Embedding** (:class:`DistantEmbedder`): per row, the user's explicit and implicit events with
   ``ts < cut`` are sliced at request time ``cut + gap`` (the slicer drops ``t > request - gap``, none here,
   and measures its time windows back from the request time, as for a snapshot made at ``cut + gap``), the
   frozen tower runs in eval mode under ``torch.inference_mode`` in fixed-size batches (a row's result does
   not depend on the other rows of its batch), then the output is int4-quantized with fbgemm
   (:func:`dv365.export.encode.quantize`) and de-quantized with :func:`dv365.core.quantize.dequantize_rows`.

Example::

    provider = build_distant_provider("data/ml-small", {1: 964982703, ...}, DEFAULT_SETTINGS, Path("work"), seed=0)
    emb, present = provider.embed(np.array([1, 2]), np.array([964982703, 1445714835]))   # [2, 12, 16], [2]
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from dv365.core.quantize import RowFormat, dequantize_rows
from dv365.core.timeline import DatasetWriter, EventTable, TimelineDataset, Timelines, take_rows
from dv365.core.vocab import Vocabulary
from dv365.experiments.downstream.settings import ExperimentError
from dv365.export.encode import UserEncoder

logger = logging.getLogger(__name__)

BITS = 4
SOURCES = ("explicit", "implicit")

# MovieLens quick runs (ml-latest-small: 610 users, 100K ratings, every rating a request): the shipped
# movielens-quick upstream model at D = 16, sized to train in well under 3 min on 2 CPU cores.
DEFAULT_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {
        "data": {"spec": "movielens", "slicer": "auto"},
        "tasks": [
            {"label": "label_rate_ge4"},
            {"label": "label_rate_5"},
            {"label": "label_rate_le2"},
            {"label": "label_rating", "kind": "regression", "weight": 0.25},
        ],
        "model": {
            "kind": "fsa",
            "tower": {
                "dim": 16,
                "n_out": 12,  # 8 funnel tokens (30 -> 15 -> 8) + 4 LCE tokens
                "encoder": {"num_heads": 2, "head_dim": 8, "ff_mult": 2, "dropout": 0.0, "num_layers": 1},
                "funnel": {"num_blocks": 3, "layers_per_block": 1, "stride": 2},
            },
            "backbone": {"embedding_dim": 16, "item_hash_size": 200003, "interaction": "dot", "over_arch": [64, 32]},
        },
        "optim": {"dense": "adam", "lr": 0.002, "sparse": "adagrad", "sparse_lr": 0.05},
        "run": {"steps": 1000, "batch_size": 256, "threads": 1},
    }
)


class DistantHistoryProvider(Protocol):
    """The DV365 embedding of each user's events before a per-row cut time."""

    out_tokens: int
    dim: int

    def embed(self, user_ids: np.ndarray, cut_ts: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """float [N, out_tokens, dim] (int4-quantized with fbgemm and de-quantized, exactly as served) and present
        bool [N]: the DV365 embedding of each user's events with ts < cut_ts[i] (the 'distant history'); present
        False when the user has no such event."""
        ...


# ------------------------------------------------------------------------------------------------------
# Upstream training on the requests before each user's validation target
# ------------------------------------------------------------------------------------------------------
def requests_before(requests: pa.Table, val_target_ts: Mapping[int, int]) -> pa.Table:
    """The rows of ``requests`` with ``ts < val_target_ts[user_id]``; users not in the map keep no row."""
    users = np.array(sorted(val_target_ts), np.int64)
    targets = np.array([val_target_ts[int(u)] for u in users], np.int64)
    uid = np.asarray(requests.column("user_id").to_numpy(zero_copy_only=False), np.int64)
    ts = np.asarray(requests.column("ts").to_numpy(zero_copy_only=False), np.int64)
    target = np.full(len(uid), np.iinfo(np.int64).min)  # no target: nothing is before it
    if len(users):
        pos = np.minimum(np.searchsorted(users, uid), len(users) - 1)
        hit = users[pos] == uid
        target[hit] = targets[pos[hit]]
    keep = ts < target
    return requests.filter(pa.array(keep))


def write_filtered_dataset(url: str, out: str, val_target_ts: Mapping[int, int]) -> dict[str, int]:
    """Copies the UniTi data set ``url`` to ``out`` (same vocabulary and buckets, every event) keeping only the
    requests of :func:`requests_before`; checks the copy and returns ``{"requests_in", "requests_kept"}``."""
    ds = TimelineDataset(url)
    n_in = n_kept = 0
    with DatasetWriter(
        out,
        vocab=Vocabulary.from_dict(ds.vocab.to_dict()),
        num_buckets=ds.meta.num_buckets,
        source=f"{ds.meta.source} (requests before each user's validation target)",
        simulated=ds.meta.simulated,
        mode="overwrite",
        extra={"filtered_from": url},
    ) as w:
        for b in range(ds.meta.num_buckets):
            req = ds.read_bucket("requests", b)
            kept = requests_before(req, val_target_ts)
            n_in, n_kept = n_in + req.num_rows, n_kept + kept.num_rows
            w.add(explicit=ds.read_bucket("explicit", b), implicit=ds.read_bucket("implicit", b), requests=kept)
    written = TimelineDataset(out).requests()
    leaked = written.num_rows - requests_before(written, val_target_ts).num_rows
    if leaked:
        raise ExperimentError(f"{out}: {leaked} requests at or after their user's validation target were written")
    return {"requests_in": n_in, "requests_kept": n_kept}


def _overrides(url: str, ckpt_dir: Path, seed: int, device: str) -> dict[str, Any]:
    """What the provider fixes in the upstream settings: the filtered data, all of its requests for training
    (the evaluation's own splits hold out the rest), the seed, where the checkpoint goes."""
    return {
        "data.url": url,
        "data.eval_fraction": 0.0,
        "run.seed": int(seed),
        "run.device": device,
        "run.progress": False,
        "run.eval_every": 0,
        "checkpoint.dir": str(ckpt_dir),
        "checkpoint.every": 0,
        "checkpoint.keep": 1,
        "checkpoint.warm_start": None,
    }


def cache_key(dataset_url: str, val_target_ts: Mapping[int, int], settings: Mapping[str, Any], seed: int) -> str:
    """16 hex digits of (data set url and ``_dataset.json``, the targets, the resolved settings, the seed)."""
    from dv365.train.config import TrainConfig, apply_overrides

    cfg = TrainConfig.from_dict(apply_overrides(_plain(settings), _overrides("", Path(), seed, "cpu"))).to_dict()
    run = {k: v for k, v in cfg["run"].items() if k not in ("device", "progress", "threads")}
    model_data = {"data": cfg["data"], "tasks": cfg["tasks"], "model": cfg["model"], "optim": cfg["optim"], "run": run}
    targets = np.array(sorted((int(u), int(t)) for u, t in val_target_ts.items()), np.int64).reshape(-1, 2)
    h = hashlib.sha256()
    h.update(dataset_url.encode())
    h.update(TimelineDataset(dataset_url).meta.to_json().encode())
    h.update(targets.tobytes())
    h.update(json.dumps(model_data, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def train_distant_upstream(
    dataset_url: str,
    val_target_ts: Mapping[int, int],
    settings: Mapping[str, Any],
    work_dir: Path,
    seed: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """Trains (or reuses) the upstream DV365 model on the requests before each user's target; returns what was
    done: ``checkpoint``, ``data`` (the filtered copy), ``requests_in`` / ``requests_kept``, ``seconds``..."""
    from dv365.train.config import TrainConfig, apply_overrides
    from dv365.train.trainer import Trainer

    if not settings:
        raise ExperimentError("upstream settings are empty: give a dv365-train TrainConfig mapping (DEFAULT_SETTINGS)")
    work = Path(work_dir) / f"distant-upstream-{cache_key(dataset_url, val_target_ts, settings, seed)}"
    info_path = work / "distant.json"
    if info_path.exists():
        info: dict[str, Any] = json.loads(info_path.read_text())
        info["reused"] = True
        logger.info(f"distant history: reusing the upstream DV365 model {info['checkpoint']}")
        return info
    data = work / "data"
    t0 = time.perf_counter()
    counts_path = work / "requests.json"  # written after the filtered copy is complete
    if counts_path.exists() and (data / "_dataset.json").exists():
        counts = json.loads(counts_path.read_text())
    else:
        counts = write_filtered_dataset(dataset_url, str(data), val_target_ts)
        counts_path.write_text(json.dumps(counts))
    cfg = TrainConfig.from_dict(
        apply_overrides(_plain(settings), _overrides(str(data), work / "upstream", seed, device))
    )
    t1 = time.perf_counter()
    res = Trainer(cfg, progress=False).fit()
    info = {
        "checkpoint": str(res.checkpoint),
        "data": str(data),
        "source": dataset_url,
        **counts,
        "users_with_target": len(val_target_ts),
        "steps": res.steps,
        "train_seconds": round(time.perf_counter() - t1, 1),
        "filter_seconds": round(t1 - t0, 1),
        "train_loss": res.train_loss,
        "kind": cfg.model.kind,
        "seed": int(seed),
    }
    info_path.write_text(json.dumps(info, indent=2, allow_nan=True) + "\n")
    logger.info(
        f"distant history: upstream DV365 ({cfg.model.kind}) trained on {counts['requests_kept']:,} of "
        f"{counts['requests_in']:,} requests (before each user's validation target), {res.steps} steps, "
        f"{info['train_seconds']} s -> {res.checkpoint}"
    )
    return {**info, "reused": False}


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A deep plain-dict copy of ``settings`` (read-only mappings included)."""
    out: dict[str, Any] = json.loads(json.dumps(settings, default=lambda m: dict(m)))
    return out


# ------------------------------------------------------------------------------------------------------
# The embedding of the events before a cut
# ------------------------------------------------------------------------------------------------------
def prefix_rows(t: EventTable, urow: np.ndarray, cut_ts: np.ndarray) -> EventTable:
    """Row ``i``: the events of user row ``urow[i]`` of ``t`` with ``ts < cut_ts[i]`` (a user may repeat)."""
    urow = np.asarray(urow, np.int64)
    start = t.offsets[urow]
    end = start.copy()
    for i, (u, c) in enumerate(zip(urow.tolist(), np.asarray(cut_ts, np.int64).tolist())):
        lo, hi = int(t.offsets[u]), int(t.offsets[u + 1])
        end[i] = lo + int(np.searchsorted(t.ts[lo:hi], c, side="left"))
    # take_rows reads rows [offsets[r], offsets[r + 1]): interleave (start, end) so row 2i spans the prefix
    view = dataclasses.replace(
        t, user_ids=np.repeat(t.user_ids[urow], 2), offsets=np.stack([start, end], axis=1).reshape(-1)
    )
    return take_rows(view, np.arange(0, 2 * len(urow), 2, dtype=np.int64))


class DistantEmbedder:
    """The frozen user tower of a checkpoint over per-row cut times (:class:`DistantHistoryProvider`).

    Args:
        model: the tower and its slice spec (:func:`dv365.export.encode.load_tower_model`).
        timelines: every user's timelines (the full data set: each row keeps only its events before its cut).
        batch_rows: rows per tower call; every call is padded to exactly this many (results do not depend on
            which rows share a batch).
        backend: the slicer backend: ``numpy`` (default: what ``dv365 export``'s
            :class:`~dv365.export.encode.UserEncoder` uses, so the rows are the bytes a snapshot would serve) or
            ``auto`` (numba when it imports, ~2x faster; it orders a bag's ids differently, so ~1% of rows may
            differ by one int4 step).
        threads: CPU intra-op threads while the tower runs (``torch.set_num_threads``, restored after; 0: leave
            torch's setting). On a small shared machine 1 thread is several times faster than 2.

    Example::

        emb = DistantEmbedder(load_tower_model(ckpt), TimelineDataset(url).read_users(users))
        x, present = emb.embed(np.array([7, 7]), np.array([t1, t2]))    # [2, N_out, D] float, [2] bool
    """

    def __init__(
        self, model: Any, timelines: Timelines, batch_rows: int = 256, backend: str = "numpy", threads: int = 0
    ) -> None:
        if batch_rows <= 0:
            raise ExperimentError(f"batch_rows must be positive, got {batch_rows}")
        order = np.argsort(timelines.user_ids, kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            timelines = Timelines(
                timelines.user_ids[order],
                take_rows(timelines.explicit, order),
                take_rows(timelines.implicit, order),
                timelines.vocab,
            )
        self.model, self.timelines, self.batch_rows, self.threads = model, timelines, batch_rows, threads
        self.out_tokens, self.dim = int(model.out_tokens), int(model.dim)
        self.gap_s = int(model.spec.gap_s)
        fmt = RowFormat(dim=self.dim, rows_per_user=self.out_tokens, bits=BITS)
        # the export's encoder (fixed-size padded batches, per-row cut-offs); quantisation stays in embed()
        self.encoder = UserEncoder(model, timelines.vocab, fmt, batch_users=batch_rows, backend=backend)
        self.info: dict[str, Any] = {}
        self._cache: dict[tuple[int, int], torch.Tensor | None] = {}

    def clear_cache(self) -> None:
        self._cache.clear()

    def embed(self, user_ids: np.ndarray, cut_ts: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """De-quantized int4 embeddings ``[N, out_tokens, dim]`` and ``present [N]`` of the events before each
        row's cut (zeros where there is none); each distinct (user, cut) is computed once per instance."""
        u, c = self._rows(user_ids, cut_ts)
        keys = list(zip(u.tolist(), c.tolist()))
        todo = sorted({k for k in keys if k not in self._cache})
        if todo:
            tu = np.array([k[0] for k in todo], np.int64)
            tc = np.array([k[1] for k in todo], np.int64)
            x, present = self.embed_float(tu, tc)
            run = np.flatnonzero(present)
            self._check_finite(x[run], tu[run], tc[run])
            deq = dequantize_rows(_quantize(x[run]), BITS) if len(run) else x[:0]
            for k in todo:
                self._cache[k] = None
            for j, i in enumerate(run.tolist()):
                self._cache[todo[i]] = deq[j]
        out = torch.zeros(len(keys), self.out_tokens, self.dim, dtype=torch.float32)
        present_out = np.zeros(len(keys), bool)
        for i, k in enumerate(keys):
            v = self._cache[k]
            if v is not None:
                out[i] = v
                present_out[i] = True
        return out, present_out

    def embed_float(self, user_ids: np.ndarray, cut_ts: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The tower's float outputs ``[N, out_tokens, dim]`` (CPU, not quantized, not cached) and ``present``."""
        u, c = self._rows(user_ids, cut_ts)
        tl = self.timelines
        pos = np.minimum(np.searchsorted(tl.user_ids, u), max(len(tl.user_ids) - 1, 0))
        known = (tl.user_ids[pos] == u) if len(tl.user_ids) else np.zeros(len(u), bool)
        urow = pos[known]
        tables = {s: prefix_rows(getattr(tl, s), urow, c[known]) for s in SOURCES}
        n_events = tables["explicit"].lengths + tables["implicit"].lengths
        present = np.zeros(len(u), bool)
        present[np.flatnonzero(known)[n_events > 0]] = True
        out = torch.zeros(len(u), self.out_tokens, self.dim, dtype=torch.float32)
        keep = np.flatnonzero(n_events > 0)
        if len(keep):
            sub = {s: take_rows(tables[s], keep) for s in SOURCES}
            ids = sub["explicit"].user_ids
            out[np.flatnonzero(present)] = self._tower(
                Timelines(ids, sub["explicit"], sub["implicit"], tl.vocab), c[present]
            )
        return out, present

    def _tower(self, rows: Timelines, cut_ts: np.ndarray) -> torch.Tensor:
        """Tower outputs of prefix timelines, sliced at ``cut + gap`` (every event kept), in padded batches."""
        self.model.tower.eval()
        with _threads(self.threads):
            return self.encoder.embed(rows, cut_ts + self.gap_s)

    def _rows(self, user_ids: np.ndarray, cut_ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = np.asarray(user_ids, np.int64).reshape(-1)
        c = np.asarray(cut_ts, np.int64).reshape(-1)
        if len(u) != len(c):
            raise ExperimentError(f"embed: {len(u)} user ids but {len(c)} cut times")
        return u, c

    @staticmethod
    def _check_finite(x: torch.Tensor, users: np.ndarray, cuts: np.ndarray) -> None:
        from dv365.core.quantize import FP16_MAX

        flat = x.reshape(len(x), -1)
        bad = ~(torch.isfinite(flat) & (flat.abs() <= FP16_MAX)).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ExperimentError(
                f"user {int(users[i])} at cut {int(cuts[i])}: the tower's output is non-finite or beyond the fp16 "
                "range; the upstream checkpoint may be broken"
            )


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quantize(x: torch.Tensor) -> torch.Tensor:
    from dv365.export.encode import quantize

    return quantize(x, bits=BITS)  # fbgemm, as the export job  # [n, N_out, row_bytes] uint8


def build_distant_provider(
    dataset_url: str,
    val_target_ts: Mapping[int, int],
    settings: Mapping[str, Any],
    work_dir: Path,
    seed: int,
    device: str = "cpu",
) -> DistantHistoryProvider:
    """Trains (or reuses, cached under ``work_dir``) the upstream DV365 model on the data set's requests before
    each user's validation target (:func:`train_distant_upstream`), and returns its :class:`DistantEmbedder`
    over every user's timelines (the numpy slicer, ``run.threads`` of ``settings`` while the tower runs).
    Empty ``settings``: :data:`DEFAULT_SETTINGS`."""
    from dv365.export.encode import load_tower_model

    settings = settings or DEFAULT_SETTINGS
    info = train_distant_upstream(dataset_url, val_target_ts, settings, work_dir, seed, device)
    ds = TimelineDataset(dataset_url)
    threads = int((_plain(settings).get("run") or {}).get("threads", 0))
    embedder = DistantEmbedder(
        load_tower_model(info["checkpoint"], device), ds.read_users(ds.user_ids()), threads=threads
    )
    embedder.info = info
    return embedder
