"""`dv365 pipeline check` and the same checks at the start of `run` / `schedule`: a typo in ``train.set``, a
missing train config, a bad store URL, a missing source, a workdir that is a file and a non-numeric
``train.steps`` are reported with the key or path named, before anything is ingested or trained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dv365.core.synth import SynthConfig, write_synth_dataset
from dv365.export.pipeline import Pipeline, PipelineConfig, PipelineError

TRAIN = {
    "data": {"spec": "kuairand", "hash_sizes": {"media": 499, "author": 499, "topic": 97}, "eval_fraction": 0.2},
    "model": {
        "kind": "fsa",
        "tower": {"dim": 8, "encoder": {"num_heads": 2, "head_dim": 8, "ff_mult": 2, "num_layers": 1}},
        "backbone": {"embedding_dim": 8, "item_hash_size": 499, "over_arch": [16]},
    },
    "run": {"steps": 4, "batch_size": 16, "seed": 0, "device": "cpu", "threads": 1, "progress": False},
}
SYNTH = SynthConfig(
    users=3,
    mean_events=120,
    max_events=150,
    min_events=100,
    days=10,
    requests_per_user=2,
    request_window_days=5,
    min_history_days=5,
    seed=1,
)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("check-src") / "synth"
    write_synth_dataset(SYNTH, str(out), progress=False, num_buckets=2)
    return str(out)


def config(root: Path, src: str, **changes: Any) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    cfg: dict[str, Any] = {
        "name": "chk",
        "workdir": str(root / "work"),
        "source": src,
        "train": {"config": str(root / "train.yaml"), "steps": 2},
        "store": {"url": f"lmdb://{root / 'store'}"},
    }
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            cfg[section] = {**cfg[section], sub: value}
        else:
            cfg[section] = value
    (root / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    return cfg


def problems(root: Path, src: str, **changes: Any) -> list[str]:
    cfg = config(root, src, **changes)
    return Pipeline(PipelineConfig.from_dict(cfg, "p.yaml"), progress=False).check()


def dv365(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dv365.core.cli", *args], capture_output=True, text=True, timeout=300, cwd=root
    )


def test_check_names_each_problem(tmp_path: Path, source: str) -> None:
    assert problems(tmp_path / "ok", source) == []
    (got,) = problems(tmp_path / "a", source, train__set={"run.stepz": 3})
    assert "train.set" in got and "stepz" in got
    (got,) = problems(tmp_path / "b", source, train__config=str(tmp_path / "missing.yaml"))
    assert "train.config" in got and "missing.yaml" in got
    (got,) = problems(tmp_path / "c", source, store__url="lmbd:///x")
    assert "store.url lmbd:///x" in got and "unknown store scheme 'lmbd'" in got
    (got,) = problems(tmp_path / "d", source, store__url="no-scheme")
    assert "store.url 'no-scheme': not a URL" in got
    (got,) = problems(tmp_path / "e", str(tmp_path / "nowhere"))
    assert got.startswith("p.yaml: source ") and "nowhere" in got
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "afile").write_text("x")
    (got,) = problems(tmp_path / "f", source, workdir=str(tmp_path / "f" / "afile"))
    assert "afile: exists and is not a folder" in got
    with pytest.raises(PipelineError, match=r"train.steps = 'lots': expected a whole number"):
        PipelineConfig.from_dict(config(tmp_path / "g", source, train__steps="lots"), "p.yaml")
    # run checks first: nothing was ingested for a config with a problem
    cfg = config(tmp_path / "h", source, train__set={"run.stepz": 3})
    with pytest.raises(PipelineError, match="stepz"):
        Pipeline(PipelineConfig.from_dict(cfg), progress=False).run_cycle()
    assert not (tmp_path / "h" / "work" / "data").exists()


def test_cli_check_run_and_schedule_fail_with_the_key_named_and_no_traceback(tmp_path: Path, source: str) -> None:
    config(tmp_path, source)
    r = dv365(tmp_path, "pipeline", "check", "--config", "pipeline.yaml")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    (tmp_path / "work").write_text("not a folder")
    for cmd in (["check"], ["run", "--no-progress"], ["schedule", "--every", "1s", "--max-cycles", "1"]):
        r = dv365(tmp_path, "pipeline", *cmd, "--config", "pipeline.yaml")
        assert r.returncode == 1 and "work: exists and is not a folder" in r.stderr, (cmd, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
    config(tmp_path, source, train__steps="lots")
    r = dv365(tmp_path, "pipeline", "run", "--config", "pipeline.yaml")
    assert r.returncode == 1 and "train.steps = 'lots'" in r.stderr and "Traceback" not in r.stderr


def test_status_reports_a_mistyped_store_path_and_creates_nothing(tmp_path: Path, source: str) -> None:
    from dv365.export.pipeline import status

    cfg = config(tmp_path, source, store__url=f"lmdb://{tmp_path / 'stroe'}")  # a typo: no store there
    st = status(PipelineConfig.from_dict(cfg, "p.yaml"))
    assert isinstance(st["versions"], str) and "no dv365 store" in st["versions"]
    assert not (tmp_path / "stroe").exists()
