"""`dv365 pipeline`: a cycle end to end, the second cycle's append + warm start + incremental export, a kill
at every step followed by a rerun that publishes the same version, the lock, `dv365 status` (tiny SIMULATED
data, the real LMDB store, real subprocesses killed with SIGKILL at named points by ``kill_at.py``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from dv365.core.snapshot import read_manifest, read_shard
from dv365.core.synth import SynthConfig, write_synth_dataset
from dv365.core.timeline import TimelineDataset, appended_runs
from dv365.export.pipeline import STEPS, Pipeline, PipelineConfig, PipelineError, parse_time
from dv365.store import open_store

DAY = 86_400
# 12 users x ~500 events over 60 days, 10 requests each in the last 20 days (SIMULATED)
SYNTH = SynthConfig(
    users=12,
    mean_events=500,
    max_events=900,
    days=60,
    requests_per_user=10,
    request_window_days=20,
    min_history_days=20,
    seed=5,
)
TRAIN = {
    "data": {"spec": "kuairand", "hash_sizes": {"media": 499, "author": 499, "topic": 97}, "eval_fraction": 0.2},
    "model": {
        "kind": "fsa",
        "tower": {"dim": 8, "encoder": {"num_heads": 2, "head_dim": 8, "ff_mult": 2, "num_layers": 1}},
        "backbone": {"embedding_dim": 8, "item_hash_size": 499, "over_arch": [16]},
    },
    "run": {
        "steps": 4,
        "batch_size": 16,
        "seed": 0,
        "device": "cpu",
        "threads": 1,
        "log_every": 2,
        "eval_batch_size": 64,
        "progress": False,
    },
    "checkpoint": {"every": 2, "keep": 2},
}
KILL_POINTS = ("ingest.mid", "train.checkpoint", "export.before_marker", "publish.chunk", "retain.before_marker")
KILL_AT = Path(__file__).with_name("kill_at.py")  # runs the command, SIGKILLs it at a named point


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int]:
    """The upstream dataset (absolute path) and its newest timestamp."""
    out = tmp_path_factory.mktemp("pipeline-src") / "synth"
    write_synth_dataset(SYNTH, str(out), progress=False, num_buckets=2)
    ds = TimelineDataset(str(out))
    newest = max(
        int(ds.read_bucket(k, b).column("ts").to_numpy().max(initial=0))
        for k in ("explicit", "implicit", "requests")
        for b in range(2)
    )
    return str(out), newest


def write_config(root: Path, src: str, **extra: Any) -> Path:
    """A pipeline whose paths are relative to ``root`` (the config's folder, also the commands' working directory)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    cfg = {
        "name": "tiny",
        "workdir": "work",
        "source": src,
        "train": {"config": "train.yaml", "steps": 4},
        "export": {"shard_users": 4, "batch_users": 4, "refresh": "active"},
        "store": {"url": "lmdb://work/store", "keep": 2},
        **extra,
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    return root / "pipeline.yaml"


def dv365(root: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    """``dv365 *args`` in a subprocess; with ``kill_at``, through :mod:`kill_at` (SIGKILLed at that point)."""
    cmd = [str(KILL_AT), kill_at] if kill_at else ["-m", "dv365.core.cli"]
    return subprocess.run([sys.executable, *cmd, *args], capture_output=True, text=True, timeout=600, cwd=root)


def active_state(root: Path, users: np.ndarray) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """(active version, every version, present mask, payload bytes) of the store as published."""
    st = open_store(f"lmdb://{root / 'work' / 'store'}")
    try:
        r = st.get(users)
        assert not r.errors
        return r.snapshot_id, [v.version for v in st.versions()], r.present.copy(), r.payload.copy()
    finally:
        st.close()


def snapshot_bytes(url: str) -> dict[int, bytes]:
    m = read_manifest(url)
    out = {}
    for s in m.shards:
        ids, payload = read_shard(url, s, m.row_format)
        out.update({int(u): payload[i].tobytes() for i, u in enumerate(ids)})
    return out


@pytest.fixture(scope="module")
def after_cycle1(source: tuple[str, int], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """A pipeline folder after one complete cycle (as of 1 day before the newest data), made through the CLI.
    Cycle 2 takes the rest: its gapped histories gain the events of (newest - 2 d, newest - 1 d], which 7 of
    the 12 users have (fixed seed), so 5 users are carried forward."""
    src, newest = source
    root = tmp_path_factory.mktemp("pipeline-c1")
    write_config(root, src)
    as_of1 = newest - DAY
    r = dv365(root, "pipeline", "run", "--config", "pipeline.yaml", "--as-of", str(as_of1), "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["cycle"] == 1 and rec["published_version"] == "tiny-c0001"
    return root, as_of1, newest


def copy_of(after: tuple[Path, int, int], dest: Path) -> Path:
    shutil.copytree(after[0], dest)
    return dest


@pytest.fixture(scope="module")
def reference_cycle2(
    after_cycle1: tuple[Path, int, int], tmp_path_factory: pytest.TempPathFactory, source: tuple[str, int]
) -> tuple[Path, tuple[str, list[str], np.ndarray, np.ndarray]]:
    """Cycle 2 (the rest of the data) run uninterrupted: the state every killed-and-rerun cycle must reach."""
    root = copy_of(after_cycle1, tmp_path_factory.mktemp("pipeline-ref") / "p")
    r = dv365(root, "pipeline", "run", "--config", "pipeline.yaml", "--no-progress", "--as-of", str(after_cycle1[2]))
    assert r.returncode == 0, r.stderr
    users = TimelineDataset(source[0]).user_ids()
    return root, active_state(root, np.concatenate([users, [10**9]]))


def test_second_cycle_appends_warm_starts_and_reexports_only_active_users(
    reference_cycle2: tuple[Path, Any], after_cycle1: tuple[Path, int, int], source: tuple[str, int]
) -> None:
    root, (active, versions, present, _payload) = reference_cycle2
    as_of1 = after_cycle1[1]
    assert active == "tiny-c0002" and versions == ["tiny-c0001", "tiny-c0002"]
    assert present[:-1].all() and not present[-1]  # every source user is served; an unknown one is missing
    c1 = json.loads((root / "work/cycles/c0001/record.json").read_text())
    c2 = json.loads((root / "work/cycles/c0002/record.json").read_text())
    # ingest: cycle 2 appended exactly the source rows newer than cycle 1's cut-off
    src = TimelineDataset(source[0])
    as_of2 = after_cycle1[2]

    def window(ts: np.ndarray, gap: int = 0) -> np.ndarray:
        return (ts > as_of1 - gap) & (ts <= as_of2 - gap)

    newer = sum(
        int(window(src.read_bucket(k, b).column("ts").to_numpy()).sum())
        for k in ("explicit", "implicit", "requests")
        for b in range(2)
    )
    assert sum(c2["figures"]["new_rows"].values()) == newer > 0
    assert appended_runs(str(root / "work/data")) == ["pipeline_c0002"]
    upto = sum(
        int((src.read_bucket(k, b).column("ts").to_numpy() <= as_of2).sum())
        for k in ("explicit", "implicit")
        for b in range(2)
    )
    assert TimelineDataset(str(root / "work/data")).meta.stats["events"] == upto
    # train: warm start from cycle 1's model
    assert c2["inputs"]["warm_start"].endswith("/work/models/c0001") and c1["inputs"]["warm_start"] is None
    # export: only users whose gapped history gained events (cut = as_of - 24 h) re-encoded; the others'
    # bytes carried exactly
    active_users = set()
    for k in ("explicit", "implicit"):
        for b in range(2):
            t = src.read_bucket(k, b)
            ts = t.column("ts").to_numpy()
            active_users.update(t.column("user_id").to_numpy()[window(ts, DAY)].tolist())
    counts = c2["figures"]["export_counts"]
    assert counts["users_encoded"] == len(active_users) and counts["users_carried"] == 12 - len(active_users)
    assert 0 < len(active_users) < 12, "the fixture must have both active and inactive users"
    # cycle 1's snapshot folder is kept (retain.snapshots = 2): compare the carried users' bytes
    s1 = snapshot_bytes(str(root / "work/snapshots/tiny-c0001"))
    s2 = snapshot_bytes(str(root / "work/snapshots/tiny-c0002"))
    carried = set(s1) - active_users
    assert carried and all(s2[u] == s1[u] for u in carried)
    assert any(s2[u] != s1[u] for u in active_users & set(s1))
    m2 = read_manifest(str(root / "work/snapshots/tiny-c0002"))
    assert m2.extra["parent_snapshot_id"] == "tiny-c0001"
    # run records: one line per complete cycle, durations of every step
    lines = (root / "work/runs.jsonl").read_text().strip().splitlines()
    assert [json.loads(x)["cycle"] for x in lines] == [1, 2]
    assert set(c2["durations_s"]) == set(STEPS)
    # nothing new: a third run as of the same time does nothing and says so
    r = dv365(root, "pipeline", "run", "--config", "pipeline.yaml", "--no-progress", "--as-of", str(as_of2))
    assert r.returncode == 0 and "nothing new" in r.stdout
    # schedule: a loop of cycles (here 2 ticks 1 s apart); nothing new since cycle 2, so both ticks say so
    r = dv365(
        root, "pipeline", "schedule", "--config", "pipeline.yaml", "--every", "1s", "--max-cycles", "2", "--no-progress"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("dv365 pipeline schedule: cycle at") == 2 and r.stdout.count("nothing new") == 2
    # status: versions with age and users, the cycles, the last cycle's figures
    r = dv365(root, "status", "--config", "pipeline.yaml", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout.strip().splitlines()[-1])
    assert [v["version"] for v in st["versions"]] == ["tiny-c0001", "tiny-c0002"]
    assert st["versions"][1]["active"] and st["versions"][1]["user_count"] == 12 and st["versions"][1]["age_h"] > 0
    assert st["last_cycle"]["cycle"] == 2 and [c["complete"] for c in st["cycles"]] == [True, True]
    text = dv365(root, "status", "--config", "pipeline.yaml").stdout
    assert "* tiny-c0002" in text and "SIMULATED" in text


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_cycle_killed_in_a_step_then_rerun_publishes_the_same_version(
    kill_at: str,
    after_cycle1: tuple[Path, int, int],
    reference_cycle2: tuple[Path, Any],
    source: tuple[str, int],
    tmp_path: Path,
) -> None:
    root = copy_of(after_cycle1, tmp_path / "p")
    as_of2 = str(after_cycle1[2])
    killed = dv365(
        root, "pipeline", "run", "--config", "pipeline.yaml", "--no-progress", "--as-of", as_of2, kill_at=kill_at
    )
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    step = kill_at.split(".")[0]
    cycle = root / "work/cycles/c0002"
    assert not (cycle / "record.json").exists() and not (cycle / f"{step}.json").exists()
    done_before = [s for s in STEPS if (cycle / f"{s}.json").exists()]
    assert done_before == list(STEPS[: STEPS.index(step)])
    rerun = dv365(root, "pipeline", "run", "--config", "pipeline.yaml", "--no-progress")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    for s in done_before:  # finished steps are not redone
        assert f"{s}: already done in an earlier run (skipped)" in rerun.stdout
    users = TimelineDataset(source[0]).user_ids()
    got = active_state(root, np.concatenate([users, [10**9]]))
    want = reference_cycle2[1]
    assert got[0] == want[0] == "tiny-c0002" and got[1] == want[1]
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_array_equal(got[3], want[3])  # byte-identical published embeddings
    if step == "ingest":  # the unfinished append was removed, not duplicated
        ref = TimelineDataset(str(reference_cycle2[0] / "work/data")).meta.stats
        assert TimelineDataset(str(root / "work/data")).meta.stats["events"] == ref["events"]


def test_lock_keeps_two_cycles_apart_and_config_errors_name_the_key(
    tmp_path: Path, source: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig.load(write_config(tmp_path, source[0]))
    holder, other = Pipeline(cfg, progress=False), Pipeline(cfg, progress=False)
    with holder.lock():
        with pytest.raises(PipelineError, match="another cycle of this pipeline is running"):
            other.run_cycle()
    with other.lock():  # released: the next cycle may start
        pass
    bad = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
    with pytest.raises(PipelineError, match=r"unknown export key\(s\) \['shards'\]"):
        PipelineConfig.from_dict({**bad, "export": {"shards": 2}})
    with pytest.raises(PipelineError, match="`source` is required"):
        PipelineConfig.from_dict({k: v for k, v in bad.items() if k != "source"})
    with pytest.raises(PipelineError, match="store.keep = 0"):
        PipelineConfig.from_dict({**bad, "store": {"url": "lmdb://x", "keep": 0}})
    assert parse_time("2018-09-01") == 1535760000 and parse_time("1535760000") == 1535760000
    with pytest.raises(PipelineError, match="--as-of"):
        parse_time("yesterday")
    r = dv365(tmp_path, "pipeline", "schedule", "--config", "pipeline.yaml", "--every", "soon")
    assert r.returncode == 1 and "--every 'soon'" in r.stderr
