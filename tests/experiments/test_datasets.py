"""``--dataset PATH``: every eval runs on a dataset a user imported; the report says REAL or SIMULATED from its
metadata, and its source picks the shipped config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dv365.core.catalog import default_data_dir
from dv365.core.cli import main
from dv365.experiments.datasets import kind_of_source, resolve_dataset
from dv365.experiments.upstream import EvalError

KUAIRAND_LOG = Path(__file__).resolve().parents[1] / "fixtures" / "kuairand-log" / "log_fixture.csv"


@pytest.fixture(scope="module")
def kuairand_sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture's KuaiRand-layout log imported as a simulator's output (``--simulated``)."""
    out = tmp_path_factory.mktemp("kr") / "kuairand-sim"
    catalog = default_data_dir() / "kuairand-pure-catalog"
    argv = ["import", "kuairand", str(KUAIRAND_LOG), "--catalog", str(catalog), "--out", str(out), "--simulated"]
    assert main(argv) == 0
    return out


def test_kind_of_source() -> None:
    assert kind_of_source("synth:kuairand-pure") == "synth"
    assert kind_of_source("pipeline tiny <- synth:kuairand-pure") == "synth"
    assert kind_of_source("movielens:ml-1m") == "movielens"
    assert kind_of_source("kuairand:log_standard_4_08_to_4_21_1k.csv") == "kuairand"
    assert kind_of_source("generic:events.csv") == "other"


def test_resolve_reads_the_metadata(kuairand_sim: Path, tmp_path: Path) -> None:
    c = resolve_dataset(str(kuairand_sim), EvalError)
    assert (c.name, c.url, c.kind, c.simulated) == ("kuairand-sim", str(kuairand_sim), "kuairand", True)
    assert resolve_dataset("movielens", EvalError).simulated is False
    with pytest.raises(EvalError, match="no _dataset.json"):
        resolve_dataset(str(tmp_path), EvalError)


def _eval(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_upstream_quick_on_an_imported_kuairand_log(
    kuairand_sim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = ["--set", "train.run.steps=4", "--set", "val_every=2", "--set", "train.run.batch_size=16"]
    argv = ["eval", "upstream", "--dataset", str(kuairand_sim), "--quick", "--seeds", "1", "--variants", "lce"]
    argv += [*small, "--jobs", "1", "--out", str(tmp_path / "rep"), "--no-progress"]
    rc, out, err = _eval(argv, capsys)
    assert rc == 0, err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["dataset"] == "kuairand-sim" and last["simulated"] is True
    assert set(last["delta_ne_pct"]["lce"]) == {"click", "like", "long_view", "watch_time"}  # kuairand.yaml's tasks
    text = (tmp_path / "rep" / "upstream-kuairand-sim-quick.md").read_text()
    assert "SIMULATED" in text and "a simulator" in text and "kuairand:" in text
    full = json.loads((tmp_path / "rep" / "upstream-kuairand-sim-quick.json").read_text())
    assert full["data"] == {
        "name": "kuairand-sim",
        "url": str(kuairand_sim),
        "source": full["data"]["source"],
        "simulated": True,
    }
    assert full["config"].endswith("upstream/kuairand.yaml")


def test_a_data_url_in_the_config_is_an_error(
    kuairand_sim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "upstream", "--dataset", str(kuairand_sim), "--quick", "--set", "train.data.url=elsewhere"]
    rc, _, err = _eval([*argv, "--out", str(tmp_path)], capsys)
    assert rc == 1 and "train.data.url" in err and "--dataset" in err


def test_an_unknown_dataset_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _eval(["eval", "upstream", "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path)], capsys)
    assert rc == 1 and "nope" in err and "dv365 import" in err


def test_importers_mark_simulated_data(kuairand_sim: Path) -> None:
    from dv365.core.timeline import TimelineDataset

    assert TimelineDataset(str(kuairand_sim)).meta.simulated is True


def test_downstream_ranking_on_an_imported_dataset(
    kuairand_sim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = ["split.windows=2", "upstream.run.steps=3", "upstream.run.batch_size=16", "downstream.history=8"]
    tiny += ["downstream.steps=4", "downstream.val_every=2", "downstream.batch_size=16"]
    argv = ["eval", "ranking", "--dataset", str(kuairand_sim), "--seeds", "1", "--out", str(tmp_path / "rep")]
    argv += ["--data-dir", str(tmp_path / "data"), "--no-progress"]
    for s in tiny:
        argv += ["--set", s]
    rc, out, err = _eval(argv, capsys)
    assert rc == 0, err[-3000:]
    last = json.loads(out.strip().splitlines()[-1])
    assert last["experiment"] == "ranking" and last["dataset"] == "kuairand-sim"
    text = (tmp_path / "rep" / "ranking-kuairand-sim.md").read_text()
    assert "SIMULATED" in text and "kuairand-sim" in text


def test_nextitem_on_an_imported_kuairand_log_with_the_real_provider(
    kuairand_sim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Next-item on the KuaiRand-layout import: sequences of impressions (implicit events), the real DV365
    provider trained (a few steps) on the requests before each user's validation target."""
    import yaml

    provider = {
        "data": {"spec": "kuairand", "hash_sizes": {"media": 1009, "author": 1009, "topic": 101}, "slicer": "numpy"},
        "tasks": [{"label": "label_click"}, {"label": "label_long_view"}],
        "model": {
            "kind": "fsa",
            "tower": {"dim": 8, "n_out": 58, "encoder": {"num_heads": 1, "head_dim": 8, "num_layers": 1}},
            "backbone": {"embedding_dim": 8, "item_hash_size": 1009, "over_arch": [8]},
        },
        "run": {"steps": 3, "batch_size": 16, "threads": 1},
    }
    cfg = {
        "dataset": "movielens",
        "seeds": 1,
        "sequence": {"source": "implicit", "actions": [], "max_len": 16, "min_items": 3},
        "model": {"dim": 8, "blocks": 1, "heads": 1, "ffn_hidden": 8, "dropout": 0.0, "prefix_tokens": 2},
        "train": {"negatives": 8, "batch_size": 16, "epochs": 1, "val_every": 2, "eval_batch_size": 64},
        "encoders": ["sasrec"],
        "short": [4],
        "fusion": ["linear"],
        "cost_users": 2,
        "provider": provider,
    }
    path = tmp_path / "nextitem.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = ["eval", "nextitem", "--dataset", str(kuairand_sim), "--config", str(path), "--out", str(tmp_path / "r")]
    rc, out, err = _eval([*argv, "--data-dir", str(tmp_path / "d"), "--no-progress"], capsys)
    assert rc == 0, err[-3000:]
    last = json.loads(out.strip().splitlines()[-1])
    assert last["dataset"] == "kuairand-sim" and last["simulated"] is True
    assert set(last["sasrec/K=4"]["HR@10"]) == {"full", "short-4", "short-4+mean", "short-4+dv365"}
    assert "SIMULATED" in (tmp_path / "r" / "nextitem-kuairand-sim.md").read_text()
