"""What every downstream experiment of one data set shares: requests, short histories, splits, the upstream
DV365 model and its exported snapshots.

Time line (all splits by request time, :class:`~dv365.experiments.downstream.settings.SplitSettings`)::

    | upstream (DV365 trained here) | downstream train | val | test |
                                    ^ w0     ^ w1     ^ w2 ...        snapshot exported at each window start

1. **Upstream**: the DV365 model (user tower + DLRM backbone, dv365-train's :class:`~dv365.train.trainer.Trainer`)
   is trained on the upstream requests only, from the config's ``upstream:`` section.
2. **Export**: :func:`dv365.export.job.run_export` writes one int4 snapshot per window, ``as_of`` = the
   window's first request time (timelines cut at ``as_of - 24 h``, the spec's gap). Snapshots are read back
   with :mod:`dv365.core.snapshot` and de-quantized downstream by :class:`dv365.adapters.DV365Input`.
   A request reads the latest snapshot made before it (``fresh``) or the first one (``stale``); users
   without a visible event at a snapshot's cut are not in it (``missing``: the adapter's learned default).
3. **Downstream** models train on the downstream-train requests, choose their step on ``val`` and are
   evaluated once on ``test``. Their short history is the last K events strictly before the request (no
   gap): the strong short-term model that DV365 has to add to.

Everything derived is cached under ``<data-dir>/experiments/`` (checkpoint, snapshots): a second run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dv365.core.timeline import TimelineDataset, Timelines
from dv365.experiments.downstream.settings import ExperimentError, Settings, SynthSettings
from dv365.train.losses import TaskSpec

logger = logging.getLogger(__name__)

PAD = 0
IMPLICIT_ACTION_BASE = 40  # history action codes: 1 + explicit action code (< 40), 40 + dwell bucket (implicit)
ACTION_ROWS = 64


# ------------------------------------------------------------------------------------------------------
# Data sets
# ------------------------------------------------------------------------------------------------------
def prepare_url(dataset: str, synth: SynthSettings, data_url: str | None, data_dir: Path, progress: bool) -> str:
    """The UniTi data set of ``dataset``: ``data_url`` if given, else created under ``data_dir`` by
    dv365-train's ``eval upstream`` preparation (MovieLens import / ``dv365 synth``), reused when valid."""
    if data_url:
        if not (Path(data_url) / "_dataset.json").exists() and "://" not in data_url:
            raise ExperimentError(f"data_url = {data_url!r}: no UniTi data set there (dv365 import / dv365 synth)")
        return data_url
    if dataset == "kuairand":
        raise ExperimentError(
            "--dataset kuairand needs the data: pass --dataset <the folder written by `dv365 import kuairand ... "
            "--out <folder>`> instead (docs/experiments.md)"
        )
    from dv365.experiments.upstream import UpstreamSettings, prepare_dataset

    return str(prepare_dataset(dataset, UpstreamSettings(train={}, synth=synth), data_dir, progress))


def tasks_of(settings: Settings) -> tuple[TaskSpec, ...]:
    return tuple(TaskSpec(**dict(t)) for t in settings.downstream.tasks)


