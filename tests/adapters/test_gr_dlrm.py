"""dv365.adapters.gr_dlrm against GR's real dlrm_v3 model (``DlrmHSTU``) and KuaiRand dataset (GR 6135bc3).

The model and table configs are GR's ``kuairand-1k`` ones, scaled down for CPU
(:func:`dv365.examples.gr_kuairand.small_kuairand_configs`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("generative_recommenders")
pytest.importorskip("fbgemm_gpu")

from generative_recommenders.common import HammerKernel  # noqa: E402
from generative_recommenders.dlrm_v3.datasets.kuairand import DLRMv3KuaiRandDataset  # noqa: E402

from dv365.adapters import AdapterError, DV365InputConfig  # noqa: E402
from dv365.adapters.gr_dlrm import DV365DlrmHSTU, DV365Feature, dataset_config, model_config  # noqa: E402
from dv365.core.lookup import LookupResult  # noqa: E402
from dv365.core.quantize import RowFormat, dequantize_rows, quantize_rows  # noqa: E402
from dv365.examples.gr_kuairand import (  # noqa: E402
    ExampleConfig,
    materialize_on_cpu,
    small_kuairand_configs,
    write_processed_seqs,
)

K = 4
FMT = RowFormat(dim=16)
EX = ExampleConfig(users=6)


class DictReader:
    """An in-memory EmbeddingReader: ``get(user_ids) -> LookupResult``."""

    def __init__(self, rows: dict[int, np.ndarray]) -> None:
        self.rows = rows

    def get(self, user_ids: np.ndarray) -> LookupResult:
        payload = np.zeros((len(user_ids), FMT.rows_per_user, FMT.row_bytes), np.uint8)
        present = np.array([int(u) in self.rows for u in user_ids], dtype=bool)
        for i, u in enumerate(user_ids):
            if present[i]:
                payload[i] = self.rows[int(u)]
        return LookupResult(payload, present, snapshot_id="t", age_s=60.0, row_format=FMT, errors={})


@pytest.fixture(scope="module")
def seqs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kuairand") / "processed_seqs.csv"
    write_processed_seqs(EX, path)
    return path


def _feature(**kw: object) -> DV365Feature:
    return DV365Feature(num_tokens=K, input=DV365InputConfig(row_format=FMT, use_age=False), **kw)  # type: ignore[arg-type]


def _model(reader: DictReader, **kw: object) -> tuple[DV365DlrmHSTU, dict[str, object]]:
    hstu, tables = small_kuairand_configs(EX)
    model = DV365DlrmHSTU(hstu, tables, is_inference=False, dv365=_feature(**kw), reader=reader)
    model.set_hammer_kernel(HammerKernel.PYTORCH)
    materialize_on_cpu(model, tables)
    return model, tables


def test_configs_lengths_and_budgets() -> None:
    hstu, tables = small_kuairand_configs(EX)
    before = dataclasses.asdict(hstu)
    model, _ = _model(DictReader({}))
    assert dataclasses.asdict(hstu) == before  # GR's config is not modified
    gr_ctx = hstu.contextual_feature_to_max_length
    assert model._hstu_configs.contextual_feature_to_max_length == {**gr_ctx, "dv365": K}
    assert model._hstu_transducer._positional_encoder._contextual_seq_len == len(gr_ctx) + K
    ds = model.dataset_hstu_config
    assert "dv365" not in ds.contextual_feature_to_max_length and ds.max_seq_len == hstu.max_seq_len - K
    assert model_config(hstu, _feature(min_uih_length=20)).contextual_feature_to_min_uih_length == {"dv365": 20}


def test_config_errors_name_the_field() -> None:
    hstu, tables = small_kuairand_configs(EX)
    with pytest.raises(AdapterError, match="already in the GR config's contextual_feature_to_max_length"):
        model_config(model_config(hstu, _feature()), _feature())  # DV365 added twice (the old README advice)
    with pytest.raises(AdapterError, match="user_id_feature='uid'"):
        model_config(hstu, _feature(user_id_feature="uid"))
    with pytest.raises(AdapterError, match="max_seq_len=16 leaves no room"):
        dataset_config(dataclasses.replace(hstu, max_seq_len=16), dataclasses.replace(_feature(), num_tokens=6))
    bad = {**tables, "user_id": dataclasses.replace(tables["user_id"], embedding_dim=8)}  # type: ignore[type-var]
    with pytest.raises(
        AdapterError, match=r"'user_id'.*embedding_dim=8 but DlrmHSTUConfig.hstu_embedding_table_dim=32"
    ):
        DV365DlrmHSTU(hstu, bad, is_inference=False, dv365=_feature(), reader=DictReader({}))


def test_gr_kuairand_dataset_feeds_the_model(seqs: Path) -> None:
    rows = {u: quantize_rows(torch.randn(58, 16)).numpy() for u in (0, 2, 3)}  # users 1, 4, 5 are absent
    model, tables = _model(DictReader(rows))
    # the old README advice (DV365 in the dataset's config) breaks GR's KuaiRand dataset
    with pytest.raises(KeyError, match="dv365"):
        bad = DLRMv3KuaiRandDataset(
            hstu_config=model._hstu_configs, embedding_config=tables, seq_logs_file=str(seqs), is_inference=False
        )
        bad.load_query_samples([0])
    dataset = DLRMv3KuaiRandDataset(
        hstu_config=model.dataset_hstu_config, embedding_config=tables, seq_logs_file=str(seqs), is_inference=False
    )
    dataset.load_query_samples(list(range(EX.users)))
    batch = dataset.get_samples(sorted(dataset.items_in_memory))
    users = batch.uih_features_kjt["user_id"].values()
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    hook = model._hstu_transducer._input_preprocessor.register_forward_hook(
        lambda _m, _i, out: seen.append((out[3], out[4], out[6]))  # lengths, offsets, embeddings
    )
    aux_losses = model(batch.uih_features_kjt, batch.candidates_features_kjt)[2]
    hook.remove()
    sum(aux_losses.values()).backward()  # type: ignore[union-attr]
    lengths, offsets, emb = seen[0]
    uih = batch.uih_features_kjt["video_id"].lengths()
    cands = batch.candidates_features_kjt["item_video_id"].lengths()
    assert torch.equal(lengths, uih + cands + 6 + K)  # GR's 6 contextual tokens + K DV365 tokens
    # long histories are cut so that history + candidates + 6 + K fill max_seq_len exactly (GR's dataset alone
    # reserves one position per contextual feature it knows: with GR's config it would reach max_seq_len + K)
    assert int(lengths.max()) == EX.max_seq_len
    # DV365 is contextual positions 6..6+K-1: GR's per-position map of the projected stored rows / the default
    pre = model._hstu_transducer._input_preprocessor
    w, bias = pre._batched_contextual_linear_weights, pre._batched_contextual_linear_bias
    for b, user in enumerate(users.tolist()):
        stored = rows.get(user)
        tokens = (
            dequantize_rows(torch.from_numpy(stored))[None]
            if stored is not None
            else model.dv365_input.default_embedding[None]
        )
        projected = model.dv365_projection(tokens)[0]  # [K, D]
        start = int(offsets[b])
        for k in range(K):
            want = projected[k] @ w[6 + k] + bias[6 + k]
            assert torch.allclose(emb[start + 6 + k], want, atol=1e-4), (user, k)
    assert model.dv365_projection.dim_proj.weight.grad.abs().sum() > 0  # type: ignore[union-attr]
    assert model.dv365_input.default_embedding.grad.abs().sum() > 0  # type: ignore[union-attr]


def test_user_id_must_be_one_id_per_user() -> None:
    from torchrec import KeyedJaggedTensor

    model, _ = _model(DictReader({}))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1])
    )
    with pytest.raises(AdapterError, match="'user_id'.*exactly one user id per user"):
        model._user_ids(kjt)
