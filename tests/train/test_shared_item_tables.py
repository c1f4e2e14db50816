"""``model.backbone.share_item_tables``: the target item's ids read in the user tower's history tables, and
the CSR bag sums the grouped pooling uses (checked against ``F.embedding_bag``, gradients included)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dv365.train.backbone import ITEM_FEATURES, SHARED_ITEM_FEATURES, BackboneConfig, MultiTaskDLRM
from dv365.train.config import DataConfig, TrainConfig
from dv365.train.data import ExampleSource, load_spec
from dv365.train.errors import TrainConfigError
from dv365.train.losses import TaskSpec
from dv365.train.model import build_model
from dv365.train.pooling import bag_sums, shared_item_tables, use_sparse_gradients

from .conftest import TINY_HASH

TASKS = (TaskSpec("label_like"), TaskSpec("label_long_view"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bag_sums_equal_embedding_bag_values_and_gradients(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    U, D, bags = 37, 5, 23
    lengths = torch.randint(0, 6, (bags,), generator=g)
    lengths[3] = 0  # empty bags give zeros
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    index = torch.randint(0, U, (int(lengths.sum()),), generator=g)
    weights = torch.rand(len(index), generator=g)
    rows = torch.randn(U, D, generator=g, requires_grad=True)
    up = torch.randn(bags, D, generator=g)
    ref = F.embedding_bag(index, rows, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True)
    (grad_ref,) = torch.autograd.grad((ref * up).sum(), rows)
    out = bag_sums(rows, index, offsets, weights)
    (grad,) = torch.autograd.grad((out * up).sum(), rows)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, grad_ref)


def _spec():  # type: ignore[no-untyped-def]
    return load_spec(DataConfig(spec="kuairand", hash_sizes=TINY_HASH))


def test_shared_item_tables_main_picks_one_table_per_id_type_all_every_table() -> None:
    spec = _spec()
    main = shared_item_tables(spec, "main")
    assert main == [("media", "explicit_pos_media"), ("author", "explicit_pos_author"), ("topic", "explicit_pos_topic")]
    every = shared_item_tables(spec, "all")
    assert every == [(t.id_type, t.name) for t in spec.tables.values()] and len(every) == 18
    assert shared_item_tables(spec, "none") == []


def test_config_accepts_true_as_main_and_rejects_unknown_modes() -> None:
    assert BackboneConfig(share_item_tables=True).share_item_tables == "main"  # type: ignore[arg-type]
    assert BackboneConfig(share_item_tables=False).share_item_tables == "none"  # type: ignore[arg-type]
    cfg = TrainConfig.from_dict({"data": {"url": "x"}, "model": {"backbone": {"share_item_tables": "all"}}})
    assert cfg.model.backbone.share_item_tables == "all"
    with pytest.raises(TrainConfigError, match="share_item_tables"):
        BackboneConfig(share_item_tables="some")


def test_item_kjt_carries_the_ids_hashed_like_the_history(synth_url: str) -> None:
    cfg = DataConfig(url=synth_url, spec="kuairand", hash_sizes=TINY_HASH)
    src = ExampleSource(cfg, TASKS, load_spec(cfg), 1009)
    rows = np.arange(6)
    item = src.collate(rows).item_kjt.to_dict()
    assert list(item) == [*ITEM_FEATURES, *SHARED_ITEM_FEATURES]
    req = src.requests
    assert item["shared.item.media"].values().tolist() == (req.media_id[rows] % TINY_HASH["media"]).tolist()
    assert item["item.media"].values().tolist() == (req.media_id[rows] % 1009).tolist()
    topics = req.topic_values[req.topic_offsets[0] : req.topic_offsets[6]] % TINY_HASH["topic"]
    assert item["shared.item.topic"].values().tolist() == topics.tolist()
    assert item["shared.item.topic"].lengths().tolist() == item["item.topic"].lengths().tolist()
    assert item["shared.item.author"].lengths().tolist() == item["item.author"].lengths().tolist()


@pytest.fixture
def shared_model(make_config: Callable[..., TrainConfig]):  # type: ignore[no-untyped-def]
    cfg = make_config(**{"model.backbone.share_item_tables": "all"})
    src = ExampleSource(cfg.data, TASKS, load_spec(cfg.data), cfg.model.backbone.item_hash_size)
    torch.manual_seed(0)
    model = build_model(cfg.model, load_spec(cfg.data), TASKS, 6)
    return cfg, src, model


def test_the_backbone_reads_the_item_in_the_towers_tables(shared_model) -> None:  # type: ignore[no-untyped-def]
    cfg, src, model = shared_model
    own = set(model.backbone.sparse_arch.embedding_bag_collection.embedding_bags)
    assert own == {"item_media_type", "item_surface"}  # no own media / author / topic tables
    assert len(model.backbone.shared_lookups) == 18
    batch = src.collate(np.arange(8))
    pooling = model.user_tower.pooling
    lookups = model.backbone.shared_lookups
    emb = pooling.item_embeddings(batch.item_kjt, lookups)  # [B, 18, D]
    assert emb.shape == (8, 18, cfg.model.tower.dim)
    # the same weights: the mean of the tower table's rows of the target's hashed ids
    kjt = batch.item_kjt.to_dict()
    for s, (id_type, table) in enumerate(lookups):
        jt = kjt[f"shared.item.{id_type}"]
        w = pooling.ebc.embedding_bags[table].weight
        for b, (lo, hi) in enumerate(zip(jt.offsets()[:-1].tolist(), jt.offsets()[1:].tolist())):
            want = w[jt.values()[lo:hi]].mean(0) if hi > lo else torch.zeros(w.shape[1])
            torch.testing.assert_close(emb[b, s], want)
    # changing the tower table's row of the first request's topic changes the model's prediction for it
    model.eval()
    with torch.no_grad():  # the heads start at zero weight (a constant predictor): give them some
        for head in model.backbone.heads.values():
            head.weight.normal_()
    before = model(batch.user_kjt, batch.item_kjt, batch.dense).detach()
    topic_row = int(kjt["shared.item.topic"].values()[0])
    with torch.no_grad():
        pooling.ebc.embedding_bags["implicit_all_topic"].weight[topic_row] += 1.0
    after = model(batch.user_kjt, batch.item_kjt, batch.dense).detach()
    assert not torch.allclose(before[0], after[0])


def test_gradients_reach_the_tower_tables_through_the_item_path(shared_model) -> None:  # type: ignore[no-untyped-def]
    _, src, model = shared_model
    use_sparse_gradients(model)
    batch = src.collate(np.arange(8))
    pooling = model.user_tower.pooling
    emb = pooling.item_embeddings(batch.item_kjt, model.backbone.shared_lookups)
    emb.sum().backward()
    media = batch.item_kjt.to_dict()["shared.item.media"].values()
    for table in ("explicit_pos_media", "implicit_all_media"):
        grad = pooling.ebc.embedding_bags[table].weight.grad
        assert grad is not None and grad.is_sparse
        dense = grad.to_dense()
        touched = set(torch.nonzero(dense.abs().sum(1)).flatten().tolist())
        assert touched == set(media.tolist())  # exactly the target items' rows, each got d(mean)/d(row)
    # and the whole model trains: a joint step moves the item's row of a tower table
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # the heads start at zero weight (no gradient flows back yet): give them some
        for head in model.backbone.heads.values():
            head.weight.normal_()
    out = model(batch.user_kjt, batch.item_kjt, batch.dense)
    out.sum().backward()
    grad = pooling.ebc.embedding_bags["implicit_all_topic"].weight.grad
    assert grad is not None and grad.coalesce().values().abs().sum() > 0


def test_the_baseline_keeps_its_own_item_tables(make_config: Callable[..., TrainConfig]) -> None:
    cfg = make_config(**{"model.backbone.share_item_tables": "all", "model.kind": "baseline"})
    model = build_model(cfg.model, None, TASKS, 6)
    own = set(model.backbone.sparse_arch.embedding_bag_collection.embedding_bags)
    assert own == {f.replace(".", "_") for f in ITEM_FEATURES}
    with pytest.raises(TrainConfigError, match="needs a user tower"):
        MultiTaskDLRM(cfg.model.backbone, 6, TASKS, None, [("media", "implicit_all_media")])
