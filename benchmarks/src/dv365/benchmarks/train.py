"""``dv365 bench fsa | dedup | tower``: training-side benchmarks (entry points of ``dv365.benchmarks``).

* ``fsa``: training throughput (forward + backward, examples/s) of the FSA tower vs the token-wise
  transformer + LCE (``tl_t``, Table 1 ``T-L_t``) at the same ``N``, ``D`` and ``N_out`` (paper: FSA about
  1.1x). ``tl_t`` is measured at the same depth as the funnel (``num_blocks x layers_per_block`` layers at
  the full width: the funnel pooling is the only difference) and at the config default depth.
* ``dedup``: examples/s of full training steps (collate = slicing + KJTs, pooling, tower, backbone,
  backward, optimizer steps) with vs without RecD dedup (:mod:`~dv365.train.dedup`), on SIMULATED users
  whose requests each show ``DV365_BENCH_ROWS_PER_USER`` items (default 4: four training rows share one
  user slice), batches grouped by user (``data.group_by_user``).
* ``tower``: users/s of pooling (the torchrec EBC's tables) + FSA forward on the generated long-history
  profile (``--mean-events``, 40K by default), embedding bytes read per user, and that against this
  machine's measured random-row gather bandwidth (the roofline of a memory-bound lookup).

Shared options (``dv365 bench --help``): ``--quick`` (CI sizes), ``--seed``, ``--users``, ``--mean-events``,
``--batch-users``. Knobs: ``DV365_BENCH_THREADS`` (torch intra-op threads, default 1: on a small shared
machine one thread is the stable choice), ``DV365_BENCH_ROWS_PER_USER`` (dedup, default 4). Timing is wall
clock (``time.perf_counter``), the best of several repeats after a warm-up; the machine is recorded by
``dv365 bench``. Every generated data set is SIMULATED (``dv365.core.synth``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SIMULATED = "SIMULATED (dv365.core.synth users on the real KuaiRand-Pure catalog)"


def _threads() -> int:
    import torch

    n = int(os.environ.get("DV365_BENCH_THREADS", "1"))
    if n > 0:
        torch.set_num_threads(n)
    return int(torch.get_num_threads())


def _best_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# --------------------------------------------------------------------------------------------------------
# fsa: FSA vs T-L_t training throughput
# --------------------------------------------------------------------------------------------------------
def _tower_train_qps(kind: str, cfg: Any, batch: int, repeats: int, seed: int) -> tuple[float, int]:
    import torch

    from dv365.train.fsa import build_user_tower

    torch.manual_seed(seed)
    tower = build_user_tower(kind, cfg)
    opt = torch.optim.Adam(tower.parameters(), lr=1e-3)
    x = torch.randn(batch, cfg.num_tokens, cfg.dim)  # [B, N, D] pooled tokens
    target = torch.randn(batch, cfg.n_out, cfg.dim)  # [B, N_out, D]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = (tower(x) - target).pow(2).mean()
        loss.backward()
        opt.step()

    secs = _best_seconds(step, repeats)
    return batch / secs, sum(p.numel() for p in tower.parameters())


def run_fsa(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    from dv365.train.fsa import EncoderConfig, FunnelConfig, TowerConfig

    quick = bool(getattr(args, "quick", False))
    threads = _threads()
    N, D = 201, (32 if quick else 256)
    batch = args.batch_users or (8 if quick else 64)
    repeats = 2 if quick else 5
    funnel = FunnelConfig()
    depth = funnel.num_blocks * funnel.layers_per_block
    base = TowerConfig(num_tokens=N, dim=D, n_out=58, encoder=EncoderConfig(), funnel=funnel)
    fsa_qps, fsa_params = _tower_train_qps("fsa", base, batch, repeats, args.seed)
    same = replace(base, encoder=replace(base.encoder, num_layers=depth))
    tlt_qps, tlt_params = _tower_train_qps("tl_t", same, batch, repeats, args.seed)
    tl2_qps, tl2_params = _tower_train_qps("tl_t", base, batch, repeats, args.seed)
    return {
        "data": "random [B, N, D] inputs (the towers' cost does not depend on the values)",
        "N": N,
        "D": D,
        "n_out": 58,
        "batch": batch,
        "threads": threads,
        "encoder": {
            "num_heads": base.encoder.num_heads,
            "head_dim": base.encoder.head_dim,
            "ff_mult": base.encoder.ff_mult,
        },
        "funnel": {
            "num_blocks": funnel.num_blocks,
            "layers_per_block": funnel.layers_per_block,
            "stride": funnel.stride,
        },
        "fsa_train_qps": fsa_qps,
        "fsa_params": fsa_params,
        "tl_t_same_depth_layers": depth,
        "tl_t_same_depth_train_qps": tlt_qps,
        "tl_t_same_depth_params": tlt_params,
        "fsa_over_tl_t_same_depth": fsa_qps / tlt_qps,
        "tl_t_default_layers": base.encoder.num_layers,
        "tl_t_default_train_qps": tl2_qps,
        "tl_t_default_params": tl2_params,
        "fsa_over_tl_t_default": fsa_qps / tl2_qps,
        "target_ratio": 1.1,
        "meets_target": fsa_qps / tlt_qps >= 1.1,
        "timing": f"wall clock, best of {repeats} forward+backward+Adam steps after a warm-up",
    }


# --------------------------------------------------------------------------------------------------------
# dedup: full training steps with vs without RecD dedup
# --------------------------------------------------------------------------------------------------------
def impression_requests(table: Any, k: int) -> Any:
    """Requests with ``k`` impressions each: every row is repeated ``k`` times at the same (user, time); the
    extra copies take the target item and labels of the user's other requests (rotated within the user).
    RecD's setting: the ``k`` training rows of one request share the user's features."""
    import pyarrow as pa

    users = np.asarray(table.column("user_id").to_numpy(), np.int64)
    order = np.argsort(users, kind="stable")
    u = users[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    sizes = np.diff(np.r_[starts, len(u)])
    start_of = np.repeat(starts, sizes)
    size_of = np.repeat(sizes, sizes)
    pos = np.arange(len(u)) - start_of
    keep = {"user_id", "ts", "surface"}
    parts = []
    for j in range(k):
        src = np.empty(len(u), np.int64)
        src[order] = order[start_of + (pos + j) % size_of]  # the item/labels of another request of the same user
        cols = {
            name: (table.column(name) if name in keep else table.column(name).take(pa.array(src)))
            for name in table.column_names
        }
        parts.append(pa.table(cols))
    return pa.concat_tables(parts)


def write_impression_dataset(
    out_url: str, users: int, mean_events: int, requests_per_user: int, k: int, seed: int
) -> str:
    """A SIMULATED dataset (``dv365.core.synth``) whose requests have ``k`` impressions each."""
    from dv365.core.synth import SynthConfig, generate
    from dv365.core.timeline import DatasetWriter

    cfg = SynthConfig(
        users=users,
        mean_events=mean_events,
        max_events=max(2 * mean_events, 1000),
        min_events=min(100, mean_events),
        requests_per_user=requests_per_user,
        seed=seed,
    )
    tl, req = generate(cfg)
    with DatasetWriter(
        out_url,
        vocab=tl.vocab,
        num_buckets=2,
        source="synth:kuairand-pure (bench)",
        simulated=True,
        extra={"simulated": SIMULATED, "impressions_per_request": k},
    ) as w:
        w.add(
            explicit=tl.explicit.to_arrow(tl.vocab),
            implicit=tl.implicit.to_arrow(tl.vocab),
            requests=impression_requests(req, k),
        )
    return out_url


def _bench_config(url: str, quick: bool, batch: int, rows_per_user: int, dedup: bool, seed: int) -> Any:
    from dv365.train.config import TrainConfig

    dim, heads, hd = (16, 2, 8) if quick else (64, 4, 16)
    return TrainConfig.from_dict(
        {
            "data": {
                "url": url,
                "spec": "kuairand",
                "hash_sizes": {"media": 20011, "author": 20011, "topic": 1009},
                "eval_fraction": 0.0,
                "slicer": "auto",  # the training default: numba when installed
                "dedup": dedup,
                "group_by_user": rows_per_user,
            },
            "model": {
                "kind": "fsa",
                "tower": {"dim": dim, "encoder": {"num_heads": heads, "head_dim": hd}},
                "backbone": {"embedding_dim": 32, "item_hash_size": 20011, "over_arch": [128, 64]},
            },
            "run": {
                "batch_size": batch,
                "seed": seed,
                "device": "auto",
                "progress": False,
                "threads": 0,
                "deterministic": False,
            },
            "checkpoint": {"dir": os.path.join(os.path.dirname(url), "ckpt-unused")},
        }
    )


def run_dedup(args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    import torch

    from dv365.core.slicing import resolve_backend
    from dv365.train.trainer import Trainer

    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    quick = bool(getattr(args, "quick", False))
    threads = _threads()
    k = int(os.environ.get("DV365_BENCH_ROWS_PER_USER", "4"))
    users = args.users or (12 if quick else 64)
    mean_events = min(args.mean_events, 2_000) if quick else min(args.mean_events, 10_000)
    batch = args.batch_users * k if args.batch_users else (32 if quick else 128)
    steps = 2 if quick else 6
    with tempfile.TemporaryDirectory(prefix="dv365-bench-dedup-") as tmp:
        url = write_impression_dataset(os.path.join(tmp, "data"), users, mean_events, 8, k, args.seed)
        result: dict[str, Any] = {}
        for dedup in (False, True):
            trainer = Trainer(_bench_config(url, quick, batch, k, dedup, args.seed), progress=False)
            trainer.model.train()
            uniq: list[int] = []

            def one(step: int, trainer: Trainer = trainer, uniq: list[int] = uniq) -> None:
                b = trainer.batches[step % len(trainer.batches)]  # collate: slicing (of U rows with dedup) + KJTs
                uniq.append(int(b.user_kjt.stride()))
                trainer.train_step(b.to(trainer.device))

            one(0)  # warm-up
            t = time.perf_counter()
            for s in range(1, steps + 1):
                one(s)
            secs = time.perf_counter() - t
            name = "dedup" if dedup else "no_dedup"
            result[f"qps_{name}"] = steps * batch / secs
            result[f"user_rows_per_batch_{name}"] = float(np.mean(uniq[1:]))
        # how often slices coincide *without* multi-impression requests (plain synth requests, grouped by user)
        natural = _natural_unique_fraction(trainer.source, k, batch)
    torch.set_num_threads(threads)
    return {
        "data": SIMULATED + f"; each request shows {k} items (RecD's setting: {k} training rows per user slice)",
        "users": users,
        "mean_events_per_user": mean_events,
        "rows_per_user": k,
        "batch_size": batch,
        "steps_timed": steps,
        "threads": threads,
        "slicer": resolve_backend("auto"),
        "model": f"fsa, kuairand spec (201 features), D = {16 if quick else 64}",
        **result,
        "speedup": result["qps_dedup"] / result["qps_no_dedup"],
        "target_speedup": 2.0,
        "meets_target": result["qps_dedup"] / result["qps_no_dedup"] >= 2.0,
        "natural_unique_fraction": natural,
        "timing": "wall clock of full training steps (collate + forward + backward + optimizer), after a warm-up",
    }


def _natural_unique_fraction(src: Any, k: int, batch: int) -> float:
    """Unique user slices / rows in user-grouped batches of the *distinct* requests (one impression each):
    how much dedup finds when every row is its own request (distinct request times)."""
    from dv365.train.dedup import dedup_rows, grouped_permutation, slice_keys

    req = src.requests
    _, first = np.unique(np.stack([req.user_id, req.ts], 1), axis=0, return_index=True)
    rows = np.sort(first)
    perm = rows[grouped_permutation(req.user_id[rows], req.ts[rows], k, np.random.default_rng(0))]
    tl = src.timelines
    fracs = []
    for s in range(0, len(perm) - batch + 1, batch):
        r = perm[s : s + batch]
        urow = np.searchsorted(src._users, req.user_id[r])
        fracs.append(len(dedup_rows(slice_keys(tl, urow, req.ts[r], src.spec))[0]) / len(r))
    return float(np.mean(fracs)) if fracs else 1.0


# --------------------------------------------------------------------------------------------------------
# tower: users/s of pooling + FSA on the 40K profile vs the gather-bandwidth roofline
# --------------------------------------------------------------------------------------------------------
def gather_bandwidth(rows: int, dim: int, lookups: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """GB/s of reading uniformly random rows of a ``[rows, dim]`` fp32 table: ``index_select`` (rows copied
    into a preallocated buffer) and ``embedding_bag`` (rows summed into bags of 64, what pooling does);
    bytes = rows read x dim x 4. Uniform rows of a table far larger than the caches: the DRAM-bound case."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, dim, generator=g)
    idx = torch.randint(0, rows, (lookups,), generator=g)
    offsets = torch.arange(0, lookups, 64)
    nbytes = lookups * dim * 4
    buf = torch.empty(lookups, dim)  # preallocated: time the row reads, not page faults of a fresh output
    sel = _best_seconds(lambda: torch.index_select(table, 0, idx, out=buf), repeats)
    bag = _best_seconds(lambda: F.embedding_bag(idx, table, offsets, mode="sum"), repeats)
    return {
        "index_select_GBps": nbytes / sel / 1e9,
        "embedding_bag_GBps": nbytes / bag / 1e9,
        "table_MB": rows * dim * 4 / 1e6,
    }


