"""``dv365 eval nextitem``: short-history next-item models with and without the DV365 embedding of the
user's older history (``nextitem`` package docstring)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dv365.core.config import to_plain
from dv365.experiments.nextitem.arms import DistantHistoryProvider, ModelConfig, NextItemModel, arm_name
from dv365.experiments.nextitem.data import NextItemError, Sequences, load_sequences
from dv365.experiments.nextitem.encoders import EncoderConfig
from dv365.experiments.nextitem.settings import DATASETS, Settings, default_config, load_settings
from dv365.experiments.nextitem.train import (
    ArmData,
    DistantCache,
    evaluate,
    fit,
    mean_metrics,
    serving_cost,
)
from dv365.train.metrics import users_95

logger = logging.getLogger(__name__)


def dataset_url(dataset: str, s: Settings, data_dir: Path, progress: bool) -> tuple[str, str]:
    """(name, url): a shipped data set prepared under ``data_dir``, or a UniTi folder given as a PATH."""
    if s.data_url:
        return dataset, s.data_url
    if dataset in DATASETS:
        from dv365.experiments.upstream import UpstreamSettings, prepare_dataset

        return dataset, str(prepare_dataset(dataset, UpstreamSettings(train={}, synth=s.synth), data_dir, progress))
    from dv365.experiments.datasets import resolve_dataset

    choice = resolve_dataset(dataset, NextItemError)  # a dataset folder: named, checked
    return choice.name, str(choice.url)


def build_provider(url: str, seqs: Sequences, s: Settings, work_dir: Path, device: str) -> DistantHistoryProvider:
    """The frozen DV365 provider (``nextitem.distant``, imported here only: the short-K+dv365 arms need it),
    trained on data strictly before each user's validation target."""
    from dv365.experiments.nextitem.distant import build_distant_provider

    val_ts = seqs.ts[seqs.target_pos("val")]
    val_target_ts = {int(u): int(t) for u, t in zip(seqs.user_ids, val_ts, strict=True)}
    return build_distant_provider(url, val_target_ts, dict(s.provider), work_dir, s.provider_seed, device)


def facts(seqs: Sequences, s: Settings) -> dict[str, Any]:
    n = seqs.lengths
    return {
        "users": int(len(n)),
        "dropped_users": seqs.dropped_users,
        "items": seqs.num_items,
        "events": int(n.sum()),
        "mean_len": float(n.mean()),
        "median_len": float(np.median(n)),
        "max_len": int(n.max()),
        "min_items": s.sequence.min_items,
        "source": s.sequence.source,
        "actions": list(s.sequence.actions),
    }


