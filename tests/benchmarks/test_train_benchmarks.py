"""`dv365 bench fsa | dedup | tower --quick --json` run through the CLI and report consistent figures."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from dv365.core.cli import main


def _bench(name: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["bench", name, "--quick", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["benchmark"] == name and result["machine"]["cpus"] >= 1
    return result


def test_bench_fsa(capsys: pytest.CaptureFixture[str]) -> None:
    r = _bench("fsa", capsys)
    assert r["N"] == 201 and r["n_out"] == 58
    assert r["fsa_train_qps"] > 0 and r["tl_t_same_depth_train_qps"] > 0 and r["tl_t_default_train_qps"] > 0
    assert r["fsa_over_tl_t_same_depth"] == pytest.approx(r["fsa_train_qps"] / r["tl_t_same_depth_train_qps"])
    assert r["fsa_params"] < r["tl_t_default_params"] < r["tl_t_same_depth_params"]  # the funnel is smaller
    assert r["tl_t_same_depth_layers"] == 3 and isinstance(r["meets_target"], bool)


def test_bench_dedup(capsys: pytest.CaptureFixture[str]) -> None:
    r = _bench("dedup", capsys)
    assert "SIMULATED" in r["data"] and r["rows_per_user"] == 4
    assert r["user_rows_per_batch_no_dedup"] == r["batch_size"]
    assert r["user_rows_per_batch_dedup"] == r["batch_size"] / 4  # the tower ran once per user slice
    assert r["speedup"] == pytest.approx(r["qps_dedup"] / r["qps_no_dedup"])
    assert r["speedup"] > 1.0  # 4x fewer slices and tower rows: faster even on a busy machine
    assert 0.0 < r["natural_unique_fraction"] <= 1.0


def test_bench_tower(capsys: pytest.CaptureFixture[str]) -> None:
    r = _bench("tower", capsys)
    assert "SIMULATED" in r["data"] and r["features"] == 201
    assert r["bytes_per_user_kjt_ids"] == pytest.approx(r["kjt_ids_per_user"] * r["D"] * 4)
    assert r["unique_rows_per_user_in_batch"] <= r["kjt_ids_per_user"]
    bw = r["gather_bandwidth"]
    assert bw["index_select_GBps"] > 0 and bw["embedding_bag_GBps"] > 0
    for key in (
        "roofline_fraction_pooling_plus_fsa",
        "roofline_fraction_pooling_plus_fsa_grouped",
        "roofline_fraction_pooling",
        "roofline_fraction_torchrec_ebc",
    ):
        assert math.isfinite(r[key]) and r[key] > 0
    # both tower paths timed (export: torchrec EBC pooling; training: grouped); which is faster is the
    # benchmark's finding, not a unit test's (timings at --quick size are noise)
    for key in (
        "users_per_s_pooling_plus_fsa",
        "users_per_s_pooling_plus_fsa_grouped",
        "users_per_s_pooling",
        "users_per_s_pooling_torchrec_ebc",
    ):
        assert math.isfinite(r[key]) and r[key] > 0
