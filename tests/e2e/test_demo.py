"""The README's main job and the CLI surface, run as a user would (real subprocesses, real data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DV365 = [sys.executable, "-m", "dv365.core.cli"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        DV365 + args, cwd=cwd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def test_demo_core_only_imports_movielens_and_slices_it(tmp_path: Path) -> None:
    p = _run(["demo", "--core-only", "--out", str(tmp_path / "demo")], cwd=ROOT)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "610 users" in out and "100,836" in out and "3,683" in out
    assert "sliced 610 users" in out
    assert "user 1:" in out and "rate.high.all.media" in out
    assert (tmp_path / "demo" / "movielens" / "_dataset.json").exists()


def test_full_demo_trains_exports_publishes_serves_and_fetches(tmp_path: Path) -> None:
    """The README's main job with every package (small sizes): two MovieLens cycles (the second incremental),
    one synth cycle, the gRPC server on 127.0.0.1, users fetched through the client, a report."""
    out = tmp_path / "demo"
    p = _run(
        [
            "demo",
            "--out",
            str(out),
            "--ml-steps",
            "8",
            "--synth-users",
            "10",
            "--synth-events",
            "600",
            "--synth-steps",
            "4",
        ],
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["versions"] == {"movielens": ["movielens-c0001", "movielens-c0002"], "synth": ["synth-c0001"]}
    assert "listening on 127.0.0.1:" in p.stdout and "present [True, True, True, False]" in p.stdout
    report = (out / "REPORT.md").read_text()
    assert "| movielens | 2 |" in report and "SIMULATED" in report and "(active)" in report
    rec2 = json.loads((out / "pipeline/movielens/cycles/c0002/record.json").read_text())
    counts = rec2["figures"]["export_counts"]
    assert rec2["inputs"]["warm_start"] and 0 < counts["users_encoded"] < rec2["figures"]["users"]  # incremental


def test_help_lists_every_core_command() -> None:
    p = _run(["--help"], cwd=ROOT)
    assert p.returncode == 0
    for cmd in ("import", "synth", "slice", "bench", "demo"):
        assert cmd in p.stdout


def test_bench_slicing_prints_json_last(tmp_path: Path) -> None:
    p = _run(["bench", "slicing", "--quick", "--json", "--users", "2"], cwd=ROOT)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "slicing" and result["users"] == 2
    assert result["events_per_s_per_core"] > 0 and result["dedup_ratio"] >= 1.0
    assert "SIMULATED" in result["data"]


def test_errors_are_one_clear_line(tmp_path: Path) -> None:
    p = _run(["slice", str(tmp_path / "nothing"), "--user", "1"], cwd=ROOT)
    assert p.returncode == 1
    assert "no UniTi dataset here" in p.stderr and "Traceback" not in p.stderr