def arm_data(seqs: Sequences, k: int, extra: str, cache: DistantCache | None = None, device: str = "cpu") -> ArmData:
    windows = {"train": seqs.train_windows(k), "val": seqs.eval_windows("val", k), "test": seqs.eval_windows("test", k)}
    return ArmData(seqs, windows, extra, cache, device=device)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class _Runner:
    """Trains every arm of one run and collects the per-seed metrics."""

    def __init__(self, seqs: Sequences, s: Settings, seeds: list[int], progress: bool) -> None:
        self.seqs, self.s, self.seeds, self.progress = seqs, s, seeds, progress
        self.lengths = seqs.lengths

    def model(self, enc: str, k: int, extra: str, fusion: str, dv_shape: tuple[int, int]) -> NextItemModel:
        m = self.s.model
        cfg = EncoderConfig(enc, m.dim, m.blocks, m.heads, m.ffn_hidden, m.dropout)
        return NextItemModel(
            ModelConfig(cfg, self.seqs.num_items, k, extra, fusion, dv_shape[0], dv_shape[1], m.prefix_tokens)
        )

    def train_one(
        self, enc: str, data: ArmData, k: int, extra: str, fusion: str, seed: int, dv_shape: tuple[int, int]
    ) -> tuple[NextItemModel, dict[str, Any]]:
        torch.manual_seed(seed)
        np.random.seed(seed)
        model = self.model(enc, k, extra, fusion, dv_shape).to(data.device)
        if extra == "dv365" and data.cache is not None:
            rows = torch.from_numpy(data.cache.index["train"])
            model.fit_standardization(data.cache.tokens[rows], data.cache.present[rows])
        fs = self.s.train
        if k == self.s.sequence.max_len and extra == "none" and fs.full_epochs:
            fs = dataclasses.replace(fs, epochs=fs.full_epochs)
        fr = fit(model, data, fs, seed, self.progress)
        val = mean_metrics(evaluate(model, data, "val", self.s.train.eval_batch_size))
        ranks = evaluate(model, data, "test", self.s.train.eval_batch_size)
        logger.info(
            f"{enc} {arm_name(None if k == self.s.sequence.max_len and extra == 'none' else k, extra)}"
            f"{'' if extra == 'none' else f' [{fusion}]'} seed {seed}: val HR@10 {val['HR@10']:.4f}, test HR@10 "
            f"{mean_metrics(ranks)['HR@10']:.4f} (best step {fr.best_step}/{fr.steps}, {fr.seconds:.0f} s)"
        )
        return model, {
            "seed": seed,
            "fusion": fusion if extra != "none" else None,
            "val": val,
            "ranks": ranks,
            "best_step": fr.best_step,
            "steps": fr.steps,
            "max_steps": fr.max_steps,
            "seconds": round(fr.seconds, 2),
            "curve": fr.curve,
        }

    def run_arm(
        self, enc: str, data: ArmData, k: int, extra: str, fusions: tuple[str, ...], dv_shape: tuple[int, int]
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None, NextItemModel]:
        """Every seed of one arm; with several fusion modes, the mode of the best validation HR@10 over the first
        ``fusion_select_seeds`` seeds is kept (the others are trained on those seeds only)."""
        nsel = min(self.s.fusion_select_seeds, len(self.seeds)) if len(fusions) > 1 else 0
        tried: dict[str, list[tuple[NextItemModel, dict[str, Any]]]] = {f: [] for f in fusions}
        for f in fusions if nsel else ():
            for seed in self.seeds[:nsel]:
                tried[f].append(self.train_one(enc, data, k, extra, f, seed, dv_shape))
        val_hr = {f: float(np.mean([r["val"]["HR@10"] for _, r in v])) for f, v in tried.items() if v}
        chosen = max(val_hr, key=lambda f: val_hr[f]) if val_hr else fusions[0]
        runs = list(tried[chosen])
        for seed in self.seeds[len(runs) :]:
            runs.append(self.train_one(enc, data, k, extra, chosen, seed, dv_shape))
        sel = {"chosen": chosen, "val_hr10": val_hr} if extra != "none" else None
        return [r for _, r in runs], sel, runs[0][0]

    def test_metrics(self, runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
        subsets: dict[str, np.ndarray | None] = {"all": None}
        for k in self.s.short:
            subsets[f"long{k}"] = self.lengths > k + self.s.long_margin
        out: dict[str, dict[str, list[float]]] = {}
        for name, mask in subsets.items():
            per_seed = [mean_metrics(r["ranks"], mask) for r in runs]
            out[name] = {m: [p[m] for p in per_seed] for m in per_seed[0]}
        return out


def run_nextitem(
    dataset: str,
    *,
    quick: bool = False,
    seeds: int | None = None,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    data_dir: str = "out/eval/data",
    device: str = "cpu",
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Runs the experiment; returns the result mapping :func:`~dv365.experiments.nextitem.report.write_report`
    writes."""
    t_start = time.perf_counter()
    s = load_settings(config or default_config(dataset, quick), overrides)
    torch.set_num_threads(max(s.threads, 1))
    if seeds is not None and seeds < 1:
        raise NextItemError(f"--seeds {seeds}: must be >= 1")
    seed_list = list(range(seeds if seeds is not None else s.seeds))
    device = resolve_device(device)
    name, url = dataset_url(dataset, s, Path(data_dir), progress)
    seqs, simulated = load_sequences(url, s.sequence.source, tuple(s.sequence.actions), s.sequence.min_items)
    logger.info(f"nextitem: {len(seqs.user_ids)} users, {seqs.num_items} items, {len(seqs.items)} events ({url})")

    t0 = time.perf_counter()
    provider = build_provider(url, seqs, s, Path(data_dir) / "nextitem" / name, device)
    provider_s = time.perf_counter() - t0
    dv_shape = (int(provider.out_tokens), int(provider.dim))
    caches: dict[int, DistantCache] = {}
    for k in s.short:
        d = arm_data(seqs, k, "none")
        caches[k] = DistantCache.build(provider, seqs, d.windows)

    runner = _Runner(seqs, s, seed_list, progress)
    encoders: dict[str, Any] = {}
    for enc in s.encoders:
        arms: dict[str, Any] = {}
        fusion: dict[str, Any] = {}
        plan: list[tuple[str, int, str]] = [("full", s.sequence.max_len, "none")]
        for k in s.short:
            plan += [(arm_name(k, e), k, e) for e in ("none", "mean", "dv365")]
        for aname, k, extra in plan:
            data = arm_data(seqs, k, extra, caches.get(k) if extra == "dv365" else None, device)
            fusions = tuple(s.fusion) if extra != "none" else ("none",)
            runs, sel, model0 = runner.run_arm(enc, data, k, extra, fusions, dv_shape)
            if sel:
                fusion[f"{k}/{extra}"] = sel
            arms[aname] = {
                "test": runner.test_metrics(runs),
                "val": {m: [r["val"][m] for r in runs] for m in runs[0]["val"]},
                "runs": [
                    {**{kk: v for kk, v in r.items() if kk != "ranks"}, "test_ranks": np.asarray(r["ranks"]).tolist()}
                    for r in runs
                ],
                "cost": serving_cost(model0, data, s.cost_users),
            }
        encoders[enc] = {
            "arms": arms,
            "fusion": fusion,
            "subset_users": {f"long{k}": int((seqs.lengths > k + s.long_margin).sum()) for k in s.short},
        }
    return {
        "experiment": "nextitem",
        "dataset": name,
        "url": url,
        "quick": quick,
        "profile": config_profile(config, name),
        "simulated": simulated,
        "label": "SIMULATED" if simulated else "REAL",
        "seeds": seed_list,
        "device": device,
        "short": list(s.short),
        "max_len": s.sequence.max_len,
        "long_margin": s.long_margin,
        "facts": facts(seqs, s),
        "user_lengths": seqs.lengths.tolist(),  # per test user, in the order of ``test_ranks`` (long subsets)
        "model": to_plain(s.model),
        "train": to_plain(s.train),
        "provider": {
            "desc": getattr(provider, "description", type(provider).__name__),
            "seed": s.provider_seed,
            "seconds": provider_s,
            "cache_seconds": sum(c.seconds for c in caches.values()),
            "out_tokens": dv_shape[0],
            "stored_bytes": stored_bytes(*dv_shape),
            "dim": dv_shape[1],
            "present_share": {
                str(k): float(c.present.float().mean()) if len(c.present) else 0.0 for k, c in caches.items()
            },
        },
        "encoders": encoders,
        "settings": to_plain(s),
        "seconds": time.perf_counter() - t_start,
        "command": command,
    }


def config_profile(config: str | None, dataset: str) -> str | None:
    """The profile of a shipped config given by name (``--config movielens-medium`` on ``movielens`` ->
    ``medium``; ``--config synth`` on ``movielens`` -> ``synth``); None for the default config or a file path."""
    if not config or Path(config).exists() or Path(config).suffix in (".yaml", ".yml") or "/" in config:
        return None
    return None if config == dataset else config.removeprefix(f"{dataset}-")


def stored_bytes(tokens: int, dim: int) -> int | None:
    """Bytes of one user's embedding in the int4 row format (None where ``dim`` does not pack at 4 bits)."""
    from dv365.core.quantize import RowFormat

    try:
        return RowFormat(dim=dim, bits=4, rows_per_user=tokens).user_bytes
    except ValueError:
        return None


def summary_line(res: dict[str, Any]) -> dict[str, Any]:
    """The JSON summary line: per encoder and K the headline test means, R and verdicts."""
    out: dict[str, Any] = {
        "experiment": "nextitem",
        "dataset": res["dataset"],
        "quick": res["quick"],
        "simulated": res["simulated"],
        "seeds": res["seeds"],
        "seconds": round(res["seconds"], 1),
    }
    for key, block in res.get("summary", {}).items():
        out[key] = {
            "HR@10": {n: st["HR@10"]["mean"] for n, st in block["arms"]["all"].items()},
            "R_HR@10": {a: r["HR@10"]["mean"] for a, r in block["R"].get("all", {}).items()},
            "R": {
                a: {mt: {x: r[mt].get(x) for x in ("mean", "std", "n", "undefined_seeds")} for mt in r}
                for a, r in block["R"].get("all", {}).items()
            },
            "deltas": {
                a: {mt: {"mean": v["mean"], "std": v["std"], "users_95": users_95(v)} for mt, v in d.items()}
                for a, d in block["deltas"].get("all", {}).items()
            },
            "verdicts": block["verdicts"],
        }
    return out
