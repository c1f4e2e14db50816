"""GateNet (Huang et al. 2020, "GateNet: Gating-Enhanced Deep Network for Click-Through Rate Prediction").

Paper §2.4 / Table 4: in retrieval (two-tower) user towers, fusing the DV365 tokens with a GateNet beat a
plain linear projection. GateNet adds two kinds of gates to an embedding + MLP network:

* the **embedding gate** re-weights each input field embedding ``e_i`` (``[D]``) by ``σ(W_i e_i)``:

  - ``granularity="field"``: one scalar gate per field, ``W_i ∈ R^{1×D}`` (GateNet's *vector-wise* gate:
    the whole field vector is scaled);
  - ``granularity="element"``: one gate per embedding element, ``W_i ∈ R^{D×D}`` (GateNet's *bit-wise* gate);
  - ``field_private=True`` learns one ``W_i`` per field (the paper's default); False shares one ``W``;

* the **hidden gate** follows each hidden layer of the MLP: ``h <- h ⊙ σ(W_g h)``.

:class:`GateNet` = embedding gate -> flatten -> MLP (Linear, ReLU, hidden gate per layer) -> output linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dv365.adapters.errors import AdapterError

_GRANULARITY = {"field": "field", "vector": "field", "element": "element", "bit": "element"}


def _granularity(name: str) -> str:
    if name not in _GRANULARITY:
        raise AdapterError(
            f"embedding gate granularity {name!r} is not one of 'field' (alias 'vector': one scalar "
            "per field) or 'element' (alias 'bit': one gate per embedding element)"
        )
    return _GRANULARITY[name]


class EmbeddingGate(nn.Module):
    """GateNet's feature-embedding gate: ``e_i <- e_i ⊙ σ(W_i e_i)`` for every field i.

    Args:
        num_fields: F, fields in the input.
        embedding_dim: D, dim of every field embedding.
        granularity: ``"field"`` (one scalar per field; GateNet's "vector-wise") or ``"element"`` (one gate per
            element; GateNet's "bit-wise"). ``"vector"`` / ``"bit"`` are accepted as the paper's names.
        field_private: one gate matrix per field (True) or one shared by all fields (False).

    Example::

        gate = EmbeddingGate(num_fields=6, embedding_dim=64, granularity="element")
        fields = torch.randn(32, 6, 64)   # [B, F, D]
        gated = gate(fields)              # [B, F, D]
    """

    def __init__(
        self, num_fields: int, embedding_dim: int, granularity: str = "field", field_private: bool = True
    ) -> None:
        super().__init__()
        if num_fields <= 0 or embedding_dim <= 0:
            raise AdapterError(
                f"EmbeddingGate: num_fields={num_fields!r} and embedding_dim={embedding_dim!r} must be positive"
            )
        self.granularity: str = _granularity(granularity)
        self.num_fields: int = num_fields
        self.embedding_dim: int = embedding_dim
        gates = 1 if self.granularity == "field" else embedding_dim
        self.weight = nn.Parameter(torch.empty(num_fields if field_private else 1, embedding_dim, gates))  # [F|1, D, G]
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / (embedding_dim + gates)))  # Xavier normal per field

    def gates(self, fields: torch.Tensor) -> torch.Tensor:
        """The gate values ``σ(W_i e_i)``: ``[B, F, 1]`` (field) or ``[B, F, D]`` (element)."""
        if fields.dim() != 3 or fields.shape[1] != self.num_fields or fields.shape[2] != self.embedding_dim:
            raise AdapterError(
                f"EmbeddingGate: fields shape {list(fields.shape)} is not [B, {self.num_fields}, {self.embedding_dim}]"
            )
        logits = torch.matmul(fields.transpose(0, 1), self.weight)  # [F, B, D] @ [F|1, D, G] -> [F, B, G]
        return torch.sigmoid(logits.transpose(0, 1))  # [B, F, G]

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        """
        Args:
            fields: ``[B, F, D]``.

        Returns:
            ``[B, F, D]``: the gated fields.
        """
        return fields * self.gates(fields)  # [B, F, D]


class HiddenGate(nn.Module):
    """GateNet's hidden gate: ``h <- h ⊙ σ(W_g h)`` after an MLP layer.

    Args:
        dim: H, width of the hidden layer.

    Example::

        gate = HiddenGate(256)
        h = torch.relu(torch.randn(32, 256))   # [B, H]
        gate(h)                                # [B, H]
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)  # W_g [H, H]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden: ``[..., H]``.

        Returns:
            ``[..., H]``.
        """
        return hidden * torch.sigmoid(self.linear(hidden))


@dataclass(frozen=True)
class GateNetConfig:
    """Configuration of :class:`GateNet`.

    Args:
        num_fields: F, input fields (e.g. K projected DV365 tokens + the tower's other user features).
        embedding_dim: D, dim of every field.
        output_dim: dim of the tower output (the user embedding for retrieval).
        hidden_dims: MLP hidden widths.
        embedding_gate: ``"field"`` / ``"element"`` (or the paper's ``"vector"`` / ``"bit"``), or None for none.
        field_private: one embedding-gate matrix per field (True) or shared (False).
        hidden_gate: add a hidden gate after every hidden layer.

    Example::

        cfg = GateNetConfig(num_fields=6, embedding_dim=64, output_dim=128, hidden_dims=(256,))
    """

    num_fields: int
    embedding_dim: int
    output_dim: int
    hidden_dims: tuple[int, ...] = (512, 256)
    embedding_gate: str | None = "field"
    field_private: bool = True
    hidden_gate: bool = True

    def __post_init__(self) -> None:
        if self.embedding_gate is not None:
            _granularity(self.embedding_gate)
        if min((self.num_fields, self.embedding_dim, self.output_dim, *self.hidden_dims)) <= 0:
            raise AdapterError(
                f"GateNetConfig: sizes must be positive, got num_fields={self.num_fields}, "
                f"embedding_dim={self.embedding_dim}, output_dim={self.output_dim}, "
                f"hidden_dims={self.hidden_dims}"
            )


class GateNet(nn.Module):
    """GateNet tower: embedding gate, then an MLP whose hidden layers each carry a hidden gate.

    Args:
        config: a :class:`GateNetConfig`.

    Example::

        tower = GateNet(GateNetConfig(num_fields=6, embedding_dim=64, output_dim=128,
                                      hidden_dims=(256,), embedding_gate="element"))
        fields = torch.randn(32, 6, 64)   # [B, F, D]: e.g. 4 DV365 tokens + 2 user features
        user = tower(fields)              # [B, 128]
    """

    def __init__(self, config: GateNetConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding_gate: nn.Module = (
            EmbeddingGate(config.num_fields, config.embedding_dim, config.embedding_gate, config.field_private)
            if config.embedding_gate is not None
            else nn.Identity()
        )
        layers: list[nn.Module] = []
        width = config.num_fields * config.embedding_dim
        for hidden in config.hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if config.hidden_gate:
                layers.append(HiddenGate(hidden))
            width = hidden
        layers.append(nn.Linear(width, config.output_dim))
        self.mlp = nn.Sequential(*layers)
        self.num_fields: int = config.num_fields
        self.embedding_dim: int = config.embedding_dim

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        """
        Args:
            fields: ``[B, F, D]``.

        Returns:
            ``[B, output_dim]``.
        """
        if fields.dim() != 3 or fields.shape[1] != self.num_fields or fields.shape[2] != self.embedding_dim:
            raise AdapterError(
                f"GateNet: fields shape {list(fields.shape)} is not [B, {self.num_fields}, {self.embedding_dim}]"
            )
        gated = self.embedding_gate(fields)  # [B, F, D]
        out: torch.Tensor = self.mlp(gated.flatten(1))  # [B, output_dim]
        return out
