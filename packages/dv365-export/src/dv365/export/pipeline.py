"""The recurring DV365 job (paper §2.5.2, Fig. 2): one *cycle* = ingest -> train -> export -> publish -> retain.

``dv365 pipeline run --config pipeline.yaml`` runs one cycle; ``dv365 pipeline schedule --every 6h`` runs one
per period; ``dv365 status`` shows what is published. Everything a cycle makes lives under ``workdir``::

    <workdir>/pipeline.lock             held while a cycle runs: two cycles never overlap
    <workdir>/data/                     the pipeline's UniTi dataset: every cycle appends the source's new rows
    <workdir>/models/c0002/             the cycle's training checkpoints (warm-started from c0001's)
    <workdir>/snapshots/<snapshot id>/  the cycle's export (incremental from the previous cycle's snapshot)
    <workdir>/cycles/c0002/cycle.json   the cycle's inputs: number, data cut-off (as_of), the previous cycle
    <workdir>/cycles/c0002/<step>.json  one per finished step: what it made and its figures
    <workdir>/cycles/c0002/record.json  the run record, written when the cycle is complete
    <workdir>/runs.jsonl                one line per complete cycle

**Resumable and idempotent.** A step whose ``<step>.json`` exists is skipped. A step that was killed is
redone from where its own durable state stands: the ingest removes the parts of its unfinished append
(:func:`dv365.core.timeline.remove_run_parts`) and appends again; training resumes from its latest checkpoint
(bit-exact, dv365-train); the export skips its finished shards (dv365-export); publishing removes a
half-published version and loads it again (dv365-store). So a cycle killed at any step and started again
ends with the same published version (same snapshot id, same bytes) as an uninterrupted one.

**Incremental.** The source (a UniTi dataset: the upstream event log) is read up to the cycle's ``as_of``;
only rows newer than the previous cycle's ``as_of`` are appended. Training warm-starts the user tower from
the previous cycle's model; the export re-encodes only users with new activity (``export.refresh``) and
carries the others' bytes forward from the previous snapshot.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dv365.core.errors import Dv365Error
from dv365.core.fsio import url_to_fs, write_json_atomic

logger = logging.getLogger(__name__)

STEPS = ("ingest", "train", "export", "publish", "retain")
RECORD_FORMAT = "dv365.pipeline.record/1"
FUTURE_TOLERANCE_S = 86_400  # a cut-off or a source row later than now + this is refused (clock skew allowance)


def future_limit(now: float | None = None) -> int:
    """The latest timestamp a cycle accepts: now + :data:`FUTURE_TOLERANCE_S` (what the importers accept too)."""
    return int(time.time() if now is None else now) + FUTURE_TOLERANCE_S


class PipelineError(Dv365Error, RuntimeError):
    """A pipeline config or state problem; the message names the key, file or cycle."""


# ------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline (YAML; relative paths in a config file are relative to the file's folder, see
    :meth:`relative_to`; :meth:`from_dict` leaves them as given).

    Keys::

        name: movielens                      # names snapshots: <name>-c0001, <name>-c0002, ...
        workdir: out/pipeline/movielens
        source: out/data/ml-small            # the upstream UniTi dataset (dv365 import / dv365 synth)
        train:
          config: movielens-quick
          steps: 300                         # optimizer steps per cycle (each cycle warm-starts)
          set: {run.threads: 1}              # any train config overrides (like dv365 train --set)
        export: {refresh: active, full_refresh_every: 4, shard_users: 1024, batch_users: 64, bits: 4}
        store: {url: lmdb://out/pipeline/movielens/store, keep: 3}
        retain: {models: 2, snapshots: 2}    # local model / snapshot folders kept (the store keeps its own)
    """

    name: str
    workdir: str
    source: str
    train_config: str
    train_steps: int = 300
    train_set: Mapping[str, Any] = field(default_factory=dict)
    export: Mapping[str, Any] = field(default_factory=dict)
    store_url: str | None = None
    store_keep: int = 3
    keep_models: int = 2
    keep_snapshots: int = 2
    path: str = ""

    EXPORT_KEYS = (
        "refresh",
        "shard_users",
        "batch_users",
        "bits",
        "device",
        "min_new_events",
        "quantizer",
        "threads",
        "slicer",
        "loader_workers",
        "full_refresh_every",
    )

    @classmethod
    def load(cls, path: str | Path) -> PipelineConfig:
        from dv365.core.config import read_yaml_mapping

        cfg = cls.from_dict(read_yaml_mapping(path, PipelineError, "pipeline config"), str(path))
        return cfg.relative_to(Path(os.path.abspath(path)).parent)

    def relative_to(self, base: Path) -> PipelineConfig:
        """The config with its relative paths (workdir, source, train.config, an ``lmdb://`` store path) taken
        relative to ``base`` (:meth:`load`: the config file's folder); absolute paths and URLs are unchanged.
        ``train.config`` stays a shipped config's name (``movielens-quick``) unless it looks like a file
        (a ``.yaml`` / ``.yml`` name, a folder in it) or names one that exists there."""
        from dataclasses import replace

        def local(p: str) -> str:
            return p if "://" in p or Path(p).is_absolute() else str(base / p)

        train = self.train_config
        if "://" not in train and not Path(train).is_absolute():
            looks_like_file = Path(train).suffix in (".yaml", ".yml") or "/" in train or os.sep in train
            if looks_like_file or (base / train).is_file():
                train = str(base / train)
        store = self.store_url
        if store and store.startswith("lmdb://") and not store[len("lmdb://") :].startswith("/"):
            store = f"lmdb://{base / store[len('lmdb://') :]}"
        return replace(
            self, workdir=local(self.workdir), source=local(self.source), train_config=train, store_url=store
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "pipeline config") -> PipelineConfig:
        if not isinstance(d, Mapping):
            raise PipelineError(f"{where}: expected a mapping at the top level")
        known = {"name", "workdir", "source", "train", "export", "store", "retain"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PipelineError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")

        def need(key: str) -> Any:
            if d.get(key) in (None, ""):
                raise PipelineError(f"{where}: `{key}` is required")
            return d[key]

        name = str(need("name"))
        if not all(c.isalnum() or c in "-_." for c in name):
            raise PipelineError(f"{where}: name {name!r}: use letters, digits, '-', '_' or '.' (it names snapshots)")
        train = dict(need("train"))
        if "config" not in train:
            raise PipelineError(f"{where}: train.config is required (a dv365 train YAML config)")
        bad = sorted(set(train) - {"config", "steps", "set"})
        if bad:
            raise PipelineError(f"{where}: unknown train key(s) {bad}; known: config, steps, set")
        export = dict(d.get("export") or {})
        bad = sorted(set(export) - set(cls.EXPORT_KEYS))
        if bad:
            raise PipelineError(f"{where}: unknown export key(s) {bad}; known: {list(cls.EXPORT_KEYS)}")
        store = dict(d.get("store") or {})
        bad = sorted(set(store) - {"url", "keep"})
        if bad:
            raise PipelineError(f"{where}: unknown store key(s) {bad}; known: url, keep")
        retain = dict(d.get("retain") or {})
        bad = sorted(set(retain) - {"models", "snapshots"})
        if bad:
            raise PipelineError(f"{where}: unknown retain key(s) {bad}; known: models, snapshots")

        def integer(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise PipelineError(f"{where}: {key} = {value!r}: expected a whole number")
            try:
                return int(value)
            except ValueError:
                raise PipelineError(f"{where}: {key} = {value!r}: expected a whole number") from None

        cfg = cls(
            name=name,
            workdir=str(need("workdir")),
            source=str(need("source")),
            train_config=str(train["config"]),
            train_steps=integer("train.steps", train.get("steps", 300)),
            train_set=dict(train.get("set") or {}),
            export=export,
            store_url=store.get("url"),
            store_keep=integer("store.keep", store.get("keep", 3)),
            keep_models=integer("retain.models", retain.get("models", 2)),
            keep_snapshots=integer("retain.snapshots", retain.get("snapshots", 2)),
            path=where,
        )
        for key, v, lo in (
            ("train.steps", cfg.train_steps, 1),
            ("store.keep", cfg.store_keep, 1),
            ("retain.models", cfg.keep_models, 1),
            ("retain.snapshots", cfg.keep_snapshots, 1),
        ):
            if v < lo:
                raise PipelineError(f"{where}: {key} = {v}: must be >= {lo}")
        return cfg


# ------------------------------------------------------------------------------------------------------
# state on disk
# ------------------------------------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    """Atomic (tmp + rename): a killed write never leaves a truncated marker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fs, local = url_to_fs(path)
    write_json_atomic(fs, local, obj, default=str)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path}: unreadable pipeline state ({e}); remove the cycle folder to redo it") from e


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | int | None) -> int | None:
    """``--as-of``: unix seconds, or an ISO date / date-time (UTC when no offset)."""
    if value is None or value == "":
        return None
    s = str(value).strip()
    if s.lstrip("-").isdigit():
        return int(s)
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as e:
        raise PipelineError(f"--as-of {value!r}: use unix seconds or an ISO date such as 2018-09-01") from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


