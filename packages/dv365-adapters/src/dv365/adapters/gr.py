"""OPTIONAL: DV365 tokens through generative-recommenders' own contextual-feature path.

Importable only where ``generative_recommenders`` (GR, github.com/meta-recsys/generative-recommenders) is
importable; ``import dv365.adapters`` never imports this module, and no dv365 package depends on GR (it is on
no package registry). Written against GR commit ``6135bc3`` (2026-07-09), the commit known to run with torch
2.13 / torchrec 1.8 / fbgemm-gpu-cpu 1.8 on CPU (it needs ``triton`` installed even on CPU, and the pure-PyTorch
kernels: ``model.set_hammer_kernel(HammerKernel.PYTORCH)``). Tested only when GR is installed
(``tests/adapters/test_gr.py`` is SKIPPED otherwise).

How GR takes extra user tokens: its ``ContextualPreprocessor`` reads each contextual feature ``name`` from
``seq_payloads[name]`` (``[B·K, D_in]`` jagged values) and ``seq_payloads[name + "_offsets"]`` (``[B+1]``),
pads it to ``contextual_feature_to_max_length[name]`` = K tokens, applies one learned linear map per token
position (D_in -> HSTU dim) and concatenates the tokens in front of every user's sequence (timestamps 0).
The positional encoder and the STU layers are told about them through ``contextual_seq_len``.

:class:`DV365ContextualPreprocessor` is a drop-in GR ``InputPreprocessor``: put the de-quantized DV365 tokens
(``DV365Input(...).tokens``, ``[B, 58, 256]``) in ``seq_payloads[name]``; it projects them to K tokens of
``input_embedding_dim`` (:class:`~dv365.adapters.LinearProjection`), writes them in the contextual layout and
runs GR's own ``ContextualPreprocessor``, returning exactly what GR's HSTU (``HSTUTransducer``) consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

try:
    from generative_recommenders.modules.preprocessors import ContextualPreprocessor, InputPreprocessor
except ImportError as exc:  # pragma: no cover - exercised only where GR is absent
    raise ImportError(
        "dv365.adapters.gr needs generative-recommenders, which is not on any package registry. Install it from "
        "source at a known-good commit, e.g. `pip install triton && git clone "
        "https://github.com/meta-recsys/generative-recommenders && cd generative-recommenders && git checkout "
        "6135bc3 && pip install --no-deps -e .` (with torch, torchrec and fbgemm-gpu already installed). "
        "Without GR use dv365.adapters.HSTUPrefix, which needs nothing but torch."
    ) from exc

from dv365.adapters.errors import AdapterError
from dv365.adapters.projection import LinearProjection
from dv365.core.quantize import RowFormat

__all__ = ["GRContextConfig", "DV365ContextualPreprocessor", "contextual_seq_len"]


@dataclass(frozen=True)
class GRContextConfig:
    """How DV365 tokens enter a GR model.

    Args:
        input_embedding_dim: GR's ``input_embedding_dim`` (``hstu_embedding_table_dim``: the dim of
            ``seq_embeddings`` and of every contextual feature).
        hidden_dim: the ContextualPreprocessor's content-MLP hidden dim.
        output_embedding_dim: the HSTU dim (``hstu_transducer_embedding_dim``).
        num_tokens: K, DV365 tokens per user after projection.
        name: the contextual-feature name (the key in ``seq_payloads``).
        other_contextual: ``((name, max_len), ...)`` the model's other contextual features, kept in front of
            the DV365 tokens in this order.
        row_format: shape of the DV365 tokens (default 58 × 256).
        is_inference: GR's inference flag (must match the ``HSTUTransducer``'s).
    """

    input_embedding_dim: int
    hidden_dim: int
    output_embedding_dim: int
    num_tokens: int = 8
    name: str = "dv365"
    other_contextual: tuple[tuple[str, int], ...] = ()
    row_format: RowFormat = field(default_factory=RowFormat)
    is_inference: bool = False

    def contextual_feature_to_max_length(self) -> dict[str, int]:
        """GR's ``contextual_feature_to_max_length``: the other features, then ``{name: K}``."""
        out = dict(self.other_contextual)
        if self.name in out:
            raise AdapterError(
                f"GRContextConfig: contextual feature {self.name!r} is both DV365's and in "
                f"other_contextual={self.other_contextual!r}"
            )
        out[self.name] = self.num_tokens
        return out


def contextual_seq_len(config: GRContextConfig) -> int:
    """Tokens GR puts in front of each sequence: the ``contextual_seq_len`` of GR's ``HSTUPositionalEncoder``."""
    return sum(config.contextual_feature_to_max_length().values())


