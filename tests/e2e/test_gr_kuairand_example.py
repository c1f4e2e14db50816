"""The DlrmHSTU example end to end (dv365.examples.gr_kuairand), on CPU: a KuaiRand-layout file written from
SIMULATED users, a DV365 tower trained by dv365-train, exported by dv365-export and published into the embedded
LMDB store, and a few training steps of GR's dlrm_v3 KuaiRand ranker reading DV365 from that store."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("generative_recommenders")
pytest.importorskip("fbgemm_gpu")

from dv365.examples.gr_kuairand import ExampleConfig, run  # noqa: E402


def test_dlrm_hstu_trains_with_dv365_from_a_published_store(tmp_path: Path) -> None:
    cfg = ExampleConfig()
    result = run(tmp_path, cfg)
    assert len(result.losses) == cfg.steps
    assert result.loss_after < 0.7 * result.loss_before  # the loss falls
    assert result.projection_grad > 0  # gradients reach the DV365 projection
    assert result.absent_users == cfg.users - cfg.store_users  # users the store lacks ...
    assert result.default_grad > 0 and result.default_moved > 0  # ... train the learned default (zero at init)
    assert result.max_seq_len_seen == cfg.max_seq_len  # history + candidates + 6 + K contextual tokens fit exactly
