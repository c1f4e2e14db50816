"""The next-item evaluation's distant history (dv365.experiments.nextitem.distant) on tiny SIMULATED data:
nothing at or after a user's validation target reaches the upstream model, an embedding depends only on the
events before its cut, and it is what serving would give (int4 round trip, independent of the batch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from dv365.core.synth import SynthConfig, write_synth_dataset
from dv365.core.timeline import DatasetWriter, TimelineDataset, Timelines
from dv365.core.vocab import Vocabulary
from dv365.experiments.nextitem.distant import (
    DistantEmbedder,
    build_distant_provider,
    requests_before,
)
from dv365.train.checkpoint import load_checkpoint

# 10 users x ~150 events, 10 requests each (SIMULATED)
SYNTH = SynthConfig(
    users=10,
    mean_events=150,
    max_events=300,
    days=60,
    requests_per_user=10,
    request_window_days=30,
    min_history_days=20,
    seed=5,
)
SETTINGS: dict[str, Any] = {
    "data": {"spec": "kuairand", "hash_sizes": {"media": 211, "author": 211, "topic": 53}, "slicer": "numpy"},
    "model": {
        "kind": "fsa",
        "tower": {"dim": 8, "encoder": {"num_heads": 1, "head_dim": 8, "ff_mult": 1, "num_layers": 1}},
        "backbone": {"embedding_dim": 8, "item_hash_size": 211, "over_arch": [16, 8]},
    },
    "optim": {"lr": 0.003, "sparse_lr": 0.05},
    "run": {"steps": 4, "batch_size": 16, "threads": 1},
}


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    write_synth_dataset(SYNTH, str(out), progress=False, num_buckets=2)
    return str(out)


@pytest.fixture(scope="module")
def targets(synth: str) -> dict[int, int]:
    """Each user's 4th-latest request time (ties included: a request AT the target must not train); user 0
    has no target (none of its requests may train)."""
    req = TimelineDataset(synth).requests()
    uid, ts = req.column("user_id").to_numpy(), req.column("ts").to_numpy()
    return {int(u): int(np.sort(ts[uid == u])[-4]) for u in np.unique(uid) if u != 0}


@pytest.fixture(scope="module")
def trained(synth: str, targets: dict[int, int], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The provider on the full data set, and the (user, ts) of every request the trainer collated."""
    from dv365.train.data import ExampleSource

    seen: list[tuple[np.ndarray, np.ndarray]] = []
    collate = ExampleSource.collate

    def spy(self: ExampleSource, rows: np.ndarray, dedup: bool | None = None) -> Any:
        seen.append((self.requests.user_id[rows].copy(), self.requests.ts[rows].copy()))
        return collate(self, rows, dedup)

    work = tmp_path_factory.mktemp("work")
    mp = pytest.MonkeyPatch()
    mp.setattr(ExampleSource, "collate", spy)
    try:
        provider = build_distant_provider(synth, targets, SETTINGS, work, seed=0)
    finally:
        mp.undo()
    return {"provider": provider, "seen": seen, "work": work}


def _write(url: str, src: TimelineDataset, tables: dict[str, pa.Table]) -> str:
    with DatasetWriter(
        url, vocab=Vocabulary.from_dict(src.vocab.to_dict()), num_buckets=src.meta.num_buckets, simulated=True
    ) as w:
        w.add(**tables)
    return url


def _before(table: pa.Table, cut: dict[int, int]) -> pa.Table:
    """Rows of users in ``cut`` with ts < their cut, and every row of the other users."""
    uid, ts = table.column("user_id").to_numpy(), table.column("ts").to_numpy()
    keep = np.array([u not in cut or t < cut[u] for u, t in zip(uid.tolist(), ts.tolist())], bool)
    return table.filter(pa.array(keep))


def _set(t: pa.Table, name: str, values: np.ndarray) -> pa.Table:
    i = t.schema.get_field_index(name)
    return t.set_column(i, t.schema.field(i), pa.array(values, t.schema.field(i).type))


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint)["model"]  # type: ignore[no-any-return]


# -- (a) leakage -----------------------------------------------------------------------------------------
def test_requests_before_is_strict_and_drops_users_without_a_target() -> None:
    t = pa.table({"user_id": pa.array([1, 1, 1, 2, 3], pa.int64()), "ts": pa.array([5, 9, 10, 1, 0], pa.int64())})
    out = requests_before(t, {1: 10, 3: 0})
    assert out.column("user_id").to_pylist() == [1, 1] and out.column("ts").to_pylist() == [5, 9]
    assert requests_before(t, {}).num_rows == 0


