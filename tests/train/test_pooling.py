"""SlicedPooling: [B, N, D] tokens in spec order equal the (weighted) mean of each raw bag's embedding rows.

The KJTs here are built from ``reference_slice`` (the plain-Python slicing semantics), so these tests check
the pooling alone, whichever backend the vectorised Slicer uses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from dv365.core.slicing import SliceSpec, reference_slice
from dv365.core.synth import SynthConfig, generate_timelines
from dv365.train.config import DataConfig
from dv365.train.data import load_spec
from dv365.train.pooling import SlicedPooling, unique_ids, use_sparse_gradients

DAY = 86_400
D = 4


@pytest.fixture(scope="module")
def sliced() -> tuple[SliceSpec, object, np.ndarray]:
    cfg = SynthConfig(users=3, mean_events=300, max_events=600, days=40, requests_per_user=0, seed=5)
    tl = generate_timelines(cfg)
    spec = load_spec(DataConfig(spec="kuairand", hash_sizes={"media": 61, "author": 53, "topic": 17}))
    req = np.array([cfg.end_ts - 2 * DAY, cfg.end_ts - 5 * DAY, cfg.end_ts], np.int64)
    return spec, tl, req


def reference_kjt(spec: SliceSpec, tl: object, req: np.ndarray) -> KeyedJaggedTensor:
    """The deduplicated, count-weighted bags of ``reference_slice`` as a weighted KJT (key-major)."""
    bags = reference_slice(spec, tl, req)
    B = len(req)
    values, weights, lengths = [], [], []
    for f in spec.features:
        for row in range(B):
            bag = bags[(f.name, row)]
            values += [i for i, _ in bag]
            weights += [w for _, w in bag]
            lengths.append(len(bag))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=spec.feature_names,
        values=torch.tensor(values, dtype=torch.long),
        weights=torch.tensor(weights, dtype=torch.float32),
        lengths=torch.tensor(lengths, dtype=torch.int32),
    )


@pytest.fixture(scope="module")
def kjt(sliced) -> KeyedJaggedTensor:
    return reference_kjt(*sliced)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "torchrec-ebc"])
def test_tokens_equal_manual_mean_of_the_raw_bags_rows(sliced, kjt, grouped: bool) -> None:
    spec, tl, req = sliced
    torch.manual_seed(0)
    pooling = SlicedPooling(spec, D, grouped=grouped)
    tokens = pooling(kjt)
    assert tokens.shape == (len(tl), len(spec.features), D)
    raw_spec = SliceSpec.from_dict(
        {**spec.raw, "id_types": {k: {**v, "dedup": False} for k, v in spec.raw["id_types"].items()}}
    )
    raw = reference_slice(raw_spec, tl, req)
    assert sum(len(v) for v in raw.values()) > kjt.values().numel()  # the KJT is deduplicated...
    # ...but pooling equals the plain mean over every raw occurrence (weighted mean for Eq. 5 features)
    tables = {name: bag.weight.detach() for name, bag in pooling.ebc.embedding_bags.items()}
    nonempty = 0
    for k, f in enumerate(spec.features):  # token k is feature k of the spec
        for row in range(len(tl)):
            occ = raw[(f.name, row)]
            ids = torch.tensor([i for i, _ in occ], dtype=torch.long)
            if not occ:
                expect = torch.zeros(D)
            elif f.weighted:
                w = torch.tensor([x for _, x in occ], dtype=torch.float32)
                expect = (w[:, None] * tables[f.table][ids]).sum(0)
            else:
                expect = tables[f.table][ids].mean(0)
                nonempty += 1
            torch.testing.assert_close(tokens[row, k], expect, rtol=1e-5, atol=1e-6)
    assert nonempty > 100


def test_grouped_lookup_matches_torchrec_ebc_values_and_gradients(sliced, kjt) -> None:
    spec, tl, req = sliced
    torch.manual_seed(0)
    ref = SlicedPooling(spec, D, grouped=False)
    fast = SlicedPooling(spec, D, grouped=True)
    fast.load_state_dict(ref.state_dict())
    use_sparse_gradients(fast)
    target = torch.randn(len(tl), len(spec.features), D)
    outs = []
    for m in (ref, fast):
        out = m(kjt)
        (out * target).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    shuffled = kjt.permute(list(range(len(spec.features)))[::-1])  # KJT key order does not matter
    torch.testing.assert_close(fast(shuffled), outs[1])
    for name in spec.tables:
        g_ref = ref.ebc.embedding_bags[name].weight.grad
        g_fast = fast.ebc.embedding_bags[name].weight.grad
        assert g_fast.is_sparse
        torch.testing.assert_close(g_fast.to_dense(), g_ref, rtol=1e-4, atol=1e-5)


def test_unique_ids_agrees_with_torch_unique() -> None:
    v = torch.tensor([7, 3, 3, 9, 0, 7, 7], dtype=torch.long)
    ids, inv = unique_ids(v, 10)
    ref_ids, ref_inv = torch.unique(v, return_inverse=True)
    assert torch.equal(ids, ref_ids) and torch.equal(inv, ref_inv)


def test_pooling_mode_is_module_state_and_auto_follows_the_context(sliced, kjt) -> None:
    """``mode="auto"`` pools table-grouped where gradients can be recorded (training, eval under no_grad) and
    per feature under inference_mode (the export), with the same numbers; callers never flip it."""
    from dv365.train.errors import TrainConfigError

    spec, tl, req = sliced
    torch.manual_seed(0)
    pooling = SlicedPooling(spec, D)
    assert pooling.mode == "auto" and pooling.grouped
    with torch.no_grad():
        assert pooling.grouped
        a = pooling(kjt)
    with torch.inference_mode():
        assert not pooling.grouped
        b = pooling(kjt)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert pooling.set_mode("per_feature") is pooling and not pooling.grouped
    pooling.grouped = True  # the older switch maps to a mode
    assert pooling.mode == "grouped" and SlicedPooling(spec, D, grouped=False).mode == "per_feature"
    with pytest.raises(TrainConfigError, match="pooling mode 'fast'"):
        pooling.set_mode("fast")
