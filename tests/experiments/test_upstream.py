"""``dv365 eval upstream`` end to end on tiny SIMULATED data (structure of the report, not its numbers),
and the slice cache against the trainer's own collate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dv365.core.cli import main

TINY = {
    "protocol": "joint",
    "val_fraction": 0.2,
    "val_every": 2,
    "seeds": 1,
    "variants": ["lce", "mlp_d"],
    "synth": {"users": 12, "mean_events": 150, "max_events": 400, "days": 60, "requests_per_user": 20, "seed": 0},
    "train": {
        "data": {
            "spec": "kuairand",
            "hash_sizes": {"media": 1009, "author": 1009, "topic": 101},
            "eval_fraction": 0.2,
            "slicer": "numpy",
        },
        "tasks": [
            {"label": "label_like"},
            {"label": "label_long_view"},
            {"label": "label_watch_time", "kind": "regression", "transform": "log1p", "weight": 0.25},
        ],
        "model": {
            "tower": {"dim": 4, "n_out": 58, "encoder": {"num_heads": 1, "head_dim": 4, "ff_mult": 1, "num_layers": 1}},
            "backbone": {"embedding_dim": 4, "item_hash_size": 1009, "over_arch": [8, 4]},
        },
        "run": {"steps": 4, "batch_size": 16, "threads": 1, "eval_batch_size": 64},
    },
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().out


def test_upstream_cli_writes_report_and_json_line(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, data = tmp_path / "reports", tmp_path / "data"
    argv = [
        "eval",
        "upstream",
        "--dataset",
        "synth",
        "--quick",
        "--config",
        str(tiny_config),
        "--seeds",
        "2",
        "--out",
        str(out),
        "--data-dir",
        str(data),
        "--no-progress",
    ]
    rc, stdout = _run(argv, capsys)
    assert rc == 0
    last = json.loads(stdout.strip().splitlines()[-1])  # the summary is the LAST line
    assert last["experiment"] == "upstream" and last["dataset"] == "synth" and last["quick"] is True
    assert last["simulated"] is True and last["seeds"] == [0, 1]
    assert set(last["delta_ne_pct"]) == {"lce", "mlp_d"}
    for variant in last["delta_ne_pct"].values():
        assert set(variant) == {"like", "long_view", "watch_time"}
        for v in variant.values():
            assert set(v) == {"mean", "std", "users_95"} and isinstance(v["mean"], float)
            low, high = v["users_95"]  # the 95 % interval over the test users holds the seed-averaged delta
            assert low <= v["mean"] + 1e-3 and v["mean"] - 1e-3 <= high
    assert {"all_variants_beat_baseline", "token_wise_beats_dim_wise"} <= set(last["checks"])
    md = out / "upstream-synth-quick.md"
    assert Path(last["report"]["markdown"]) == md and md.exists()
    text = md.read_text()
    assert "SIMULATED" in text and "checks the implementation, not the method" in text
    assert "| like |" in text and "LCE" in text and "MLP_d" in text
    full = json.loads((out / "upstream-synth-quick.json").read_text())
    passes = 4 * 16 / full["facts"]["train"]  # steps x batch over the training requests
    assert f"at most 4 steps ({passes:.2f} passes over the training split;" in text
    assert len(full["runs"]) == 2 * 3  # (baseline + 2 variants) x 2 seeds
    assert full["facts"]["users"] == 12
    assert all(len(r["test_users"]["ids"]) > 1 for r in full["runs"])  # per-user sums kept for the interval
    assert "95 % interval of the seed-averaged delta when the test users are resampled" in text
    for r in full["runs"]:  # per-task validation metrics of the kept step; the criterion covers every task
        assert set(r["val"]) == {"like", "long_view", "watch_time"}
        nl = [r["val"]["like"]["ne"], r["val"]["long_view"]["ne"], r["val"]["watch_time"]["nmse"]]
        assert r["best_val"] == pytest.approx(sum(nl) / 3, rel=1e-9)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "png" not in last["report"]
    else:
        png = out / "upstream-synth-quick.png"
        assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    # a second run reuses the generated data set
    before = sorted(p.name for p in data.iterdir())
    rc, stdout = _run(argv[:-1] + ["--variants", "fsa", "--seeds", "1", "--no-progress"], capsys)
    assert rc == 0 and sorted(p.name for p in data.iterdir()) == before
    assert set(json.loads(stdout.strip().splitlines()[-1])["delta_ne_pct"]) == {"fsa"}


def test_eval_without_experiment_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval"]) == 2
    assert "upstream" in capsys.readouterr().out


def test_bad_setting_is_a_user_error(tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "eval",
            "upstream",
            "--config",
            str(tiny_config),
            "--set",
            "protocol=sideways",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(tmp_path / "d"),
            "--no-progress",
        ]
    )
    assert rc == 1
    assert "protocol" in capsys.readouterr().err


def test_unknown_selection_criterion_is_named(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "eval",
            "upstream",
            "--config",
            str(tiny_config),
            "--set",
            "select_by=auc",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(tmp_path / "d"),
            "--no-progress",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "select_by" in err and "all_tasks" in err and "binary_ne" in err


def test_slice_cache_matches_the_slicer(tiny_config: Path, tmp_path: Path) -> None:
    from dv365.experiments.upstream import SlicedExamples, UpstreamSettings, _run_cfg, prepare_dataset
    from dv365.train.data import ExampleSource, load_spec

    settings = UpstreamSettings.load(tiny_config)
    url = str(prepare_dataset("synth", settings, tmp_path, progress=False))
    cfg = _run_cfg(settings, url, "fsa", 0, 1)
    spec = load_spec(cfg.data)
    cached = SlicedExamples(cfg.data, cfg.tasks, spec, 1009, chunk=7)  # chunks that straddle users
    plain = ExampleSource(cfg.data, cfg.tasks, spec, 1009)
    rows = np.array([0, 5, 3, len(plain.requests) - 1, 11, 5])
    a = cached.collate(rows)
    try:
        b = plain.collate(rows, dedup=False)  # type: ignore[call-arg]  # one KJT row per request
    except TypeError:  # a source without RecD dedup
        b = plain.collate(rows)
    ka, kb = a.user_kjt, b.user_kjt
    assert ka.keys() == kb.keys()
    assert torch.equal(ka.lengths(), kb.lengths())
    # the order of ids inside a dedup'd bag is the slicer's; compare each bag as a sorted (id, weight) set
    la, lb = ka.length_per_key(), kb.length_per_key()
    assert la == lb
    for x, y in ((ka, kb),):
        va, wa, vb, wb = x.values(), x.weights(), y.values(), y.weights()
        off = np.concatenate([[0], np.cumsum(x.lengths().numpy())])
        for s, e in zip(off[:-1], off[1:]):
            ia, ib = torch.argsort(va[s:e]), torch.argsort(vb[s:e])
            assert torch.equal(va[s:e][ia], vb[s:e][ib])
            assert torch.allclose(wa[s:e][ia], wb[s:e][ib])
    assert torch.equal(a.labels, b.labels) and torch.equal(a.dense, b.dense)
    assert cached.history_events[rows].min() >= 0
    # one stored copy per distinct slice: requests sharing a slot get the very same bags
    assert 0 < cached.distinct_slices <= len(cached.requests) and len(cached.slot) == len(cached.requests)
    assert cached.lengths.shape[0] == cached.distinct_slices
    assert len(cached.values) == int(cached.lengths.sum())
    # over the cache limit the batches are sliced when read: the very same KJTs, and no cache in memory
    lazy = SlicedExamples(cfg.data, cfg.tasks, spec, 1009, chunk=7, cache_mb=1e-9)
    assert cached.cached and not lazy.cached and len(lazy.values) == 0 and lazy.cache_mb_estimate > 0
    assert np.array_equal(lazy.history_events, cached.history_events)
    kl = lazy.collate(rows).user_kjt
    for get in ("values", "weights", "lengths"):
        assert torch.equal(getattr(kl, get)(), getattr(ka, get)()), get


def test_parallel_jobs_give_the_same_results(tiny_config: Path, tmp_path: Path) -> None:
    """--jobs trains models in forked workers: every model seeds itself, so the results equal a serial run."""
    from dv365.experiments.upstream import run_upstream

    kw = dict(quick=True, seeds=2, config=tiny_config, data_dir=tmp_path / "data", progress=False)
    serial = run_upstream("synth", jobs=1, **kw)  # type: ignore[arg-type]
    parallel = run_upstream("synth", jobs=2, **kw)  # type: ignore[arg-type]
    assert [(r.kind, r.seed) for r in parallel.results] == [(r.kind, r.seed) for r in serial.results]
    for a, b in zip(serial.results, parallel.results):
        assert (a.best_step, a.best_val, a.test) == (b.best_step, b.best_val, b.test)


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")
def test_slicer_backend_does_not_change_results(tiny_config: Path, tmp_path: Path) -> None:
    """The slice cache is canonical (one id order inside dedup'd bags): numba's bags are numpy's bit for bit, so
    every model trains and evaluates to the very same numbers, cached or sliced per batch."""
    from dv365.experiments.upstream import run_upstream

    kw = dict(quick=True, seeds=1, config=tiny_config, data_dir=tmp_path / "data", progress=False)
    runs = {
        b: run_upstream("synth", overrides={"train.data.slicer": b}, variants=["fsa"], **kw)  # type: ignore[arg-type]
        for b in ("numpy", "numba")
    }
    # and slicing per batch (over the cache limit) instead of once gives them too
    runs["lazy"] = run_upstream(
        "synth", overrides={"train.data.slicer": "numba", "slice_cache_mb": 1e-9}, variants=["fsa"], **kw
    )  # type: ignore[arg-type]
    assert "sliced per batch" in runs["lazy"].facts["slice_cache"]
    for other in ("numba", "lazy"):
        for a, b in zip(runs["numpy"].results, runs[other].results):
            assert (a.kind, a.seed, a.best_step, a.best_val, a.test) == (
                b.kind,
                b.seed,
                b.best_step,
                b.best_val,
                b.test,
            )


def test_checks_pair_token_and_dim_wise_by_seed() -> None:
    """A quick synth report's runs (tests/fixtures: the session-7 run of `dv365 eval upstream --dataset synth
    --quick`): the checks recomputed from its runs give its token/dim verdicts,
    and the seed-paired difference (token − dim) of each pair says by how much and whether that is beyond
    noise."""
    import json
    from pathlib import Path

    from dv365.experiments.upstream import RunResult, checks, deltas

    rep = json.loads((Path(__file__).parents[2] / "tests" / "fixtures" / "upstream-synth-quick.json").read_text())
    runs = [
        RunResult(**{k: r[k] for k in ("kind", "seed", "best_step", "best_val", "test", "test_returning", "seconds")})
        for r in rep["runs"]
    ]
    ck = checks(deltas(runs, "test"))
    assert ck["token_minus_dim_paired"] == rep["checks"]["token_minus_dim_paired"]
    for tok, dim in (("mlp_t", "mlp_d"), ("tl_t", "tl_d")):
        pair = ck["token_minus_dim_paired"][f"{tok}-{dim}"]
        n = pair["n"]
        assert n == len(rep["seeds"])
        # the paired mean is the difference of the two variants' mean deltas (same seeds, same tasks)
        assert abs(pair["mean"] - (ck["mean_delta_pct"][tok] - ck["mean_delta_pct"][dim])) < 1e-3
        # negative = token-wise better; the verdict counts it only beyond noise
        assert ck["token_vs_dim"][f"{tok}<{dim}"] == (pair["mean"] < 0 and not pair["noise"])
        assert pair["noise"] == (abs(pair["mean"]) <= 2 * pair["std"] / n**0.5)


def test_verdicts_count_only_deltas_beyond_noise() -> None:
    """A negative mean delta within noise is not "beats the baseline" (the sign of the mean alone said yes)."""
    from dv365.experiments.upstream import checks
    from dv365.train.metrics import seed_stats

    clear = {"like": seed_stats([-1.0, -1.2, -0.9]), "click": seed_stats([-2.0, -2.1, -1.8])}
    noisy = {"like": seed_stats([-0.15 + x for x in (0.6, -0.5, -0.55)]), "click": seed_stats([-2.0, -2.1, -1.8])}
    assert noisy["like"]["mean"] < 0 and noisy["like"]["noise"]
    ck = checks({"mlp_d": noisy, "mlp_t": clear})
    assert ck["beats_baseline"] == {"mlp_d": False, "mlp_t": True}
    assert not ck["all_variants_beat_baseline"]
    # mlp_t - mlp_d per seed (-0.73, -0.28, -0.10 pp): token-wise better on the mean, but within noise
    pair = ck["token_minus_dim_paired"]["mlp_t-mlp_d"]
    assert pair["mean"] < 0 and pair["noise"]
    assert ck["token_vs_dim"] == {"mlp_t<mlp_d": False} and not ck["token_wise_beats_dim_wise"]


def test_verdicts_need_the_interval_over_users() -> None:
    """Two seeds agree that the variant is better (seed rule: beyond noise), but the gain comes from 2 of 100
    test users: the 95 % interval over users reaches above 0, so "beats the baseline" is no; the same gain
    spread over every user is yes. The report's JSON rows keep the per-user sums."""
    import numpy as np

    from dv365.experiments.upstream import RunResult, checks, deltas
    from dv365.train.metrics import GroupSums

    rng = np.random.default_rng(0)
    users = 100
    count = np.full(users, 10.0)
    label = rng.binomial(10, 0.3, users).astype(np.float64)[:, None]
    base_loss = np.full((users, 1), 6.0) + rng.random((users, 1))

    def run(kind: str, seed: int, loss: np.ndarray) -> RunResult:
        gs = GroupSums(np.arange(users), count, loss, label, label, (True,))
        ne = float(gs.metric(np.ones((1, users)))[0, 0])
        m = {"like": {"ne": ne}}
        return RunResult(kind, seed, 1, ne, m, m, 1.0, test_users=gs, test_returning_users=gs)

    few = base_loss.copy()
    few[:2] -= 5.0  # two users much better
    spread = base_loss - 0.05  # every user a little better
    for variant, expect in ((few, False), (spread, True)):
        runs = [run("baseline", s, base_loss + 0.01 * s) for s in (0, 1)]
        runs += [run("mlp_d", s, variant + 0.01 * s + 0.001 * s) for s in (0, 1)]
        d = deltas(runs, "test")["mlp_d"]["like"]
        assert d["mean"] < 0 and not d["noise"]  # the seed rule alone says "better"
        assert (d["users"]["high"] < 0) is expect and d["users"]["groups"] == users
        assert checks({"mlp_d": {"like": d}})["beats_baseline"]["mlp_d"] is expect
