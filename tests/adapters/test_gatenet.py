"""GateNet: embedding gate (field / element granularity, private / shared), hidden gate, the tower."""

from __future__ import annotations

import pytest
import torch

from dv365.adapters import AdapterError, EmbeddingGate, GateNet, GateNetConfig, HiddenGate


@pytest.mark.parametrize("granularity", ["field", "element", "vector", "bit"])
@pytest.mark.parametrize("private", [True, False])
def test_embedding_gate(granularity: str, private: bool) -> None:
    gate = EmbeddingGate(num_fields=5, embedding_dim=16, granularity=granularity, field_private=private)
    assert gate.weight.shape == (5 if private else 1, 16, 1 if granularity in ("field", "vector") else 16)
    x = torch.randn(7, 5, 16, requires_grad=True)  # [B, F, D]
    g = gate.gates(x)
    assert g.shape == (7, 5, 1 if gate.granularity == "field" else 16)
    assert ((g > 0) & (g < 1)).all()
    out = gate(x)
    assert out.shape == x.shape and torch.allclose(out, x * g)
    # each field uses its own W_i (or the shared W): check one field against the formula
    w = gate.weight[2 if private else 0]  # [D, G]
    assert torch.allclose(g[:, 2], torch.sigmoid(x[:, 2] @ w), atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_hidden_gate() -> None:
    gate = HiddenGate(32)
    h = torch.randn(4, 32, requires_grad=True)
    out = gate(h)
    assert out.shape == (4, 32)
    assert torch.allclose(out, h * torch.sigmoid(h @ gate.linear.weight.T))
    out.sum().backward()
    assert h.grad is not None and gate.linear.weight.grad is not None


@pytest.mark.parametrize("embedding_gate", ["field", "element", None])
@pytest.mark.parametrize("hidden_gate", [True, False])
def test_gatenet_tower(embedding_gate: str | None, hidden_gate: bool) -> None:
    cfg = GateNetConfig(
        num_fields=6,
        embedding_dim=16,
        output_dim=24,
        hidden_dims=(64, 32),
        embedding_gate=embedding_gate,
        hidden_gate=hidden_gate,
    )
    tower = GateNet(cfg)
    assert isinstance(tower.embedding_gate, EmbeddingGate if embedding_gate else torch.nn.Identity)
    assert sum(isinstance(m, HiddenGate) for m in tower.modules()) == (2 if hidden_gate else 0)
    x = torch.randn(9, 6, 16, requires_grad=True)
    out = tower(x)
    assert out.shape == (9, 24)
    out.square().mean().backward()
    assert x.grad is not None
    for name, p in tower.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_and_input_errors() -> None:
    with pytest.raises(AdapterError, match="granularity"):
        GateNetConfig(num_fields=2, embedding_dim=4, output_dim=4, embedding_gate="row")
    with pytest.raises(AdapterError, match="positive"):
        GateNetConfig(num_fields=2, embedding_dim=4, output_dim=4, hidden_dims=(0,))
    tower = GateNet(GateNetConfig(num_fields=2, embedding_dim=4, output_dim=4, hidden_dims=(8,)))
    with pytest.raises(AdapterError, match=r"\[B, 2, 4\]"):
        tower(torch.randn(3, 3, 4))
