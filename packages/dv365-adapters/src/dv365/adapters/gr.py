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
For GR's dlrm_v3 ranking model (``DlrmHSTU``) use :mod:`dv365.adapters.gr_dlrm`, which also fetches the
embeddings from a store.
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
from dv365.adapters.hstu_prefix import contextual_layout
from dv365.adapters.projection import LinearProjection
from dv365.core.quantize import RowFormat

__all__ = ["GRContextConfig", "DV365ContextualPreprocessor", "contextual_seq_len"]


@dataclass(frozen=True)
class GRContextConfig:
    """How DV365 tokens enter a GR model through its ``ContextualPreprocessor``.

    Args:
        input_embedding_dim: GR's ``input_embedding_dim`` (``hstu_embedding_table_dim``: the dim of
            ``seq_embeddings`` and of every contextual feature; the DV365 projection's output dim).
        hidden_dim: the ContextualPreprocessor's content-MLP hidden dim.
        output_embedding_dim: the HSTU dim (``hstu_transducer_embedding_dim``).
        num_tokens: K, DV365 tokens per user after projection.
        name: the contextual-feature name (the key in ``seq_payloads``).
        other_contextual: ``((name, max_len), ...)`` the model's other contextual features, kept in front of
            the DV365 tokens in this order.
        min_uih_length: GR's ``contextual_feature_to_min_uih_length`` for DV365: users whose sequence (history
            plus targets) is shorter get zero DV365 inputs (0: every user gets them; GR's default for a feature
            it is not told about).
        other_min_uih_length: ``((name, min_len), ...)`` the same for the other contextual features.
        row_format: shape of the DV365 tokens (default 58 × 256).
        is_inference: GR's inference flag (must match the ``HSTUTransducer``'s).
    """

    input_embedding_dim: int
    hidden_dim: int
    output_embedding_dim: int
    num_tokens: int = 8
    name: str = "dv365"
    other_contextual: tuple[tuple[str, int], ...] = ()
    min_uih_length: int = 0
    other_min_uih_length: tuple[tuple[str, int], ...] = ()
    row_format: RowFormat = field(default_factory=RowFormat)
    is_inference: bool = False

    def __post_init__(self) -> None:
        for key in ("input_embedding_dim", "hidden_dim", "output_embedding_dim", "num_tokens"):
            if getattr(self, key) <= 0:
                raise AdapterError(f"GRContextConfig.{key} must be positive, got {getattr(self, key)!r}")
        if self.min_uih_length < 0:
            raise AdapterError(f"GRContextConfig.min_uih_length must be >= 0, got {self.min_uih_length!r}")
        unknown = sorted({n for n, _ in self.other_min_uih_length} - {n for n, _ in self.other_contextual})
        if unknown:
            raise AdapterError(
                f"GRContextConfig.other_min_uih_length names {unknown}, which are not in other_contextual="
                f"{self.other_contextual!r}"
            )

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

    def contextual_feature_to_min_uih_length(self) -> dict[str, int]:
        """GR's ``contextual_feature_to_min_uih_length``: the other features', then DV365's (when > 0)."""
        out = dict(self.other_min_uih_length)
        if self.min_uih_length > 0:
            out[self.name] = self.min_uih_length
        return out


def contextual_seq_len(config: GRContextConfig) -> int:
    """Tokens GR puts in front of each sequence: the ``contextual_seq_len`` of GR's ``HSTUPositionalEncoder``."""
    return sum(config.contextual_feature_to_max_length().values())


def _check_inner(config: GRContextConfig, inner: ContextualPreprocessor) -> None:
    """Raises :class:`AdapterError` naming the field where ``inner`` (a GR ``ContextualPreprocessor``) and
    ``config`` disagree: caught here rather than as GR's "Sizes of tensors must match" at the first batch."""
    where = "DV365ContextualPreprocessor: the inner ContextualPreprocessor"
    max_len = dict(getattr(inner, "_contextual_feature_to_max_length", {}))
    if max_len.get(config.name) != config.num_tokens:
        raise AdapterError(
            f"{where}'s contextual_feature_to_max_length={max_len!r} lacks {{{config.name!r}: {config.num_tokens}}} "
            "(GRContextConfig.name: GRContextConfig.num_tokens)"
        )
    for key in ("input_embedding_dim", "output_embedding_dim"):
        got = getattr(inner, f"_{key}", None)
        if got != getattr(config, key):
            raise AdapterError(
                f"{where} has {key}={got!r} but GRContextConfig.{key}={getattr(config, key)!r}"
                + (" (the DV365 projection's output dim)" if key == "input_embedding_dim" else " (the HSTU dim)")
            )
    min_len = dict(getattr(inner, "_contextual_feature_to_min_uih_length", {}))
    if min_len.get(config.name, 0) != config.min_uih_length:
        raise AdapterError(
            f"{where}'s contextual_feature_to_min_uih_length={min_len!r} gives {config.name!r} "
            f"{min_len.get(config.name, 0)} but GRContextConfig.min_uih_length={config.min_uih_length}"
        )


class DV365ContextualPreprocessor(InputPreprocessor):  # type: ignore[misc]  # GR is untyped for mypy
    """GR ``InputPreprocessor`` that feeds DV365 tokens through GR's ``ContextualPreprocessor``.

    The projection's initialisation survives ``HSTUTransducer(...)``, which re-initialises every ``nn.Linear``
    outside its STU stack with ``xavier_normal_``: the projection's maps are
    :class:`~dv365.adapters.projection.Affine` modules, which that loop does not touch (GR's own
    ``ContextualPreprocessor`` layers get GR's xavier init, as in any GR model).

    Args:
        config: a :class:`GRContextConfig`.
        inner: an already-built GR ``ContextualPreprocessor`` whose ``contextual_feature_to_max_length``
            includes ``{config.name: config.num_tokens}`` and whose dims and DV365 min-UIH length are the
            config's (checked here: :class:`~dv365.adapters.AdapterError` names the field); None: build one from
            ``config``.

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
        self.projection = LinearProjection(config.num_tokens, config.input_embedding_dim, config.row_format)
        self.inner: ContextualPreprocessor = (
            inner
            if inner is not None
            else ContextualPreprocessor(
                input_embedding_dim=config.input_embedding_dim,
                hidden_dim=config.hidden_dim,
                output_embedding_dim=config.output_embedding_dim,
                contextual_feature_to_max_length=config.contextual_feature_to_max_length(),
                contextual_feature_to_min_uih_length=config.contextual_feature_to_min_uih_length(),
                is_inference=config.is_inference,
            )
        )
        _check_inner(config, self.inner)

    def dv365_payloads(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, N, 256]`` DV365 tokens -> ``{name: [B·K, D_in], name + "_offsets": [B+1]}`` (GR's layout)."""
        values, offsets = contextual_layout(self.projection(tokens))  # [B·K, D_in], [B+1]
        return {self._name: values, self._name + "_offsets": offsets}

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