def test_no_request_at_or_after_its_users_target_reaches_training(
    trained: dict[str, Any], synth: str, targets: dict[int, int]
) -> None:
    users = np.concatenate([u for u, _ in trained["seen"]])
    ts = np.concatenate([t for _, t in trained["seen"]])
    assert len(users) >= SETTINGS["run"]["steps"] * SETTINGS["run"]["batch_size"]
    assert all(u in targets and t < targets[u] for u, t in zip(users.tolist(), ts.tolist()))
    info = trained["provider"].info
    kept = TimelineDataset(info["data"]).requests()
    full = TimelineDataset(synth).requests()
    # what the trainer could read: exactly the requests strictly before the target (9 of 10 users x 6 each)
    assert kept.num_rows == info["requests_kept"] == len(targets) * (SYNTH.requests_per_user - 4)
    assert info["requests_in"] == full.num_rows
    at_target = pc.sum(
        pc.equal(full.column("ts"), pa.array([targets.get(int(u), -1) for u in full.column("user_id").to_pylist()]))
    ).as_py()
    assert at_target >= len(targets)  # the tie rule was exercised: those rows exist and were dropped


def test_weights_do_not_change_when_everything_after_the_targets_is_deleted(
    trained: dict[str, Any], synth: str, targets: dict[int, int], tmp_path: Path
) -> None:
    src = TimelineDataset(synth)
    tables = {k: src.read_table(k) for k in ("explicit", "implicit", "requests")}
    pruned = {k: _before(t, targets) for k, t in tables.items()}
    removed = sum(tables[k].num_rows - pruned[k].num_rows for k in ("explicit", "implicit"))
    assert removed > 100  # a real change of the data set
    url = _write(str(tmp_path / "pruned"), src, pruned)
    other = build_distant_provider(url, targets, SETTINGS, tmp_path / "work", seed=0)
    assert other.info["checkpoint"] != trained["provider"].info["checkpoint"]
    a, b = _weights(trained["provider"].info["checkpoint"]), _weights(other.info["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the comparison sees a single extra training request: user 1's target one request later
    later = {**targets, 1: targets[1] + 1}
    c = _weights(build_distant_provider(synth, later, SETTINGS, tmp_path / "work", seed=0).info["checkpoint"])
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_rerun_reuses_the_checkpoint(trained: dict[str, Any], synth: str, targets: dict[int, int]) -> None:
    again = build_distant_provider(synth, dict(targets), SETTINGS, trained["work"], seed=0)
    assert again.info["reused"] and again.info["checkpoint"] == trained["provider"].info["checkpoint"]


# -- (b)-(e) the embedding -----------------------------------------------------------------------------
def _cuts(synth: str) -> dict[int, int]:
    """A cut AT an explicit event in the middle of each user's history (the event itself is after the cut)."""
    ex = TimelineDataset(synth).read_table("explicit")
    uid, ts = ex.column("user_id").to_numpy(), ex.column("ts").to_numpy()
    return {int(u): int(np.sort(ts[uid == u])[(uid == u).sum() // 2]) for u in np.unique(uid)}


def test_embedding_depends_only_on_events_before_the_cut(trained: dict[str, Any], synth: str) -> None:
    provider: DistantEmbedder = trained["provider"]
    cut = _cuts(synth)
    users = np.array(sorted(cut), np.int64)
    cuts = np.array([cut[u] for u in users.tolist()], np.int64)
    ref, present = provider.embed(users, cuts)
    assert present.all() and ref.shape == (len(users), provider.out_tokens, provider.dim)

    # every event at or after the cut replaced: deleted, and new ones AT the cut and later
    src = TimelineDataset(synth)
    tables = {}
    for kind in ("explicit", "implicit"):
        t = src.read_table(kind)
        uid, ts = t.column("user_id").to_numpy(), t.column("ts").to_numpy()
        cut_of = np.array([cut[u] for u in uid.tolist()], np.int64)
        late = t.filter(pa.array(ts >= cut_of))
        late = _set(late, "media_id", late.column("media_id").to_numpy() + 7)
        shifted = _set(late, "ts", late.column("ts").to_numpy() + 3600)
        _, first = np.unique(late.column("user_id").to_numpy(), return_index=True)
        at_cut = late.take(pa.array(first))  # one new event per user exactly at the cut
        at_cut = _set(at_cut, "ts", np.array([cut[u] for u in at_cut.column("user_id").to_pylist()], np.int64))
        tables[kind] = pa.concat_tables([_before(t, cut), shifted, at_cut])
    tl = Timelines.from_arrow(tables["explicit"], tables["implicit"], src.vocab, user_ids=users, validate=False)
    changed = DistantEmbedder(provider.model, tl, batch_rows=provider.batch_rows)
    got, present2 = changed.embed(users, cuts)
    assert present2.all()
    assert torch.equal(got, ref)
    # ...and the change is visible to a later cut (the test can fail)
    later, _ = changed.embed(users, cuts + 1)
    assert not torch.equal(later, provider.embed(users, cuts + 1)[0])


def test_no_event_before_the_cut_gives_zeros_and_absent(trained: dict[str, Any], synth: str) -> None:
    provider: DistantEmbedder = trained["provider"]
    src = TimelineDataset(synth)
    first = min(int(pc.min(src.read_table(k, [3]).column("ts")).as_py()) for k in ("explicit", "implicit"))
    users = np.array([3, 3, 3, 999_999], np.int64)
    cuts = np.array([first - 1, first, first + 1, first + 10**7], np.int64)
    x, present = provider.embed(users, cuts)
    assert present.tolist() == [False, False, True, False]  # strictly before: the first event at `first`
    assert not x[[0, 1, 3]].any() and x[2].abs().sum() > 0


def test_output_is_the_float_tower_within_one_int4_step(trained: dict[str, Any], synth: str) -> None:
    provider: DistantEmbedder = trained["provider"]
    cut = _cuts(synth)
    users = np.array(sorted(cut), np.int64)
    cuts = np.array([cut[u] for u in users.tolist()], np.int64) + 86_400
    q, present = provider.embed(users, cuts)
    f, present_f = provider.embed_float(users, cuts)
    assert present.all() and (present == present_f).all()
    step = (f.amax(dim=-1, keepdim=True) - f.amin(dim=-1, keepdim=True)) / 15  # [U, N, 1]
    assert ((q - f).abs() <= step * 1.01 + 1e-6).all()
    assert not torch.equal(q, f)
    assert max(len(torch.unique(row)) for row in q.reshape(-1, provider.dim)) <= 16  # on the int4 grid


def test_batch_composition_does_not_change_a_row(trained: dict[str, Any], synth: str) -> None:
    provider: DistantEmbedder = trained["provider"]
    cut = _cuts(synth)
    users = np.array(sorted(cut), np.int64)
    cuts = np.array([cut[u] for u in users.tolist()], np.int64)
    alone = torch.cat([provider.embed_float(users[i : i + 1], cuts[i : i + 1])[0] for i in range(len(users))])
    rng = np.random.default_rng(0)
    mix_u = np.concatenate([users, rng.choice(users, 20)])
    mix_c = np.concatenate([cuts, rng.integers(cuts.min(), cuts.max() + 86_400 * 5, 20)])
    perm = rng.permutation(len(mix_u))
    mixed, _ = provider.embed_float(mix_u[perm], mix_c[perm])
    back = mixed[np.argsort(perm)][: len(users)]
    assert torch.equal(back, alone)
    # several padded batches (3 rows each): other positions, other batch-mates, the same bytes
    small = DistantEmbedder(provider.model, provider.timelines, batch_rows=3)
    assert torch.equal(
        torch.cat([small.embed_float(users[i : i + 1], cuts[i : i + 1])[0] for i in range(len(users))]),
        small.embed_float(mix_u[perm], mix_c[perm])[0][np.argsort(perm)][: len(users)],
    )
    # the cached int4 path: a fresh cache and another composition give the same bytes
    ref, _ = provider.embed(users, cuts)
    provider.clear_cache()
    again, _ = provider.embed(mix_u[perm], mix_c[perm])
    assert torch.equal(again[np.argsort(perm)][: len(users)], ref)


def test_numpy_backend_gives_the_bytes_of_dv365_export(trained: dict[str, Any], synth: str) -> None:
    """At one cut with no event exactly at it, the embedding is the de-quantized row of the export's encoder
    at ``as_of = cut + gap`` (numpy slicer, as UserEncoder): byte for byte."""
    from dv365.core.quantize import RowFormat, dequantize_rows
    from dv365.export.encode import UserEncoder

    provider: DistantEmbedder = trained["provider"]
    tl = provider.timelines
    every_ts = np.concatenate([tl.explicit.ts, tl.implicit.ts])
    cut = int(np.median(every_ts))
    while (every_ts == cut).any():
        cut += 1
    enc = UserEncoder(provider.model, tl.vocab, RowFormat(dim=provider.dim, rows_per_user=provider.out_tokens, bits=4))
    ref = dequantize_rows(
        torch.from_numpy(enc.encode(tl, cut + provider.gap_s)).reshape(len(tl), provider.out_tokens, -1), 4
    )
    mine = DistantEmbedder(provider.model, tl, batch_rows=enc.batch_users, backend="numpy")
    x, present = mine.embed(tl.user_ids, np.full(len(tl), cut))
    assert present.all() and torch.equal(x, ref)
    # the default slicer (numba when it imports) is within one int4 step of it
    y, _ = provider.embed(tl.user_ids, np.full(len(tl), cut))
    step = (ref.amax(dim=-1, keepdim=True) - ref.amin(dim=-1, keepdim=True)) / 15
    assert ((y - ref).abs() <= step * 1.01 + 1e-6).all()
