"""Inference graphs: torch.export.export of every module (dynamic batch, save/load round trip) and
torch.jit.script where the module is scriptable (all but DV365Input, whose de-quantizer is export-only)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.export import Dim

from dv365.adapters import (
    DV365Input,
    DV365InputConfig,
    EmbeddingGate,
    GateNet,
    GateNetConfig,
    HiddenGate,
    HSTUPrefix,
    LinearProjection,
)
from dv365.core.quantize import quantize_rows

B, T = Dim("B", min=1, max=4096), Dim("T", min=0, max=1 << 20)


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5) if a.is_floating_point() else torch.equal(a, b)
    else:
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)


def _dv365_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = quantize_rows(torch.randn(batch, 58, 256))
    present = torch.arange(batch) % 3 != 1
    return q, present, torch.rand(batch) * 1e5


def _jagged_inputs(lengths: list[int], dim: int = 32) -> tuple[torch.Tensor, ...]:
    lens = torch.tensor(lengths)
    total = int(lens.sum())
    return torch.randn(len(lengths), 58, 256), torch.randn(total, dim), torch.arange(total) * 10, lens


CASES: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int], tuple[Any, ...]], Any]] = {
    "DV365Input": (lambda: DV365Input(DV365InputConfig(default_init_std=0.1)), _dv365_inputs, ({0: B}, {0: B}, {0: B})),
    "DV365Input-no-age": (
        lambda: DV365Input(DV365InputConfig(use_age=False)),
        lambda b: _dv365_inputs(b)[:1],
        ({0: B},),
    ),
    "DV365Input-standardized": (
        lambda: DV365Input(DV365InputConfig(standardize=True)).fit_standardization(_dv365_inputs(16)[0]),
        _dv365_inputs,
        ({0: B}, {0: B}, {0: B}),
    ),
    "LinearProjection": (lambda: LinearProjection(4, 32), lambda b: (torch.randn(b, 58, 256),), ({0: B},)),
    "EmbeddingGate-field": (lambda: EmbeddingGate(5, 16, "field"), lambda b: (torch.randn(b, 5, 16),), ({0: B},)),
    "EmbeddingGate-element-shared": (
        lambda: EmbeddingGate(5, 16, "element", field_private=False),
        lambda b: (torch.randn(b, 5, 16),),
        ({0: B},),
    ),
    "HiddenGate": (lambda: HiddenGate(16), lambda b: (torch.randn(b, 16),), ({0: B},)),
    "GateNet": (
        lambda: GateNet(GateNetConfig(5, 16, 8, (32, 16), "element")),
        lambda b: (torch.randn(b, 5, 16),),
        ({0: B},),
    ),
    "HSTUPrefix": (
        lambda: HSTUPrefix(32, 4),
        lambda b: _jagged_inputs([3, 0, 5, 1, 2][:b] + [4] * max(0, b - 5)),
        ({0: B}, {0: T}, {0: T}, {0: B}),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_torch_export(name: str) -> None:
    make, inputs, dynamic = CASES[name]
    torch.manual_seed(0)
    module = make().eval()
    ep = torch.export.export(module, inputs(3), dynamic_shapes=dynamic)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    for batch in (2, 7):  # another batch size than the one traced
        args = inputs(batch)
        _assert_same(loaded(*args), module(*args))


SCRIPTABLE = [
    "LinearProjection",
    "EmbeddingGate-field",
    "EmbeddingGate-element-shared",
    "HiddenGate",
    "GateNet",
    "HSTUPrefix",
]


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", SCRIPTABLE)
def test_jit_script(name: str) -> None:
    make, inputs, _ = CASES[name]
    module = make().eval()
    scripted = torch.jit.script(module)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)  # type: ignore[no-untyped-call]
    args = inputs(4)
    got, want = loaded(*args), module(*args)
    if isinstance(want, tuple):  # a NamedTuple comes back from jit.load as a plain tuple
        got, want = tuple(got), tuple(want)
    _assert_same(got, want)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_scripted_hstu_prefix_payloads() -> None:
    module = HSTUPrefix(32, 4, name="dv")
    scripted = torch.jit.script(module)
    out = scripted(*_jagged_inputs([2, 0, 1]))
    payloads = scripted.seq_payloads(out)
    assert sorted(payloads) == ["dv", "dv_offsets"] and payloads["dv_offsets"].tolist() == [0, 4, 8, 12]
