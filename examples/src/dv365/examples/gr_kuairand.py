"""DV365 in generative-recommenders' dlrm_v3 KuaiRand ranker (``DlrmHSTU``), end to end on CPU in seconds.

Needs the ``[gr]`` extra and GR's source tree on the path (``tools/setup.sh``). All data is SIMULATED:

1. :func:`write_processed_seqs`: a small KuaiRand-layout file (GR's ``processed_seqs.csv``: one row per user,
   JSON lists ``video_id``, ``time_ms``, ``action_weights``, ``play_time_ms``, ``duration_ms``, and the user
   features GR's KuaiRand config embeds) from ``dv365.core.synth`` users;
2. :func:`publish_dv365`: a DV365 user tower trained for a few steps on the same generator's long histories
   (dv365-train), its embeddings exported as an int4 snapshot (dv365-export) and published into an embedded
   LMDB store (dv365-store) — for the first ``store_users`` users only, so the others are absent;
3. :func:`train_ranker`: GR's KuaiRand config (scaled down) and GR's ``DLRMv3KuaiRandDataset`` on that file;
   the model is :class:`dv365.adapters.gr_dlrm.DV365DlrmHSTU`, which fetches each batch's DV365 rows from the
   store by user id. The GR-side changes are the constructor call and the dataset's config.

``python -m dv365.examples.gr_kuairand OUT_DIR`` runs it and prints the losses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: KuaiRand's action bits (GR's ``get_feature_merge_weights("kuairand-1k")``) that the simulated events set.
CLICK, LIKE, LONG_VIEW = 1, 2, 64
#: the user features GR's KuaiRand config reads as contextual features, besides ``user_id``.
USER_FEATURES = (
    "user_active_degree",
    "follow_user_num_range",
    "fans_user_num_range",
    "friend_user_num_range",
    "register_days_range",
)


@dataclass(frozen=True)
class ExampleConfig:
    """Sizes of the example (defaults: about 15 s on 2 CPU cores, GR import included).

    Args:
        users: users in the KuaiRand file (ids ``0..users-1``).
        store_users: users with a DV365 embedding in the store (ids ``0..store_users-1``); the rest are absent.
        mean_events: mean simulated events per user.
        dim: GR's ``hstu_embedding_table_dim`` = ``hstu_transducer_embedding_dim``.
        num_tokens: K, DV365 tokens per user.
        max_seq_len: GR's ``max_seq_len`` (history + candidates + contextual tokens).
        batch_size: users per batch.
        steps: training steps.
        seed: synth and torch seed.
    """

    users: int = 32
    store_users: int = 24
    mean_events: int = 120
    dim: int = 32
    num_tokens: int = 4
    max_seq_len: int = 64
    batch_size: int = 8
    steps: int = 12
    seed: int = 7


def _synth_config(cfg: ExampleConfig) -> Any:
    from dv365.core.synth import SynthConfig

    return SynthConfig(
        users=cfg.users,
        mean_events=cfg.mean_events,
        max_events=4 * cfg.mean_events,
        days=40,
        requests_per_user=6,
        request_window_days=15,
        min_history_days=15,
        seed=cfg.seed,
    )


def _range_code(value: float, edges: tuple[float, ...]) -> int:
    """1-based bucket of ``value`` (GR's KuaiRand preprocessing codes each range feature 1..n)."""
    return 1 + int(np.searchsorted(np.asarray(edges), value, side="right"))


def write_processed_seqs(cfg: ExampleConfig, path: Path) -> int:
    """Writes ``cfg.users`` SIMULATED users in GR's KuaiRand ``processed_seqs.csv`` layout; returns the row count.

    Each impression of the simulated implicit timeline is one event: ``video_id`` (catalog row), ``time_ms``,
    ``play_time_ms`` (dwell), ``duration_ms``, and ``action_weights`` = click (dwell >= 2 s) | long view
    (dwell >= 10 s) | like (the user also acted on the item explicitly).
    """
    import pandas as pd

    from dv365.core.synth import iter_users, universe_for

    synth = _synth_config(cfg)
    uni = universe_for(synth)
    rows = []
    for h in iter_users(synth, uni, np.arange(cfg.users)):
        liked = set(h.exp_item.tolist())
        dwell = h.imp_dwell.astype(np.float64)
        weights = (
            np.where(dwell >= 2.0, CLICK, 0)
            + np.where(dwell >= 10.0, LONG_VIEW, 0)
            + np.where(np.isin(h.imp_item, list(liked)), LIKE, 0)
        )
        duration = np.nan_to_num(uni.duration[h.imp_item], nan=0.0)
        n = len(h.imp_ts)
        rows.append(
            {
                "user_id": h.user_id,
                "video_id": json.dumps(h.imp_item.tolist()),
                "time_ms": json.dumps((h.imp_ts * 1000).tolist()),
                "action_weights": json.dumps(weights.astype(int).tolist()),
                "play_time_ms": json.dumps((dwell * 1000).astype(int).tolist()),
                "duration_ms": json.dumps((duration * 1000).astype(int).tolist()),
                "user_active_degree": _range_code(n, (50, 100, 200)),
                "follow_user_num_range": _range_code(len(liked), (5, 20, 50)),
                "fans_user_num_range": 1 + h.user_id % 3,
                "friend_user_num_range": 1 + h.user_id % 2,
                "register_days_range": _range_code(float(h.imp_ts[-1] - h.imp_ts[0]) / 86400 if n else 0.0, (10, 30)),
            }
        )
    pd.DataFrame(rows).to_csv(path, index=False)
    return len(rows)


def tiny_tower_config(data_url: str, checkpoint_dir: str, seed: int = 0) -> Any:
    """A dv365-train config for a 16-dim FSA user tower trained for 2 steps on CPU (seconds): 58 × 16 rows."""
    from dv365.train.config import TrainConfig

    return TrainConfig.from_dict(
        {
            "data": {
                "url": data_url,
                "spec": "kuairand",
                "hash_sizes": {"media": 499, "author": 499, "topic": 97},
                "slicer": "numpy",
            },
            "model": {
                "kind": "fsa",
                "tower": {"dim": 16, "encoder": {"num_heads": 2, "head_dim": 8, "num_layers": 1}},
                "backbone": {"embedding_dim": 8, "item_hash_size": 499, "over_arch": [16]},
            },
            "run": {"steps": 2, "batch_size": 16, "device": "cpu", "progress": False, "seed": seed},
            "checkpoint": {"dir": checkpoint_dir, "every": 2},
        }
    )


def publish_dv365(cfg: ExampleConfig, workdir: Path) -> tuple[Any, Any]:
    """Trains a tiny DV365 tower on the first ``store_users`` users, exports it and publishes it into an
    embedded LMDB store; returns the open store (an :class:`~dv365.core.lookup.EmbeddingReader`) and the
    snapshot's :class:`~dv365.core.quantize.RowFormat` (58 rows of the tower's dim)."""
    from dv365.core.snapshot import read_manifest
    from dv365.core.synth import write_synth_dataset
    from dv365.export.job import ExportConfig, run_export
    from dv365.store import open_store
    from dv365.train.trainer import Trainer

    data = workdir / "timelines"
    synth = dataclasses.replace(_synth_config(cfg), users=cfg.store_users)
    write_synth_dataset(synth, str(data), progress=False, num_buckets=2)
    train = tiny_tower_config(str(data), str(workdir / "tower"), cfg.seed)
    Trainer(train).fit()
    snapshot = workdir / "snapshot"
    run_export(
        ExportConfig(
            checkpoint=str(workdir / "tower"),
            out=str(snapshot),
            data=str(data),
            snapshot_id="gr-kuairand-example",
            device="cpu",
            progress=False,
        )
    )
    store = open_store(f"lmdb://{workdir / 'store'}")
    store.publish(str(snapshot))
    return store, read_manifest(str(snapshot)).row_format


def small_kuairand_configs(cfg: ExampleConfig) -> tuple[Any, dict[str, Any]]:
    """GR's ``kuairand-1k`` model and embedding-table configs, scaled down for CPU (dims, one STU layer, small
    tables, fp32, no dropout); the feature names, tasks and contextual features are GR's."""
    from generative_recommenders.dlrm_v3.configs import get_embedding_table_config, get_hstu_configs
    from torchrec.modules.embedding_configs import DataType

    hstu = get_hstu_configs("kuairand-1k")
    hstu = dataclasses.replace(
        hstu,
        max_seq_len=cfg.max_seq_len,
        max_num_candidates=4,
        max_num_candidates_inference=4,
        hstu_num_heads=1,
        hstu_attn_linear_dim=16,
        hstu_attn_qk_dim=16,
        hstu_attn_num_layers=1,
        hstu_embedding_table_dim=cfg.dim,
        hstu_preprocessor_hidden_dim=cfg.dim,
        hstu_transducer_embedding_dim=cfg.dim,
        hstu_input_dropout_ratio=0.0,
        hstu_linear_dropout_rate=0.0,
    )
    tables = {
        name: dataclasses.replace(
            t, num_embeddings=min(t.num_embeddings, 4096), embedding_dim=cfg.dim, data_type=DataType.FP32
        )
        for name, t in get_embedding_table_config("kuairand-1k").items()
    }
    if tables["user_id"].num_embeddings <= cfg.users:
        raise ValueError("the user_id table must hold every user id unhashed: the store is keyed by raw ids")
    return hstu, tables


def materialize_on_cpu(model: torch.nn.Module, tables: dict[str, Any]) -> None:
    """GR builds its embedding tables on the meta device for torchrec's sharding (DMP); without DMP (CPU tests)
    they are allocated on the CPU here and initialised with each table's own ``init_fn``."""
    collection = model._embedding_collection  # GR's EmbeddingCollection (meta)
    collection.to_empty(device="cpu")
    for table in tables.values():
        table.init_fn(collection.embeddings[table.name].weight)


@dataclass
class RankerResult:
    """What :func:`train_ranker` measured.

    Attributes:
        losses: the summed multitask loss of each training step.
        loss_before: mean loss over every batch before training.
        loss_after: the same after training.
        projection_grad: L1 norm of the DV365 projection's gradients, summed over the steps.
        default_grad: L1 norm of the learned default embedding's gradients, summed over the steps.
        default_moved: L1 norm of the learned default embedding after training (it starts at zero).
        absent_users: users in the batches that the store lacks.
        max_seq_len_seen: the longest sequence entering HSTU (history + candidates + every contextual token).
    """

    losses: list[float]
    loss_before: float
    loss_after: float
    projection_grad: float
    default_grad: float
    default_moved: float
    absent_users: int
    max_seq_len_seen: int


def _loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    aux_losses = model(batch.uih_features_kjt, batch.candidates_features_kjt)[2]
    total: torch.Tensor = sum(aux_losses.values())  # type: ignore[assignment]
    return total


def train_ranker(cfg: ExampleConfig, seqs_csv: Path, reader: Any, row_format: Any) -> RankerResult:
    """GR's dlrm_v3 KuaiRand setup with DV365 rows of ``row_format`` from ``reader``: a few Adam steps over the
    file's batches."""
    import fbgemm_gpu  # noqa: F401  (GR calls torch.ops.fbgemm.*)
    from generative_recommenders.common import HammerKernel
    from generative_recommenders.dlrm_v3.datasets.kuairand import DLRMv3KuaiRandDataset

    from dv365.adapters import DV365InputConfig
    from dv365.adapters.gr_dlrm import DV365DlrmHSTU, DV365Feature

    torch.manual_seed(cfg.seed)
    hstu_config, tables = small_kuairand_configs(cfg)
    # the GR user's two changes: this constructor instead of DlrmHSTU(...), and model.dataset_hstu_config below
    feature = DV365Feature(num_tokens=cfg.num_tokens, input=DV365InputConfig(row_format=row_format, use_age=False))
    model = DV365DlrmHSTU(hstu_config, tables, is_inference=False, dv365=feature, reader=reader)
    model.set_hammer_kernel(HammerKernel.PYTORCH)  # CPU
    materialize_on_cpu(model, tables)
    dataset = DLRMv3KuaiRandDataset(
        hstu_config=model.dataset_hstu_config, embedding_config=tables, seq_logs_file=str(seqs_csv), is_inference=False
    )
    ids = list(range(dataset.get_item_count()))
    dataset.load_query_samples(ids)
    kept = sorted(dataset.items_in_memory)  # GR skips users with no more events than candidates
    n_batches = -(-len(kept) // cfg.batch_size)
    kept.sort(key=lambda i: (i % n_batches, i))  # round-robin: every batch mixes stored and absent users
    batches = [dataset.get_samples(kept[i : i + cfg.batch_size]) for i in range(0, len(kept), cfg.batch_size)]
    absent = sum(
        int((~torch.from_numpy(reader.get(b.uih_features_kjt["user_id"].values().numpy()).present)).sum())
        for b in batches
    )
    seen: list[int] = []
    hook = model._hstu_transducer._input_preprocessor.register_forward_hook(
        lambda _m, _i, out: seen.append(int(out[3].max()))  # out[3]: [B] lengths after the contextual tokens
    )
    model.train()
    with torch.no_grad():
        before = float(np.mean([_loss(model, b).item() for b in batches]))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses: list[float] = []
    grads = [0.0, 0.0]  # summed over steps: the default embedding only gets gradients from absent users
    for step in range(cfg.steps):
        optimizer.zero_grad()
        loss = _loss(model, batches[step % len(batches)])
        loss.backward()
        grads[0] += sum(float(p.grad.abs().sum()) for p in model.dv365_projection.parameters() if p.grad is not None)
        default = model.dv365_input.default_embedding.grad
        grads[1] += float(default.abs().sum()) if default is not None else 0.0
        optimizer.step()
        losses.append(loss.item())
        logger.info("step %d loss %.4f", step, losses[-1])
    with torch.no_grad():
        after = float(np.mean([_loss(model, b).item() for b in batches]))
    hook.remove()
    return RankerResult(
        losses=losses,
        loss_before=before,
        loss_after=after,
        projection_grad=grads[0],
        default_grad=grads[1],
        default_moved=float(model.dv365_input.default_embedding.detach().abs().sum()),
        absent_users=absent,
        max_seq_len_seen=max(seen),
    )


def run(workdir: Path, cfg: ExampleConfig | None = None) -> RankerResult:
    """The whole example in ``workdir``: KuaiRand-layout file, DV365 store, GR training."""
    cfg = cfg or ExampleConfig()
    workdir.mkdir(parents=True, exist_ok=True)
    seqs = workdir / "processed_seqs.csv"
    write_processed_seqs(cfg, seqs)
    store, row_format = publish_dv365(cfg, workdir)
    try:
        return train_ranker(cfg, seqs, store, row_format)
    finally:
        store.close()


if __name__ == "__main__":  # pragma: no cover - the test calls run()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(Path(sys.argv[1] if len(sys.argv) > 1 else "out/gr-kuairand"))
    logger.info(
        "loss %.4f -> %.4f over %d steps; %d absent users trained with the learned default",
        result.loss_before,
        result.loss_after,
        len(result.losses),
        result.absent_users,
    )