@dataclass
class Histories:
    """Every user's explicit + implicit events merged and sorted by time (one array each, user-major).

    ``action``: 1 + explicit action code, or 40 + a log2 dwell bucket for impressions; 0 is padding.
    """

    users: np.ndarray  # [U] sorted
    offsets: np.ndarray  # [U+1]
    media: np.ndarray  # [n]
    author: np.ndarray  # [n] (-1 unknown)
    action: np.ndarray  # [n]
    ts: np.ndarray  # [n]

    @classmethod
    def from_timelines(cls, tl: Timelines, sources: tuple[str, ...] = ("explicit", "implicit")) -> Histories:
        parts = []
        for kind in sources:
            t = getattr(tl, kind)
            lens = np.diff(t.offsets)
            uidx = np.repeat(np.arange(len(tl.user_ids)), lens)
            if kind == "explicit":
                act = 1 + (t.action.astype(np.int64) if t.action is not None else np.zeros(len(t.ts), np.int64))
                act = np.minimum(act, IMPLICIT_ACTION_BASE - 1)
            else:
                dwell = np.nan_to_num(
                    t.dwell_time.astype(np.float64) if t.dwell_time is not None else np.zeros(len(t.ts)), nan=0.0
                )
                act = IMPLICIT_ACTION_BASE + np.minimum(np.floor(np.log2(1 + np.maximum(dwell, 0))), 15).astype(
                    np.int64
                )
            parts.append((uidx, t.ts.astype(np.int64), t.media_id.astype(np.int64), t.author_id.astype(np.int64), act))
        uidx, ts, media, author, act = (np.concatenate([p[i] for p in parts]) for i in range(5))
        order = np.lexsort((ts, uidx))
        counts = np.bincount(uidx, minlength=len(tl.user_ids))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(np.asarray(tl.user_ids, np.int64), offsets, media[order], author[order], act[order], ts[order])

    def before(
        self, urow: np.ndarray, ts: np.ndarray, cap: int, gap_s: int = 0, strict: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) of the last ``cap`` events of user row ``urow`` with ``t < ts - gap_s`` (``<=``
        when not ``strict``), vectorised with one ``searchsorted`` on (user, ts) keys."""
        big = np.int64(1) << np.int64(40)
        uidx = np.repeat(np.arange(len(self.users), dtype=np.int64), np.diff(self.offsets))
        keys = uidx * big + (self.ts - self.ts.min() if len(self.ts) else self.ts)
        base = self.ts.min() if len(self.ts) else 0
        q = urow.astype(np.int64) * big + (np.asarray(ts, np.int64) - gap_s - base)
        end = np.searchsorted(keys, q, side="left" if strict else "right")
        end = np.clip(end, self.offsets[urow], self.offsets[urow + 1])
        start = np.maximum(self.offsets[urow], end - cap)
        return start.astype(np.int64), (end - start).astype(np.int64)


def gather_right_aligned(start: np.ndarray, length: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``[B, cap]`` of each row's events right-aligned (padding first) and the valid mask."""
    col = np.arange(cap)[None, :]
    valid = col >= (cap - length)[:, None]
    idx = start[:, None] + col - (cap - length)[:, None]
    return np.where(valid, idx, 0), valid


