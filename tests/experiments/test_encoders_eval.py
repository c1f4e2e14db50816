"""App. C evaluation encodes each distinct history slice once (requests share slices) and must give the
metrics of encoding every request on its own, for every encoder."""

import numpy as np
import pytest
import torch

from dv365.experiments.downstream.context import prepare_url
from dv365.experiments.downstream.encoders import Slices, _hstu, _model, evaluate
from dv365.experiments.downstream.settings import Settings, SynthSettings
from dv365.train.metrics import MultiTaskMeter


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> Slices:
    synth = SynthSettings(users=6, mean_events=800, max_events=1500, days=60, requests_per_user=40, seed=3)
    url = prepare_url("synth", synth, None, tmp_path_factory.mktemp("enc"), False)
    sl = Slices(url, "implicit", ("like", "long_view"))
    sl.len_all = sl.len_all.copy()
    sl.len_all[::17] = 0  # some requests without history (the synth users all have some)
    return sl


@pytest.mark.parametrize("kind", ["mean", "position", "hstu"])
def test_deduplicated_evaluation_matches_per_request(slices: Slices, kind: str) -> None:
    settings, H, cap = Settings(dataset="synth"), 101, 120
    rows = np.random.default_rng(0).permutation(len(slices.req))  # every request, shuffled
    st, ln = slices.spans(rows, cap)
    distinct = len(np.unique(np.stack([st, ln], 1), axis=0))
    assert distinct < len(rows) and (ln == 0).any() and (ln == cap).any()  # shared, empty and capped slices
    torch.manual_seed(0)
    m = _model(kind, cap, settings.encoders, _hstu(settings, 32), len(slices.tasks), H)
    m.init_head_bias([-1.0, -0.5])
    with torch.no_grad():  # non-trivial weights everywhere (the heads start at zero)
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    got = evaluate(m, slices, rows, cap, kind, H)
    ref = MultiTaskMeter(slices.tasks)
    m.eval()
    with torch.no_grad():
        for s in range(0, len(rows), 7):  # small, unsorted batches: padding differs from the dedup path
            b = slices.batch(rows[s : s + 7], cap, kind, H)
            ref.update(m(b), b["labels"])
    want = ref.compute()
    assert got.keys() == want.keys()
    for task in want:
        for k, v in want[task].items():
            assert got[task][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (task, k)