class DV365ContextualPreprocessor(InputPreprocessor):  # type: ignore[misc]  # GR is untyped for mypy
    """GR ``InputPreprocessor`` that feeds DV365 tokens through GR's ``ContextualPreprocessor``.

    Args:
        config: a :class:`GRContextConfig`.
        inner: an already-built GR ``ContextualPreprocessor`` whose ``contextual_feature_to_max_length``
            includes ``{config.name: config.num_tokens}`` (None: build a plain one from ``config``).

    Example::

        cfg = GRContextConfig(input_embedding_dim=64, hidden_dim=64, output_embedding_dim=64, num_tokens=4)
        pre = DV365ContextualPreprocessor(cfg)
        seq_payloads["dv365"] = DV365Input()(*batch).tokens        # [B, 58, 256]
        transducer = HSTUTransducer(stu_module=stu, input_preprocessor=pre,
                                    positional_encoder=HSTUPositionalEncoder(
                                        num_position_buckets=8192, num_time_buckets=2048, embedding_dim=64,
                                        contextual_seq_len=contextual_seq_len(cfg), is_inference=False),
                                    is_inference=False)
        transducer.set_hammer_kernel(HammerKernel.PYTORCH)       # CPU
        # every sequence is now K tokens longer: lengths [B] + K, embeddings [ΣL + B·K, 64]
    """

    def __init__(self, config: GRContextConfig, inner: ContextualPreprocessor | None = None) -> None:
        super().__init__(is_inference=config.is_inference)
        self._name: str = config.name
        self._num_tokens: int = config.num_tokens
        self._dim: int = config.input_embedding_dim
        self.projection = LinearProjection(config.num_tokens, config.input_embedding_dim, config.row_format)
        self.inner: ContextualPreprocessor = (
            inner
            if inner is not None
            else ContextualPreprocessor(
                input_embedding_dim=config.input_embedding_dim,
                hidden_dim=config.hidden_dim,
                output_embedding_dim=config.output_embedding_dim,
                contextual_feature_to_max_length=config.contextual_feature_to_max_length(),
                contextual_feature_to_min_uih_length={},
                is_inference=config.is_inference,
            )
        )
        got = dict(getattr(self.inner, "_contextual_feature_to_max_length", {}))
        if got.get(config.name) != config.num_tokens:
            raise AdapterError(
                f"DV365ContextualPreprocessor: the inner ContextualPreprocessor's contextual_feature_"
                f"to_max_length={got!r} lacks {{{config.name!r}: {config.num_tokens}}}"
            )

    def dv365_payloads(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, N, 256]`` DV365 tokens -> ``{name: [B·K, D_in], name + "_offsets": [B+1]}`` (GR's layout)."""
        projected = self.projection(tokens)  # [B, K, D_in]
        batch = projected.shape[0]
        offsets = self._num_tokens * torch.arange(batch + 1, device=projected.device, dtype=torch.long)  # [B+1]
        return {self._name: projected.reshape(batch * self._num_tokens, self._dim), self._name + "_offsets": offsets}

    def forward(  # GR's InputPreprocessor signature, unchanged
        self,
        max_uih_len: int,
        max_targets: int,
        total_uih_len: int,
        total_targets: int,
        seq_lengths: torch.Tensor,
        seq_timestamps: torch.Tensor,
        seq_embeddings: torch.Tensor,
        num_targets: torch.Tensor,
        seq_payloads: dict[str, torch.Tensor],
    ) -> tuple[
        int, int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]
    ]:
        """GR's ``InputPreprocessor.forward``; ``seq_payloads[name]`` holds the ``[B, N, 256]`` DV365 tokens.

        Returns:
            GR's tuple ``(max_seq_len, total_uih_len, total_targets, lengths, offsets, timestamps, embeddings,
            num_targets, payloads)`` with the contextual tokens (DV365's among them) in front of every user.
        """
        if self._name not in seq_payloads:
            raise AdapterError(
                f"DV365ContextualPreprocessor: seq_payloads has no {self._name!r} entry (put "
                "DV365Input(...).tokens [B, 58, 256] there)"
            )
        payloads: dict[str, torch.Tensor] = dict(seq_payloads)
        payloads.update(self.dv365_payloads(seq_payloads[self._name]))
        out: tuple[
            int, int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]
        ] = self.inner(
            max_uih_len=max_uih_len,
            max_targets=max_targets,
            total_uih_len=total_uih_len,
            total_targets=total_targets,
            seq_lengths=seq_lengths,
            seq_timestamps=seq_timestamps,
            seq_embeddings=seq_embeddings,
            num_targets=num_targets,
            seq_payloads=payloads,
        )
        return out

    def interleave_targets(self) -> bool:
        return bool(self.inner.interleave_targets())
