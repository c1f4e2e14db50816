"""CI smoke test: `dv365 eval all` through the CLI on tiny SIMULATED data (structure, not quality)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "synth.users=16",
    "synth.mean_events=300",
    "synth.max_events=600",
    "synth.requests_per_user=30",
    "split.windows=3",
    "upstream.run.steps=3",
    "upstream.run.batch_size=32",
    "downstream.history=8",
    "downstream.steps=4",
    "downstream.val_every=2",
    "downstream.batch_size=32",
    "retrieval.steps=3",
    "retrieval.val_every=3",
    "retrieval.batch_size=32",
    "retrieval.sampled_negatives=16",
    "staleness.passes=1",
    "encoders.synth={users: 6, mean_events: 1500, max_events: 3000, days: 100, requests_per_user: 20, seed: 1}",
    "encoders.caps=[50, 0]",
    "encoders.cost_lengths=[50, 0]",
    "encoders.hstu_train_max=60",
    "encoders.steps=3",
    "encoders.val_every=3",
    "encoders.batch_size=16",
]


@pytest.fixture(scope="module")
def run_all(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("eval")
    cmd = [
        sys.executable,
        "-m",
        "dv365.core.cli",
        "eval",
        "all",
        "--datasets",
        "synth",
        "--quick",
        "--seeds",
        "2",
        "--out",
        str(tmp / "reports"),
        "--data-dir",
        str(tmp / "data"),
        "--no-progress",
    ]
    for s in TINY:
        cmd += ["--set", s]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    return json.loads(last), tmp / "reports"


def test_all_summary_structure(run_all: tuple[dict, Path]) -> None:
    s, out = run_all
    assert s["experiment"] == "all"
    e = s["datasets"]["synth"]
    assert e["simulated"] is True
    rk = e["ranking"]["delta_ne_pct"]
    assert set(rk) == {"no_projection", "linear", "hstu_prefix"}
    for v in rk["linear"].values():
        assert set(v) == {"mean", "std", "noise", "users_95"} and v["std"] is not None  # 2 seeds -> a std
        low, high = v["users_95"]  # the 95 % interval over the test users (bootstrap of the seed-averaged delta)
        assert low <= high and (v["noise"] or high < 0 or low > 0)  # "beyond noise" needs it on one side of 0
    rt = e["retrieval"]["delta_hr_pct"]
    assert set(rt) == {"linear", "gatenet"} and "next_item@1" in rt["gatenet"] and "like@10" in rt["gatenet"]
    st = e["staleness"]
    assert "stale_fresh_gain_ratio" in st and 0.0 <= st["median_version_cosine"] <= 1.0 + 1e-6
    enc = e["encoders"]
    assert {r["encoder"] for r in enc["cost_table"]} == {"mean", "position", "hstu"}
    assert enc["longest"] > 50


def test_reports_written(run_all: tuple[dict, Path]) -> None:
    _, out = run_all
    for exp in ("ranking", "retrieval", "staleness", "encoders"):
        md = out / f"{exp}-synth-quick.md"
        assert md.exists() and "SIMULATED" in md.read_text()
        assert (out / f"{exp}-synth-quick.png").exists()
        assert json.loads((out / f"{exp}-synth-quick.json").read_text())
    assert (out / "all-quick.md").exists()
    ranking = (out / "ranking-synth-quick.md").read_text()
    assert re.search(r"at most 4 steps \(\d+\.\d\d passes over the training split\)", ranking)
    assert "interval of the seed-averaged delta when the test users are resampled" in ranking
    assert re.search(r"\[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", ranking)  # intervals in the tables
    runs = json.loads((out / "ranking-synth-quick.json").read_text())["runs"]
    assert all(r["test_users"] and len(r["test_users"]["ids"]) > 1 for r in runs)


def test_bad_setting_exits_1(tmp_path: Path) -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "dv365.core.cli",
            "eval",
            "ranking",
            "--dataset",
            "synth",
            "--quick",
            "--set",
            "split.windows=1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and "split.windows" in p.stderr


def test_datasets_in_parallel_give_the_serial_figures(tmp_path: Path) -> None:
    """`eval all --jobs 2` runs the data sets in spawned processes; every model seeds itself, so the summary's
    figures equal those of `--jobs 1` (data sets prepared once, in the shared data dir)."""

    def run(jobs: int) -> dict:
        cmd = [
            sys.executable,
            "-m",
            "dv365.core.cli",
            "eval",
            "all",
            "--datasets",
            "synth,movielens",
            "--experiments",
            "ranking",
            "--quick",
            "--seeds",
            "1",
            "--jobs",
            str(jobs),
            "--out",
            str(tmp_path / f"reports{jobs}"),
            "--data-dir",
            str(tmp_path / "data"),
            "--no-progress",
        ]
        for s in TINY:
            if not s.startswith(("retrieval.", "staleness.", "encoders.")):
                cmd += ["--set", s]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    par, ser = run(2), run(1)
    assert set(par["datasets"]) == {"synth", "movielens"}
    for ds in ("synth", "movielens"):
        assert par["datasets"][ds]["ranking"]["delta_ne_pct"] == ser["datasets"][ds]["ranking"]["delta_ne_pct"]
        assert par["datasets"][ds]["data"] == ser["datasets"][ds]["data"]
    assert (tmp_path / "reports2" / "ranking-movielens-quick.md").exists()


def test_zero_seeds_is_refused_before_any_work(tmp_path: Path) -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "dv365.core.cli",
            "eval",
            "all",
            "--quick",
            "--seeds",
            "0",
            "--out",
            str(tmp_path / "r"),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and "--seeds = 0: must be >= 1" in p.stderr
    assert not (tmp_path / "d").exists()  # refused before any data set was prepared


def test_no_projection_interact_with_unequal_dims_is_refused(tmp_path: Path) -> None:
    """`no_projection` dots the raw DV365 rows with the ranker's embeddings: a config whose tower dim differs from
    the ranker's is refused up front, naming both settings and the way out."""
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "dv365.core.cli",
            "eval",
            "ranking",
            "--dataset",
            "synth",
            "--quick",
            "--set",
            "upstream.model.tower.dim=32",
            "--out",
            str(tmp_path / "r"),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1
    assert "upstream.model.tower.dim (32) must equal downstream.embedding_dim (16)" in p.stderr
    assert "downstream.no_projection: flatten" in p.stderr
    assert not (tmp_path / "d").exists()


