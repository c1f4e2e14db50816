"""``dv365 export compare`` (stability report, paper App. B / Fig. 4), the CLI's help and run output, and the
``dv365 bench export`` benchmark."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dv365.core.cli import main
from dv365.core.quantize import dequantize_rows
from dv365.core.snapshot import read_manifest
from dv365.export.compare import compare_snapshots
from dv365.export.job import ExportConfig, run_export
from dv365.export.plan import SnapshotIndex

DAY = 86_400


@pytest.fixture(scope="module")
def two_versions(checkpoint: str, last_ts: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Snapshots of the same users 7 days apart, the older one written through the CLI."""
    root = tmp_path_factory.mktemp("export-cmp")
    assert (
        main(
            [
                "export",
                "run",
                "--checkpoint",
                checkpoint,
                "--out",
                str(root / "old"),
                "--as-of",
                str(last_ts - 7 * DAY),
                "--shard-users",
                "16",
                "--batch-users",
                "8",
                "--device",
                "cpu",
                "--no-progress",
                "--snapshot-id",
                "v-old",
            ]
        )
        == 0
    )
    run_export(
        ExportConfig(
            checkpoint=checkpoint,
            out=str(root / "new"),
            as_of=last_ts,
            snapshot_id="v-new",
            shard_users=16,
            batch_users=8,
            device="cpu",
            progress=False,
        )
    )
    return root / "old", root / "new"


def test_compare_cosines_and_report(
    two_versions: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = two_versions
    c = compare_snapshots(str(old), str(new))
    a, b = SnapshotIndex(str(old)), SnapshotIndex(str(new))
    common = np.intersect1d(a.user_ids, b.user_ids)
    assert np.array_equal(c.user_ids, common) and c.summary["common_users"] == len(common) > 0
    # the cosine of one user, recomputed by hand from the de-quantized bytes
    u = common[:1]
    fmt = a.fmt
    xa = dequantize_rows(torch.from_numpy(a.payload(u)).view(1, fmt.rows_per_user, -1)).flatten().double()
    xb = dequantize_rows(torch.from_numpy(b.payload(u)).view(1, fmt.rows_per_user, -1)).flatten().double()
    assert c.cosine[0] == pytest.approx(float(xa @ xb / (xa.norm() * xb.norm())), abs=1e-12)
    s = c.summary
    assert s["days_apart"] == 7 and -1 <= s["min"] <= s["p5"] <= s["p50"] <= s["p95"] <= 1
    assert s["frac_gt_0.9"] == pytest.approx(float((c.cosine > 0.9).mean()))
    assert c.cosine.max() < 1.0  # a week of new history moved every user a little
    # the same snapshot against itself: identical embeddings
    same = compare_snapshots(str(new), str(new))
    assert np.allclose(same.cosine, 1.0, atol=1e-12) and same.summary["frac_gt_0.99"] == 1.0
    # through the CLI: summary on stdout, JSON + PNG + Markdown written
    out = tmp_path / "report"
    assert main(["export", "compare", str(old), str(new), "--out", str(out), "--json"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1])["common_users"] == len(common)
    assert any(line.startswith("export compare: v-old -> v-new (7 days apart)") for line in printed)
    saved = json.loads((out / "compare.json").read_text())
    assert sum(saved["histogram"]["counts"]) == len(common) and saved["mean"] == pytest.approx(s["mean"])
    from PIL import Image

    with Image.open(out / "cosine_hist.png") as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 300
    assert "cosine_hist.png" in (out / "compare.md").read_text()


def test_cli_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("run", "merge", "verify", "compare", "Examples:", "7,656 B per user"):
        assert word in text
    assert main(["export"]) == 2  # no subcommand: the help, exit 2
    with pytest.raises(SystemExit):
        main(["export", "run", "--help"])
    text = capsys.readouterr().out
    for opt in (
        "--checkpoint",
        "--as-of",
        "--previous",
        "--refresh",
        "--num-workers",
        "--worker-rank",
        "--bits",
        "--device",
        "--no-progress",
    ):
        assert opt in text


def test_cli_run_verify_and_errors(
    two_versions: tuple[Path, Path], checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, _ = two_versions
    assert main(["export", "verify", str(old), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = read_manifest(str(old))
    assert lines[0].startswith(f"snapshot 'v-old' OK: SIMULATED data, {m.user_count} users in {len(m.shards)} shards")
    assert json.loads(lines[-1])["snapshot_id"] == "v-old"
    assert main(["export", "run", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert (
        main(["export", "run", "--checkpoint", checkpoint, "--out", str(old), "--as-of", "2024-12-01", "--no-progress"])
        == 1
    )
    assert "holds a complete snapshot 'v-old'" in capsys.readouterr().err
    assert main(["export", "verify", str(tmp_path)]) == 1
    assert "no complete snapshot here" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_export_quick_reports_the_paper_figures() -> None:
    from dv365.benchmarks.export import run

    r = run(argparse.Namespace(quick=True, seed=0, users=4, mean_events=40_000, batch_users=None, json=True))
    assert r["simulated"] is True and r["users"] == 4
    assert r["bytes_per_user"] == 7656 and r["bytes_per_user"] <= 7656
    assert r["compression_vs_200x256_fp32"] >= 26 and r["compression_words_vs_paper_input"] >= 50
    assert 0 < r["rel_error_4bit_mean"] < 0.1 and r["rel_error_8bit_mean"] < r["rel_error_4bit_mean"] / 4
    assert r["core_decoder_bit_exact_with_fbgemm"] is True and r["users_per_s"] > 0
