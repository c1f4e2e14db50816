"""The HSTU encoder: chunked attention == dense reference; causality; padding; right_align."""

import torch

from dv365.experiments.downstream.hstu import HSTUConfig, HSTUEncoder, log_bucket, right_align


def _inputs(B: int = 3, L: int = 11, D: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=g)
    valid = torch.arange(L)[None] >= torch.tensor([[0], [4], [10]])[:B]
    ts = torch.cumsum(torch.randint(0, 5000, (B, L), generator=g), dim=1)
    return x, valid, ts


def test_chunked_matches_dense() -> None:
    x, valid, ts = _inputs()
    torch.manual_seed(1)
    dense = HSTUEncoder(HSTUConfig(dim=16, num_layers=2, chunk=0))
    chunked = HSTUEncoder(HSTUConfig(dim=16, num_layers=2, chunk=4))
    chunked.load_state_dict(dense.state_dict())
    with torch.no_grad():
        for p in dense.parameters():  # non-zero relative biases too
            p.add_(0.01 * torch.randn_like(p))
    chunked.load_state_dict(dense.state_dict())
    a, b = dense(x, valid, ts), chunked(x, valid, ts)
    assert torch.allclose(a[valid], b[valid], atol=1e-5)


def test_causal_and_padding() -> None:
    x, valid, ts = _inputs()
    enc = HSTUEncoder(HSTUConfig(dim=16, num_layers=2)).eval()
    base = enc(x, valid, ts)
    x2 = x.clone()
    x2[:, -1] += 5.0  # the last token cannot change earlier outputs
    assert torch.allclose(enc(x2, valid, ts)[:, :-1], base[:, :-1], atol=1e-6)
    x3 = x.clone()
    x3[1, :4] = 100.0  # padding positions of row 1 are ignored
    assert torch.allclose(enc(x3, valid, ts)[1, 4:], base[1, 4:], atol=1e-5)


def test_right_align_keeps_last_rows() -> None:
    values = torch.arange(7, dtype=torch.float32)[:, None]  # users of lengths 3, 0, 4
    offsets = torch.tensor([0, 3, 3, 7])
    out, valid, t = right_align(values, offsets, torch.arange(7) * 10, 3)
    assert out[:, :, 0].tolist() == [[0, 1, 2], [0, 0, 0], [4, 5, 6]]
    assert valid.tolist() == [[True] * 3, [False] * 3, [True] * 3]
    assert t[2].tolist() == [40, 50, 60]


def test_log_bucket() -> None:
    assert log_bucket(torch.tensor([0, 1, 3, -3, 10**9]), 8).tolist() == [0, 1, 2, 2, 7]


def test_last_only_matches_full() -> None:
    x, valid, ts = _inputs()
    for chunk in (0, 4):
        torch.manual_seed(2)
        enc = HSTUEncoder(HSTUConfig(dim=16, num_layers=2, chunk=chunk))
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(0.01 * torch.randn_like(p))
        full, last = enc(x, valid, ts), enc(x, valid, ts, last_only=True)
        assert last.shape == (3, 1, 16)
        assert torch.allclose(full[:, -1], last[:, 0], atol=1e-5)
