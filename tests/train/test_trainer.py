"""Training: the loss goes down, resume is bit-exact, warm start loads the tower, device-agnostic, options run."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import torch

from dv365.train.checkpoint import latest_checkpoint, load_checkpoint, load_user_tower
from dv365.train.config import TrainConfig
from dv365.train.errors import CheckpointError, TrainConfigError
from dv365.train.trainer import Trainer

MakeConfig = Callable[..., TrainConfig]


def _mean_loss(trainer: Trainer, steps: range) -> float:
    trainer.model.eval()
    with torch.no_grad():
        losses = [
            trainer.loss_fn(trainer.model(b.user_kjt, b.item_kjt, b.dense), b.labels)[0].item()
            for b in (trainer.batches[s].to(trainer.device) for s in steps)
        ]
    trainer.model.train()
    return float(np.mean(losses))


def test_training_on_tiny_synth_data_decreases_the_loss(make_config: MakeConfig) -> None:
    # the first 32 requests by time (2 batches): 10 epochs in 20 steps, enough to fit them
    trainer = Trainer(make_config("fit", **{"run.steps": 20, "data.train_range": [0.0, 0.21]}))
    probe = range(trainer.batches.batches_per_epoch)  # one epoch of training batches, fixed
    assert len(probe) == 2
    before = _mean_loss(trainer, probe)
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.fit()
    after = _mean_loss(trainer, probe)
    assert result.steps == 20 and result.start_step == 0
    assert after < 0.7 * before, (before, after)
    moved = {k for k, v in trainer.model.state_dict().items() if not torch.equal(v, init[k])}
    assert any(k.startswith("user_tower.pooling.ebc.embedding_bags.") for k in moved)  # the tower learns too
    assert any(k.startswith("user_tower.arch.funnel.") for k in moved) and "backbone.token_proj.weight" in moved
    assert result.eval["examples"] == len(trainer.source.eval_rows)
    assert set(result.eval["tasks"]) >= {"like", "long_view", "watch_time"}
    assert (trainer.ckpt_dir / "metrics.json").exists() and (trainer.ckpt_dir / "train_log.jsonl").exists()


def _assert_same_state(a: Trainer, b: Trainer) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for name, opt in a.optimizers.items():
        for (ka, va), (_kb, vb) in zip(
            opt.state_dict()["state"].items(), b.optimizers[name].state_dict()["state"].items()
        ):
            for field in va:
                x, y = va[field], vb[field]
                assert torch.equal(x, y) if torch.is_tensor(x) else x == y, (name, ka, field)


def test_resume_from_a_checkpoint_is_bit_identical_to_training_straight(make_config: MakeConfig) -> None:
    over = {"run.steps": 8, "model.tower.encoder.dropout": 0.1, "run.log_every": 3}  # dropout: RNG state matters
    straight = Trainer(make_config("straight", **over))
    straight.fit()

    first = Trainer(make_config("resumed", **{**over, "run.steps": 4}))
    first.fit()
    assert latest_checkpoint(first.ckpt_dir).name == "step_000000004.pt"
    del first  # "kill": nothing of that process state survives but the checkpoint folder
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)
    resumed = Trainer(make_config("resumed", **over))
    assert resumed.step == 4 and resumed.resumed_from is not None
    result = resumed.fit()
    assert result.start_step == 4 and result.steps == 8
    _assert_same_state(straight, resumed)
    ck_a = load_checkpoint(straight.ckpt_dir)
    ck_b = load_checkpoint(resumed.ckpt_dir)
    assert torch.equal(ck_a["rng"]["torch"], ck_b["rng"]["torch"])  # same RNG stream after 8 steps
    assert ck_b["epoch"] * resumed.batches.batches_per_epoch + ck_b["batch_in_epoch"] == 8
    log_a = (straight.ckpt_dir / "train_log.jsonl").read_text().splitlines()
    log_b = (resumed.ckpt_dir / "train_log.jsonl").read_text().splitlines()
    assert log_a == log_b  # running loss / NE continue across the restart too


def test_resume_refuses_a_checkpoint_of_another_model(make_config: MakeConfig) -> None:
    Trainer(make_config("x", **{"run.steps": 1})).fit()
    with pytest.raises(CheckpointError, match="model"):
        Trainer(make_config("x", **{"run.steps": 2, "model.kind": "lce"}))


def test_warm_start_loads_the_user_tower_and_trains_on_newer_data(make_config: MakeConfig) -> None:
    v1 = Trainer(make_config("v1", **{"run.steps": 3, "data.train_range": [0.0, 0.5]}))
    v1.fit()
    v2 = Trainer(
        make_config("v2", **{"run.steps": 6, "data.train_range": [0.5, 1.0], "checkpoint.warm_start": str(v1.ckpt_dir)})
    )
    assert v2.warm_started_from == str(latest_checkpoint(v1.ckpt_dir))
    s1, s2 = v1.model.state_dict(), v2.model.state_dict()
    tower_keys = [k for k in s1 if k.startswith("user_tower.")]
    assert any(".embedding_bags." in k for k in tower_keys) and any(".arch." in k for k in tower_keys)
    for k in tower_keys:
        assert torch.equal(s1[k], s2[k]), k
    assert not torch.equal(
        s1["backbone.over_arch._mlp.0._linear.weight"], s2["backbone.over_arch._mlp.0._linear.weight"]
    )
    assert set(v2.source.train_rows).isdisjoint(v1.source.train_rows)  # newer data
    assert v2.fit().warm_started_from is not None
    # a tower that does not fit is a clear error
    with pytest.raises(CheckpointError, match="shape"):
        Trainer(make_config("v3", **{"model.tower.dim": 4, "checkpoint.warm_start": str(v1.ckpt_dir)}))
    # the exported part loads alone from the checkpoint
    tower = load_user_tower(v2.ckpt_dir)
    batch = v2.batches[0]
    assert tower(batch.user_kjt).shape == (16, 58, 8)


def test_baseline_trains_without_a_tower_or_timelines(make_config: MakeConfig) -> None:
    trainer = Trainer(make_config("base", **{"model.kind": "baseline", "run.steps": 2}))
    assert trainer.model.user_tower is None and trainer.source.timelines is None
    assert not any(k.startswith("user_tower") for k in trainer.model.state_dict())
    assert trainer.fit().steps == 2
    with pytest.raises(TrainConfigError, match="user_tower"):
        Trainer(make_config("base2", **{"model.kind": "baseline", "checkpoint.warm_start": str(trainer.ckpt_dir)}))


@pytest.mark.parametrize(
    "over",
    [
        {"model.backbone.interaction": "dcn"},
        {"model.backbone.token_mode": "flatten"},
        {"model.kind": "tl_t", "optim.sparse": "sparse_adam", "optim.dense": "adamw", "optim.grad_clip": 1.0},
        {"model.kind": "pass_thru", "optim.sparse": "sgd"},
    ],
    ids=["dcn", "flatten", "tl_t-sparse_adam", "pass_thru-sgd"],
)
def test_backbone_and_optimizer_options_train(make_config: MakeConfig, over: dict) -> None:
    result = Trainer(make_config("opt", **{"run.steps": 2, **over})).fit()
    assert np.isfinite(result.train_loss)


def test_runs_on_cpu(make_config: MakeConfig) -> None:
    trainer = Trainer(make_config("cpu", **{"run.steps": 1}), device="cpu")
    assert trainer.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())
    assert trainer.fit().steps == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_runs_on_cuda(make_config: MakeConfig) -> None:
    trainer = Trainer(make_config("cuda", **{"run.steps": 2}), device="cuda")
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    result = trainer.fit()
    assert np.isfinite(result.train_loss) and result.eval["examples"] > 0


def test_config_errors_name_the_key(make_config: MakeConfig) -> None:
    with pytest.raises(TrainConfigError, match=r"config.model: unknown keys \['towr'\]"):
        make_config("e", **{"model.towr": {}})
    with pytest.raises(TrainConfigError, match="run.batch_size"):
        make_config("e", **{"run.batch_size": 0})
    with pytest.raises(TrainConfigError, match="expected int"):
        make_config("e", **{"run.steps": "many"})
    with pytest.raises(TrainConfigError, match="hash_sizes.media: expected int"):
        make_config("e", **{"data.hash_sizes": {"media": "big"}})
    cfg = make_config(
        "e",
        **{
            "tasks": [
                {"label": "label_like"},
                {"label": "label_watch_time", "kind": "regression", "transform": "log1p", "weight": 0.25},
            ]
        },
    )
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # what a checkpoint stores reads back equal


def test_dataloader_workers_deliver_the_same_batches_as_the_training_process(make_config: MakeConfig) -> None:
    trainer = Trainer(make_config("workers", **{"run.num_workers": 1}))
    for step, batch in zip(range(3, 5), trainer._batches(3, 5)):
        direct = trainer.batches[step]
        assert torch.equal(batch.labels, direct.labels) and torch.equal(batch.dense, direct.dense)
        assert torch.equal(batch.user_kjt.values(), direct.user_kjt.values())
        assert torch.equal(batch.user_kjt.weights(), direct.user_kjt.weights())
        assert torch.equal(batch.item_kjt.lengths(), direct.item_kjt.lengths())
