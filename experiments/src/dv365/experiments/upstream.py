"""``dv365 eval upstream``: the paper's Table 2 on our data -- every Table-1 user tower vs the baseline.

For one dataset it trains the backbone without DV365 timelines (``baseline``) and with each user tower
variant (``pass_thru``, ``lce``, ``mlp_d``, ``mlp_t``, ``tl_d``, ``tl_t``, ``fsa``) on the same examples,
for several seeds, and reports the NE delta % per task of every variant against the baseline of the same
seed (MSE delta % for regression tasks), mean +- std over seeds, like Table 2.

Protocol (:class:`UpstreamSettings`), everything split by request time:

* the latest ``data.eval_fraction`` of requests is the **test** split: it is evaluated once per model,
  at the end, and never used for a choice;
* the latest ``val_fraction`` of the remaining requests is the **validation** split: models are evaluated
  on it every ``val_every`` steps and the best step is kept (early stopping). ``select_by`` names the
  criterion: ``all_tasks`` (default) is the mean normalised loss over every task -- NE for a binary task,
  MSE / Var(label) for the watch-time regression -- so a step is not chosen for binary gains bought with a
  worse regression head; ``binary_ne`` is the mean NE of the binary tasks alone;
* the rest is the **training** split.

Two ways to train a tower (``protocol``):

* ``joint``: tower + backbone trained together on the training split (the paper's upstream model);
* ``frozen``: the paper's deployment setting as a regulariser. An upstream model (tower + backbone) is
  trained on the first ``upstream_fraction`` of the training split; its tower is then frozen, its
  output computed once per request, and a fresh backbone is trained on the whole training split with the
  frozen tokens as an input (the baseline gets the same fresh-backbone training without tokens). Later
  training requests see a tower that was not fitted on them, so tokens that only memorise users (like a
  user id) do not help the backbone there.

Speed: every request is sliced once (:class:`SlicedExamples`); batches are gathered from that cache, so
the 8 models x seeds share one slicing pass. Datasets are created under ``--data-dir`` on first use and
reused when valid (:func:`prepare_dataset`).

Reports: ``<out>/upstream-<dataset>[-quick].md`` + ``.png`` (+ ``.json`` with every number), and one JSON
summary line printed last. On MovieLens the numbers are also given for the test requests whose user has
a non-empty history after the 24 h gap (returning users); on the synthetic data every request has one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dv365.core.config import load_dataclass, resolve_config, shipped_file
from dv365.core.errors import DatasetError, Dv365Error
from dv365.core.slicing import SliceSpec
from dv365.core.timeline import Timelines, take_rows
from dv365.experiments.datasets import KINDS, DataChoice, data_banner, resolve_dataset
from dv365.train.backbone import MultiTaskDLRM
from dv365.train.config import TrainConfig, apply_overrides
from dv365.train.data import NUM_DENSE, Batch, ExampleSource, dense_features, head_bias_from_labels, item_kjt, load_spec
from dv365.train.errors import TrainConfigError
from dv365.train.fsa import canonical_kind
from dv365.train.losses import MultiTaskLoss, TaskSpec
from dv365.train.metrics import (
    GroupSums,
    MultiTaskMeter,
    beyond_noise,
    bootstrap_delta_pct,
    mean_ne,
    mean_normalized_loss,
    seed_stats,
    users_95,
)
from dv365.train.model import BASELINE, build_model
from dv365.train.trainer import build_optimizers, optimizer_step, seed_everything

logger = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("pass_thru", "lce", "mlp_d", "mlp_t", "tl_d", "tl_t", "fsa")
# Table-1 spellings for the report
LABELS = {
    "baseline": "baseline",
    "pass_thru": "pass_thru",
    "lce": "LCE",
    "mlp_d": "MLP_d",
    "mlp_t": "MLP_t",
    "tl_d": "T-L_d",
    "tl_t": "T-L_t",
    "fsa": "FSA",
}
DIM_TOKEN_PAIRS = (("mlp_d", "mlp_t"), ("tl_d", "tl_t"))
DATASETS = ("synth", "movielens")


class EvalError(Dv365Error, ValueError):
    """A bad ``dv365 eval`` setting (names the setting and the value)."""


# ------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthData:
    """The generated long-history dataset of the experiment (``dv365 synth`` parameters)."""

    users: int = 200
    mean_events: int = 2000
    max_events: int = 8000
    days: int = 400
    requests_per_user: int = 100
    seed: int = 0


@dataclass(frozen=True)
class UpstreamSettings:
    """One ``eval upstream`` configuration (shipped: ``dv365/experiments/configs/upstream/*.yaml``).

    Args:
        train: a :class:`~dv365.train.config.TrainConfig` mapping shared by every model (``model.kind`` and
            ``run.seed`` are set per run; ``data.url`` by the dataset preparation).
        variants: tower kinds compared with the baseline.
        seeds: default number of seeds (``--seeds`` overrides).
        val_fraction: latest fraction of the non-test requests used for validation / early stopping.
        val_every: steps between validation evaluations.
        protocol: ``joint`` or ``frozen`` (module docstring).
        upstream_fraction: ``frozen``: the first fraction of the training split the upstream model sees.
        backbone_steps: ``frozen``: steps of the downstream backbone (0: ``train.run.steps``).
        select_by: early-stopping criterion on the validation split: ``all_tasks`` (mean of NE and
            MSE / Var(label) over every task) or ``binary_ne`` (mean NE of the binary tasks).
        synth: generator sizes (synth dataset only).
        slice_cache_mb: the largest slice cache built up front (MB; beyond it batches are sliced as they are
            read, with the same results; <= 0: always cache).
    """

    train: Mapping[str, Any]
    variants: tuple[str, ...] = VARIANTS
    seeds: int = 3
    val_fraction: float = 0.15
    val_every: int = 50
    protocol: str = "joint"
    upstream_fraction: float = 0.5
    backbone_steps: int = 0
    select_by: str = "all_tasks"
    synth: SynthData = SynthData()
    slice_cache_mb: float = 2048

    @classmethod
    def load(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> UpstreamSettings:
        out: UpstreamSettings = load_dataclass(
            cls, resolve_config(path, __package__, "configs/upstream", EvalError), overrides, EvalError, "eval config"
        )
        out = replace(out, variants=tuple(canonical_kind(v) for v in out.variants))
        out.validate()
        return out

    def validate(self) -> None:
        if (self.train.get("data") or {}).get("url"):
            raise EvalError(
                "train.data.url: the data set comes from --dataset (synth, movielens or a dataset folder); "
                "remove train.data.url from the config / --set"
            )
        if self.protocol not in ("joint", "frozen"):
            raise EvalError(f"protocol = {self.protocol!r}: use joint or frozen")
        if self.select_by not in SELECT_BY:
            raise EvalError(f"select_by = {self.select_by!r}: use one of {sorted(SELECT_BY)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise EvalError(f"val_fraction = {self.val_fraction}: must be in (0, 1)")
        if not 0.0 < self.upstream_fraction <= 1.0:
            raise EvalError(f"upstream_fraction = {self.upstream_fraction}: must be in (0, 1]")
        if self.val_every < 1 or self.seeds < 1:
            raise EvalError("val_every and seeds must be >= 1")
        TrainConfig.from_dict(apply_overrides(self.train, {"data.url": "x"}))  # the shared config is valid


def default_config(kind: str, quick: bool) -> Path:
    """The shipped ``configs/upstream/<kind>[-quick].yaml`` for a dataset family (:data:`~.datasets.KINDS`)."""
    if kind not in KINDS:
        raise EvalError(
            f"no shipped eval upstream config fits this dataset (its source is not one of {list(KINDS)}): "
            "pass --config with the tasks (label columns) and slice spec that fit it"
        )
    path = shipped_file(__package__, "configs", "upstream", f"{kind}{'-quick' if quick else ''}.yaml")
    return path if path.exists() or not quick else default_config(kind, False)  # kuairand: one config


# ------------------------------------------------------------------------------------------------------
# Datasets: created under the data dir on first use, reused when valid
# ------------------------------------------------------------------------------------------------------
def _valid_dataset(path: Path) -> bool:
    from dv365.core.timeline import TimelineDataset

    if not (path / "_dataset.json").exists():
        return False
    try:
        ds = TimelineDataset(str(path))
        return ds.requests().num_rows > 0
    except Exception:  # noqa: BLE001 - a half-written or foreign folder is rebuilt
        return False


def prepare_dataset(dataset: str, settings: UpstreamSettings, data_dir: Path, progress: bool) -> Path:
    """The UniTi dataset of ``dataset``: a dataset folder as it is, or a built-in one under ``data_dir``
    (generated / imported when missing or invalid)."""
    import shutil

    if dataset not in DATASETS:
        choice = resolve_dataset(dataset, EvalError)
        if not _valid_dataset(Path(str(choice.url))):
            raise EvalError(f"--dataset {dataset}: the dataset has no requests (training examples)")
        return Path(str(choice.url))
    data_dir.mkdir(parents=True, exist_ok=True)
    if dataset == "synth":
        s = settings.synth
        path = data_dir / f"synth-u{s.users}-e{s.mean_events}-r{s.requests_per_user}-d{s.days}-s{s.seed}"
        if _valid_dataset(path):
            return path
        from dv365.core.synth import SynthConfig, write_synth_dataset

        cfg = SynthConfig(
            users=s.users,
            mean_events=s.mean_events,
            max_events=s.max_events,
            days=s.days,
            requests_per_user=s.requests_per_user,
            seed=s.seed,
            min_events=min(SynthConfig.min_events, s.mean_events),
        )
        shutil.rmtree(path, ignore_errors=True)
        logger.info(
            f"generating SIMULATED data: {s.users} users x ~{s.mean_events} events, {s.requests_per_user} requests "
            f"each -> {path}"
        )
        write_synth_dataset(cfg, str(path), progress=progress)
        return path
    if dataset == "movielens":
        from dv365.core.catalog import default_data_dir
        from dv365.core.importers.movielens import import_movielens

        path = data_dir / "movielens-latest-small"
        if _valid_dataset(path):
            return path
        src = default_data_dir() / "movielens-latest-small"
        if not src.exists():
            raise DatasetError(f"{src}: MovieLens ml-latest-small not found (set DV365_DATA_DIR)")
        shutil.rmtree(path, ignore_errors=True)
        logger.info(f"importing MovieLens {src} -> {path}")
        import_movielens(src, str(path))
        return path
    raise EvalError(f"--dataset {dataset!r}: use one of {list(DATASETS)}")


# ------------------------------------------------------------------------------------------------------
# Examples sliced once
# ------------------------------------------------------------------------------------------------------
def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each (s, c), vectorised."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    return np.repeat(np.asarray(starts, np.int64) - (ends - counts), counts) + np.arange(total, dtype=np.int64)


class SlicedExamples(ExampleSource):
    """An :class:`~dv365.train.data.ExampleSource` whose requests are sliced once, up front.

    The bags are stored once per *distinct* slice (requests of a user with the same kept events in every
    window share them: :func:`~dv365.train.dedup.slice_keys`), slot-major (``int32`` ids, ``float32`` weights);
    a batch is gathered from them into the same weighted KJT the slicer would give (tested against
    :meth:`ExampleSource.collate`). ``with_user_features = False`` (the baseline) skips the user KJT.

    Args:
        cfg, tasks, spec, item_hash_size: as :class:`~dv365.train.data.ExampleSource` (``spec`` required).
        chunk: requests sliced per slicer call.
        progress: a tqdm bar over the slicing pass.
        cache_mb: the largest slice cache to build (MB, estimated from a sample of slices; <= 0: no limit).
            Beyond it (long histories x many requests: a run over 300 users x 10K events x 200 requests that
            cached them peaked at 18 GB) the timelines are kept and each batch is sliced when it is read, to
            the same canonical bags, so the results are the same and memory stays at the timelines' size.

    Example::

        ex = SlicedExamples(cfg.data, cfg.tasks, load_spec(cfg.data), 100_003)
        ex.history_events[:5]                # gapped history events (all bags' raw counts) per request
        batch = ex.collate(ex.train_rows[:256])
    """

    def __init__(
        self,
        cfg: Any,
        tasks: Sequence[TaskSpec],
        spec: SliceSpec,
        item_hash_size: int,
        chunk: int = 512,
        progress: bool = False,
        cache_mb: float = 2048,
    ) -> None:
        # canonical bags: the numba slicer's cache is bit-identical to the numpy reference's (same results)
        super().__init__(cfg, tasks, spec, item_hash_size, canonical=True)
        from tqdm.auto import tqdm

        assert self.features is not None and self.timelines is not None  # spec is required
        from dv365.train.dedup import dedup_rows, slice_keys

        self.keys = list(spec.feature_names)
        R, N = len(self.requests), len(self.keys)
        req = self.requests
        tl = self.timelines
        # requests whose slices are identical (same user, same kept events in every window: RecD's key) share
        # one stored copy of their bags: memory grows with distinct slices, not with requests
        all_urow = np.searchsorted(self._users, req.user_id)
        first, self.slot = dedup_rows(slice_keys(tl, all_urow, req.ts, spec)) if R else (np.zeros(0, np.int64),) * 2
        S = len(first)
        self.distinct_slices = S
        self._first, self._all_urow = first, all_urow

        def slice_slots(slots: np.ndarray) -> Any:
            rows = first[slots]
            urow = all_urow[rows]
            return self.features.slice(  # type: ignore[union-attr]
                Timelines(tl.user_ids[urow], take_rows(tl.explicit, urow), take_rows(tl.implicit, urow), tl.vocab),
                req.ts[rows],
            )

        # the cache's size, estimated from a spread sample of slices: over cache_mb, slices are made per batch
        sample = np.unique(np.linspace(0, S - 1, min(S, 32)).astype(np.int64)) if S else np.zeros(0, np.int64)
        per_slot = len(slice_slots(sample).values) / max(len(sample), 1) if len(sample) else 0.0
        self.cache_mb_estimate = per_slot * S * 8 / 2**20  # int32 id + float32 weight per value
        self.cached = cache_mb <= 0 or self.cache_mb_estimate <= cache_mb
        self.lengths = np.zeros((S if self.cached else 0, N), np.int32)
        slot_events = np.zeros(S, np.int64)
        vals: list[np.ndarray] = []
        wts: list[np.ndarray] = []
        desc = "slice (once)" if self.cached else "count histories"
        for s in tqdm(range(0, S, chunk), desc=desc, unit="chunk", disable=not progress, leave=False):
            slots = np.arange(s, min(s + chunk, S), dtype=np.int64)
            sb = slice_slots(slots)
            B = len(slots)
            slot_events[slots] = sb.raw_counts.reshape(N, B).sum(axis=0)
            if not self.cached:
                continue
            L = sb.lengths.reshape(N, B).astype(np.int64)  # key-major
            starts = (np.cumsum(L.ravel()) - L.ravel()).reshape(N, B)
            idx = _ranges(starts.T.ravel(), L.T.ravel())  # slot-major order
            vals.append(sb.values[idx].astype(np.int32))
            wts.append(sb.weights[idx].astype(np.float32))
            self.lengths[slots] = L.T
        self.history_events = slot_events[self.slot]  # raw (pre-dedup) count over all bags: 0 = empty history
        self.values = np.concatenate(vals) if vals else np.zeros(0, np.int32)
        self.weights = np.concatenate(wts) if wts else np.zeros(0, np.float32)
        per_slot_len = self.lengths.sum(axis=1, dtype=np.int64)
        self.slot_start = np.cumsum(per_slot_len) - per_slot_len  # [S]
        self.within = np.cumsum(self.lengths, axis=1, dtype=np.int64) - self.lengths  # [S, N]
        self.with_user_features = True
        if self.cached:
            self.timelines = None  # the cache replaces them

    def user_kjt(self, rows: np.ndarray) -> Any:
        """The user KJT of requests ``rows``."""
        return self.slots_kjt(self.slot[np.asarray(rows, np.int64)])

    def slots_kjt(self, slots: np.ndarray) -> Any:
        """The user KJT of distinct slices ``slots`` (from the cache, or sliced now when it was not built)."""
        from torchrec import KeyedJaggedTensor

        slots = np.asarray(slots, np.int64)
        if not self.cached:  # the same canonical bags the cache would hold, made for this batch
            chunk_rows = 128  # the slicer's working memory follows 128 rows, not an evaluation batch of 1,024
            tl = self.timelines
            assert tl is not None and self.features is not None
            rows = self._first[slots]
            urow = self._all_urow[rows]
            batch = Timelines(tl.user_ids[urow], take_rows(tl.explicit, urow), take_rows(tl.implicit, urow), tl.vocab)
            return self.features.kjt(batch, self.requests.ts[rows], chunk=chunk_rows)

        L = self.lengths[slots].T.astype(np.int64)  # [N, B] key-major
        starts = self.slot_start[slots][None, :] + self.within[slots].T  # [N, B]
        idx = _ranges(starts.ravel(), L.ravel())
        lpk = L.sum(axis=1)
        return KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(self.values[idx].astype(np.int64)),
            weights=torch.from_numpy(self.weights[idx]),
            lengths=torch.from_numpy(L.ravel().astype(np.int32)),
            stride=len(slots),
            length_per_key=[int(x) for x in lpk],
            offset_per_key=[0, *np.cumsum(lpk).tolist()],
        )

    def collate(self, rows: np.ndarray) -> Batch:
        rows = np.asarray(rows, np.int64)
        req = self.requests
        return Batch(
            self.user_kjt(rows) if self.with_user_features else None,
            item_kjt(req, rows, self.item_hash_size, self.history_rows),
            torch.from_numpy(dense_features(req.ts[rows], req.video_duration[rows])),
            torch.from_numpy(np.ascontiguousarray(req.labels[rows])),
        )


class _Rows:
    """A view of the shared examples with its own training rows (``TrainBatches`` reads ``train_rows``)."""

    def __init__(self, ex: SlicedExamples, train_rows: np.ndarray, user_features: bool) -> None:
        self.ex, self.train_rows, self.user_features = ex, train_rows, user_features

    def collate(self, rows: np.ndarray) -> Batch:
        self.ex.with_user_features = self.user_features
        b = self.ex.collate(rows)
        b.rows = torch.from_numpy(np.asarray(rows, np.int64))  # type: ignore[attr-defined] # frozen-token lookup
        return b


def _to(b: Batch, device: torch.device) -> Batch:
    """``b.to(device)``, keeping the request rows."""
    out = b.to(device)
    out.rows = getattr(b, "rows", None)  # type: ignore[attr-defined]
    return out


@dataclass(frozen=True)
class Splits:
    """Row indices (time-sorted requests) of the three splits, and the test subset with a gapped history."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_returning: np.ndarray  # test rows whose user has >= 1 event before request - gap

    @classmethod
    def of(cls, ex: SlicedExamples, val_fraction: float) -> Splits:
        pool = ex.train_rows  # time-sorted, everything before the test split
        n_val = max(1, int(math.ceil(val_fraction * len(pool))))
        test = ex.eval_rows
        return cls(pool[:-n_val], pool[-n_val:], test, test[ex.history_events[test] > 0])


# ------------------------------------------------------------------------------------------------------
# Training one model (early stopping on the validation split)
# ------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One trained model: test metrics (all requests / returning users), the chosen step, timing."""

    kind: str
    seed: int
    best_step: int
    best_val: float
    test: dict[str, dict[str, Any]]
    test_returning: dict[str, dict[str, Any]]
    seconds: float
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    val: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-task metrics of the kept step on validation
    test_users: GroupSums | None = None  # per-user sums of the test evaluation (the bootstrap over users)
    test_returning_users: GroupSums | None = None


def _evaluate(
    forward: Callable[[Batch], torch.Tensor], batches: Iterator[Batch], tasks: Sequence[TaskSpec]
) -> dict[str, dict[str, Any]]:
    return _evaluate_by_user(forward, batches, tasks, None)[0]


def _evaluate_by_user(
    forward: Callable[[Batch], torch.Tensor],
    batches: Iterator[Batch],
    tasks: Sequence[TaskSpec],
    users: np.ndarray | None,
) -> tuple[dict[str, dict[str, Any]], GroupSums | None]:
    """Per-task metrics and, with ``users`` (the user id of every example row), their per-user sums."""
    meter = MultiTaskMeter(tasks)
    with torch.no_grad():
        for b in batches:
            rows = getattr(b, "rows", None)
            groups = users[rows.cpu().numpy()] if users is not None and rows is not None else None
            meter.update(forward(b), b.labels, groups)
    return meter.compute(), meter.group_sums()


# early-stopping criteria (lower is better): UpstreamSettings.select_by
SELECT_BY: dict[str, Callable[[Mapping[str, Mapping[str, Any]]], float]] = {
    "all_tasks": mean_normalized_loss,
    "binary_ne": mean_ne,
}
CRITERION_TEXT = {
    "all_tasks": "mean normalised loss over every task (NE; MSE / Var(label) for regression)",
    "binary_ne": "mean NE of the binary tasks",
}


def _batches(view: Any, rows: np.ndarray, bs: int, device: torch.device) -> Iterator[Batch]:
    for s in range(0, len(rows), bs):
        yield _to(view.collate(rows[s : s + bs]), device)


class _EpochBatches:
    """``batches[step]``: the training rows in a fresh permutation per epoch (``SeedSequence([seed, epoch])``,
    the trainer's order), the last partial batch dropped."""

    def __init__(self, view: Any, batch_size: int, seed: int) -> None:
        n = len(view.train_rows)
        if n < batch_size:
            raise TrainConfigError(f"run.batch_size = {batch_size} but the training split has only {n} requests")
        self.view, self.batch_size, self.seed, self.per_epoch = view, batch_size, seed, n // batch_size
        self._perm: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def __getitem__(self, step: int) -> Batch:
        epoch, b = divmod(step, self.per_epoch)
        if self._perm[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            self._perm = (epoch, rng.permutation(len(self.view.train_rows)))
        idx = self._perm[1][b * self.batch_size : (b + 1) * self.batch_size]
        return self.view.collate(self.view.train_rows[idx])


class _Fit:
    """Trains ``model`` on ``view.train_rows`` with the optimizers / loss of ``cfg``; keeps the best
    validation state (lowest ``select_by`` criterion, see :data:`SELECT_BY`) in memory."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        forward: Callable[[Batch], torch.Tensor],
        view: Any,
        tasks: Sequence[TaskSpec],
        device: torch.device,
        select_by: str = "all_tasks",
    ) -> None:
        self.cfg, self.model, self.forward, self.view, self.tasks, self.device = (
            cfg,
            model,
            forward,
            view,
            tasks,
            device,
        )
        self.criterion = SELECT_BY[select_by]
        self.loss_fn = MultiTaskLoss(tasks).to(device)
        self.optimizers = build_optimizers(model, cfg.optim)

    def run(
        self, steps: int, val_rows: np.ndarray, val_every: int, progress: bool, desc: str
    ) -> tuple[int, float, list[tuple[int, float]]]:
        from tqdm.auto import tqdm

        batches = _EpochBatches(self.view, self.cfg.run.batch_size, self.cfg.run.seed)
        best = (0, self._val(val_rows), copy.deepcopy(self.model.state_dict()))
        curve = [(0, best[1])]
        self.model.train()
        for step in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
            b = _to(batches[step], self.device)
            loss, _ = self.loss_fn(self.forward(b), b.labels)
            optimizer_step(loss, self.optimizers, self.cfg.optim.grad_clip)
            if (step + 1) % val_every == 0 or step + 1 == steps:
                ne = self._val(val_rows)
                curve.append((step + 1, ne))
                if ne < best[1]:
                    best = (step + 1, ne, copy.deepcopy(self.model.state_dict()))
                self.model.train()
        self.model.load_state_dict(best[2])
        self.model.eval()
        return best[0], best[1], curve

    def _val(self, rows: np.ndarray) -> float:
        self.model.eval()
        return self.criterion(
            _evaluate(self.forward, _batches(self.view, rows, self.cfg.run.eval_batch_size, self.device), self.tasks)
        )


def _run_cfg(settings: UpstreamSettings, url: str, kind: str, seed: int, threads: int | None) -> TrainConfig:
    over: dict[str, Any] = {"data.url": url, "model.kind": kind, "run.seed": seed, "run.progress": False}
    if threads is not None:
        over["run.threads"] = threads
    return TrainConfig.from_dict(apply_overrides(settings.train, over))


class _TokenTable:
    """Frozen tower outputs of every distinct slice, ``[S, N_out, D]``, looked up by request row
    (:meth:`rows`) for the backbone."""

    def __init__(self, tower: torch.nn.Module, ex: SlicedExamples, bs: int, device: torch.device) -> None:
        tower.eval()
        S = ex.distinct_slices
        ex.with_user_features = True
        out = []
        with torch.no_grad():
            for s in range(0, S, bs):
                out.append(tower(ex.slots_kjt(np.arange(s, min(s + bs, S))).to(device)).cpu())
        self.tokens = torch.cat(out)  # [S, N_out, D]
        self.slot = torch.from_numpy(np.asarray(ex.slot, np.int64))  # [R]: request row -> slice
        self.shape = (int(self.tokens.shape[1]), int(self.tokens.shape[2]))

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.tokens[self.slot[rows]]


def train_one(
    settings: UpstreamSettings,
    ex: SlicedExamples,
    splits: Splits,
    spec: SliceSpec,
    url: str,
    kind: str,
    seed: int,
    device: torch.device,
    progress: bool,
    threads: int | None,
) -> RunResult:
    """Trains one model (``kind`` = ``baseline`` or a tower variant) and evaluates it on the test split."""
    t0 = time.perf_counter()
    cfg = _run_cfg(settings, url, kind, seed, threads)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    tasks = ex.tasks
    seed_everything(seed)
    bs_eval = cfg.run.eval_batch_size
    frozen = settings.protocol == "frozen"
    tokens: _TokenTable | None = None
    if kind != BASELINE and frozen:  # stage 1: the upstream model on the first part of the training split
        n_up = max(cfg.run.batch_size, int(len(splits.train) * settings.upstream_fraction))
        up_view = _Rows(ex, splits.train[:n_up], True)
        model = build_model(cfg.model, spec, tasks, NUM_DENSE, device)
        model.backbone.init_head_bias(_head_bias(ex, splits.train[:n_up], tasks))
        fit = _Fit(
            cfg, model, lambda b: model(b.user_kjt, b.item_kjt, b.dense), up_view, tasks, device, settings.select_by
        )
        fit.run(cfg.run.steps, splits.val, settings.val_every, progress, f"{kind} s{seed} upstream")
        assert model.user_tower is not None
        tokens = _TokenTable(model.user_tower, ex, bs_eval, device)
        seed_everything(seed + 10_000)
    if kind == BASELINE or frozen:  # the (downstream) backbone alone, fed frozen tokens if any
        view = _Rows(ex, splits.train, False)
        backbone = MultiTaskDLRM(cfg.model.backbone, NUM_DENSE, tasks, tokens.shape if tokens else None).to(device)
        backbone.init_head_bias(_head_bias(ex, splits.train, tasks))
        table = tokens

        def forward(b: Batch) -> torch.Tensor:
            tok = table.rows(b.rows).to(device) if table is not None else None  # type: ignore[attr-defined]
            return backbone(b.item_kjt, b.dense, tok)

        net: torch.nn.Module = backbone
        steps = (settings.backbone_steps or cfg.run.steps) if frozen else cfg.run.steps
    else:  # joint: tower + backbone together
        view = _Rows(ex, splits.train, True)
        model = build_model(cfg.model, spec, tasks, NUM_DENSE, device)
        model.backbone.init_head_bias(_head_bias(ex, splits.train, tasks))

        def forward(b: Batch) -> torch.Tensor:
            return model(b.user_kjt, b.item_kjt, b.dense)

        net = model
        steps = cfg.run.steps
    fit = _Fit(cfg, net, forward, view, tasks, device, settings.select_by)
    best_step, best_ne, curve = fit.run(steps, splits.val, settings.val_every, progress, f"{kind} s{seed}")
    val = _evaluate(forward, _batches(view, splits.val, bs_eval, device), tasks)
    users = ex.requests.user_id
    test, test_users = _evaluate_by_user(forward, _batches(view, splits.test, bs_eval, device), tasks, users)
    ret = splits.test_returning
    ret_users: GroupSums | None = None
    if len(ret) == len(splits.test):  # every test request has a history (synth): the same rows, same numbers
        test_ret, ret_users = copy.deepcopy(test), test_users
    elif len(ret):
        test_ret, ret_users = _evaluate_by_user(forward, _batches(view, ret, bs_eval, device), tasks, users)
    else:
        test_ret = {}
    seconds = time.perf_counter() - t0
    return RunResult(kind, seed, best_step, best_ne, test, test_ret, seconds, curve, val, test_users, ret_users)


def _head_bias(ex: SlicedExamples, rows: np.ndarray, tasks: Sequence[TaskSpec]) -> list[float]:
    return head_bias_from_labels(ex.requests.labels[rows], tasks)


# ------------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------------
def metric_of(metrics: Mapping[str, Any]) -> tuple[str, float]:
    """(``ne`` or ``mse``, value) of one task's metrics."""
    return ("ne", float(metrics["ne"])) if "ne" in metrics else ("mse", float(metrics["mse"]))


def deltas(results: Sequence[RunResult], subset: str) -> dict[str, dict[str, dict[str, Any]]]:
    """``{variant: {task: {mean, std, n, values, noise[, users]}}}``: NE (MSE) delta % vs the baseline of the
    same seed.

    ``noise`` is true when ``|mean| < 2 std / sqrt(n)`` (the paired seed-wise deltas do not separate from 0).
    ``users`` (where every run kept its per-user sums): the 95 % bootstrap interval of the seed-averaged delta
    when the test users are resampled (:func:`dv365.train.metrics.bootstrap_delta_pct`): every seed is scored
    on the same users, so the seed rule alone cannot see how much another draw of users would move it.
    """
    base_runs = {r.seed: r for r in results if r.kind == BASELINE}
    base = {s: getattr(r, subset) for s, r in base_runs.items()}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in dict.fromkeys(r.kind for r in results if r.kind != BASELINE):
        per_task: dict[str, list[float]] = {}
        paired: list[tuple[RunResult, RunResult]] = []
        for r in results:
            m = getattr(r, subset)
            if r.kind != kind or r.seed not in base or not m:
                continue
            paired.append((r, base_runs[r.seed]))
            for task, v in m.items():
                _, x = metric_of(v)
                _, b = metric_of(base[r.seed][task])
                if math.isfinite(x) and math.isfinite(b) and b > 0:
                    per_task.setdefault(task, []).append(100.0 * (x / b - 1.0))
        out[kind] = {}
        for task, vals in per_task.items():
            out[kind][task] = seed_stats(vals)
        sums = [(getattr(v, f"{subset}_users"), getattr(b, f"{subset}_users")) for v, b in paired]
        if sums and all(a is not None and b is not None for a, b in sums):
            intervals = bootstrap_delta_pct([a for a, _ in sums], [b for _, b in sums])["tasks"]  # type: ignore[misc]
            names = list(getattr(paired[0][0], subset))
            for task, iv in zip(names, intervals, strict=True):
                if task in out[kind]:
                    out[kind][task]["users"] = iv
    return out


def better(v: Mapping[str, Any]) -> bool:
    """A delta below 0 beyond noise: by the seed rule and, where computed, with its interval over users below 0."""
    return v.get("mean") is not None and v["mean"] < 0 and beyond_noise(v)


def checks(d: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The report's verdicts, each counting only what is beyond noise (:func:`dv365.train.metrics.seed_stats`).

    * ``beats_baseline[k]``: every task's seed-paired delta of variant ``k`` is negative and beyond noise;
    * ``token_vs_dim["<token><<dim>"]``: the seed-paired difference of the mean delta over tasks (token − dim)
      is negative and beyond noise (MLP_t vs MLP_d, T-L_t vs T-L_d, for the pairs that were run with the
      same seeds); ``mean_delta_pct`` gives the means for reading, not for the verdicts.
    """
    beat = {k: all(better(v) for v in tasks.values()) for k, tasks in d.items()}
    avg = {k: float(np.mean([v["mean"] for v in tasks.values()])) for k, tasks in d.items() if tasks}

    def per_seed(k: str) -> np.ndarray:  # mean delta over tasks of each seed (same seed order in every variant)
        return np.mean([v["values"] for v in d[k].values()], axis=0)

    paired = {
        f"{t}-{dd}": seed_stats(per_seed(t) - per_seed(dd))
        for dd, t in DIM_TOKEN_PAIRS
        if t in avg and dd in avg and len({len(v["values"]) for k in (t, dd) for v in d[k].values()}) == 1
    }
    pairs = {
        f"{t}<{dd}": bool(
            f"{t}-{dd}" in paired and paired[f"{t}-{dd}"]["mean"] < 0 and not paired[f"{t}-{dd}"]["noise"]
        )
        for dd, t in DIM_TOKEN_PAIRS
        if t in avg and dd in avg
    }
    return {
        "all_variants_beat_baseline": bool(beat) and all(beat.values()),
        "beats_baseline": beat,
        "token_wise_beats_dim_wise": bool(pairs) and all(pairs.values()),
        "token_vs_dim": pairs,
        "token_minus_dim_paired": paired,
        "mean_delta_pct": {k: round(v, 4) for k, v in avg.items()},
    }


@dataclass
class UpstreamReport:
    """Everything the report shows (also written as JSON beside it)."""

    dataset: str
    quick: bool
    simulated: bool
    settings: UpstreamSettings
    config_path: str
    command: str
    data_url: str
    facts: dict[str, Any]
    results: list[RunResult]
    seconds: float
    device: str
    data: DataChoice

    def summary(self) -> dict[str, Any]:
        all_d = deltas(self.results, "test")
        out: dict[str, Any] = {
            "experiment": "upstream",
            "dataset": self.dataset,
            "quick": self.quick,
            "simulated": self.simulated,
            "seeds": sorted({r.seed for r in self.results}),
            "protocol": self.settings.protocol,
            "delta_ne_pct": _summary_deltas(all_d),
            "checks": checks(all_d),
        }
        if self.facts.get("test_empty_history_share", 0) > 0:
            ret = deltas(self.results, "test_returning")
            out["delta_ne_pct_returning"] = _summary_deltas(ret)
            out["checks_returning"] = checks(ret)
        out["seconds"] = round(self.seconds, 1)
        return out


def _summary_deltas(d: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    return {
        k: {
            t: {"mean": v["mean"], "std": v["std"]} | ({"users_95": users_95(v)} if "users" in v else {})
            for t, v in tasks.items()
        }
        for k, tasks in d.items()
    }


def data_facts(ex: SlicedExamples, splits: Splits) -> dict[str, Any]:
    meta = ex.dataset.meta
    st = meta.stats or {}
    users = int(st.get("users", len(np.unique(ex.requests.user_id))))
    test_empty = float(np.mean(ex.history_events[splits.test] == 0)) if len(splits.test) else 0.0
    return {
        "users": users,
        "events": int(st.get("events", 0)),
        "mean_events_per_user": float(st.get("mean_events", 0.0)),
        "requests": len(ex.requests),
        "distinct_user_slices": int(ex.distinct_slices),  # what the slice cache stores (RecD's dedup)
        "slice_cache": f"{ex.cache_mb_estimate:,.0f} MB est., "
        + ("built" if ex.cached else "over the limit: sliced per batch"),
        "train": len(splits.train),
        "val": len(splits.val),
        "test": len(splits.test),
        "test_returning": len(splits.test_returning),
        "test_empty_history_share": round(test_empty, 4),
        "train_empty_history_share": round(float(np.mean(ex.history_events[splits.train] == 0)), 4),
        "features": len(ex.keys),
        "source": meta.source,
        "base_rates_test": {
            t.name: round(float(ex.requests.labels[splits.test, k].mean()), 5)
            for k, t in enumerate(ex.tasks)
            if t.kind == "binary"
        },
    }


_POOL: dict[str, Any] = {}  # what forked workers read (set by run_upstream before the pool starts)


def _hide_cuda_in_cpu_worker() -> None:
    """A forked CPU worker must never touch CUDA: on a CUDA build of torch with a GPU present, the optimizers'
    graph-capture check calls into CUDA, which fails ("initialization error") in a child forked after the
    parent initialised the driver. With the NVML-based availability check and no visible device, CUDA reads
    as unavailable in the worker without initialising anything (measured on an H100 host)."""
    import os

    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _train_one_in_worker(job: tuple[str, int]) -> RunResult:
    kind, seed = job
    p = _POOL
    return train_one(
        p["settings"], p["ex"], p["splits"], p["spec"], p["url"], kind, seed, p["dev"], False, p["threads"]
    )


def _log_run(r: RunResult) -> None:
    logger.info(
        f"  seed {r.seed} {LABELS.get(r.kind, r.kind):9s} best step {r.best_step:4d} val {r.best_val:.4f} "
        f"test mean NE {mean_ne(r.test):.4f} ({r.seconds:.0f} s)"
    )


def run_upstream(
    dataset: str,
    *,
    quick: bool = False,
    seeds: int | None = None,
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    variants: Sequence[str] | None = None,
    data_dir: str | Path = "out/eval/data",
    device: str = "cpu",
    threads: int | None = 1,
    progress: bool = True,
    command: str = "",
    jobs: int = 1,
) -> UpstreamReport:
    """Runs the experiment (datasets prepared, every model trained) and returns the report's content.

    ``jobs > 1`` (CPU only) trains that many models at a time in forked worker processes that share the
    sliced examples; every model seeds itself, so the results are the same as with ``jobs = 1``."""
    import warnings

    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    from dv365.train.trainer import resolve_device

    t0 = time.perf_counter()
    choice = resolve_dataset(dataset, EvalError)
    cfg_path = config or default_config(choice.kind, quick)
    settings = UpstreamSettings.load(cfg_path, overrides)
    if variants:
        settings = replace(settings, variants=tuple(canonical_kind(v) for v in variants))
    n_seeds = seeds if seeds is not None else settings.seeds
    if n_seeds < 1:
        raise EvalError(f"--seeds {n_seeds}: must be >= 1")
    dev = resolve_device(device)
    url = str(prepare_dataset(dataset, settings, Path(data_dir), progress))
    cfg = _run_cfg(settings, url, settings.variants[0] if settings.variants else "fsa", 0, threads)
    if threads:
        torch.set_num_threads(threads)
    spec = load_spec(cfg.data)
    ts = time.perf_counter()
    ex = SlicedExamples(
        cfg.data,
        cfg.tasks,
        spec,
        cfg.model.backbone.item_hash_size,
        progress=progress,
        cache_mb=settings.slice_cache_mb,
    )
    splits = Splits.of(ex, settings.val_fraction)
    facts = data_facts(ex, splits)
    facts["slice_seconds"] = round(time.perf_counter() - ts, 1)
    logger.info(
        f"data: {facts['users']:,} users, {facts['requests']:,} requests (train {facts['train']:,} / val "
        f"{facts['val']:,} / test {facts['test']:,}), {facts['mean_events_per_user']:,.0f} events/user; "
        f"test requests with empty gapped history: {100 * facts['test_empty_history_share']:.1f}%"
        + (" [SIMULATED]" if ex.simulated else "")
    )
    results: list[RunResult] = []
    todo = [(kind, seed) for seed in range(n_seeds) for kind in (BASELINE, *settings.variants)]
    jobs = max(1, min(int(jobs), len(todo))) if dev.type == "cpu" else 1
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        logger.info(f"training {len(todo)} models, {jobs} at a time (forked CPU workers)")
        _POOL.update(settings=settings, ex=ex, splits=splits, spec=spec, url=url, dev=dev, threads=threads)
        try:
            with ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("fork"), initializer=_hide_cuda_in_cpu_worker
            ) as pool:  # the pool is CPU-only
                runs = pool.map(_train_one_in_worker, todo)
                for r in runs:  # in submission order
                    results.append(r)
                    _log_run(r)
        finally:
            _POOL.clear()
    else:
        for kind, seed in todo:
            r = train_one(settings, ex, splits, spec, url, kind, seed, dev, progress, threads)
            results.append(r)
            _log_run(r)
    return UpstreamReport(
        choice.name,
        quick,
        ex.simulated,
        settings,
        str(cfg_path),
        command,
        url,
        facts,
        results,
        time.perf_counter() - t0,
        str(dev),
        replace(choice, simulated=ex.simulated),
    )


# ------------------------------------------------------------------------------------------------------
# Report: Markdown + PNG + JSON, all generated from the results
# ------------------------------------------------------------------------------------------------------
def _fmt(v: Mapping[str, Any]) -> str:
    std = v.get("std")
    s = f"{v['mean']:+.2f}" + (f" ± {std:.2f}" if std is not None else "")
    u = v.get("users")
    if u is not None:
        s += f" [{u['low']:+.2f}, {u['high']:+.2f}]"
    if not beyond_noise(v):
        return f"{s} ~"
    return f"**{s}**" if v["mean"] < 0 else s


def _table(d: Mapping[str, Mapping[str, Mapping[str, Any]]], tasks: Sequence[TaskSpec], variants: Sequence[str]) -> str:
    head = "| task | " + " | ".join(LABELS.get(k, k) for k in variants) + " |"
    lines = [head, "|---|" + "---:|" * len(variants)]
    for t in tasks:
        name = t.name + (" (MSE)" if t.kind != "binary" else "")
        cells = [(_fmt(d[k][t.name]) if t.name in d.get(k, {}) else "n/a") for k in variants]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    avg = [f"{np.mean([v['mean'] for v in d[k].values()]):+.2f}" if d.get(k) else "n/a" for k in variants]
    lines.append("| *mean over tasks* | " + " | ".join(avg) + " |")
    return "\n".join(lines)


def _abs_table(results: Sequence[RunResult], subset: str, tasks: Sequence[TaskSpec], kinds: Sequence[str]) -> str:
    lines = [
        "| model | "
        + " | ".join(t.name + (" MSE" if t.kind != "binary" else " NE") for t in tasks)
        + " | best step (per seed) |",
        "|---|" + "---:|" * len(tasks) + "---|",
    ]
    for k in kinds:
        rs = [r for r in results if r.kind == k and getattr(r, subset)]
        if not rs:
            continue
        cells = []
        for t in tasks:
            vals = [metric_of(getattr(r, subset)[t.name])[1] for r in rs]
            cells.append(f"{np.mean(vals):.4f}")
        lines.append(
            f"| {LABELS.get(k, k)} | " + " | ".join(cells) + " | " + ", ".join(str(r.best_step) for r in rs) + " |"
        )
    return "\n".join(lines)


def plot(rep: UpstreamReport, path: Path) -> bool:
    """Grouped bars: NE (MSE) delta % per task and variant, error bars = std over seeds. False if matplotlib
    is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [("all test requests", deltas(rep.results, "test"))]
    if rep.facts.get("test_empty_history_share", 0) > 0:
        panels.append(("test requests with a non-empty gapped history", deltas(rep.results, "test_returning")))
    tasks = [t for t in rep.results[0].test] if rep.results else []
    variants = [k for k in rep.settings.variants if k in panels[0][1]]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(7.0, 1.3 * len(tasks) * len(variants) / 3), 3.6 * len(panels)), squeeze=False
    )
    width = 0.8 / max(len(variants), 1)
    cmap = plt.get_cmap("tab10")
    for ax, (title, d) in zip(axes[:, 0], panels):
        x = np.arange(len(tasks))
        for i, k in enumerate(variants):
            m = [d[k].get(t, {}).get("mean", np.nan) for t in tasks]
            s = [d[k].get(t, {}).get("std") or 0.0 for t in tasks]
            ax.bar(
                x + (i - (len(variants) - 1) / 2) * width,
                m,
                width,
                yerr=s,
                capsize=2,
                label=LABELS.get(k, k),
                color=cmap(i % 10),
            )
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [t + (" (MSE)" if "mse" in rep.results[0].test[t] else "") for t in tasks])
        ax.set_ylabel("Δ vs baseline (%)  ← better")
        sim = "SIMULATED data" if rep.simulated else "real data"
        ax.set_title(f"dv365 eval upstream — {rep.dataset} ({sim}), {title}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=min(len(variants), 7), fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(rep: UpstreamReport, out_dir: str | Path) -> dict[str, str]:
    """Writes ``upstream-<dataset>[-quick].md`` / ``.png`` / ``.json`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"upstream-{rep.dataset}{'-quick' if rep.quick else ''}"
    md, png, js = out / f"{stem}.md", out / f"{stem}.png", out / f"{stem}.json"
    has_png = plot(rep, png)
    summ = rep.summary()
    tasks = list(_tasks_of(rep))
    variants = [k for k in rep.settings.variants if k in summ["delta_ne_pct"]]
    f = rep.facts
    seeds = summ["seeds"]
    s = rep.settings
    tcfg = TrainConfig.from_dict(apply_overrides(s.train, {"data.url": rep.data_url}))
    L: list[str] = []
    sim = " — SIMULATED data" if rep.simulated else " — real data"
    L.append(f"# dv365 eval upstream: {rep.dataset}{' (quick)' if rep.quick else ''}{sim}\n")
    L.append(data_banner(rep.data))
    L.append(
        "Paper Table 2 on this data: NE delta % of each user tower variant (Table 1) against the baseline "
        "without DV365 timelines, per task (MSE delta % for regression tasks), mean ± std over "
        f"{len(seeds)} seed(s) {seeds}, each variant compared with the baseline of the same seed. "
        "Negative = better. [low, high]: the 95 % interval of the seed-averaged delta when the test users are "
        "resampled (2,000 bootstrap draws; every seed scores the same users, so the seed spread alone cannot "
        "show how much another draw of users would move it). **Bold**: better than the baseline beyond noise, "
        "i.e. |mean| > 2·std/√n over the seeds and the interval below 0; `~`: within noise (either check fails, "
        "or a single seed); a plain positive value is worse than the baseline beyond noise.\n"
    )
    L.append("## Results: all test requests\n")
    L.append(_table(deltas(rep.results, "test"), tasks, variants) + "\n")
    ck = summ["checks"]
    L.append(_check_line(ck) + "\n")
    if "delta_ne_pct_returning" in summ:
        L.append(
            f"## Results: test requests with a non-empty gapped history ({f['test_returning']:,} of {f['test']:,})\n"
        )
        L.append(
            f"{100 * f['test_empty_history_share']:.1f}% of the test requests have no event before request − 24 h "
            "(the user's ratings come in bursts and the test split is the latest by time), so every tower "
            "sees an empty history there. These are the requests where a tower can help:\n"
        )
        L.append(_table(deltas(rep.results, "test_returning"), tasks, variants) + "\n")
        L.append(_check_line(summ["checks_returning"]) + " (returning users)\n")
    if has_png:
        L.append(f"![NE delta per task and variant]({png.name})\n")
    else:
        L.append("(No plot: matplotlib is not installed in this environment.)\n")
    L.append("## Absolute test metrics (mean over seeds)\n")
    L.append(_abs_table(rep.results, "test", tasks, (BASELINE, *variants)) + "\n")
    if "delta_ne_pct_returning" in summ:
        L.append("Returning users only:\n")
        L.append(_abs_table(rep.results, "test_returning", tasks, (BASELINE, *variants)) + "\n")
    L.append("## Data\n")
    L.append(f"- dataset `{rep.data_url}` (source `{f['source']}`){' — SIMULATED' if rep.simulated else ''}")
    L.append(
        f"- {f['users']:,} users, {f['events']:,} events ({f['mean_events_per_user']:,.1f} per user), "
        f"{f['requests']:,} requests; slice spec `{tcfg.data.spec}` ({f['features']} features), 24 h gap"
    )
    L.append(
        f"- splits by request time: train {f['train']:,} / validation {f['val']:,} (latest {100 * s.val_fraction:g}% "
        f"before the test split; early stopping) / test {f['test']:,} (latest {tcfg.data.eval_fraction:.0%}; "
        "evaluated once per model, never used for a choice)"
    )
    L.append(
        f"- test requests with an empty gapped history: {100 * f['test_empty_history_share']:.1f}% "
        f"(train: {100 * f['train_empty_history_share']:.1f}%)"
    )
    L.append(f"- test base rates: {', '.join(f'{k} {v:.4f}' for k, v in f['base_rates_test'].items())}\n")
    L.append("## Setting\n")
    m = tcfg.model
    L.append(
        f"- protocol `{s.protocol}`: "
        + (
            "tower + backbone trained together on the training split; the step with the best validation "
            f"{CRITERION_TEXT[s.select_by]} is kept (checked every {s.val_every} steps)"
            if s.protocol == "joint"
            else f"an upstream model (tower + backbone) is trained on the first {s.upstream_fraction:.0%} of the training "
            "split (early-stopped on validation); its tower is frozen and its output computed once per request; a "
            "fresh backbone is trained on the whole training split with those tokens (the baseline: the same "
            f"backbone training without tokens), early-stopped on the validation {CRITERION_TEXT[s.select_by]} every "
            f"{s.val_every} steps"
        )
    )
    L.append(
        f"- tower D = {m.tower.dim}, N_out = {m.tower.n_out}, encoder {m.tower.encoder}, funnel {m.tower.funnel}; "
        f"backbone E = {m.backbone.embedding_dim}, {m.backbone.interaction}, over-arch {list(m.backbone.over_arch)}, "
        f"tokens `{m.backbone.token_mode}`; hash sizes {dict(tcfg.data.hash_sizes)}"
    )
    o, r = tcfg.optim, tcfg.run
    L.append(
        f"- optimizers: dense {o.dense} lr {o.lr}, sparse {o.sparse} lr {o.sparse_lr}; batch {r.batch_size}, "
        f"at most {r.steps} steps ({r.steps * r.batch_size / max(f['train'], 1):.2f} passes over the training split; "
        "id-embedding models tend to overfit from the second pass on)"
        + (f" (downstream backbone: {s.backbone_steps})" if s.protocol == "frozen" and s.backbone_steps else "")
    )
    L.append(
        f"- tasks: {', '.join(t.name + ('' if t.kind == 'binary' else f' ({t.kind}, {t.transform}, weight {t.weight})') for t in tasks)}"
    )
    L.append(
        f"- config `{rep.config_path}`; device {rep.device}; wall time {rep.seconds / 60:.1f} min "
        f"(slicing once: {f['slice_seconds']} s); {platform.machine()}, torch {torch.__version__}\n"
    )
    L.append("## Command\n")
    L.append(
        f"```bash\n{rep.command or f'dv365 eval upstream --dataset {rep.dataset}' + (' --quick' if rep.quick else '')}\n```\n"
    )
    L.append("## Runs\n")
    L.append(f"| model | seed | best step | best val ({s.select_by}) | test mean NE (binary) | seconds |")
    L.append("|---|---:|---:|---:|---:|---:|")
    for x in rep.results:
        L.append(
            f"| {LABELS.get(x.kind, x.kind)} | {x.seed} | {x.best_step} | {x.best_val:.4f} | "
            f"{mean_ne(x.test):.4f} | {x.seconds:.0f} |"
        )
    md.write_text("\n".join(L) + "\n")
    full = {
        **summ,
        "facts": f,
        "data": {"name": rep.data.name, "url": rep.data_url, "source": rep.data.source, "simulated": rep.simulated},
        "config": rep.config_path,
        "command": rep.command,
        "runs": [
            {
                "kind": x.kind,
                "seed": x.seed,
                "best_step": x.best_step,
                "best_val": x.best_val,
                "test": x.test,
                "test_returning": x.test_returning,
                "seconds": round(x.seconds, 1),
                "val_curve": x.val_curve,
                "val": x.val,
                **({"test_users": x.test_users.to_json()} if x.test_users is not None else {}),
                **(
                    {"test_returning_users": x.test_returning_users.to_json()}
                    if x.test_returning_users is not None and x.test_returning_users is not x.test_users
                    else {}
                ),
            }
            for x in rep.results
        ],
    }
    js.write_text(json.dumps(full, indent=1, allow_nan=True) + "\n")
    paths = {"markdown": str(md), "json": str(js)}
    if has_png:
        paths["png"] = str(png)
    return paths


def _yes(v: bool) -> str:
    return "yes" if v else "no"


def _check_line(ck: Mapping[str, Any]) -> str:
    each = ", ".join(f"{LABELS.get(k, k)} {_yes(v)}" for k, v in ck["beats_baseline"].items())
    pairs = ", ".join(f"{p}: {_yes(v)}" for p, v in ck["token_vs_dim"].items()) or "pairs not run"
    paired = "; ".join(
        f"{p} {v['mean']:+.2f} ± {v['std'] if v['std'] is not None else float('nan'):.2f}"
        f" ({'within noise' if v['noise'] else 'beyond noise'})"
        for p, v in ck.get("token_minus_dim_paired", {}).items()
    )
    return (
        f"Every variant beats the baseline on every task, beyond noise: **{_yes(ck['all_variants_beat_baseline'])}** "
        f"({each}). Token-wise beats dim-wise beyond noise (seed-paired difference of the mean delta over tasks): "
        f"**{_yes(ck['token_wise_beats_dim_wise'])}** ({pairs})."
        + (
            f" Seed-paired token − dim difference of the mean delta over tasks (percentage points, negative = "
            f"token-wise better): {paired}."
            if paired
            else ""
        )
    )


def _tasks_of(rep: UpstreamReport) -> Iterator[TaskSpec]:
    tcfg = TrainConfig.from_dict(apply_overrides(rep.settings.train, {"data.url": rep.data_url}))
    if tcfg.tasks:
        yield from tcfg.tasks
        return
    names = list(rep.results[0].test) if rep.results else []
    for n in names:
        kind = "binary" if "ne" in rep.results[0].test[n] else "regression"
        yield TaskSpec(n if n.startswith("label_") else f"label_{n}", kind)
