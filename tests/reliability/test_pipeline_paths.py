"""Paths in a pipeline config file (workdir, source, train.config, an ``lmdb://`` store path) are relative to
the config file's folder, not the working directory; absolute paths, URLs and shipped config names are
unchanged. Checked by running from another working directory (train / export / publish are stubs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dv365.core.synth import SynthConfig, write_synth_dataset
from dv365.core.timeline import TimelineDataset
from dv365.export.pipeline import Pipeline, PipelineConfig

from .conftest import tiny_train

TRAIN = tiny_train()
SYNTH = SynthConfig(
    users=3,
    mean_events=120,
    max_events=150,
    min_events=100,
    days=10,
    requests_per_user=2,
    request_window_days=5,
    min_history_days=5,
    seed=4,
)


def layout(tmp_path: Path) -> Path:
    """``proj/conf/pipeline.yaml`` naming ``../data/src``, ``train.yaml``, ``work`` and ``lmdb://work/store``."""
    conf = tmp_path / "proj" / "conf"
    conf.mkdir(parents=True)
    write_synth_dataset(SYNTH, str(tmp_path / "proj" / "data" / "src"), progress=False, num_buckets=2)
    (conf / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    cfg = {
        "name": "rel",
        "workdir": "work",
        "source": "../data/src",
        "train": {"config": "train.yaml", "steps": 2},
        "store": {"url": "lmdb://work/store"},
    }
    (conf / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "elsewhere").mkdir()
    return conf / "pipeline.yaml"


def test_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = layout(tmp_path)
    conf = path.parent
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = PipelineConfig.load("../proj/conf/pipeline.yaml")
    assert Path(cfg.workdir) == conf / "work" and Path(cfg.source).resolve() == tmp_path / "proj/data/src"
    assert Path(cfg.train_config) == conf / "train.yaml" and cfg.store_url == f"lmdb://{conf / 'work/store'}"
    absolute = {"workdir": str(tmp_path / "w"), "source": "memory://src", "train": {"config": "movielens-quick"}}
    raw = {"name": "a", **absolute, "store": {"url": "redis://127.0.0.1:6379/0"}}
    same = PipelineConfig.from_dict(raw).relative_to(conf)
    assert (same.workdir, same.source, same.train_config, same.store_url) == (
        str(tmp_path / "w"),
        "memory://src",
        "movielens-quick",
        "redis://127.0.0.1:6379/0",
    )
    r = subprocess.run(
        [sys.executable, "-m", "dv365.core.cli", "pipeline", "check", "--config", "../proj/conf/pipeline.yaml"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path / "elsewhere",
    )
    assert r.returncode == 0, r.stderr
    for step in ("train", "export", "publish", "retain"):
        monkeypatch.setattr(Pipeline, f"_step_{step}", lambda self, c: {})
    monkeypatch.setattr(Pipeline, "_describe", staticmethod(lambda step, out: ""))
    rec = Pipeline(cfg, progress=False).run_cycle()
    assert rec is not None and rec["cycle"] == 1
    assert TimelineDataset(str(conf / "work" / "data")).meta.stats["events"] > 0
    assert list((tmp_path / "elsewhere").iterdir()) == []  # nothing was written relative to the cwd
