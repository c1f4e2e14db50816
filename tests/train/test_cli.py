"""`dv365 train --config` end to end on a tiny SIMULATED dataset (the command is an entry-point plugin)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from dv365.core.cli import build_parser, main


def test_train_is_registered_through_the_entry_point_group() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "train" in sub.choices  # type: ignore[attr-defined]


def test_train_config_end_to_end_then_resume_then_eval_only(
    make_config_file: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config_file("cli", **{"run.steps": 4, "checkpoint.every": 2})
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dv365 train: fsa on SIMULATED data" in out and "steps 0->4" in out and "mean NE" in out
    ckpt_dir = cfg.parent / "cli"
    metrics = json.loads((ckpt_dir / "metrics.json").read_text())
    assert metrics["simulated"] is True and metrics["steps"] == 4 and metrics["eval"]["examples"] == 39
    assert 0.5 < metrics["eval"]["mean_ne"] < 2.0
    assert sorted(p.name for p in ckpt_dir.glob("step_*.pt")) == ["step_000000002.pt", "step_000000004.pt"]

    assert main(["train", "--config", str(cfg), "--steps", "6", "--no-progress", "--set", "run.log_every=3"]) == 0
    out = capsys.readouterr().out
    assert "steps 4->6 resumed at step 4" in out
    assert json.loads((ckpt_dir / "metrics.json").read_text())["steps"] == 6

    assert main(["train", "--config", str(cfg), "--eval-only", "--no-progress"]) == 0
    assert "eval on 39 requests" in capsys.readouterr().out


def test_bad_configs_fail_with_a_message_naming_the_key(
    make_config_file: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config_file("bad", **{"model.kind": "transformer"})
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 1
    assert "user tower kind 'transformer' is unknown" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg.parent / "missing.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--set", "run.stepz=3"]) == 1
    assert "unknown keys ['stepz']" in capsys.readouterr().err
