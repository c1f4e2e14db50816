"""``dv365 eval nextitem``: the leave-one-out split, the arms' windows, metrics, SASRec causality, R, and the
command end to end on tiny SIMULATED data with a fake DV365 provider (structure, not numbers)."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dv365.core.cli import main
from dv365.experiments.nextitem.arms import DistantHistoryProvider, ModelConfig, NextItemModel
from dv365.experiments.nextitem.data import NextItemError, Sequences, gather
from dv365.experiments.nextitem.encoders import EncoderConfig
from dv365.experiments.nextitem.report import recovered_fraction, report_stem, summarize, user_interval
from dv365.experiments.nextitem.run import config_profile
from dv365.experiments.nextitem.settings import Settings, default_config, load_settings
from dv365.experiments.nextitem.train import ArmData, mean_metrics, per_user_metrics, ranks_of, sampled_softmax_loss


class FakeProvider:
    """A :class:`DistantHistoryProvider` without DV365: a fixed function of (user, cut), so a wrong cut shows;
    users divisible by 3 are missing. Records every call."""

    out_tokens, dim = 58, 8

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def embed(self, user_ids: np.ndarray, cut_ts: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        self.calls.append((np.asarray(user_ids).copy(), np.asarray(cut_ts).copy()))
        u = torch.as_tensor(np.asarray(user_ids, np.float64))[:, None, None]
        c = torch.as_tensor(np.asarray(cut_ts, np.float64))[:, None, None]
        grid = torch.arange(self.out_tokens * self.dim, dtype=torch.float64).reshape(1, self.out_tokens, self.dim)
        return torch.sin(u + 0.1 * grid + 1e-3 * c).float(), np.asarray(user_ids) % 3 != 0


def _seqs() -> Sequences:
    """User 10: 8 items (ts 0..70, item 100 + ts); user 11: 2 items (dropped); user 12: 5 items, two at ts 5."""
    user = [10] * 8 + [11] * 2 + [12] * 5
    ts = list(range(0, 80, 10)) + [0, 1] + [9, 5, 5, 7, 8]
    item = [100 + t for t in ts[:8]] + [1, 2] + [50, 51, 52, 53, 54]
    return Sequences.from_events(np.array(user), np.array(item), np.array(ts), min_items=3)


def test_split_targets_are_last_and_second_to_last() -> None:
    s = _seqs()
    assert list(s.user_ids) == [10, 12] and s.dropped_users == 1
    ids = s.item_ids[s.items - 1]  # codes -> original ids
    # user 12 sorted by (ts, stored order): 51 (ts 5), 52 (ts 5), 53, 54, 50
    assert list(ids[s.offsets[1] :]) == [51, 52, 53, 54, 50]
    assert list(ids[s.target_pos("test")]) == [170, 50]
    assert list(ids[s.target_pos("val")]) == [160, 54]
    for split in ("val", "test"):
        w = s.eval_windows(split, 200)
        b = gather(s, w, train=False)
        assert (b["target"].numpy() == s.items[s.target_pos(split)]).all()
        assert (w.end == s.target_pos(split)).all()  # the history ends right before its target
        for i in range(len(w)):  # no target in its own history
            assert s.target_pos(split)[i] not in range(w.start[i], w.end[i])
    # training targets: every position before the validation target, never the val / test items
    tw = s.train_windows(3)
    b = gather(s, tw, train=True)
    targets = b["targets"][b["valid"]].numpy()
    val_test = set(s.items[s.target_pos("val")]) | set(s.items[s.target_pos("test")])
    assert not set(targets) & val_test
    assert sorted(targets) == sorted(np.concatenate([s.items[1:6], s.items[s.offsets[1] + 1 : s.offsets[1] + 3]]))


def test_windows_short_k_and_distant_cut() -> None:
    s = _seqs()
    k = 3
    w = s.eval_windows("test", k)
    b = gather(s, w, train=False)
    for i in range(len(w)):
        end = s.target_pos("test")[i]
        assert list(b["items"][i][b["valid"][i]].numpy()) == list(s.items[end - k : end])  # exactly the last K
        assert w.cut_ts[i] == s.ts[end - k]  # cut at the window's first item
    data = ArmData(s, {"test": w}, extra="mean")
    mb = data.batch("test", np.arange(len(w)))
    bags = np.split(mb["bag"].numpy(), mb["bag_offsets"].numpy()[1:])
    for i in range(len(w)):
        lo, end = s.offsets[i], s.target_pos("test")[i]
        user_ts, user_items = s.ts[lo : end + 1], s.items[lo : end + 1]
        expect = user_items[user_ts < w.cut_ts[i]]
        assert list(bags[i]) == list(expect)
        window_and_later = set(range(end - k, end + 1))
        assert not any(lo + j in window_and_later for j in np.flatnonzero(user_ts < w.cut_ts[i]))
    # user 12, window (53, 54, 50)? no: test window = last 3 before 50 = (52, 53, 54); 51 shares 52's ts 5,
    # so it is neither in the window nor in the distant part (the cut is by time)
    assert list(s.item_ids[bags[1] - 1]) == []
    # training chunks: each chunk's cut is its first item's ts
    tw = s.train_windows(2)
    assert (tw.cut_ts == s.ts[tw.start]).all() and ((tw.end - tw.start) <= 2).all()


def test_provider_cache_reads_each_user_cut_once() -> None:
    from dv365.experiments.nextitem.train import DistantCache

    s = _seqs()
    p = FakeProvider()
    assert isinstance(p, DistantHistoryProvider)
    wins = {"train": s.train_windows(2), "val": s.eval_windows("val", 2), "test": s.eval_windows("test", 2)}
    cache = DistantCache.build(p, s, wins)
    asked = np.concatenate([np.stack(c, 1) for c in p.calls])
    assert len(np.unique(asked, axis=0)) == len(asked)  # each (user, cut) once
    data = ArmData(s, wins, extra="dv365", cache=cache)
    b = data.batch("test", np.arange(2))
    tok, pres = p.embed(s.user_ids, wins["test"].cut_ts)
    assert torch.equal(b["dv365"], tok) and list(b["present"].numpy()) == list(pres)


def test_metrics_hand_computed() -> None:
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])  # row 0 = padding
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # user 0 scores items 1..4: 1, .8, 0, -1; target item 3 (score 0): two items above -> rank 2
    # user 1 scores: 0, .6, 1, 0; target item 3 (score 1): rank 0
    ranks = ranks_of(user, items, torch.tensor([3, 3])).numpy()
    assert list(ranks) == [2, 0]
    m = per_user_metrics(np.array([2, 0, 60, 300]))
    assert list(m["HR@10"]) == [1, 1, 0, 0] and list(m["HR@50"]) == [1, 1, 0, 0] and list(m["HR@200"]) == [1, 1, 1, 0]
    assert m["NDCG@10"][0] == pytest.approx(0.5) and m["NDCG@10"][1] == pytest.approx(1.0)
    assert m["NDCG@200"][2] == pytest.approx(1 / math.log2(62))
    avg = mean_metrics(np.array([2, 0, 60, 300]))
    assert avg["HR@10"] == pytest.approx(0.5) and avg["NDCG@10"] == pytest.approx(0.375)


@pytest.mark.parametrize("kind", ["sasrec", "hstu"])
def test_encoder_is_causal(kind: str) -> None:
    torch.manual_seed(0)
    m = NextItemModel(ModelConfig(EncoderConfig(kind=kind, dim=8, ffn_hidden=8), num_items=30, max_len=6)).eval()
    items = torch.tensor([[0, 3, 4, 5, 6, 7]])
    valid = items > 0
    ts = torch.arange(6)[None] * 100
    a = m({"items": items, "valid": valid, "ts": ts})
    changed = items.clone()
    changed[0, 4:] = torch.tensor([20, 21])
    b = m({"items": changed, "valid": valid, "ts": ts})
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)  # positions before the change are unchanged
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize(
    "extra,fusion", [("mean", "prefix"), ("dv365", "prefix"), ("dv365", "linear"), ("mean", "gate")]
)
def test_fused_model_shapes_and_default_for_missing(extra: str, fusion: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(EncoderConfig(dim=8, ffn_hidden=8), 30, 4, extra, fusion, dv365_tokens=58, dv365_dim=8)
    m = NextItemModel(cfg).eval()
    b = {
        "items": torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]),
        "ts": torch.zeros(2, 4, dtype=torch.long),
        "valid": torch.tensor([[False, True, True, True], [True] * 4]),
        "dv365": torch.randn(2, 58, 8),
        "present": torch.tensor([True, False]),
        "bag": torch.tensor([9, 10]),
        "bag_offsets": torch.tensor([0, 2]),
        "bag_len": torch.tensor([2, 0]),
    }
    out = m(b)
    norms = out.norm(dim=-1)[b["valid"]]
    assert out.shape == (2, 4, 8) and torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    tok = m.extra_tokens(b)
    assert torch.equal(tok[1], m.default)  # no distant history -> the learned default


def test_recovered_fraction_on_made_up_numbers() -> None:
    r = recovered_fraction(full=[0.30, 0.32, 0.31], short=[0.20, 0.22, 0.21], extra=[0.25, 0.27, 0.24])
    assert r["values"] == [0.5, 0.5, 0.3] and r["mean"] == pytest.approx(0.4333, abs=1e-4)
    assert r["std"] == pytest.approx(float(np.std([0.5, 0.5, 0.3], ddof=1)), abs=1e-4)
    assert r["noise"] is False  # 0.433 > 2 * 0.115 / sqrt(3)
    undefined = recovered_fraction(full=[0.2, 0.3], short=[0.25, 0.2], extra=[0.3, 0.25])
    assert undefined["undefined_seeds"] == 1 and undefined["n"] == 1 and undefined["noise"] is True
    res = {
        "short": [20],
        "encoders": {
            "sasrec": {
                "arms": {
                    n: {"test": {"all": {"HR@10": v, "NDCG@10": v}, "long20": {"HR@10": v, "NDCG@10": v}}}
                    for n, v in {
                        "full": [0.30, 0.32, 0.31],
                        "short-20": [0.20, 0.22, 0.21],
                        "short-20+mean": [0.21, 0.22, 0.22],
                        "short-20+dv365": [0.25, 0.27, 0.24],
                    }.items()
                }
            }
        },
    }
    s = summarize(res)["sasrec/K=20"]
    assert s["R"]["all"]["short-20+dv365"]["HR@10"]["mean"] == pytest.approx(0.4333, abs=1e-4)
    assert s["verdicts"]["full beats short-20 (HR@10)"] is True
    assert s["verdicts"]["short-20+dv365 beats short-20 (HR@10)"] is True
    assert s["verdicts"]["short-20+dv365 beats short-20+mean (HR@10)"] is True
    assert s["verdicts"]["short-20+mean beats short-20 (HR@10)"] is False  # +0.0067 ± 0.0058: noise


def test_user_interval_decides_when_seeds_agree_on_a_few_users() -> None:
    """Three seeds that agree (seed rule: beyond noise) but owe it to 2 of 300 test users: the paired bootstrap
    over users contains 0 and the verdict is no; the same per-user gain on 150 users is beyond noise by both."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2000, (3, 300))  # ranks of short-20 per seed and user; a rank < 10 is a hit
    few = base.copy()
    few[:, :2] = 0  # two users become hits on every seed
    many = base.copy()
    many[:, :150] = 0
    lengths = np.full(300, 100)

    def res(extra_ranks: np.ndarray) -> dict:
        arms = {}
        for name, ranks in (("full", extra_ranks), ("short-20", base), ("short-20+dv365", extra_ranks)):
            per_seed = [mean_metrics(r) for r in ranks]
            test = {m: [p[m] for p in per_seed] for m in ("HR@10", "NDCG@10")}
            arms[name] = {
                "test": {"all": test, "long20": test},
                "runs": [{"test_ranks": r.tolist()} for r in ranks],
            }
        return {
            "short": [20],
            "long_margin": 20,
            "user_lengths": lengths.tolist(),
            "encoders": {"sasrec": {"arms": arms}},
        }

    s = summarize(res(few))["sasrec/K=20"]
    d = s["deltas"]["all"]["short-20+dv365"]["HR@10"]
    assert d["noise"] is False and d["mean"] > 0  # the seeds agree exactly
    assert d["users"]["users"] == 300 and d["users"]["low"] <= 0 < d["users"]["high"]
    assert s["verdicts"]["short-20+dv365 beats short-20 (HR@10)"] is False
    assert "users" in s["deltas"]["long"]["short-20+dv365"]["HR@10"]  # the long subset from user_lengths
    s = summarize(res(many))["sasrec/K=20"]
    assert s["deltas"]["all"]["short-20+dv365"]["HR@10"]["users"]["low"] > 0
    assert s["verdicts"]["short-20+dv365 beats short-20 (HR@10)"] is True
    a, b = rng.random((3, 50)), rng.random((3, 50))
    u = user_interval(a, b)
    assert u == user_interval(a, b) and u["low"] < u["mean"] < u["high"]  # a fixed bootstrap seed
    assert u["mean"] == pytest.approx(float((a - b).mean()), abs=1e-5)