def run_tower(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dv365.core.slicing import Slicer, SliceSpec
    from dv365.core.synth import SynthConfig, generate_timelines
    from dv365.core.timeline import Timelines, take_rows
    from dv365.train.fsa import TowerConfig, build_user_tower
    from dv365.train.model import DV365UserTower
    from dv365.train.pooling import SlicedPooling

    quick = bool(getattr(args, "quick", False))
    threads = _threads()
    users = args.users or (4 if quick else 16)
    mean_events = min(args.mean_events, 5_000) if quick else args.mean_events
    batch_users = args.batch_users or (4 if quick else 8)
    D = 32 if quick else 256
    media_rows = 20_011 if quick else 200_003  # tables far larger than the CPU caches (full runs)
    repeats = 1 if quick else 3
    spec = SliceSpec.load_default("kuairand")
    id_types = {
        k: {**v, "hash_size": {"media": media_rows, "author": min(media_rows, 200_003)}.get(k, v["hash_size"])}
        for k, v in spec.raw["id_types"].items()
    }
    spec = SliceSpec.from_dict({**spec.raw, "id_types": id_types})
    tl = generate_timelines(
        SynthConfig(users=users, mean_events=mean_events, seed=args.seed, min_events=min(100, mean_events))
    )
    last = np.array(
        [
            max(
                tl.explicit.ts[tl.explicit.offsets[i + 1] - 1] if tl.explicit.lengths[i] else 0,
                tl.implicit.ts[tl.implicit.offsets[i + 1] - 1] if tl.implicit.lengths[i] else 0,
            )
            for i in range(len(tl))
        ]
    )
    slicer = Slicer(spec, tl.vocab, backend="numpy")
    kjts = []
    for s in range(0, len(tl), batch_users):
        r = np.arange(s, min(s + batch_users, len(tl)))
        sub = Timelines(tl.user_ids[r], take_rows(tl.explicit, r), take_rows(tl.implicit, r), tl.vocab)
        kjts.append(slicer.slice(sub, last[r] + spec.gap_s).to_kjt())
    torch.manual_seed(args.seed)
    pooling = SlicedPooling(spec, D)
    tower = DV365UserTower(pooling, build_user_tower("fsa", TowerConfig(num_tokens=len(spec.features), dim=D))).eval()
    ids = sum(int(k.values().numel()) for k in kjts)
    unique_rows = 0
    for k in kjts:  # rows the grouped path reads: distinct ids per table per batch
        g = k.to_dict()
        for t in spec.tables.values():
            vals = [g[f].values() for f in t.features]
            unique_rows += int(torch.unique(torch.cat(vals)).numel()) if vals else 0

    def run_all(fn: Callable[[Any], Any]) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                for k in kjts:
                    fn(k)

        return go

    # the tower as dv365-export runs it: torchrec's per-feature EBC forward (set_mode("per_feature"), the faster
    # path without gradients); the training path (grouped) is measured too
    pooling.set_mode("per_feature")
    t_ebc = _best_seconds(run_all(pooling), repeats)
    t_tower = _best_seconds(run_all(tower), repeats)
    pooling.set_mode("grouped")
    t_pool = _best_seconds(run_all(pooling), repeats)
    t_tower_grouped = _best_seconds(run_all(tower), repeats)
    bw = gather_bandwidth(
        rows=media_rows * (5 if not quick else 1),
        dim=D,
        lookups=200_000 if quick else 2_000_000,
        repeats=repeats,
        seed=args.seed,
    )
    peak = max(bw["index_select_GBps"], bw["embedding_bag_GBps"]) * 1e9
    bytes_ids = ids * D * 4 / users  # every id entry of the (bag-deduplicated) KJT read once
    bytes_unique = unique_rows * D * 4 / users  # the grouped path: each distinct row once per batch and table

    def frac(secs: float, nbytes: float) -> float:
        return (users / secs) * nbytes / peak

    return {
        "data": SIMULATED,
        "users": users,
        "mean_events_per_user": float(tl.lengths().mean()),
        "batch_users": batch_users,
        "D": D,
        "features": len(spec.features),
        "threads": threads,
        "media_table_rows": media_rows,
        "users_per_s_pooling_plus_fsa": users / t_tower,
        "users_per_s_pooling_plus_fsa_grouped": users / t_tower_grouped,
        "users_per_s_pooling": users / t_pool,
        "users_per_s_pooling_torchrec_ebc": users / t_ebc,
        "kjt_ids_per_user": ids / users,
        "unique_rows_per_user_in_batch": unique_rows / users,
        "bytes_per_user_kjt_ids": bytes_ids,
        "bytes_per_user_unique_rows": bytes_unique,
        "gather_bandwidth": bw,
        "roofline_users_per_s_kjt_ids": peak / bytes_ids,
        "roofline_fraction_pooling_plus_fsa": frac(t_tower, bytes_ids),
        "roofline_fraction_pooling_plus_fsa_grouped": frac(t_tower_grouped, bytes_ids),
        "roofline_fraction_pooling": frac(t_pool, bytes_ids),
        "roofline_fraction_torchrec_ebc": frac(t_ebc, bytes_ids),
        "roofline_fraction_pooling_unique_rows": frac(t_pool, bytes_unique),
        "target_fraction": 0.5,
        "meets_target": frac(t_tower, bytes_ids) >= 0.5,
        "timing": f"wall clock, best of {repeats} passes over all users (inference, no grad), slicing excluded; "
        "pooling_plus_fsa = the export path (torchrec EBC pooling), _grouped = the training path",
    }


__all__ = ["gather_bandwidth", "impression_requests", "run_dedup", "run_fsa", "run_tower", "write_impression_dataset"]