def test_all_from_reports_rebuilds_the_summary(run_all: tuple[dict, Path], tmp_path: Path) -> None:
    """`eval all --from-reports` trains nothing: it rebuilds the overview and the JSON line from the per-experiment
    reports in --out (experiments run separately) and lists the command behind each."""
    s, out = run_all
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.glob("*-synth-quick.*"):
        (copy / f.name).write_bytes(f.read_bytes())
    cmd = [
        sys.executable,
        "-m",
        "dv365.core.cli",
        "eval",
        "all",
        "--from-reports",
        "--datasets",
        "synth",
        "--quick",
        "--out",
        str(copy),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    rebuilt = json.loads(p.stdout.strip().splitlines()[-1])
    for exp in ("ranking", "retrieval", "staleness", "encoders"):
        assert rebuilt["datasets"]["synth"][exp] == s["datasets"]["synth"][exp]
    assert rebuilt["datasets"]["synth"]["data"] == s["datasets"]["synth"]["data"]
    md = (copy / "all-quick.md").read_text()
    assert "Built from the JSON of those reports" in md and "dv365 eval all --datasets synth --quick --seeds 2" in md
    (copy / "staleness-synth-quick.json").unlink()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "staleness-synth-quick.json: no staleness report for synth" in p.stderr


def test_diagnose_runs_controls_and_candidates(tmp_path: Path) -> None:
    """`dv365 eval diagnose`: the control, linear, the two content controls and the candidate fixes, each a
    row of the report; the choice is one of linear / the candidates; the JSON line carries the verdicts."""
    cmd = [sys.executable, "-m", "dv365.core.cli", "eval", "diagnose", "--dataset", "synth", "--quick"]
    cmd += ["--seeds", "2", "--out", str(tmp_path / "r"), "--data-dir", str(tmp_path / "d"), "--no-progress"]
    for s in TINY + ["diagnose.candidates=[{dv365_dropout: 0.5}]", "diagnose.train_sample=200"]:
        cmd += ["--set", s]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])["diagnose"]
    assert set(last["delta_val_ret_pct"]) == {
        "linear",
        "linear shuffled",
        "linear constant",
        "linear dv365_dropout=0.5",
    }
    assert last["verdicts"]["chosen"] in ("linear", "linear dv365_dropout=0.5")
    text = (tmp_path / "r" / "diagnose-synth-quick.md").read_text()
    assert "| linear shuffled |" in text and "Chosen on validation" in text and "SIMULATED" in text
