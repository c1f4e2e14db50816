"""``dv365 bench export``: the export end to end on SIMULATED data at the paper's embedding shape.

Generates a SIMULATED long-history dataset (:mod:`dv365.core.synth`), trains a DV365 model with the real
``N_out = 58``, ``D = 256`` FSA user tower for a few steps (kuairand spec, 201 sliced features, small hash
tables), exports every user with ``dv365 export``'s job (fbgemm 4-bit), and reports:

* ``users_per_s``: users / seconds of the export loop (read timelines, slice, tower, quantize, write shards);
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
2 CPU cores). Default: 128 users, ``--mean-events`` (40K, the paper's mean), 10 steps of 16, tower batches of 32.
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


def _train_config(url: str, ckpt: Path, steps: int, batch: int, seed: int) -> Any:
    from dv365.train.config import TrainConfig

    return TrainConfig.from_dict(
        {
            "data": {
                "url": url,
                "spec": "kuairand",
                "hash_sizes": {"media": 4999, "author": 4999, "topic": 1009},
                "eval_fraction": 0.1,
                "slicer": "numpy",
            },
            "model": {
                "kind": "fsa",
                "tower": {"dim": 256, "n_out": 58},  # the paper's shape (default encoder sizes)
                "backbone": {"embedding_dim": 32, "item_hash_size": 4999, "over_arch": [64, 32]},
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dv365.core.quantize import dequantize_rows
    from dv365.core.synth import SynthConfig, write_synth_dataset
    from dv365.core.timeline import TimelineDataset
    from dv365.export.encode import UserEncoder, load_tower_model, quantize_fbgemm
    from dv365.export.job import ExportConfig, run_export
    from dv365.export.plan import SnapshotIndex
    from dv365.train.trainer import Trainer

    quick = bool(getattr(args, "quick", False))
    users = args.users or (24 if quick else 128)
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
        Trainer(_train_config(str(root / "data"), root / "ckpt", steps, train_batch, args.seed)).fit()
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        res = run_export(
            ExportConfig(
                checkpoint=str(root / "ckpt"),
                out=str(root / "snap"),
                shard_users=64,
                batch_users=batch_users,
                progress=False,
            )
        )
        t_export = time.perf_counter() - t
        m = res.manifest
        assert m is not None
        fmt = m.row_format
        idx = SnapshotIndex(str(root / "snap"))
        payload = torch.from_numpy(idx.payload(idx.user_ids)).view(len(idx.user_ids), fmt.rows_per_user, fmt.row_bytes)
        x_hat = dequantize_rows(payload, fmt.bits)  # pure PyTorch
        fb = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(payload.reshape(-1, fmt.row_bytes), fmt.bits)
        bit_exact = bool(torch.equal(x_hat.reshape(-1, fmt.dim), fb))
        # the tower's float outputs for the same users at the same cut (same batch size: the export's floats)
        model = load_tower_model(str(root / "ckpt"), "cuda" if torch.cuda.is_available() else "cpu")
        ds = TimelineDataset(str(root / "data"))
        x = UserEncoder(model, ds.vocab, fmt, batch_users).embed(ds.read_users(idx.user_ids), m.data_cutoff_ts)
        err4 = _rel_error(x, x_hat)
        err8 = _rel_error(x, dequantize_rows(quantize_fbgemm(x, 8), 8))
        shard_bytes = sum(s.bytes for s in m.shards)
        lengths = ds.read_users(idx.user_ids).lengths()
    words = fmt.user_bytes / 8
    return {
        "simulated": True,
        "data": f"SIMULATED: {users} users, {float(lengths.mean()):,.0f} mean events (dv365.core.synth, seed {args.seed})",
        "tower": f"FSA N_out={fmt.rows_per_user} D={fmt.dim}, kuairand spec (201 features), trained {steps} steps",
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "batch_users": batch_users,
        "users": m.user_count,
        "shards": len(m.shards),
        "users_per_s": round(res.users_per_s, 2),
        "users_per_s_end_to_end": round(m.user_count / t_export, 2),
        "export_s": round(t_export, 2),
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
