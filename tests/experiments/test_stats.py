"""The significance rules of the experiment reports: the seed-paired noise rule (its boundary counts as
noise) and the retrieval rule that a relative HR delta needs enough control hits in every seed."""

import math

from dv365.experiments.downstream.common import paired_stats
from dv365.experiments.downstream.retrieval import MIN_CONTROL_HITS, deltas


def test_paired_stats_flags_small_means_and_keeps_clear_ones() -> None:
    clear = paired_stats([-2.0, -2.2, -1.9])
    assert not clear["noise"] and clear["mean"] == round((-2.0 - 2.2 - 1.9) / 3, 4) and clear["n"] == 3
    assert paired_stats([1.0, -1.0, 0.5])["noise"]
    assert paired_stats([3.0])["noise"]  # a single seed is never beyond noise
    empty = paired_stats([math.nan])
    assert empty["mean"] is None and empty["noise"]


def test_paired_stats_boundary_is_noise() -> None:
    # [x, x, 0] has mean 2x/3 and std x/√3, so |mean| = 2·std/√3 exactly: the full MovieLens run's returning
    # rate>=4 HR@1 cells (+66.7 %: one control hit per seed, one more or the same with DV365) were this case.
    s = paired_stats([100.0, 100.0, 0.0])
    assert s["mean"] == 66.6667 and s["noise"]
    assert paired_stats([-100.0, -100.0, 0.0])["noise"]
    assert not paired_stats([100.0, 100.0, 10.0])["noise"]  # just past the boundary


def _run(kind: str, seed: int, hr1: float, hr10: float, count: int) -> dict:
    m = {"next_item": {"hr@1": hr1, "hr@10": hr10, "count": count}}
    return {"kind": kind, "seed": seed, "test": m}


def test_retrieval_deltas_need_enough_control_hits_in_every_seed() -> None:
    count = 1000
    runs = []
    for seed in range(3):
        # control: HR@1 = 2 hits (too few), HR@10 = 100 hits (enough; seed 2 has 40)
        runs.append(_run("baseline", seed, 2 / count, (100 if seed < 2 else 40) / count, count))
        runs.append(_run("linear", seed, 4 / count, (110 if seed < 2 else 44) / count, count))
    d = deltas(runs, "test")["linear"]
    hr1, hr10 = d["next_item@1"], d["next_item@10"]
    assert hr1["mean"] is None and hr1["noise"] and hr1["min_control_hits"] == 2  # +100 % per seed, but 2 hits
    assert hr10["min_control_hits"] == 40 and 40 >= MIN_CONTROL_HITS
    assert hr10["values"] == [10.0, 10.0, 10.0] and hr10["mean"] == 10.0 and not hr10["noise"]
    # a lower threshold reports the small-count cell again
    assert deltas(runs, "test", min_hits=2)["linear"]["next_item@1"]["mean"] == 100.0


def test_retrieval_deltas_zero_control_hits_is_not_reported() -> None:
    runs = [_run("baseline", s, 0.0, 0.05, 200) for s in range(3)] + [
        _run("gatenet", s, 0.01, 0.06, 200) for s in range(3)
    ]
    d = deltas(runs, "test")["gatenet"]
    assert d["next_item@1"]["mean"] is None and d["next_item@1"]["min_control_hits"] == 0
    assert abs(d["next_item@10"]["mean"] - 20.0) < 1e-9


def test_retrieval_interval_over_users_decides_a_gain_a_few_users_make() -> None:
    """+25 % HR@10 in every seed (seed rule: beyond noise), but the extra hits come from 2 of 50 users: the 95 %
    interval over users reaches 0 or below, so the cell is within noise; the same gain spread over every
    user stays beyond noise. The per-user hits recompute the run's HR exactly."""
    from dv365.experiments.downstream.common import beyond_noise, fmt_stat
    from dv365.experiments.downstream.retrieval import KS, hr_intervals

    users = 50
    assert KS == (1, 10)

    def run(kind: str, seed: int, hits10: list[int]) -> dict:
        count = [20] * users
        per = {"ids": list(range(users)), "count": count, "hits": [[h // 4, h] for h in hits10]}
        tot = sum(count)
        m = {"next_item": {"hr@1": sum(h // 4 for h in hits10) / tot, "hr@10": sum(hits10) / tot, "count": tot}}
        return {"kind": kind, "seed": seed, "test": m, "test_users": {"next_item": per}}

    base = [4] * users  # 200 hits
    few = [4] * users
    few[0] = few[1] = 4 + 25  # +50 hits from two users
    spread = [5] * users  # +50 hits from everyone
    for variant, expect in ((few, False), (spread, True)):
        runs = [run("baseline", s, base) for s in range(3)] + [run("linear", s, variant) for s in range(3)]
        cell = deltas(runs, "test")["linear"]["next_item@10"]
        assert cell["mean"] == 25.0 and not cell["noise"]  # every seed +25 %: the seed rule says beyond noise
        assert (cell["users"]["low"] > 0) is expect and cell["users"]["groups"] == users
        assert beyond_noise(cell) is expect and fmt_stat(cell).endswith("~") is not expect
    iv = hr_intervals(
        [run("linear", 0, spread)["test_users"]["next_item"]], [run("baseline", 0, base)["test_users"]["next_item"]]
    )
    assert iv is not None and iv[1]["low"] <= 25.0 <= iv[1]["high"]