# ------------------------------------------------------------------------------------------------------
# The shared context
# ------------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """Requests, short histories, splits and DV365 snapshots of one data set (module docstring)."""

    dataset: str
    url: str
    settings: Settings
    simulated: bool
    tasks: tuple[TaskSpec, ...]
    req: Any  # dv365.train.data.Requests, sorted by time
    urow: np.ndarray  # [R] row of each request's user in hist.users
    hist: Histories
    hist_start: np.ndarray  # [R]
    hist_len: np.ndarray  # [R]
    rows: dict[str, np.ndarray]  # upstream / train / val / test
    window_of_row: np.ndarray  # [R], -1 in the upstream part
    window_bounds: list[tuple[int, int]]  # request rows [lo, hi) of each window
    snap_as_of: np.ndarray  # [W]
    snap_payload: np.ndarray  # [W, U, N, row_bytes] uint8
    snap_present: np.ndarray  # [W, U] bool
    row_format: Any
    upstream: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    media_vocab: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted item ids
    author_vocab: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted author ids (>= 0)

    # -- item ids -> embedding rows --------------------------------------------------------------------
    def media_code(self, ids: np.ndarray) -> np.ndarray:
        """Row of each item id: its rank in the data set's item vocabulary (every item of the requests and
        histories; ids only, no labels), modulo ``item_hash_size`` (no collisions when the table has at least
        as many rows as there are items)."""
        H = self.settings.downstream.item_hash_size
        return np.searchsorted(self.media_vocab, ids) % H

    def author_code(self, ids: np.ndarray) -> np.ndarray:
        """Row of each author id: 1 + its rank modulo ``item_hash_size``; 0 = unknown (id < 0)."""
        H = self.settings.downstream.item_hash_size
        return np.where(ids >= 0, np.searchsorted(self.author_vocab, ids) % H + 1, 0)

    # -- per-request DV365 inputs ----------------------------------------------------------------------
    def snapshot_index(self, rows: np.ndarray, schedule: str) -> np.ndarray:
        if schedule == "fresh":
            return np.maximum(self.window_of_row[rows], 0)
        if schedule == "stale":
            return np.zeros(len(rows), np.int64)
        raise ExperimentError(f"schedule {schedule!r}: use fresh or stale")

    def dv365(self, rows: np.ndarray, schedule: str = "fresh") -> dict[str, torch.Tensor]:
        s = self.snapshot_index(rows, schedule)
        u = self.urow[rows]
        return {
            "payload": torch.from_numpy(np.ascontiguousarray(self.snap_payload[s, u])),
            "present": torch.from_numpy(self.snap_present[s, u]),
            "age_s": torch.from_numpy((self.req.ts[rows] - self.snap_as_of[s]).astype(np.float32)),
        }

    def dv365_sample(self, rows: np.ndarray, schedule: str = "fresh") -> tuple[torch.Tensor, torch.Tensor]:
        """``(payload [P, N, row_bytes], present [P])``: each distinct (snapshot, user) embedding that ``rows``
        read under ``schedule`` once (the sample a downstream model's DV365 statistics are fitted on)."""
        pairs = np.unique(np.stack([self.snapshot_index(rows, schedule), self.urow[rows]], axis=1), axis=0)
        s, u = pairs[:, 0], pairs[:, 1]
        return (
            torch.from_numpy(np.ascontiguousarray(self.snap_payload[s, u])),
            torch.from_numpy(self.snap_present[s, u]),
        )

    def returning(self, rows: np.ndarray, schedule: str = "fresh") -> np.ndarray:
        """Rows whose user has an embedding (>= 1 event before the snapshot's cut-off: a non-empty gapped
        history)."""
        return rows[self.snap_present[self.snapshot_index(rows, schedule), self.urow[rows]]]

    # -- the downstream batch --------------------------------------------------------------------------
    def item_features(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        from dv365.train.data import dense_features

        r = self.req
        t0, t1 = r.topic_offsets[rows], r.topic_offsets[rows + 1]
        topic = (
            np.where(t1 > t0, r.topic_values[np.minimum(t0, max(len(r.topic_values) - 1, 0))] + 1, 0)
            if len(r.topic_values)
            else np.zeros(len(rows), np.int64)
        )
        return {
            "media": torch.from_numpy(self.media_code(r.media_id[rows])),
            "author": torch.from_numpy(self.author_code(r.author_id[rows])),
            "topic": torch.from_numpy(topic % 1009),
            "media_type": torch.from_numpy(r.media_type[rows] % 16),
            "surface": torch.from_numpy(r.surface[rows] % 16),
            "dense": torch.from_numpy(dense_features(r.ts[rows], r.video_duration[rows])),
            "ts": torch.from_numpy(r.ts[rows]),
        }

    def history(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        K = self.settings.downstream.history
        idx, valid = gather_right_aligned(self.hist_start[rows], self.hist_len[rows], K)
        h = self.hist
        return {
            "h_media": torch.from_numpy(np.where(valid, self.media_code(h.media[idx]), 0)),
            "h_action": torch.from_numpy(np.where(valid, h.action[idx], PAD)),
            "h_ts": torch.from_numpy(np.where(valid, h.ts[idx], 0)),
            "h_valid": torch.from_numpy(valid),
        }

    def batch(self, rows: np.ndarray, schedule: str = "fresh", with_dv365: bool = True) -> dict[str, torch.Tensor]:
        b = {
            **self.item_features(rows),
            **self.history(rows),
            "labels": torch.from_numpy(np.ascontiguousarray(self.req.labels[rows])),
        }
        if with_dv365:
            b.update(self.dv365(rows, schedule))
        return b


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_context(
    dataset: str, settings: Settings, data_dir: Path, *, progress: bool = False, device: str = "cpu"
) -> Context:
    """Prepares the data set, trains the upstream model (cached), exports one snapshot per window (cached)."""
    from dv365.train.data import Requests

    t0 = time.perf_counter()
    url = prepare_url(dataset, settings.synth, settings.data_url, data_dir, progress)
    ds = TimelineDataset(url)
    tasks = tasks_of(settings)
    req = Requests.from_arrow(ds.requests(), tasks, ds.vocab)
    R = len(req)
    sp = settings.split
    n_up = int(math.floor(sp.upstream * R))
    n_test = int(math.ceil(sp.test * R))
    n_val = int(math.ceil(sp.val * R))
    n_train = R - n_up - n_val - n_test
    if n_train < settings.downstream.batch_size:
        raise ExperimentError(f"{url}: only {n_train} downstream training requests (split {sp})")
    ar = np.arange(R, dtype=np.int64)
    rows = {
        "upstream": ar[:n_up],
        "train": ar[n_up : n_up + n_train],
        "val": ar[n_up + n_train : R - n_test],
        "test": ar[R - n_test :],
    }
    down = ar[n_up:]
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in np.array_split(down, sp.windows)]
    window_of_row = np.full(R, -1, np.int64)
    for w, (lo, hi) in enumerate(bounds):
        window_of_row[lo:hi] = w
    as_of = np.array([int(req.ts[lo]) for lo, _ in bounds], np.int64)

    users = np.unique(np.asarray(ds.user_ids(), np.int64))
    tl = ds.read_users(users)
    hist = Histories.from_timelines(tl)
    urow = np.searchsorted(users, req.user_id)
    hs, hl = hist.before(urow, req.ts, settings.downstream.history)
    logger.info(
        f"{dataset}: {len(users):,} users, {len(hist.ts):,} events, {R:,} requests (upstream {n_up:,} / train "
        f"{n_train:,} / val {n_val:,} / test {n_test:,}); {sp.windows} windows"
        + (" [SIMULATED]" if ds.meta.simulated else "")
    )

    work = data_dir / "experiments" / f"{dataset}-{_digest([url, resolved_upstream(settings, url), sp.upstream])}"
    up = train_upstream(settings, url, work / "upstream", sp.upstream, progress, device)
    payload, present, fmt, snaps = export_snapshots(up["checkpoint"], url, users, as_of, work, device)
    facts = {
        "users": int(len(users)),
        "events": int(len(hist.ts)),
        "mean_events_per_user": float(len(hist.ts) / max(len(users), 1)),
        "max_events_per_user": int(np.diff(hist.offsets).max()) if len(users) else 0,
        "requests": R,
        **{k: int(len(v)) for k, v in rows.items()},
        "source": ds.meta.source,
        "simulated": bool(ds.meta.simulated),
        "windows": sp.windows,
        "window_as_of": [int(x) for x in as_of],
        "snapshots": snaps,
        "mean_short_history": float(hl[rows["test"]].mean()),
        "base_rates_test": {
            t.name: round(float(req.labels[rows["test"], k].mean()), 5)
            for k, t in enumerate(tasks)
            if t.kind == "binary"
        },
        "prepare_seconds": round(time.perf_counter() - t0, 1),
    }
    ctx = Context(
        dataset,
        url,
        settings,
        bool(ds.meta.simulated),
        tasks,
        req,
        urow,
        hist,
        hs,
        hl,
        rows,
        window_of_row,
        bounds,
        as_of,
        payload,
        present,
        fmt,
        up,
        facts,
        media_vocab=np.unique(np.concatenate([req.media_id, hist.media]).astype(np.int64)),
        author_vocab=np.unique(np.concatenate([req.author_id, hist.author]).astype(np.int64)),
    )
    au = ctx.author_vocab
    ctx.author_vocab = au[au >= 0]
    ctx.facts["items"], ctx.facts["authors"] = int(len(ctx.media_vocab)), int(len(ctx.author_vocab))
    test = rows["test"]
    ctx.facts["test_returning"] = int(len(ctx.returning(test)))
    ctx.facts["test_missing_share"] = round(1 - len(ctx.returning(test)) / max(len(test), 1), 4)
    return ctx


def resolved_upstream(settings: Settings, url: str) -> dict[str, Any]:
    """The upstream TrainConfig as dv365-train resolves it (its defaults included), minus the run-only keys:
    the cache key of the checkpoint and snapshots, so that a change of dv365-train's config schema or defaults
    trains a new upstream model instead of failing to resume the old one."""
    from dv365.train.config import TrainConfig, apply_overrides

    d = TrainConfig.from_dict(apply_overrides(settings.upstream, {"data.url": url})).to_dict()
    return {
        "data": d.get("data"),
        "tasks": d.get("tasks"),
        "model": d.get("model"),
        "optim": d.get("optim"),
        "run": {k: v for k, v in (d.get("run") or {}).items() if k not in ("progress", "device", "threads")},
    }


def train_upstream(
    settings: Settings, url: str, ckpt_dir: Path, fraction: float, progress: bool, device: str
) -> dict[str, Any]:
    """The DV365 model on the upstream requests (dv365-train's Trainer; resumes / reuses ``ckpt_dir``)."""
    from dv365.train.config import TrainConfig, apply_overrides
    from dv365.train.trainer import Trainer

    if not settings.upstream:
        raise ExperimentError("upstream: the DV365 training config (a dv365-train TrainConfig mapping) is empty")
    over = {
        "data.url": url,
        "data.eval_fraction": 0.0,
        "data.train_range": [0.0, fraction],
        "checkpoint.dir": str(ckpt_dir),
        "checkpoint.every": 0,
        "checkpoint.keep": 1,
        "run.progress": progress,
        "run.device": device,
        "run.eval_every": 0,
    }
    cfg = TrainConfig.from_dict(apply_overrides(settings.upstream, over))
    t0 = time.perf_counter()
    done = (ckpt_dir / "metrics.json").exists()
    res = Trainer(cfg, progress=progress).fit()
    secs = time.perf_counter() - t0
    logger.info(
        f"  upstream DV365 ({cfg.model.kind}) {'reused' if done else 'trained'}: {res.steps} steps, "
        f"{secs:.0f} s -> {res.checkpoint}"
    )
    return {
        "checkpoint": str(res.checkpoint),
        "kind": cfg.model.kind,
        "steps": res.steps,
        "seconds": round(secs, 1),
        "reused": done,
        "train_loss": res.train_loss,
        "examples_per_s": round(res.examples_per_s, 1),
        "dim": cfg.model.tower.dim,
        "n_out": cfg.model.tower.n_out,
    }


def export_snapshots(
    checkpoint: str, url: str, users: np.ndarray, as_of: np.ndarray, work: Path, device: str
) -> tuple[np.ndarray, np.ndarray, Any, list[dict[str, Any]]]:
    """One snapshot per ``as_of`` (dv365 export, int4), read back into ``[W, U, N, row_bytes]`` + presence."""
    from dv365.core.snapshot import read_manifest, read_shard
    from dv365.export.job import ExportConfig, run_export

    tables, present, info = [], [], []
    fmt = None
    t0 = time.perf_counter()
    for w, ts in enumerate(as_of):
        out = work / f"snapshot-w{w:02d}-{int(ts)}"
        run_export(
            ExportConfig(
                checkpoint=checkpoint,
                out=str(out),
                data=url,
                as_of=int(ts),
                device=device,
                progress=False,
                overwrite=True,
                batch_users=64,
            )
        )
        m = read_manifest(str(out))
        fmt = m.row_format
        P = np.zeros((len(users), fmt.rows_per_user, fmt.row_bytes), np.uint8)
        have = np.zeros(len(users), bool)
        for sh in m.shards:
            ids, data = read_shard(str(out), sh, fmt)
            pos = np.searchsorted(users, ids)
            ok = (pos < len(users)) & (users[np.minimum(pos, len(users) - 1)] == ids)
            P[pos[ok]] = data[ok].reshape(-1, fmt.rows_per_user, fmt.row_bytes)
            have[pos[ok]] = True
        tables.append(P)
        present.append(have)
        info.append({"as_of": int(ts), "snapshot_id": m.snapshot_id, "users": int(have.sum()), "path": str(out)})
    logger.info(
        f"  {len(as_of)} snapshots exported / read ({time.perf_counter() - t0:.0f} s; users with an embedding: "
        f"{', '.join(str(i['users']) for i in info)})"
    )
    return np.stack(tables), np.stack(present), fmt, info