@dataclass
class Cycle:
    number: int
    as_of: int
    previous: int | None  # the previous complete cycle's number
    previous_as_of: int | None
    created_at: float
    dir: Path

    @property
    def tag(self) -> str:
        return f"c{self.number:04d}"

    def marker(self, step: str) -> Path:
        return self.dir / f"{step}.json"

    def done(self, step: str) -> dict[str, Any] | None:
        p = self.marker(step)
        return _read_json(p) if p.exists() else None

    @property
    def complete(self) -> bool:
        return (self.dir / "record.json").exists()

    @property
    def abandoned(self) -> bool:
        """Given up by ``dv365 pipeline abort``: its outputs are removed, later cycles ignore it."""
        return (self.dir / "abandoned.json").exists()


class Pipeline:
    """One pipeline's state and steps (see the module docstring).

    Example::

        p = Pipeline(PipelineConfig.load("examples/configs/pipeline-movielens.yaml"))
        record = p.run_cycle()              # ingest -> train -> export -> publish -> retain
        record["snapshot_id"], record["figures"]
    """

    def __init__(self, cfg: PipelineConfig, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.work = Path(cfg.workdir)
        self.progress = progress

    # -- paths ---------------------------------------------------------------------------------------
    @property
    def data_url(self) -> str:
        return str(self.work / "data")

    def model_dir(self, c: Cycle | int) -> Path:
        n = c.number if isinstance(c, Cycle) else c
        return self.work / "models" / f"c{n:04d}"

    def snapshot_id(self, c: Cycle | int) -> str:
        n = c.number if isinstance(c, Cycle) else c
        return f"{self.cfg.name}-c{n:04d}"

    def snapshot_dir(self, c: Cycle | int) -> Path:
        return self.work / "snapshots" / self.snapshot_id(c)

    # -- checks ------------------------------------------------------------------------------------------
    def check(self) -> list[str]:
        """What can be checked without running a cycle; returns the problems (empty: all good), each naming its
        key or path. ``run_cycle`` and ``dv365 pipeline schedule`` call it first; ``dv365 pipeline check`` alone.

        Checked: the workdir is a folder or can be created; the source is a readable UniTi dataset; the train
        config loads with ``train.set`` and the pipeline's own overrides; the store URL names a scheme whose
        backend is installed (nothing is opened or created).
        """
        where = self.cfg.path
        found = (self._check_workdir(), self._check_source(), self._check_train(), self._check_store())
        return [f"{where}: {p}" for p in found if p]

    def check_or_raise(self) -> None:
        problems = self.check()
        if problems:
            raise PipelineError("the pipeline config has problems:\n  " + "\n  ".join(problems))

    def _check_workdir(self) -> str:
        w = self.work
        if w.exists():
            return "" if w.is_dir() else f"workdir {w}: exists and is not a folder"
        parent = next((p for p in w.absolute().parents if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return f"workdir {w}: cannot be created ({parent} is not a writable folder)"
        return ""

    def _check_source(self) -> str:
        from dv365.core.timeline import TimelineDataset

        try:
            TimelineDataset(self.cfg.source)
        except (Dv365Error, OSError, ValueError) as e:
            return f"source {self.cfg.source}: not a readable UniTi dataset ({e})"
        return ""

    def _check_train(self) -> str:
        from dv365.train.config import TrainConfig

        try:
            TrainConfig.load(self.cfg.train_config, self._train_overrides(self.work / "models" / "check", None))
        except (Dv365Error, OSError, ValueError, TypeError) as e:
            return f"train.config {self.cfg.train_config} with train.set {dict(self.cfg.train_set)}: {e}"
        return ""

    def _check_store(self) -> str:
        import importlib
        import sys
        from urllib.parse import urlsplit

        from dv365.core.plugins import load_plugin

        url = self.cfg.store_url
        if not url:
            return ""
        scheme = urlsplit(str(url)).scheme
        if not scheme:
            return f"store.url {url!r}: not a URL (lmdb:///path, redis://host:port/db, grpc://host:port)"
        try:
            opener = load_plugin("dv365.stores", "open_store", "publishing to a store needs dv365-store installed")
        except Dv365Error as e:
            return f"store.url {url}: {e}"
        backends = getattr(sys.modules.get(getattr(opener, "__module__", "")), "BACKENDS", None)
        if isinstance(backends, Mapping):
            if scheme not in backends:
                return f"store.url {url}: unknown store scheme {scheme!r}; installed: {sorted(backends)}"
            try:
                importlib.import_module(backends[scheme][0])
            except ImportError as e:
                return f"store.url {url}: the {scheme} backend is not installed ({e.name or e})"
        return ""

    # -- cycles --------------------------------------------------------------------------------------
    def cycles(self) -> list[Cycle]:
        out = []
        for d in sorted((self.work / "cycles").glob("c[0-9][0-9][0-9][0-9]")):
            if (d / "cycle.json").exists():
                j = _read_json(d / "cycle.json")
                out.append(
                    Cycle(
                        int(j["number"]),
                        int(j["as_of"]),
                        j.get("previous"),
                        j.get("previous_as_of"),
                        float(j["created_at"]),
                        d,
                    )
                )
        return out

    def last_complete(self) -> Cycle | None:
        done = [c for c in self.cycles() if c.complete]
        return done[-1] if done else None

    def records(self) -> list[dict[str, Any]]:
        return [_read_json(c.dir / "record.json") for c in self.cycles() if c.complete]

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Holds ``<workdir>/pipeline.lock`` (an OS lock: released when the process dies, even by SIGKILL)."""
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / "pipeline.lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise PipelineError(
                    f"{path}: another cycle of this pipeline is running ({holder}); "
                    "cycles never overlap: wait for it to finish"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {_iso(time.time())}\n")
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()
                fcntl.flock(f, fcntl.LOCK_UN)

    def source_newest_ts(self) -> int:
        import pyarrow.parquet as pq

        from dv365.core.timeline import EVENT_KINDS, TimelineDataset

        src = TimelineDataset(self.cfg.source)
        limit = future_limit()
        newest, future = None, 0
        for kind in (*EVENT_KINDS, "requests"):
            for b in range(src.meta.num_buckets):
                for path in src.part_files(kind, b):  # only the ts column is read
                    with src.fs.open(path, "rb") as f:
                        t = pq.read_table(f, columns=["ts"]).column("ts").to_numpy()
                    future += int((t > limit).sum())
                    t = t[t <= limit]  # a row from the future never moves the cut-off
                    if len(t):
                        newest = int(t.max()) if newest is None else max(newest, int(t.max()))
        if future:
            logger.warning(
                f"source {self.cfg.source}: {future} row(s) later than now + {FUTURE_TOLERANCE_S} s "
                f"({_iso(limit)}) are ignored for the cut-off and rejected at ingest"
            )
        if newest is None:
            raise PipelineError(f"source {self.cfg.source}: the dataset has no events up to {_iso(limit)}")
        return newest

    def next_cycle(self, as_of: int | None) -> Cycle | None:
        """The unfinished cycle to finish, or a new one for ``as_of``; ``None`` when there is no new data."""
        every = self.cycles()
        cycles = [x for x in every if not x.abandoned]
        if cycles and not cycles[-1].complete:
            c = cycles[-1]
            if as_of is not None and as_of != c.as_of:
                raise PipelineError(
                    f"cycle {c.tag} (as of {_iso(c.as_of)}) is unfinished: run again without --as-of "
                    f"(or with --as-of {c.as_of}) to finish it before starting another"
                )
            logger.info(f"dv365 pipeline: finishing unfinished cycle {c.tag} (as of {_iso(c.as_of)})")
            return c
        prev = cycles[-1] if cycles else None
        if as_of is None:
            as_of = self.source_newest_ts()
        elif as_of > future_limit():
            raise PipelineError(
                f"--as-of {as_of} ({_iso(as_of)}) is later than now + {FUTURE_TOLERANCE_S} s "
                f"({_iso(future_limit())}): a cut-off in the future would stop every later cycle; refused"
            )
        if prev is not None and as_of <= prev.as_of:
            logger.info(
                f"dv365 pipeline: nothing new: cycle {prev.tag} already covers the source up to "
                f"{_iso(prev.as_of)} (as of {_iso(as_of)} asked)"
            )
            return None
        n = every[-1].number + 1 if every else 1  # an abandoned cycle's number (and snapshot id) is never reused
        d = self.work / "cycles" / f"c{n:04d}"
        c = Cycle(n, int(as_of), prev.number if prev else None, prev.as_of if prev else None, time.time(), d)
        _write_json(
            d / "cycle.json",
            {
                "number": n,
                "as_of": c.as_of,
                "as_of_utc": _iso(c.as_of),
                "previous": c.previous,
                "previous_as_of": c.previous_as_of,
                "created_at": c.created_at,
                "config": self.cfg.path,
                "name": self.cfg.name,
                "source": self.cfg.source,
            },
        )
        return c

    def abort(self) -> dict[str, Any]:
        """Abandons the unfinished cycle (``dv365 pipeline abort``), under the lock, so that the next run starts
        a fresh one (with any ``--as-of``). What it made is removed: its rows in the pipeline's dataset (the
        unfinished or committed append; the whole dataset for a first cycle), its model and snapshot folders,
        a store version it half-published. Its cycle folder stays, marked by ``abandoned.json`` (what was
        removed); its number is not reused. A cycle that has published is not abandoned: run it to finish."""
        with self.lock():
            live = [x for x in self.cycles() if not x.abandoned]
            if not live or live[-1].complete:
                raise PipelineError(f"{self.work}: no unfinished cycle to abort")
            c = live[-1]
            if c.done("publish") is not None:
                raise PipelineError(
                    f"cycle {c.tag} has published {self.snapshot_id(c)}: it is not abandoned; "
                    "`dv365 pipeline run` finishes it"
                )
            removed = self._remove_ingest(c)
            for p in (self.model_dir(c), self.snapshot_dir(c)):
                if p.exists():
                    shutil.rmtree(p)
                    removed.append(str(p))
            removed += self._remove_store_version(c)
            info = {
                "cycle": c.number,
                "as_of": c.as_of,
                "abandoned_at": _iso(time.time()),
                "steps_done": [s for s in STEPS if c.marker(s).exists()],
                "removed": removed,
            }
            _write_json(c.dir / "abandoned.json", info)
            logger.info(f"dv365 pipeline: cycle {c.tag} abandoned; removed {removed or 'nothing'}")
            return info

    def _remove_ingest(self, c: Cycle) -> list[str]:
        """Takes the cycle's rows out of the pipeline's dataset (its run's parts, and its append record)."""
        from dv365.core.timeline import appended_runs, remove_run_parts

        run_id = f"pipeline_{c.tag}"
        data = Path(self.data_url)
        if not data.exists():
            return []
        if c.previous is None:  # a first cycle made the whole dataset (the next first cycle rebuilds it)
            shutil.rmtree(data)
            return [self.data_url]
        if not (data / "_dataset.json").exists():
            raise PipelineError(f"{data}: the pipeline's dataset has no _dataset.json; remove the workdir to rebuild")
        out: list[str] = []
        if run_id in appended_runs(self.data_url):
            self._uncommit_append(run_id)
            out.append(f"{self.data_url} append {run_id}")
        n = remove_run_parts(self.data_url, run_id)
        if n:
            out.append(f"{n} part file(s) of {run_id}")
        return out

    def _uncommit_append(self, run_id: str) -> None:
        """Rewrites ``_dataset.json`` without the parts of the committed append ``run_id`` (stats recomputed)."""
        from dv365.core.fsio import open_atomic
        from dv365.core.timeline import TimelineDataset

        meta = TimelineDataset(self.data_url).meta
        if meta.parts is None:
            raise PipelineError(f"{self.data_url}: an older dataset without a parts list: its append cannot be undone")
        meta.parts = [p for p in meta.parts if not Path(p).name.startswith(f"part-{run_id}-")]
        meta.extra["appends"] = [r for r in meta.extra.get("appends", []) if r != run_id]
        ds = TimelineDataset(self.data_url, _meta=meta)
        meta.stats.update(ds.stats_from_lengths(ds.compute_stats()))
        fs, root = url_to_fs(self.data_url)
        with open_atomic(fs, f"{root}/_dataset.json", "w") as f:
            f.write(meta.to_json())

    def _remove_store_version(self, c: Cycle) -> list[str]:
        if not self.cfg.store_url:
            return []
        from dv365.core.plugins import open_store

        sid = self.snapshot_id(c)
        store = open_store(self.cfg.store_url, keep=self.cfg.store_keep)
        try:
            have = {v.version: v for v in store.versions()}
            if sid in have and not have[sid].active:
                store.delete_version(sid)
                return [f"store version {sid}"]
        finally:
            store.close()
        return []

    def run_cycle(self, as_of: int | None = None) -> dict[str, Any] | None:
        """Runs (or finishes) one cycle under the lock; returns its run record (``None``: no new data)."""
        self.check_or_raise()
        with self.lock():
            c = self.next_cycle(as_of)
            if c is None:
                return None
            t0 = time.time()
            for i, step in enumerate(STEPS, 1):
                done = c.done(step)
                if done is not None:
                    logger.info(f"== {i}/{len(STEPS)} {step}: already done in an earlier run (skipped)")
                    continue
                logger.info(f"== {i}/{len(STEPS)} {step}")
                t = time.perf_counter()
                out = getattr(self, f"_step_{step}")(c)
                out["seconds"] = round(time.perf_counter() - t, 3)
                _write_json(c.marker(step), out)
                logger.info(f"   {step} done in {out['seconds']:.1f} s: {self._describe(step, out)}")
            record = self._record(c, time.time() - t0)
            _write_json(c.dir / "record.json", record)
            with open(self.work / "runs.jsonl", "a") as f:
                f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
            return record

    # -- steps ---------------------------------------------------------------------------------------
    def _step_ingest(self, c: Cycle) -> dict[str, Any]:
        import pyarrow.compute as pc

        from dv365.core.timeline import (
            EVENT_KINDS,
            DatasetWriter,
            TimelineDataset,
            appended_runs,
            remove_dataset,
            remove_run_parts,
        )

        src = TimelineDataset(self.cfg.source)
        lo = c.previous_as_of
        run_id = f"pipeline_{c.tag}"
        first = lo is None
        complete = (Path(self.data_url) / "_dataset.json").exists()
        if complete:  # finished by an earlier run that died before writing the step marker?
            meta = TimelineDataset(self.data_url).meta
            if (meta.extra.get("created_by_run") == run_id) or (not first and run_id in appended_runs(self.data_url)):
                return self._ingest_figures(c, run_id, already=True)
        if first:
            if complete:
                remove_dataset(self.data_url)  # not this cycle's: the pipeline's data is rebuilt from the source
            writer = DatasetWriter(
                self.data_url,
                vocab=src.vocab,
                num_buckets=src.meta.num_buckets,
                source=f"pipeline {self.cfg.name} <- {src.meta.source or self.cfg.source}",
                simulated=src.meta.simulated,
                run_id=run_id,
                mode="create",
                extra={"pipeline": self.cfg.name, "source_url": self.cfg.source, "created_by_run": run_id},
            )
        else:
            removed = remove_run_parts(self.data_url, run_id)
            if removed:
                logger.info(f"   removed {removed} part file(s) of an unfinished append ({run_id})")
            writer = DatasetWriter(self.data_url, mode="append", run_id=run_id)
        rows = {k: 0 for k in (*EVENT_KINDS, "requests")}
        covered = dict(rows)  # source rows with ts <= as_of now: the next cycle finds late arrivals with it
        older = dict(rows)  # source rows with ts <= the previous cut-off now
        future = dict(rows)  # source rows later than now + tolerance: rejected, counted
        limit = future_limit()
        users: set[int] = set()
        with writer:
            for b in range(src.meta.num_buckets):
                parts: dict[str, Any] = {}
                for kind in rows:
                    t = src.read_bucket(kind, b)
                    ts = t.column("ts")
                    tsn = ts.to_numpy()
                    covered[kind] += int((tsn <= c.as_of).sum())
                    future[kind] += int((tsn > limit).sum())
                    if lo is not None:
                        older[kind] += int((tsn <= lo).sum())
                    keep = pc.less_equal(ts, c.as_of)
                    if lo is not None:
                        keep = pc.and_(keep, pc.greater(ts, lo))
                    t = t.filter(keep)
                    rows[kind] += t.num_rows
                    if kind in EVENT_KINDS and t.num_rows:
                        users.update(np.unique(t.column("user_id").to_numpy()).tolist())
                    parts[kind] = t
                writer.add(**parts)
                if b == 0:
                    writer.flush()
        late = self._late_rows(c, older) if lo is not None else {k: 0 for k in rows}
        if late and any(late.values()):
            logger.warning(
                f"   {sum(late.values())} late row(s) {late}: dated at or before the previous cut-off "
                f"{_iso(lo or 0)} but not in the source then; reported, not ingested (rebuild the pipeline's "
                "dataset in a new workdir to include them)"
            )
        if any(future.values()):
            logger.warning(
                f"   {sum(future.values())} source row(s) {future} later than now + {FUTURE_TOLERANCE_S} s: rejected"
            )
        figures = {
            "rows": rows,
            "active_users": len(users),
            "window": [lo, c.as_of],
            "run_id": run_id,
            "source_rows_covered": covered,
            "late_rows": late,
            "rejected_future_rows": future,
        }
        return {**figures, **self._ingest_figures(c, run_id, already=False)}

    def _late_rows(self, c: Cycle, older: dict[str, int]) -> dict[str, int] | None:
        """Source rows at or before the previous cut-off that the previous cycle did not see (the source is an
        append-only log: now minus what it counted then). ``None`` when the previous cycle did not count."""
        prev = self._previous_done(c, "ingest") or {}
        seen = prev.get("source_rows_covered")
        if not isinstance(seen, dict):
            return None
        return {k: max(0, n - int(seen.get(k, 0))) for k, n in older.items()}

    def _ingest_figures(self, c: Cycle, run_id: str, already: bool) -> dict[str, Any]:
        from dv365.core.timeline import TimelineDataset

        st = TimelineDataset(self.data_url).meta.stats
        return {
            "dataset": self.data_url,
            "dataset_users": st.get("users"),
            "dataset_events": st.get("events"),
            "already_appended": already,
            "run_id": run_id,
        }

    def _step_train(self, c: Cycle) -> dict[str, Any]:
        from dv365.train.config import TrainConfig
        from dv365.train.trainer import Trainer

        prev_model = self._previous_done(c, "train")
        overrides = self._train_overrides(self.model_dir(c), prev_model["model_dir"] if prev_model else None)
        cfg = TrainConfig.load(self.cfg.train_config, overrides)
        trainer = Trainer(cfg, progress=self.progress)
        res = trainer.fit()
        ev = res.eval or {}
        return {
            "model_dir": str(self.model_dir(c)),
            "checkpoint": str(res.checkpoint),
            "steps": res.steps,
            "warm_started_from": cfg.checkpoint.warm_start,
            "resumed_from": res.resumed_from,
            "examples_per_s": round(res.examples_per_s, 1),
            "eval_examples": ev.get("examples"),
            "eval_mean_ne": ev.get("mean_ne"),
            "eval_ne": {k: v.get("ne") for k, v in (ev.get("tasks") or {}).items() if "ne" in v},
            "model_kind": cfg.model.kind,
        }

    def _step_export(self, c: Cycle) -> dict[str, Any]:
        from dv365.export.job import ExportConfig, run_export

        model = c.done("train")
        assert model is not None
        prev = self._previous_done(c, "export")
        previous = prev["snapshot"] if prev and Path(prev["snapshot"], "manifest.json").exists() else None
        opts = dict(self.cfg.export)
        every = int(opts.pop("full_refresh_every", 4))
        if previous and every > 0 and (c.number - 1) % every == 0:
            logger.info(f"   cycle {c.number}: a full refresh (every {every} cycles: export.full_refresh_every)")
            opts["refresh"] = "all"
        cfg = ExportConfig(
            checkpoint=model["model_dir"],
            out=str(self.snapshot_dir(c)),
            data=self.data_url,
            as_of=c.as_of,
            snapshot_id=self.snapshot_id(c),
            previous=previous,
            progress=self.progress,
            carry_across_models=True,
            **opts,
        )
        res = run_export(cfg)
        if res.manifest is None:
            raise PipelineError(f"export {cfg.out}: the snapshot is not complete after the export step")
        m = res.manifest
        return {
            "snapshot": str(self.snapshot_dir(c)),
            "snapshot_id": m.snapshot_id,
            "users": m.user_count,
            "previous": previous,
            "counts": res.counts,
            "users_encoded": res.users_encoded,
            "users_per_s": round(res.users_per_s, 1),
            "bytes_per_user": m.row_format.user_bytes,
            "model_version": m.model_version,
        }

    def _step_publish(self, c: Cycle) -> dict[str, Any]:
        exp = c.done("export")
        assert exp is not None
        if not self.cfg.store_url:
            return {"store": None, "note": "no store.url in the config: nothing published"}
        from dv365.core.plugins import open_store

        store = open_store(self.cfg.store_url, keep=self.cfg.store_keep)
        try:
            have = {v.version: v for v in store.versions()}
            sid = exp["snapshot_id"]
            if sid in have and have[sid].state == "ready":
                info = have[sid] if have[sid].active else store.activate(sid)
                how = "already published"
            else:
                info = store.publish(exp["snapshot"])
                how = "published"
            pruned = store.prune()
            versions = [v.version for v in store.versions()]
        finally:
            store.close()
        return {
            "store": self.cfg.store_url,
            "version": info.version,
            "how": how,
            "users": info.user_count,
            "active": info.version,
            "versions": versions,
            "pruned": pruned,
        }

    def _step_retain(self, c: Cycle) -> dict[str, Any]:
        removed: list[str] = []
        numbers = [x.number for x in self.cycles() if x.number <= c.number and not x.abandoned]
        for keep, path_of in ((self.cfg.keep_models, self.model_dir), (self.cfg.keep_snapshots, self.snapshot_dir)):
            for n in numbers[:-keep]:
                p = path_of(n)
                if p.exists():
                    shutil.rmtree(p)
                    removed.append(str(p))
        return {"removed": removed, "kept_models": self.cfg.keep_models, "kept_snapshots": self.cfg.keep_snapshots}

    # -- helpers -------------------------------------------------------------------------------------
    def _train_overrides(self, model_dir: Path, warm_start: str | None) -> dict[str, Any]:
        """``train.set`` with the pipeline's own keys on top (data, checkpoint folder, steps, warm start)."""
        overrides: dict[str, Any] = dict(self.cfg.train_set)
        overrides.update(
            {
                "data.url": self.data_url,
                "checkpoint.dir": str(model_dir),
                "run.steps": self.cfg.train_steps,
                "checkpoint.warm_start": warm_start,
            }
        )
        return overrides

    def _previous_done(self, c: Cycle, step: str) -> dict[str, Any] | None:
        if c.previous is None:
            return None
        prev = next((x for x in self.cycles() if x.number == c.previous), None)
        return prev.done(step) if prev else None

    @staticmethod
    def _describe(step: str, out: dict[str, Any]) -> str:
        if step == "ingest":
            r = out.get("rows", {})
            return (
                f"{sum(r.values()) if r else 0:,} new rows ({r}) from {out.get('active_users', 0):,} users; "
                f"dataset now {out.get('dataset_users')} users, {out.get('dataset_events')} events"
            )
        if step == "train":
            return (
                f"{out['steps']} steps (warm start: {out['warm_started_from'] or 'none'}); "
                f"eval mean NE {out['eval_mean_ne']}"
            )
        if step == "export":
            return (
                f"snapshot {out['snapshot_id']}: {out['users']:,} users ({out['counts']}), "
                f"{out['bytes_per_user']} B/user"
            )
        if step == "publish":
            return f"{out.get('how', 'skipped')} {out.get('version')} to {out.get('store')}; versions {out.get('versions')}"
        return f"removed {len(out['removed'])} old folder(s)"

    def _record(self, c: Cycle, seconds: float) -> dict[str, Any]:
        steps = {s: c.done(s) for s in STEPS}
        exp, pub, tr = steps["export"] or {}, steps["publish"] or {}, steps["train"] or {}
        return {
            "format": RECORD_FORMAT,
            "pipeline": self.cfg.name,
            "config": self.cfg.path,
            "cycle": c.number,
            "as_of": c.as_of,
            "as_of_utc": _iso(c.as_of),
            "previous_cycle": c.previous,
            "finished_at": _iso(time.time()),
            "seconds_this_run": round(seconds, 3),
            "inputs": {
                "source": self.cfg.source,
                "train_config": self.cfg.train_config,
                "warm_start": tr.get("warm_started_from"),
                "previous_snapshot": exp.get("previous"),
            },
            "model": tr.get("model_dir"),
            "snapshot_id": exp.get("snapshot_id"),
            "snapshot": exp.get("snapshot"),
            "store": pub.get("store"),
            "published_version": pub.get("version"),
            "figures": {
                "new_rows": (steps["ingest"] or {}).get("rows"),
                "late_rows": (steps["ingest"] or {}).get("late_rows"),
                "rejected_future_rows": (steps["ingest"] or {}).get("rejected_future_rows"),
                "eval_mean_ne": tr.get("eval_mean_ne"),
                "eval_ne": tr.get("eval_ne"),
                "users": exp.get("users"),
                "export_counts": exp.get("counts"),
                "bytes_per_user": exp.get("bytes_per_user"),
            },
            "durations_s": {s: (steps[s] or {}).get("seconds") for s in STEPS},
        }


def status(cfg: PipelineConfig) -> dict[str, Any]:
    """What ``dv365 status`` shows: the store's versions (age, users) and the pipeline's last cycles."""
    p = Pipeline(cfg, progress=False)
    out: dict[str, Any] = {"pipeline": cfg.name, "workdir": cfg.workdir, "store": cfg.store_url}
    cycles = p.cycles()
    out["cycles"] = [
        {
            "cycle": c.number,
            "as_of_utc": _iso(c.as_of),
            "complete": c.complete,
            "abandoned": c.abandoned,
            "steps_done": [s for s in STEPS if c.marker(s).exists()],
        }
        for c in cycles
    ]
    records = p.records()
    out["last_cycle"] = records[-1] if records else None
    if cfg.store_url:
        from dv365.core.plugins import open_store

        try:
            # an embedded store is opened read-only: a mistyped path is reported, never created
            embedded = cfg.store_url.startswith("lmdb://") or "://" not in cfg.store_url
            store = open_store(cfg.store_url, **({"mode": "ro"} if embedded else {}))
        except Dv365Error as e:
            out["versions"] = f"store not readable: {e}"
        else:
            now = time.time()
            try:
                out["versions"] = [
                    {
                        **{k: v for k, v in asdict(x).items() if k != "row_format"},
                        "age_h": round((now - x.data_cutoff_ts) / 3600, 1),
                        "published_utc": _iso(x.published_at),
                    }
                    for x in store.versions()
                ]
            except Dv365Error as e:
                out["versions"] = f"store not readable: {e}"
            finally:
                store.close()
    return out
