"""Eq. 7-8 loss and Eq. 12 normalized entropy on hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dv365.train.errors import TrainConfigError
from dv365.train.losses import MultiTaskLoss, TaskSpec, bce
from dv365.train.metrics import (
    GroupSums,
    MultiTaskMeter,
    binary_entropy,
    bootstrap_delta_pct,
    normalized_entropy,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_eq7_bce_on_probabilities() -> None:
    # -(1/2) [1*ln 0.9 + 1*ln(1 - 0.2)]
    got = bce(torch.tensor([0.9, 0.2], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert got.item() == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2, rel=1e-12)
    assert got.item() == pytest.approx(0.16425203348, rel=1e-9)


def test_eq8_total_is_sum_of_bce_plus_a_times_mse() -> None:
    tasks = [
        TaskSpec("label_like"),
        TaskSpec("label_follow"),
        TaskSpec("label_watch_time", "regression", weight=0.5, transform="log1p"),
    ]
    loss_fn = MultiTaskLoss(tasks)
    out = torch.tensor([[logit(0.9), logit(0.5), 1.0], [logit(0.2), logit(0.25), 2.0]], dtype=torch.float64)
    labels = torch.tensor(
        [
            [1.0, 0.0, math.e - 1],  # log1p(e - 1) = 1: squared error 0
            [0.0, 1.0, math.e**3 - 1],
        ],
        dtype=torch.float64,
    )  # log1p -> 3: squared error 1
    total, per_task = loss_fn(out, labels)
    like = -(math.log(0.9) + math.log(0.8)) / 2
    follow = -(math.log(0.5) + math.log(0.25)) / 2
    mse = (0.0 + 1.0) / 2
    assert per_task.tolist() == pytest.approx([like, follow, mse], rel=1e-9)
    assert total.item() == pytest.approx(like + follow + 0.5 * mse, rel=1e-9)


def test_eq12_ne_is_one_for_the_base_rate_predictor_and_hand_value_otherwise() -> None:
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert binary_entropy(0.25) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert normalized_entropy(torch.full((4,), logit(0.25)), labels) == pytest.approx(1.0, rel=1e-9)
    probs = [0.8, 0.1, 0.2, 0.1]
    bce_ = -(math.log(0.8) + math.log(0.9) + math.log(0.8) + math.log(0.9)) / 4
    ne = normalized_entropy(torch.tensor([logit(p) for p in probs], dtype=torch.float64), labels)
    assert ne == pytest.approx(bce_ / binary_entropy(0.25), rel=1e-9)
    assert ne == pytest.approx(0.29209, abs=1e-5)  # 0.164252 / 0.562335
    assert math.isnan(normalized_entropy(torch.zeros(3), torch.zeros(3)))  # no positives: undefined


def test_meter_streams_batches_and_uses_the_evaluated_base_rate() -> None:
    tasks = [TaskSpec("label_like"), TaskSpec("label_watch_time", "regression", transform="log1p")]
    torch.manual_seed(0)
    out = torch.randn(10, 2)
    labels = torch.stack([(torch.rand(10) < 0.3).float(), torch.rand(10) * 60], dim=1)
    labels[0, 0] = 1.0
    meter = MultiTaskMeter(tasks)
    meter.update(out[:4], labels[:4])
    meter.update(out[4:], labels[4:])
    res = meter.compute()
    assert res["like"]["ne"] == pytest.approx(normalized_entropy(out[:, 0], labels[:, 0]), rel=1e-9)
    assert res["like"]["base_rate"] == pytest.approx(labels[:, 0].mean().item())
    expect_mse = ((out[:, 1].double() - torch.log1p(labels[:, 1].double())) ** 2).mean().item()
    assert res["watch_time"]["mse"] == pytest.approx(expect_mse, rel=1e-9)
    assert meter.mean_ne() == pytest.approx(res["like"]["ne"])
    y = torch.log1p(labels[:, 1].double())
    assert res["watch_time"]["label_var"] == pytest.approx(y.var(unbiased=False).item(), rel=1e-9)
    assert res["watch_time"]["nmse"] == pytest.approx(expect_mse / y.var(unbiased=False).item(), rel=1e-9)
    assert meter.mean_normalized_loss() == pytest.approx((res["like"]["ne"] + res["watch_time"]["nmse"]) / 2)


def test_group_sums_recompute_the_metrics_under_any_user_weights() -> None:
    """Per-user sums: weights of ones give compute()'s NE / MSE; weights (2, 0, 1) give the metrics of the rows
    of user 7 twice and user 9 once; the bootstrap interval of a clearly better model is below 0 and a model
    equal to the baseline gets an interval around 0."""
    tasks = [TaskSpec("label_like"), TaskSpec("label_watch_time", "regression", transform="log1p")]
    torch.manual_seed(0)
    out = torch.randn(12, 2)
    labels = torch.stack([(torch.rand(12) < 0.4).float(), torch.rand(12) * 60], dim=1)
    labels[:2, 0] = torch.tensor([1.0, 0.0])
    users = np.array([7, 8, 9, 7, 8, 9, 7, 8, 9, 7, 8, 9])
    meter = MultiTaskMeter(tasks)
    meter.update(out[:5], labels[:5], users[:5])
    meter.update(out[5:], labels[5:], users[5:])
    res, gs = meter.compute(), meter.group_sums()
    assert gs is not None and list(gs.ids) == [7, 8, 9] and list(gs.count) == [4, 4, 4]
    plain = gs.metric(np.ones((1, 3)))[0]
    assert plain[0] == pytest.approx(res["like"]["ne"], rel=1e-9)
    assert plain[1] == pytest.approx(res["watch_time"]["mse"], rel=1e-9)
    keep = np.isin(users, [7, 9])
    rows = np.concatenate([np.flatnonzero(users == 7)] * 2 + [np.flatnonzero(users == 9)])
    ref = MultiTaskMeter(tasks)
    ref.update(out[rows], labels[rows])
    want = ref.compute()
    got = gs.metric(np.array([[2.0, 0.0, 1.0]]))[0]
    assert keep.sum() == 8 and got[0] == pytest.approx(want["like"]["ne"], rel=1e-9)
    assert got[1] == pytest.approx(want["watch_time"]["mse"], rel=1e-9)
    assert MultiTaskMeter(tasks).group_sums() is None
    with pytest.raises(ValueError, match="groups"):
        meter.update(out[:2], labels[:2], users[:3])

    rng = np.random.default_rng(0)
    n = 400
    u = np.repeat(np.arange(100), 4)
    y = (rng.random(n) < 0.3).astype(np.float32)
    base_logit = torch.zeros(n, 1) + math.log(0.3 / 0.7)
    good_logit = torch.from_numpy(np.where(y > 0, 1.0, -2.0).astype(np.float32))[:, None]

    def sums(logits: torch.Tensor) -> GroupSums:
        m = MultiTaskMeter([TaskSpec("label_like")])
        m.update(logits, torch.from_numpy(y)[:, None], u)
        gs = m.group_sums()
        assert gs is not None
        return gs

    better = bootstrap_delta_pct([sums(good_logit)] * 2, [sums(base_logit)] * 2, resamples=500)
    assert better["tasks"][0]["high"] < 0 and better["tasks"][0]["groups"] == 100
    assert better["mean"] == better["tasks"][0]  # one task: the mean over tasks is that task
    same = bootstrap_delta_pct([sums(base_logit)], [sums(base_logit)], resamples=200)["tasks"][0]
    assert same["low"] == pytest.approx(0.0, abs=1e-9) and same["high"] == pytest.approx(0.0, abs=1e-9)
    back = GroupSums.from_json(json.loads(json.dumps(sums(good_logit).to_json())))
    assert np.array_equal(back.metric(np.ones((1, 100))), sums(good_logit).metric(np.ones((1, 100))))
    with pytest.raises(ValueError, match="different users"):
        other = sums(base_logit)
        other.ids = other.ids + 1
        bootstrap_delta_pct([sums(base_logit)], [other])


def test_normalized_loss_is_one_for_the_mean_predictor() -> None:
    """NE and MSE / Var(label) both read 1.0 for a model that predicts the evaluated data's mean label."""
    tasks = [TaskSpec("label_like"), TaskSpec("label_watch_time", "regression", transform="log1p")]
    g = torch.Generator().manual_seed(1)
    labels = torch.stack([(torch.rand(500, generator=g) < 0.2).float(), torch.rand(500, generator=g) * 60], 1)
    p = labels[:, 0].double().mean()
    out = torch.stack(
        [
            torch.full((500,), math.log(p / (1 - p))),
            torch.full((500,), torch.log1p(labels[:, 1].double()).mean().item()),
        ],
        1,
    )
    meter = MultiTaskMeter(tasks)
    meter.update(out, labels)
    assert meter.mean_normalized_loss() == pytest.approx(1.0, rel=1e-6)
    constant = MultiTaskMeter(tasks[1:])  # constant labels: the normalised MSE is undefined, left out
    constant.update(torch.zeros(4, 1), torch.ones(4, 1))
    assert math.isnan(constant.compute()["watch_time"]["nmse"]) and math.isnan(constant.mean_normalized_loss())


def test_task_spec_validation() -> None:
    with pytest.raises(TrainConfigError, match="kind"):
        TaskSpec("label_x", kind="ranking")
    with pytest.raises(TrainConfigError, match="binary tasks take no transform"):
        TaskSpec("label_x", transform="log1p")
    assert TaskSpec("label_watch_time").name == "watch_time"
