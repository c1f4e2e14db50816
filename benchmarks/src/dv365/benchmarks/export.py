"""``dv365 bench export``: the export end to end on SIMULATED data at the paper's embedding shape.

Generates a SIMULATED long-history dataset (:mod:`dv365.core.synth`), trains a DV365 model with the real
``N_out = 58``, ``D = 256`` FSA user tower for a few steps (kuairand spec, 201 sliced features, small hash
tables), exports every user with ``dv365 export``'s job (fbgemm 4-bit), and reports:

* ``users_per_s``: users / seconds of the export loop (read timelines, slice, tower, quantize, write shards),
  with its reading and slicing in ``loader_workers`` processes ahead of the tower (the export's default: half
  the cores, one on 2); the export runs in a fresh process whose peak RSS is reported, and its loader worker's peak RSS and
  private memory (a forked worker's RSS counts the pages it shares with the export process);
* ``tower_only_users_per_s``: in the same run, the same users' tower calls (pooling + FSA) on KJTs built
  beforehand, with the threads the export gave its tower (``tower_threads``), and ``end_to_end_vs_tower_only``, the ratio of the two: how close the job is to its own limit;
* ``users_per_s_steady`` / ``steady_vs_tower_only``: the same after the first tower batch arrived (the
  loader's fill, ``first_batch_s``, excluded): the rate of an export over many users;
* ``<stage>_ms_per_user`` for read, slice, kjt, pool, fsa, quantize, write (the loader's stages summed over
  its workers, so on 2 cores they may add up to more than the wall time per user), and ``wait``: the time the
  tower's process waited for the loader (the first batch's included); ``warm_up_s``: loading the slicer's
  compiled kernels before the loop (the loader's workers inherit them);
  ``users_per_s_end_to_end`` also counts loading the checkpoint and scanning the dataset;
* ``bytes_per_user`` (the manifest's: 58 x 132 = 7,656) and the shard files' bytes per user (with Parquet and
  crc32 overhead);
* compression vs the paper's ``200 x 256`` fp32 pooled input (204,800 B), vs ``58 x 256`` fp32 (the tower's
  own output), and in 8-byte words as the paper counts it (51,200 fp32 numbers vs ``58 x 17`` int64 words
  padded: "a compression factor of 50"; unpadded 132-byte rows are 957 words);
* the relative quantization error ``||x - x_hat|| / ||x||`` per user (flattened) on the trained tower's real
  outputs: mean / p50 / p99 / max, for 4 bits and, on the same outputs, 8 bits;
* whether core's pure-PyTorch de-quantizer decodes the snapshot bit-exactly like fbgemm's.

``--quick``: 24 users, at most 2,000 mean events, 2 training steps of 8 requests, tower batches of 8 (< 60 s on
2 CPU cores). Default: 512 users, ``--mean-events`` (40K, the paper's mean), 10 steps of 16, tower batches of 32:
16 batches, 16 per loader worker on 2 cores. A worker's first one or two batches run at about half its steady
rate (its heap and Arrow's buffers fill, page by page), which at 128 users (4 batches per worker) weighs on the
whole run as it does not on an export over many users; ``--users 128`` shows it.
``--batch-users`` sets the export's tower batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PAPER_INPUT_BYTES = 200 * 256 * 4  # the paper's pooled input: 200 embeddings of 256 fp32


def _train_config(url: str, ckpt: Path, steps: int, batch: int, seed: int, quick: bool = True) -> Any:
    """Quick: 4,999-row tables; full: 20,011-row media / author tables, as ``dv365 bench dedup`` trains."""
    from dv365.train.config import TrainConfig

    rows = 4999 if quick else 20011

    return TrainConfig.from_dict(
        {
            "data": {
                "url": url,
                "spec": "kuairand",
                "hash_sizes": {"media": rows, "author": rows, "topic": 1009},
                "eval_fraction": 0.1,
            },
            "model": {
                "kind": "fsa",
                "tower": {"dim": 256, "n_out": 58},  # the paper's shape (default encoder sizes)
                "backbone": {"embedding_dim": 32, "item_hash_size": rows, "over_arch": [64, 32]},
            },
            "run": {
                "steps": steps,
                "batch_size": batch,
                "seed": seed,
                "device": "auto",
                "progress": False,
                "log_every": max(steps, 1),
                "eval_batch_size": 256,
            },
            "checkpoint": {"dir": str(ckpt), "every": steps},
        }
    )


def _rel_error(x: torch.Tensor, x_hat: torch.Tensor) -> np.ndarray:
    flat, flat_hat = x.reshape(len(x), -1).double(), x_hat.reshape(len(x), -1).double()
    return ((flat - flat_hat).norm(dim=1) / flat.norm(dim=1).clamp_min(1e-30)).numpy()


def _stats(err: np.ndarray, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}_mean": float(err.mean()),
        f"{prefix}_p50": float(np.percentile(err, 50)),
        f"{prefix}_p99": float(np.percentile(err, 99)),
        f"{prefix}_max": float(err.max()),
    }


def _export_in_child(cfg: Any, conn: Any) -> None:
    """Runs one export in a fresh process and sends back its result and peak RSS (its own and its loader
    workers'), so the figures are the export's alone, not the benchmark's data generation and training."""
    import resource

    from dv365.export.job import run_export

    t = time.perf_counter()
    res = run_export(cfg)
    wall = time.perf_counter() - t
    conn.send(
        {
            "users_per_s": res.users_per_s,
            "users_per_s_steady": res.users_per_s_steady,
            "first_batch_s": res.first_batch[0] if res.first_batch else 0.0,
            "seconds": res.seconds,
            "wall_s": wall,
            "users_encoded": res.users_encoded,
            "stage_seconds": res.stage_seconds,
            # VmHWM: this process image's own peak (ru_maxrss would start from the benchmark's RSS at the spawn:
            # Linux keeps the forked copy's high-water mark across exec)
            "peak_rss_mb": _vm_hwm_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loader_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "loader_private_mb": res.loader_private_mb,
            "tower_threads": res.tower_threads,
            "loader_workers": res.loader_workers,
        }
    )
    conn.close()


def _vm_hwm_mb() -> float:
    """Peak RSS of this process image (``VmHWM`` of /proc/self/status) in MB; 0.0 where it is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _run_export(cfg: Any) -> dict[str, Any]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_export_in_child, args=(cfg, send))
    p.start()
    send.close()
    try:
        out = recv.recv()
    except EOFError as e:
        p.join()
        raise RuntimeError(f"the export process ended with exit code {p.exitcode} before reporting") from e
    p.join()
    return dict(out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dv365.core.quantize import dequantize_rows
    from dv365.core.synth import SynthConfig, write_synth_dataset
    from dv365.core.timeline import TimelineDataset, Timelines, take_rows
    from dv365.export.encode import UserEncoder, load_tower_model, quantize_fbgemm
    from dv365.export.job import ExportConfig
    from dv365.export.plan import SnapshotIndex
    from dv365.train.trainer import Trainer

    quick = bool(getattr(args, "quick", False))
    users = args.users or (24 if quick else 512)
    mean_events = min(args.mean_events, 2_000) if quick else args.mean_events
    steps, train_batch = (2, 8) if quick else (10, 16)
    batch_users = args.batch_users or (8 if quick else 32)
    with tempfile.TemporaryDirectory(prefix="dv365-bench-export-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        synth = SynthConfig(users=users, mean_events=mean_events, requests_per_user=8, seed=args.seed)
        write_synth_dataset(synth, str(root / "data"), progress=False, num_buckets=4)
        t_data = time.perf_counter() - t
        t = time.perf_counter()
        Trainer(_train_config(str(root / "data"), root / "ckpt", steps, train_batch, args.seed, quick)).fit()
        t_train = time.perf_counter() - t
        cfg = ExportConfig(
            checkpoint=str(root / "ckpt"),
            out=str(root / "snap"),
            shard_users=64,
            batch_users=batch_users,
            progress=False,
        )
        t = time.perf_counter()
        ex = _run_export(cfg)
        t_export = time.perf_counter() - t
        idx = SnapshotIndex(str(root / "snap"))
        m = idx.manifest
        fmt = m.row_format
        payload = torch.from_numpy(idx.payload(idx.user_ids)).view(len(idx.user_ids), fmt.rows_per_user, fmt.row_bytes)
        x_hat = dequantize_rows(payload, fmt.bits)  # pure PyTorch
        fb = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(payload.reshape(-1, fmt.row_bytes), fmt.bits)
        bit_exact = bool(torch.equal(x_hat.reshape(-1, fmt.dim), fb))
        # the tower alone, in this run: the same users' KJTs built beforehand, then only pooling + FSA timed
        model = load_tower_model(str(root / "ckpt"), "cuda" if torch.cuda.is_available() else "cpu")
        ds = TimelineDataset(str(root / "data"))
        enc = UserEncoder(model, ds.vocab, fmt, batch_users)
        tl = ds.read_users(idx.user_ids)
        lengths = tl.lengths()
        x = enc.embed(tl, m.data_cutoff_ts)  # the tower's float outputs (same batch size: the export's floats)
        kjts = []
        for s0 in range(0, len(idx.user_ids), batch_users):
            rows = np.arange(s0, min(s0 + batch_users, len(idx.user_ids)))
            pad = np.concatenate([rows, np.full(batch_users - len(rows), rows[0])])
            sub = Timelines(tl.user_ids[pad], take_rows(tl.explicit, pad), take_rows(tl.implicit, pad), tl.vocab)
            kjts.append(enc.features.kjt(sub, m.data_cutoff_ts, model.device))
        threads_before = torch.get_num_threads()
        torch.set_num_threads(ex["tower_threads"])  # the tower alone with the threads the export gave it
        enc.forward(kjts[0])  # warm-up
        t = time.perf_counter()
        for k in kjts:
            enc.forward(k)
        tower_users_per_s = len(idx.user_ids) / (time.perf_counter() - t)
        torch.set_num_threads(threads_before)
        err4 = _rel_error(x, x_hat)
        err8 = _rel_error(x, dequantize_rows(quantize_fbgemm(x, 8), 8))
        shard_bytes = sum(s.bytes for s in m.shards)
    words = fmt.user_bytes / 8
    n_enc = max(int(ex["users_encoded"]), 1)
    stage_ms = {
        f"{k}_ms_per_user": round(1000 * v / n_enc, 3) for k, v in ex["stage_seconds"].items() if k != "warm_up"
    }
    stage_ms["warm_up_s"] = round(ex["stage_seconds"].get("warm_up", 0.0), 3)
    return {
        "simulated": True,
        "data": f"SIMULATED: {users} users, {float(lengths.mean()):,.0f} mean events (dv365.core.synth, seed {args.seed})",
        "tower": f"FSA N_out={fmt.rows_per_user} D={fmt.dim}, kuairand spec (201 features), trained {steps} steps",
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "batch_users": batch_users,
        "loader_workers": ex["loader_workers"],
        "users": m.user_count,
        "shards": len(m.shards),
        "users_per_s": round(ex["users_per_s"], 2),
        "tower_only_users_per_s": round(tower_users_per_s, 2),
        "end_to_end_vs_tower_only": round(ex["users_per_s"] / tower_users_per_s, 3),
        "users_per_s_steady": round(ex["users_per_s_steady"], 2),
        "steady_vs_tower_only": round(ex["users_per_s_steady"] / tower_users_per_s, 3),
        "first_batch_s": round(ex["first_batch_s"], 3),
        **stage_ms,
        "users_per_s_end_to_end": round(m.user_count / ex["wall_s"], 2),
        "export_s": round(t_export, 2),
        "export_peak_rss_mb": round(ex["peak_rss_mb"], 1),
        "loader_worker_peak_rss_mb": round(ex["loader_peak_rss_mb"], 1),
        "loader_worker_private_mb": round(ex["loader_private_mb"], 1),
        "tower_threads": ex["tower_threads"],
        "data_s": round(t_data, 2),
        "train_s": round(t_train, 2),
        "bits": fmt.bits,
        "row_bytes": fmt.row_bytes,
        "bytes_per_user": fmt.user_bytes,
        "shard_file_bytes_per_user": round(shard_bytes / m.user_count, 1),
        "compression_vs_200x256_fp32": round(PAPER_INPUT_BYTES / fmt.user_bytes, 2),
        "compression_vs_58x256_fp32": round(fmt.float_bytes / fmt.user_bytes, 2),
        "compression_words_vs_paper_input": round(200 * 256 / words, 2),
        "paper_padded_bytes_per_user": fmt.rows_per_user * 136,
        **{k: round(v, 5) for k, v in _stats(err4, "rel_error_4bit").items()},
        **{k: round(v, 5) for k, v in _stats(err8, "rel_error_8bit").items()},
        "core_decoder_bit_exact_with_fbgemm": bit_exact,
    }
