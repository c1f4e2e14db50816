"""The export job (``dv365 export run``): every user's embedding, int4-quantized, into a versioned snapshot.

Paper §2.5: the trained user tower ``eta`` is re-run over the users, its ``N_out x D`` outputs are quantized
(4-bit row-wise, App. A.2.2) and written keyed by user id. A snapshot folder (any fsspec URL) holds, in core's
:mod:`dv365.core.snapshot` format::

    <out>/shard-b00000-00000.parquet ...   written one by one, each atomically (tmp + rename)
    <out>/_export/job.json                 the job's settings and shard plan (the resume journal)
    <out>/_export/done/<shard>.json        one per finished shard: its ShardInfo (sha256) and counts
    <out>/manifest.json                    written LAST, atomically: until then readers see no snapshot

**Resumable.** Killed at any point (SIGKILL included), the same command skips every shard whose done record
matches the file on disk (sha256) and redoes the rest; shard boundaries, user order and tower batches are
fixed by the plan (:mod:`dv365.export.plan`), the tower runs in eval mode on fixed-size batches, so the result
is byte-identical to an uninterrupted run. A different command into the same folder is refused (naming the
setting that differs) unless ``overwrite``.

**Sharded.** Worker ``rank`` of ``num_workers`` (or torchrun's ``RANK``/``WORLD_SIZE``) exports a contiguous
hash range of the shard list; the worker that finds every shard done writes the manifest (``dv365 export
merge`` does it explicitly). The shard list does not depend on the number of workers, so a 2-worker snapshot
is byte-identical to a 1-worker one (manifest times aside).

**Incremental.** With ``previous``, users are re-encoded or carried forward per the refresh policy
(:func:`dv365.export.plan.select_encode`); carried users keep their previous bytes exactly.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np
import torch

from dv365.core.fsio import open_atomic, url_to_fs, write_json_atomic
from dv365.core.quantize import RowFormat
from dv365.core.snapshot import (
    MANIFEST,
    ShardInfo,
    SnapshotError,
    SnapshotManifest,
    read_manifest,
    write_shard,
)
from dv365.core.timeline import TimelineDataset
from dv365.export.__about__ import __version__
from dv365.export.encode import QUANTIZERS, TowerModel, UserEncoder, load_tower_model, resolve_device
from dv365.export.errors import ExportError
from dv365.export.plan import (
    REFRESH_POLICIES,
    PlannedShard,
    SnapshotIndex,
    make_plan,
    plan_digest,
    scan_activity,
    select_encode,
    worker_range,
)

logger = logging.getLogger(__name__)

JOURNAL = "_export"
JOB_FILE = "job.json"
JOB_FORMAT = "dv365.export.job/1"


@dataclass(frozen=True)
class ExportConfig:
    """One export job.

    Args:
        checkpoint: a dv365 training checkpoint (``step_*.pt``) or its folder (the latest step).
        out: the snapshot folder (local path or fsspec URL).
        data: the UniTi dataset to read timelines from (default: the checkpoint's ``data.url``).
        as_of: the snapshot time = the manifest's ``data_cutoff_ts`` (unix s); timelines are cut at
            ``as_of - gap`` (the spec's 24 h, as in training). Default: the dataset's newest event.
        snapshot_id: default ``<as_of, UTC>-<model sha256 prefix>``, e.g. ``20250101T000000Z-3f2a9c1b``, with
            ``-active`` / ``-activity<N>`` appended for an incremental export that carries users forward.
        bits: 4 (default) or 8.
        quantizer: ``fbgemm`` (default) or ``torch`` (core's pure-PyTorch quantizer, same format).
        shard_users: users per shard (the unit of resume).
        batch_users: users per tower call.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N``.
        previous: a complete snapshot to refresh incrementally from.
        refresh: ``active`` (default), ``activity`` or ``all`` (see :mod:`dv365.export.plan`).
        carry_across_models: allow carrying users forward from a ``previous`` snapshot made by another model
            version (the recurring pipeline's warm-started models: stale embeddings stay usable, paper
            App. B); off by default, where a model change needs ``refresh: all``. The manifest records it.
        min_new_events: the ``activity`` policy's threshold.
        num_workers / worker_rank: this process's part of a sharded export.
        merge: write the manifest when every shard is done (any worker may; ``False``: leave it to ``merge``).
        overwrite: replace whatever dv365 export wrote in ``out`` (a finished or unfinished other snapshot).
        progress: show a tqdm bar (users/s, ETA).
        threads: torch CPU threads of the tower (0: the host's cores less the loader workers, at least 1; with
            no loader worker, torch's default).
        slicer: the slicer backend, ``auto`` (numba when it imports), ``numba`` or ``numpy`` (the reference).
        loader_workers: processes that read and slice tower batches ahead of the tower (``None``: half the
            host's cores, one on 2 cores, none on one core; ``0``: inline). Each holds one batch of users at a time.
    """

    checkpoint: str
    out: str
    data: str | None = None
    as_of: int | None = None
    snapshot_id: str | None = None
    bits: int = 4
    quantizer: str = "fbgemm"
    shard_users: int = 1024
    batch_users: int = 64
    device: str = "auto"
    previous: str | None = None
    refresh: str = "active"
    carry_across_models: bool = False
    min_new_events: int = 10
    num_workers: int = 1
    worker_rank: int = 0
    merge: bool = True
    overwrite: bool = False
    progress: bool = True
    threads: int = 0
    slicer: str = "auto"
    loader_workers: int | None = None


@dataclass
class ExportResult:
    """What one ``run_export`` call did."""

    out: str
    snapshot_id: str
    manifest: SnapshotManifest | None  # None: other workers' shards are not done yet
    shards_total: int
    shards_mine: int
    shards_written: int
    shards_resumed: int
    users_mine: int
    users_written: int  # users in the shards this call wrote (encoded + carried)
    users_encoded: int  # tower runs this call made
    seconds: float
    already_complete: bool = False
    counts: dict[str, int] = field(default_factory=dict)  # whole-snapshot encoded / carried / new
    # seconds per stage of this call's encoding: read, slice, kjt (the loader's, workers' time included),
    # pool, fsa, quantize, write, wait (the tower's process waiting for the loader), and warm_up (the slicer's
    # kernels loaded before the loop; not in ``seconds``)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    loader_private_mb: float = 0.0  # the largest private memory a loader worker (or this process, inline) had
    first_batch: tuple[float, int] | None = None  # (seconds until the first tower batch arrived, its users)
    loader_workers: int = 0  # reader/slicer processes this call used (0: inline)
    tower_threads: int = 0  # torch threads the tower ran with

    @property
    def users_per_s_steady(self) -> float:
        """Encoded users/s after the first tower batch arrived (the loader's fill excluded): the rate an export
        over many users runs at."""
        if self.first_batch is None:
            return 0.0
        s, n = self.first_batch
        rest = self.seconds - s
        return (self.users_encoded - n) / rest if rest > 0 and self.users_encoded > n else 0.0

    @property
    def users_per_s(self) -> float:
        return self.users_written / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------------------------------
# small fsspec helpers
# ------------------------------------------------------------------------------------------------------


def _write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    # per-process temporary name: workers of a sharded export may write the same record at once
    write_json_atomic(fs, path, obj, tmp_suffix=f".tmp-{os.getpid()}")


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    return json.loads(fs.cat_file(path).decode())


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha256(blob: bytes) -> str:
    import hashlib

    return hashlib.sha256(blob).hexdigest()


def _abs_url(url: str) -> str:
    fs, path = url_to_fs(url)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


# ------------------------------------------------------------------------------------------------------
# the job
# ------------------------------------------------------------------------------------------------------
def _worker_from_env(cfg: ExportConfig) -> tuple[int, int]:
    """``(rank, world)``: the config's, or torchrun's ``RANK``/``WORLD_SIZE`` when the config says 1 worker."""
    if cfg.num_workers == 1 and "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        try:
            return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError as e:
            raise ExportError(
                f"RANK / WORLD_SIZE are not integers: {os.environ['RANK']!r}, {os.environ['WORLD_SIZE']!r}"
            ) from e
    return cfg.worker_rank, cfg.num_workers


class _Job:
    def __init__(self, cfg: ExportConfig, loader_workers: int = 0) -> None:
        self.cfg, self.loader_workers = cfg, loader_workers
        if cfg.bits not in (4, 8):
            raise ExportError(f"--bits must be 4 or 8, got {cfg.bits}")
        if cfg.quantizer not in QUANTIZERS:
            raise ExportError(f"--quantizer must be one of {QUANTIZERS}, got {cfg.quantizer!r}")
        if cfg.refresh not in REFRESH_POLICIES:
            raise ExportError(f"--refresh must be one of {REFRESH_POLICIES}, got {cfg.refresh!r}")
        if cfg.slicer not in ("auto", "numba", "numpy"):
            raise ExportError(f"--slicer must be auto, numba or numpy, got {cfg.slicer!r}")
        if cfg.loader_workers is not None and cfg.loader_workers < 0:
            raise ExportError(f"--loader-workers must be 0 (inline) or more, got {cfg.loader_workers}")
        self.rank, self.world = _worker_from_env(cfg)
        if self.world > 1 and cfg.overwrite:
            raise ExportError(
                "--overwrite with several workers would let one worker delete another's shards: "
                "clear the folder (or run with --overwrite and one worker) first"
            )
        self.device = resolve_device(cfg.device)
        self.model: TowerModel = load_tower_model(cfg.checkpoint, self.device)
        data = cfg.data or self.model.data_url
        if not data:
            raise ExportError(f"{cfg.checkpoint}: the checkpoint names no dataset (data.url); pass --data")
        self.ds = TimelineDataset(data)  # DatasetError names the URL
        self.data_url = data
        self.fmt = RowFormat(dim=self.model.dim, bits=cfg.bits, rows_per_user=self.model.out_tokens)
        self.gap_s = int(self.model.spec.gap_s)
        if cfg.as_of is not None:
            self.as_of = int(cfg.as_of)
        elif "last_ts" in self.ds.meta.stats:
            self.as_of = int(self.ds.meta.stats["last_ts"])
        else:
            raise ExportError(f"{data}: the dataset records no newest event time (stats.last_ts); pass --as-of")
        self.cut = self.as_of - self.gap_s
        self.snapshot_id = cfg.snapshot_id or (
            datetime.fromtimestamp(self.as_of, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            + "-"
            + self.model.model_version.rsplit(":", 1)[-1][:8]
            # an incremental snapshot carries stale users: never the same default id as a full rebuild
            + (
                ""
                if not cfg.previous or cfg.refresh == "all"
                else "-active"
                if cfg.refresh == "active"
                else f"-activity{cfg.min_new_events}"
            )
        )
        self.prev: SnapshotIndex | None = None
        self.prev_manifest: SnapshotManifest | None = None
        if cfg.previous:
            self._load_previous(cfg.previous)
        self.fs, self.root = url_to_fs(cfg.out)
        self.journal = posixpath.join(self.root, JOURNAL)

    # -- previous snapshot ----------------------------------------------------------------------------
    def _load_previous(self, url: str) -> None:
        pm = read_manifest(url)  # SnapshotError: "no complete snapshot here"
        where = f"--previous {url} (snapshot {pm.snapshot_id!r})"
        if pm.data_cutoff_ts >= self.as_of:
            raise ExportError(
                f"{where}: its data cut-off {iso(pm.data_cutoff_ts)} is not before this export's "
                f"{iso(self.as_of)} (--as-of)"
            )
        if self.cfg.refresh != "all":
            if pm.row_format != self.fmt:
                raise ExportError(
                    f"{where}: row format {pm.row_format.to_dict()} differs from this export's "
                    f"{self.fmt.to_dict()}; carried bytes would not match: use --refresh all"
                )
            if pm.model_version != self.model.model_version and not self.cfg.carry_across_models:
                raise ExportError(
                    f"{where}: made by model {pm.model_version!r}, this export uses "
                    f"{self.model.model_version!r}; carrying its embeddings forward would mix model "
                    "versions: use --refresh all after a model change"
                )
            if abs(pm.gap_hours * 3600 - self.gap_s) > 1e-6:
                raise ExportError(f"{where}: gap_hours {pm.gap_hours} differs from the spec's {self.gap_s / 3600}")
        self.prev_manifest = pm
        self.prev = SnapshotIndex(url, pm)

    # -- plan and identity ----------------------------------------------------------------------------
    def make_plan(self) -> list[PlannedShard]:
        since = None
        if self.prev_manifest is not None:
            since = self.prev_manifest.data_cutoff_ts - int(round(self.prev_manifest.gap_hours * 3600))
        activity = scan_activity(self.ds, self.cut, since)
        prev_ids = self.prev.user_ids if (self.prev is not None and self.cfg.refresh != "all") else None
        users, encode = select_encode(activity, prev_ids, self.cfg.refresh, self.cfg.min_new_events)
        if not len(users):
            raise ExportError(
                f"{self.data_url}: no user has an event at or before the cut {iso(self.cut)} "
                f"(--as-of {iso(self.as_of)} minus the {self.gap_s / 3600:g} h gap)"
            )
        self.new_users = int((~np.isin(users, prev_ids)).sum()) if prev_ids is not None else len(users)
        return make_plan(users, encode, self.ds.meta.num_buckets, self.cfg.shard_users)

    def identity(self, plan: list[PlannedShard]) -> dict[str, Any]:
        """Everything that determines the snapshot's bytes: a restart must match it exactly."""
        return {
            "snapshot_id": self.snapshot_id,
            "model_version": self.model.model_version,
            "data": _abs_url(self.data_url),
            "dataset_created_at": self.ds.meta.created_at,
            "data_cutoff_ts": self.as_of,
            "gap_s": self.gap_s,
            "row_format": self.fmt.to_dict(),
            "quantizer": self.cfg.quantizer,
            "shard_users": self.cfg.shard_users,
            "batch_users": self.cfg.batch_users,
            "device_type": self.device.type,
            "previous": self.prev_manifest.snapshot_id if self.prev_manifest else None,
            "refresh": self.cfg.refresh if self.prev_manifest else None,
            "min_new_events": self.cfg.min_new_events
            if self.prev_manifest and self.cfg.refresh == "activity"
            else None,
            "plan_digest": plan_digest(plan),
        }

    # -- output folder --------------------------------------------------------------------------------
    def _ours(self, name: str) -> bool:
        return (
            name in (MANIFEST, JOURNAL)
            or name.startswith(MANIFEST + ".tmp")
            or (name.startswith("shard-") and (name.endswith(".parquet") or name.endswith(".parquet.tmp")))
        )

    def _clear(self) -> None:
        man = posixpath.join(self.root, MANIFEST)
        if self.fs.exists(man):
            self.fs.rm(man)  # first: an interrupted clear leaves no visible snapshot
        for p in self.fs.ls(self.root, detail=False):
            if self._ours(posixpath.basename(p.rstrip("/"))):
                self.fs.rm(p, recursive=True)

    def prepare_output(self, ident: dict[str, Any], plan: list[PlannedShard]) -> SnapshotManifest | None:
        """Checks the folder; returns the manifest if this very snapshot is already complete there."""
        cfg = self.cfg
        if self.fs.exists(self.root):
            if not self.fs.isdir(self.root):
                raise ExportError(f"{cfg.out}: exists and is not a folder")
            names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
            foreign = sorted(n for n in names if not self._ours(n))
            if foreign:
                raise ExportError(
                    f"{cfg.out}: the folder holds files dv365 export did not write ({foreign[:5]}); "
                    "export into an empty or new folder"
                )
            man = posixpath.join(self.root, MANIFEST)
            if self.fs.exists(man):
                m = read_manifest(cfg.out)
                if m.extra.get("job") == ident:
                    return m
                if not cfg.overwrite:
                    raise ExportError(
                        f"{cfg.out}: holds a complete snapshot {m.snapshot_id!r} (model {m.model_version!r}, "
                        f"data cut-off {iso(m.data_cutoff_ts)}) made with other settings"
                        f"{_diff(m.extra.get('job'), ident)}; export into a new folder, or pass --overwrite"
                    )
                self._clear()
            job = posixpath.join(self.journal, JOB_FILE)
            if self.fs.exists(job):
                old = _read_json(self.fs, job)
                if old.get("identity") != ident:
                    if not cfg.overwrite:
                        raise ExportError(
                            f"{cfg.out}: holds an unfinished export with other settings{_diff(old.get('identity'), ident)}; "
                            "rerun it with its own settings to finish it, or pass --overwrite to start over"
                        )
                    self._clear()
            elif cfg.overwrite:
                self._clear()
        self.fs.makedirs(posixpath.join(self.journal, "done"), exist_ok=True)
        job = posixpath.join(self.journal, JOB_FILE)
        if not self.fs.exists(job):
            _write_json_atomic(self.fs, job, self._job_record(ident, plan))
        return None

    def _job_record(self, ident: dict[str, Any], plan: list[PlannedShard]) -> dict[str, Any]:
        return {
            "format": JOB_FORMAT,
            "identity": ident,
            "exporter": f"dv365-export {__version__}",
            "manifest": {
                "snapshot_id": self.snapshot_id,
                "model_version": self.model.model_version,
                "data_cutoff_ts": self.as_of,
                "gap_hours": self.gap_s / 3600,
                "row_format": self.fmt.to_dict(),
                "simulated": bool(self.ds.meta.simulated),
            },
            "extra": {
                "exporter": f"dv365-export {__version__}",
                "checkpoint": self.model.checkpoint,
                "dataset": self.data_url,
                "data_cutoff": iso(self.as_of),
                "cut_ts": self.cut,
                "quantizer": self.cfg.quantizer,
                "shard_users": self.cfg.shard_users,
                "parent_snapshot_id": self.prev_manifest.snapshot_id if self.prev_manifest else None,
                # carried users' bytes come from this model (differs from model_version with carry_across_models)
                "parent_model_version": self.prev_manifest.model_version if self.prev_manifest else None,
                "refresh": self.cfg.refresh if self.prev_manifest else "full",
                "users_new": self.new_users,
            },
            "shards": [s.name for s in plan],
        }

    # -- one worker's shards ----------------------------------------------------------------------------
    def _done_path(self, name: str) -> str:
        return posixpath.join(self.journal, "done", name + ".json")

    def done_info(self, name: str) -> dict[str, Any] | None:
        """The done record of a shard if the shard file on disk matches it (size and sha256)."""
        rec_path = self._done_path(name)
        if not self.fs.exists(rec_path):
            return None
        try:
            rec = _read_json(self.fs, rec_path)
            info = ShardInfo(**rec["shard"])
        except (ValueError, KeyError, TypeError):
            return None  # a record cut short cannot exist (atomic rename), but never trust a broken one
        path = posixpath.join(self.root, name)
        if not self.fs.exists(path) or self.fs.size(path) != info.bytes:
            return None
        if _sha256(self.fs.cat_file(path)) != info.sha256:
            logger.info(f"dv365 export: shard {name} does not match its done record (sha256); re-exporting it")
            return None
        return dict(rec)

    def write_shard(self, shard: PlannedShard, encoded: np.ndarray) -> dict[str, Any]:
        """Writes one shard from its encoded users' payload ``[shard.encoded, user_bytes]`` and the previous
        snapshot's bytes of its carried users, then its done record."""
        payload = np.empty((len(shard.users), self.fmt.user_bytes), np.uint8)
        payload[shard.encode] = encoded
        if shard.carried:
            assert self.prev is not None
            payload[~shard.encode] = self.prev.payload(shard.users[~shard.encode])
        info = write_shard(self.cfg.out, shard.name, shard.users, payload, self.fmt)
        rec = {"shard": asdict(info), "encoded": shard.encoded, "carried": shard.carried}
        _write_json_atomic(self.fs, self._done_path(shard.name), rec)
        return rec

    def _groups(self, shards: list[PlannedShard]) -> list[list[PlannedShard]]:
        """Consecutive shards whose encoded users fill at least 4 tower batches: at most one padded batch per
        group, however small the buckets' shards are; a kill loses at most one group's work."""
        groups: list[list[PlannedShard]] = []
        cur: list[PlannedShard] = []
        n = 0
        for s in shards:
            cur.append(s)
            n += s.encoded
            if n >= 4 * self.cfg.batch_users:
                groups.append(cur)
                cur, n = [], 0
        if cur:
            groups.append(cur)
        return groups

    def _tower_batches(self, groups: list[list[PlannedShard]]) -> list[np.ndarray]:
        """Each group's encoded users (in group order) cut into tower batches of ``batch_users``: a group ends
        with at most one short (padded) batch, as the group's encode call always made."""
        out = []
        B = self.cfg.batch_users
        for group in groups:
            users = np.concatenate([s.users[s.encode] for s in group] + [np.zeros(0, np.int64)])
            out.extend(users[i : i + B] for i in range(0, len(users), B))
        return out

    def run(self) -> ExportResult:
        t0 = time.perf_counter()
        plan = self.make_plan()
        mine = [plan[i] for i in worker_range(len(plan), self.rank, self.world)]
        ident = self.identity(plan)
        complete = self.prepare_output(ident, plan)
        users_mine = sum(len(s.users) for s in mine)
        if complete is not None:
            return ExportResult(
                self.cfg.out,
                self.snapshot_id,
                complete,
                shards_total=len(plan),
                shards_mine=len(mine),
                shards_written=0,
                shards_resumed=len(mine),
                users_mine=users_mine,
                users_written=0,
                users_encoded=0,
                seconds=time.perf_counter() - t0,
                already_complete=True,
                counts=_counts(complete.extra),
            )
        todo = [s for s in mine if self.done_info(s.name) is None]
        resumed = len(mine) - len(todo)
        users_todo = sum(len(s.users) for s in todo)
        if resumed:
            logger.info(f"dv365 export: resuming {self.snapshot_id}: {resumed} of {len(mine)} shards already done")
        encoder = UserEncoder(
            self.model, self.ds.vocab, self.fmt, self.cfg.batch_users, self.cfg.quantizer, backend=self.cfg.slicer
        )
        from tqdm.auto import tqdm

        from dv365.train.features import StageSeconds, tower_batches

        tag = f" [worker {self.rank}/{self.world}]" if self.world > 1 else ""
        bar = tqdm(
            total=users_mine,
            initial=users_mine - users_todo,
            unit=" users",
            unit_scale=False,
            desc=f"export {self.snapshot_id}{tag}",
            disable=not self.cfg.progress,
            dynamic_ncols=True,
        )
        written = encoded = 0
        # the slicer's kernels loaded here, before the loader forks its workers (they inherit them)
        warm_s = encoder.features.warm_up() if todo else 0.0
        t_work = time.perf_counter()
        groups = self._groups(todo)
        data_seconds = StageSeconds()
        write_s, loader_mb, wait_s = 0.0, 0.0, 0.0
        first_batch: tuple[float, int] | None = None
        batches = tower_batches(
            self.ds.url,
            encoder.features,
            self._tower_batches(groups),
            cutoff_ts=self.as_of,
            batch_users=self.cfg.batch_users,
            workers=self.loader_workers,
            device=self.model.device,
        )
        try:
            for group in groups:
                need = sum(s.encoded for s in group)
                floats = torch.empty(need, self.fmt.rows_per_user, self.fmt.dim, dtype=torch.float32)
                ids = np.concatenate([s.users[s.encode] for s in group] + [np.zeros(0, np.int64)])
                got = 0
                while got < need:
                    t_wait = time.perf_counter()
                    tb = next(batches)
                    wait_s += time.perf_counter() - t_wait
                    if first_batch is None:  # the loader's fill: its first batch, before any overlap
                        first_batch = (time.perf_counter() - t_work, tb.n)
                    assert np.array_equal(tb.user_ids, ids[got : got + tb.n])
                    data_seconds.add(tb.seconds)
                    loader_mb = max(loader_mb, tb.private_mb)
                    floats[got : got + tb.n] = encoder.forward(tb.kjt)[: tb.n]
                    got += tb.n
                    bar.update(tb.n)
                payload = encoder.quantize(floats, ids) if need else np.zeros((0, self.fmt.user_bytes), np.uint8)
                t_w = time.perf_counter()
                start = 0
                for s in group:
                    self.write_shard(s, payload[start : start + s.encoded])
                    start += s.encoded
                    written += len(s.users)
                    encoded += s.encoded
                    bar.update(s.carried)
                write_s += time.perf_counter() - t_w
        finally:
            bar.close()
            batches.close()  # type: ignore[attr-defined]  # stops the loader's workers
        # wait: time the tower's process spent waiting for the loader (inline: the read + slice + KJT time)
        stage_seconds = {
            **data_seconds.as_dict(),
            **encoder.seconds,
            "write": write_s,
            "wait": wait_s,
            "warm_up": warm_s,
        }
        seconds = time.perf_counter() - t_work
        manifest = merge_snapshot(self.cfg.out, missing_ok=True) if self.cfg.merge else None
        return ExportResult(
            self.cfg.out,
            self.snapshot_id,
            manifest,
            shards_total=len(plan),
            shards_mine=len(mine),
            shards_written=len(todo),
            shards_resumed=resumed,
            users_mine=users_mine,
            users_written=written,
            users_encoded=encoded,
            seconds=seconds,
            counts=_counts(manifest.extra) if manifest else {},
            stage_seconds=stage_seconds,
            loader_private_mb=loader_mb,
            first_batch=first_batch,
        )


def _counts(extra: dict[str, Any]) -> dict[str, int]:
    return {k: int(extra[k]) for k in ("users_encoded", "users_carried", "users_new") if k in extra}


def _diff(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return ""
    keys = [k for k in new if old.get(k) != new[k]]
    if not keys:
        return ""
    k = keys[0]
    return f" ({k}: was {old.get(k)!r}, now {new[k]!r}{'; and ' + ', '.join(keys[1:]) if keys[1:] else ''})"


def run_export(cfg: ExportConfig) -> ExportResult:
    """Runs (or resumes, or finishes) one export job; see the module docstring.

    Example::

        res = run_export(ExportConfig(checkpoint="out/train/synth-fsa", out="out/export/synth-1"))
        res.manifest.user_count, res.users_per_s
    """
    from dv365.train.features import default_loader_workers, host_cores

    workers = default_loader_workers() if cfg.loader_workers is None else cfg.loader_workers
    threads = cfg.threads
    if threads <= 0 and workers > 0:  # the cores the loader workers leave to the tower
        threads = max(1, host_cores() - workers)
    threads_before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        res = _Job(cfg, workers).run()
        res.loader_workers, res.tower_threads = max(workers, 0), torch.get_num_threads()
        return res
    finally:
        if threads > 0:
            torch.set_num_threads(threads_before)


def merge_snapshot(out: str, *, missing_ok: bool = False) -> SnapshotManifest | None:
    """Writes ``manifest.json`` once every planned shard is done (checked against its sha256), making the
    snapshot visible. Returns the manifest (also when it was already there); with ``missing_ok``, ``None``
    while shards are missing (otherwise a :class:`SnapshotError` lists them)."""
    fs, root = url_to_fs(out)
    man = posixpath.join(root, MANIFEST)
    if fs.exists(man):
        return read_manifest(out)
    job_path = posixpath.join(root, JOURNAL, JOB_FILE)
    if not fs.exists(job_path):
        raise SnapshotError(f"{out}: no export job here ({JOURNAL}/{JOB_FILE} not found): nothing to merge")
    job = _read_json(fs, job_path)
    if job.get("format") != JOB_FORMAT:
        raise SnapshotError(f"{out}: {JOURNAL}/{JOB_FILE} is not a dv365 export journal")
    shards: list[ShardInfo] = []
    missing: list[str] = []
    encoded = carried = 0
    for name in job["shards"]:
        rec_path = posixpath.join(root, JOURNAL, "done", name + ".json")
        path = posixpath.join(root, name)
        if not fs.exists(rec_path) or not fs.exists(path):
            missing.append(name)
            continue
        rec = _read_json(fs, rec_path)
        info = ShardInfo(**rec["shard"])
        if _sha256(fs.cat_file(path)) != info.sha256:
            raise SnapshotError(
                f"{out}: shard {name} does not match its done record (sha256): rerun the export command to redo it"
            )
        shards.append(info)
        encoded += int(rec["encoded"])
        carried += int(rec["carried"])
    if missing:
        if missing_ok:
            return None
        raise SnapshotError(
            f"{out}: {len(missing)} of {len(job['shards'])} shards are not done yet "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): run the missing workers"
        )
    m = job["manifest"]
    extra = {**job["extra"], "job": job["identity"], "users_encoded": encoded, "users_carried": carried}
    manifest = SnapshotManifest(
        snapshot_id=m["snapshot_id"],
        model_version=m["model_version"],
        data_cutoff_ts=int(m["data_cutoff_ts"]),
        row_format=RowFormat.from_dict(m["row_format"]),
        shards=tuple(shards),
        gap_hours=float(m["gap_hours"]),
        simulated=bool(m["simulated"]),
        extra=extra,
    )
    if fs.exists(man):  # another worker merged meanwhile
        return read_manifest(out)
    # as core's write_manifest (written last, renamed into place), with a per-process temporary name: two
    # workers that finish together may both merge; each rename installs a complete manifest
    with open_atomic(fs, man, "w", tmp_suffix=f".tmp-{os.getpid()}") as f:
        f.write(manifest.to_json())
    return manifest
