"""RecD-style dedup: keys = identical slices; the tower runs on U < B rows; outputs, gradients and training match."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from dv365.benchmarks.train import write_impression_dataset
from dv365.core.timeline import Timelines, take_rows
from dv365.train.config import TrainConfig
from dv365.train.dedup import dedup_rows, grouped_permutation, slice_keys
from dv365.train.trainer import Trainer

MakeConfig = Callable[..., TrainConfig]
DAY = 86_400


def _bags(trainer: Trainer, urow: np.ndarray, ts: np.ndarray) -> list[list[tuple[list[int], list[float]]]]:
    """Per row, every feature's (ids, weights) from the slicer, without dedup."""
    src = trainer.source
    tl = src.timelines
    sub = Timelines(tl.user_ids[urow], take_rows(tl.explicit, urow), take_rows(tl.implicit, urow), tl.vocab)
    sliced = src.slicer.slice(sub, ts)
    return [[(sliced.bag(k, r)[0].tolist(), sliced.bag(k, r)[1].tolist()) for k in sliced.keys] for r in range(len(ts))]


def test_rows_with_equal_keys_have_identical_slices(make_config: MakeConfig) -> None:
    trainer = Trainer(make_config("keys"))
    src = trainer.source
    ex = src.timelines.explicit
    t_last = int(ex.ts[ex.offsets[1] - 1])  # user row 0's last explicit event
    # a cut-off 1 s after that event and one 1 s later again: no event in between -> the same slice
    # (unless an implicit event sits exactly there); 10 days earlier: fewer events, another key
    ts = np.array([t_last + DAY + 1, t_last + DAY + 2, t_last + DAY - 10 * DAY, t_last + DAY + 1])
    urow = np.array([0, 0, 0, 1])
    keys = slice_keys(src.timelines, urow, ts, src.spec)
    first, inverse = dedup_rows(keys)
    assert np.array_equal(keys[first[inverse]], keys)
    assert (keys[0] == keys[1]).all() and not (keys[0] == keys[2]).all() and not (keys[0] == keys[3]).all()
    assert first.tolist() == [0, 2, 3] and inverse.tolist() == [0, 0, 1, 2]  # first-occurrence order
    bags = _bags(trainer, urow, ts)
    assert bags[0] == bags[1] and bags[0] != bags[2]
    # every pair of rows with equal keys over many real request rows slices identically
    rows = src.train_rows[:60]
    u = np.searchsorted(src._users, src.requests.user_id[rows])
    t = src.requests.ts[rows] // (5 * DAY) * (5 * DAY)  # coarse times: many coinciding cut-offs
    k = slice_keys(src.timelines, u, t, src.spec)
    first, inverse = dedup_rows(k)
    assert len(first) < len(rows)
    b = _bags(trainer, u, t)
    for r in range(len(rows)):
        assert b[r] == b[first[inverse[r]]]


def test_dedup_batch_gives_the_same_outputs_and_gradients_on_fewer_rows(make_config: MakeConfig) -> None:
    trainer = Trainer(make_config("grads", **{"model.tower.encoder.dropout": 0.0}))
    src = trainer.source
    rows = np.repeat(src.train_rows[[3, 40, 77, 100]], [4, 1, 3, 4])  # B = 12 rows, 4 distinct slices
    rows = rows[np.random.default_rng(0).permutation(len(rows))]
    plain, dedup = src.collate(rows, dedup=False), src.collate(rows, dedup=True)
    assert plain.user_kjt.stride() == 12 and dedup.user_kjt.stride() == 4  # sliced once per unique row
    seen: list[int] = []
    hook = trainer.model.user_tower.arch.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))

    def run(batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trainer.model.zero_grad(set_to_none=True)
        out = trainer.model(batch.user_kjt, batch.item_kjt, batch.dense)
        trainer.loss_fn(out, batch.labels)[0].backward()
        grads = {
            n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
            for n, p in trainer.model.named_parameters()
            if p.grad is not None
        }
        return out.detach(), grads

    out_a, g_a = run(plain)
    out_b, g_b = run(dedup)
    hook.remove()
    assert seen == [12, 4]  # pooling + FSA ran on B rows, then on U rows
    assert out_b.shape == (12, len(trainer.tasks))
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    assert g_a.keys() == g_b.keys() and any(".embedding_bags." in n for n in g_a)
    for n in g_a:
        torch.testing.assert_close(g_b[n], g_a[n], rtol=1e-4, atol=1e-6, msg=n)


def test_grouped_permutation_keeps_a_users_consecutive_requests_together() -> None:
    users = np.array([5, 9, 5, 5, 9, 5, 5, 7])
    ts = np.array([1, 1, 2, 3, 2, 4, 5, 1])
    perm = grouped_permutation(users, ts, 2, np.random.default_rng(1))
    assert sorted(perm.tolist()) == list(range(8))
    groups = {(0, 2), (3, 5), (6,), (1, 4), (7,)}  # user 5 by time: rows 0,2 | 3,5 | 6; user 9: 1,4
    found, i = set(), 0
    while i < len(perm):
        g = next(g for g in groups if g[0] == perm[i])
        assert tuple(perm[i : i + len(g)].tolist()) == g
        found.add(g)
        i += len(g)
    assert found == groups
    again = grouped_permutation(users, ts, 2, np.random.default_rng(1))
    assert np.array_equal(perm, again)


@pytest.fixture(scope="module")
def impressions_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SIMULATED: 8 users x ~500 events, 6 requests each shown with 4 items (4 rows per user slice)."""
    return write_impression_dataset(
        str(tmp_path_factory.mktemp("imp") / "data"), users=8, mean_events=500, requests_per_user=6, k=4, seed=5
    )


def test_training_with_dedup_matches_training_without_and_resumes_exactly(
    impressions_url: str, tmp_path: Path, make_config: MakeConfig
) -> None:
    # SGD: Adagrad / Adam normalise each gradient entry, so float-rounding differences of near-zero gradients
    # (summation order differs with dedup) could flip an update's sign; SGD keeps them at rounding size
    over = {
        "data.url": impressions_url,
        "data.group_by_user": 4,
        "run.steps": 4,
        "run.log_every": 2,
        "data.eval_fraction": 0.1,
        "optim.dense": "sgd",
        "optim.sparse": "sgd",
        "optim.lr": 0.05,
    }

    def cfg(name: str, **extra: object) -> TrainConfig:
        return make_config(name, **{**over, **extra})

    on, off = Trainer(cfg("on")), Trainer(cfg("off", **{"data.dedup": False}))
    assert on.batches[0].user_kjt.stride() == 4 and off.batches[0].user_kjt.stride() == 16  # 4 users x 4 rows
    on.fit()
    off.fit()
    for (name, a), b in zip(on.model.state_dict().items(), off.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)
    # resume with dedup + grouping stays bit-exact
    first = Trainer(cfg("resumed", **{"run.steps": 2}))
    first.fit()
    resumed = Trainer(cfg("resumed"))
    assert resumed.step == 2
    resumed.fit()
    for (name, a), b in zip(on.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