def test_quick_and_full_configs_load() -> None:
    q = load_settings(default_config("movielens", True))
    f = load_settings(default_config("movielens", False))
    assert isinstance(q, Settings) and q.seeds == 3 and tuple(q.short) == (20,)
    assert tuple(q.encoders) == ("sasrec", "hstu") and q.train.patience > 0  # both encoders, length on validation
    assert tuple(f.short) == (10, 20, 50) and f.train.epochs == 101 and f.train.negatives == 128
    assert f.train.negatives_group == 1  # the published per-position sampler
    assert load_settings(default_config("synth", True)).dataset == "synth"
    # the medium run: the published model settings, both encoders, its length chosen on validation
    m = load_settings("movielens-medium")
    assert (m.model, m.train.negatives, m.train.lr) == (f.model, f.train.negatives, f.train.lr)
    assert tuple(m.encoders) == ("sasrec", "hstu") and tuple(m.short) == (10, 20) and m.train.patience > 0
    assert m.seeds >= 3 and m.train.val_every > 0 and m.train.full_epochs >= m.train.epochs


def test_report_name_follows_a_shipped_config(tmp_path: Path) -> None:
    """``--config movielens-medium`` writes nextitem-movielens-medium.*, beside (not over) the default and quick
    reports; a config given as a file path keeps the default name."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("seeds: 1\n")
    cases = [
        (None, False, "nextitem-movielens"),
        (None, True, "nextitem-movielens-quick"),
        ("movielens-medium", False, "nextitem-movielens-medium"),
        ("movielens-quick", False, "nextitem-movielens-quick"),
        ("movielens-quick", True, "nextitem-movielens-quick"),
        ("movielens", False, "nextitem-movielens"),
        (str(cfg), True, "nextitem-movielens-quick"),
    ]
    for config, quick, stem in cases:
        res = {"dataset": "movielens", "quick": quick, "profile": config_profile(config, "movielens")}
        assert report_stem(res) == stem, (config, quick)
    assert report_stem({"dataset": "movielens", "quick": False}) == "nextitem-movielens"  # older JSON


TINY = {
    "dataset": "synth",
    "synth": {"users": 10, "mean_events": 60, "max_events": 120, "days": 40, "requests_per_user": 5, "seed": 0},
    "seeds": 2,
    "sequence": {"source": "implicit", "actions": [], "max_len": 16, "min_items": 3},
    "model": {"dim": 8, "blocks": 1, "heads": 1, "ffn_hidden": 8, "dropout": 0.0, "prefix_tokens": 2},
    "train": {"negatives": 8, "batch_size": 16, "epochs": 1, "val_every": 2, "eval_batch_size": 64},
    "encoders": ["sasrec", "hstu"],
    "short": [4],
    "fusion": ["prefix", "linear"],
    "cost_users": 2,
}


def test_cli_end_to_end_with_fake_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, object] = {}

    def build_distant_provider(dataset_url, val_target_ts, settings, work_dir, seed, device):  # type: ignore[no-untyped-def]
        seen.update(url=dataset_url, val=val_target_ts, seed=seed)
        return FakeProvider()

    fake = types.ModuleType("dv365.experiments.nextitem.distant")
    fake.build_distant_provider = build_distant_provider  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dv365.experiments.nextitem.distant", fake)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "reports"
    argv = ["eval", "nextitem", "--dataset", "synth", "--quick", "--config", str(cfg), "--out", str(out)]
    rc = main([*argv, "--data-dir", str(tmp_path / "data"), "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0
    last = json.loads(stdout.strip().splitlines()[-1])  # the summary is the LAST line
    assert last["experiment"] == "nextitem" and last["simulated"] is True and last["seeds"] == [0, 1]
    assert set(last["sasrec/K=4"]["HR@10"]) == {"full", "short-4", "short-4+mean", "short-4+dv365"}
    md = Path(last["report"]["markdown"])
    assert md.name == "nextitem-synth-quick.md" and Path(last["report"]["json"]).exists()
    text = md.read_text()
    assert "SIMULATED" in text and "R HR@10" in text and "beyond noise" in text and "ms / user" in text
    assert "95 % over users" in text and "paired-bootstrap interval over test users" in text
    assert (
        "users_95" in json.dumps(last["sasrec/K=4"]["deltas"])
        and "std" in last["sasrec/K=4"]["R"]["short-4+dv365"]["HR@10"]
    )
    res = json.loads(Path(last["report"]["json"]).read_text())
    runs = res["encoders"]["sasrec"]["arms"]["short-4"]["runs"]
    assert len(runs[0]["test_ranks"]) == res["facts"]["users"] == len(res["user_lengths"])
    assert res["label"] == "SIMULATED" and res["encoders"]["hstu"]["fusion"]["4/dv365"]["chosen"] in (
        "prefix",
        "linear",
    )
    # the provider was trained only up to each user's validation target
    assert isinstance(seen["val"], dict) and len(seen["val"]) == res["facts"]["users"]


def test_training_is_reproducible_for_a_seed() -> None:
    from dv365.experiments.nextitem.train import FitSettings, fit

    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(6), 12)
    s = Sequences.from_events(user, rng.integers(0, 15, len(user)), np.tile(np.arange(12) * 60, 6))
    data = ArmData(s, {"train": s.train_windows(4), "val": s.eval_windows("val", 4), "test": s.eval_windows("test", 4)})
    fs = FitSettings(negatives=4, batch_size=4, epochs=2, val_every=2)

    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        m = NextItemModel(ModelConfig(EncoderConfig(dim=8, ffn_hidden=8, dropout=0.2), s.num_items, 4))
        fit(m, data, fs, seed)
        return m.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_dataset_path_without_uniti_data_is_refused(tmp_path: Path) -> None:
    from dv365.experiments.nextitem.data import NextItemError
    from dv365.experiments.nextitem.run import dataset_url

    with pytest.raises(NextItemError, match="no _dataset.json"):
        dataset_url(str(tmp_path), load_settings(default_config("movielens", True)), tmp_path, False)


def test_grouped_negatives_score_the_shared_draw_per_position() -> None:
    """``negatives_group`` G: positions 0..G-1 share the first draw, G..2G-1 the second... (the last group
    padded); the loss equals the per-position formula on those ids, the positive is masked where drawn, and
    over many draws the mean loss matches the per-position sampler's (same distribution per position)."""
    torch.manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(12, 6), dim=-1)
    items[0] = 0.0
    h = torch.nn.functional.normalize(torch.randn(11, 6), dim=-1)
    targets = torch.randint(1, 12, (11,))
    for group in (4, 16):
        got = sampled_softmax_loss(items, h, targets, 9, 0.5, torch.Generator().manual_seed(3), group)
        draw = torch.randint(1, 12, (-(-11 // group), 9), generator=torch.Generator().manual_seed(3))
        neg = draw.repeat_interleave(group, dim=0)[:11]
        logits = torch.cat([(h * items[targets]).sum(-1, keepdim=True), (items[neg] * h[:, None]).sum(-1)], 1)
        logits[:, 1:] = logits[:, 1:].masked_fill(neg == targets[:, None], -5e4 * 0.5)
        want = torch.nn.functional.cross_entropy(logits / 0.5, torch.zeros(11, dtype=torch.long), reduction="sum")
        assert (neg == targets[:, None]).any()  # the mask is exercised
        torch.testing.assert_close(got, want)
    means = {
        g: np.mean(
            [
                float(sampled_softmax_loss(items, h, targets, 9, 0.5, torch.Generator().manual_seed(s), g))
                for s in range(300)
            ]
        )
        for g in (1, 4)
    }
    assert abs(means[4] - means[1]) < 0.03 * means[1], means
    with pytest.raises(NextItemError, match="negatives_group"):
        load_settings("movielens-quick", {"train.negatives_group": 0})
