"""`dv365 pipeline abort`: a cycle killed mid-step (SIGKILL through tests/pipeline/kill_at.py) is abandoned: its
rows leave the pipeline's dataset (an unfinished or a committed append, or the whole dataset of a first cycle),
the lock is respected, and the next run starts a fresh cycle with another ``--as-of`` whose ingest counts match
the source exactly (no duplicated rows). Train / export / publish are stubs in the in-process runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dv365.core.synth import SynthConfig, write_synth_dataset
from dv365.core.timeline import TimelineDataset, appended_runs
from dv365.export.pipeline import Pipeline, PipelineConfig, PipelineError

from .conftest import tiny_train

DAY = 86_400
KILL_AT = Path(__file__).parents[1] / "pipeline" / "kill_at.py"
TRAIN = tiny_train(batch_size=2)
SYNTH = SynthConfig(
    users=4,
    mean_events=150,
    max_events=200,
    min_events=100,
    days=10,
    requests_per_user=2,
    request_window_days=5,
    min_history_days=5,
    seed=2,
)


def setup(root: Path) -> tuple[Pipeline, str, int]:
    src = str(root / "src")
    write_synth_dataset(SYNTH, src, progress=False, num_buckets=2)
    (root / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    cfg = {"name": "ab", "workdir": "work", "source": src, "train": {"config": "train.yaml", "steps": 2}}
    (root / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    ds = TimelineDataset(src)
    newest = max(int(ds.read_bucket("explicit", b).column("ts").to_numpy().max(initial=0)) for b in range(2))
    return (
        Pipeline(
            PipelineConfig.from_dict(
                {**cfg, "workdir": str(root / "work"), "train": {"config": str(root / "train.yaml"), "steps": 2}}
            ),
            progress=False,
        ),
        src,
        newest,
    )


def events_upto(src: str, as_of: int) -> int:
    ds = TimelineDataset(src)
    return sum(
        int((ds.read_bucket(k, b).column("ts").to_numpy() <= as_of).sum())
        for k in ("explicit", "implicit")
        for b in (0, 1)
    )


def dv365(root: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(KILL_AT), kill_at] if kill_at else ["-m", "dv365.core.cli"]
    return subprocess.run([sys.executable, *cmd, *args], capture_output=True, text=True, timeout=300, cwd=root)


def test_first_cycle_killed_mid_ingest_is_aborted_and_a_fresh_cycle_starts(tmp_path: Path, stubbed: None) -> None:
    p, src, newest = setup(tmp_path)
    run = ("pipeline", "run", "--config", "pipeline.yaml", "--no-progress")
    killed = dv365(tmp_path, *run, "--as-of", str(newest - 2 * DAY), kill_at="ingest.mid")
    assert killed.returncode == -9, killed.stderr[-2000:]
    r = dv365(tmp_path, *run, "--as-of", str(newest - DAY))
    assert r.returncode == 1 and "is unfinished" in r.stderr
    with p.lock(), pytest.raises(PipelineError, match="another cycle of this pipeline is running"):
        p.abort()  # the lock is respected
    r = dv365(tmp_path, "pipeline", "abort", "--config", "pipeline.yaml")
    assert r.returncode == 0 and "cycle 1 abandoned" in r.stdout, r.stderr
    assert (tmp_path / "work/cycles/c0001/abandoned.json").exists() and not (tmp_path / "work/data").exists()
    rec = p.run_cycle(newest - DAY)  # another cut-off: accepted now
    assert rec is not None and rec["cycle"] == 2 and rec["previous_cycle"] is None
    assert TimelineDataset(str(tmp_path / "work/data")).meta.stats["events"] == events_upto(src, newest - DAY)
    r = dv365(tmp_path, "pipeline", "abort", "--config", "pipeline.yaml")
    assert r.returncode == 1 and "no unfinished cycle to abort" in r.stderr
    r = dv365(tmp_path, "status", "--config", "pipeline.yaml")
    assert "cycle 1: as of" in r.stdout and "ABANDONED" in r.stdout


def test_committed_append_of_an_abandoned_cycle_is_taken_out(
    tmp_path: Path, stubbed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    p, src, newest = setup(tmp_path)
    assert p.run_cycle(newest - 3 * DAY) is not None
    real = Pipeline._step_ingest

    def ingest_then_die(self: Pipeline, c: object) -> dict[str, object]:
        real(self, c)  # type: ignore[arg-type]
        raise KeyboardInterrupt  # killed after the append committed, before the marker

    monkeypatch.setattr(Pipeline, "_step_ingest", ingest_then_die)
    with pytest.raises(KeyboardInterrupt):
        p.run_cycle(newest)
    assert appended_runs(str(tmp_path / "work/data")) == ["pipeline_c0002"]
    info = p.abort()
    assert info["cycle"] == 2 and any("append pipeline_c0002" in x for x in info["removed"])
    data = TimelineDataset(str(tmp_path / "work/data"))
    assert appended_runs(str(tmp_path / "work/data")) == [] and data.meta.stats["events"] == events_upto(
        src, newest - 3 * DAY
    )
    monkeypatch.setattr(Pipeline, "_step_ingest", real)
    rec = p.run_cycle(newest - DAY)
    assert rec is not None and rec["cycle"] == 3 and rec["previous_cycle"] == 1
    data = TimelineDataset(str(tmp_path / "work/data"))
    assert data.meta.stats["events"] == events_upto(src, newest - DAY)
    ts = np.concatenate([data.read_bucket("explicit", b).column("ts").to_numpy() for b in (0, 1)])
    assert int((ts > newest - DAY).sum()) == 0  # nothing of the abandoned cut-off is left


def test_cycle_killed_after_a_training_checkpoint_is_aborted_with_its_model(tmp_path: Path) -> None:
    _p, _src, newest = setup(tmp_path)
    run = ("pipeline", "run", "--config", "pipeline.yaml", "--no-progress")
    killed = dv365(tmp_path, *run, "--as-of", str(newest - DAY), kill_at="train.checkpoint")
    assert killed.returncode == -9, killed.stderr[-2000:]
    model = tmp_path / "work/models/c0001"
    assert model.exists() and (tmp_path / "work/cycles/c0001/ingest.json").exists()
    r = dv365(tmp_path, "pipeline", "abort", "--config", "pipeline.yaml")
    assert r.returncode == 0 and "steps done: ingest" in r.stdout, r.stderr
    assert not model.exists() and not (tmp_path / "work/data").exists()
    assert str(model) in r.stdout or "work/models/c0001" in r.stdout
