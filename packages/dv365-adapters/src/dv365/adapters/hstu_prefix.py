"""HSTUPrefix: prepend K projected DV365 tokens to every user's jagged HSTU input (paper §2.4, adoption style 2).

HSTU (generative-recommenders) takes a batch of user histories as one jagged tensor: ``values [ΣL, D]``,
``offsets [B+1]`` (or ``lengths [B]``) and ``timestamps [ΣL]``. This module returns the same layout with
the user's K DV365 tokens in front of the user's events (``lengths + K``), and *also* the tokens in
generative-recommenders' contextual-feature layout, so a GR model can take them through its own
``ContextualPreprocessor`` instead (``seq_payloads[name]``: ``[B·K, D]`` values,
``seq_payloads[name + "_offsets"]``: ``[B+1]`` = ``0, K, 2K, …``). Use one path or the other, not both.
Nothing here imports generative-recommenders.

Timestamps of the prefix tokens: HSTU's relative-time bias needs a timestamp for every token. By default the
prefix tokens get timestamp 0, as generative-recommenders' ``ContextualPreprocessor`` gives its contextual
tokens, so a model trained on this path and one trained on GR's contextual path see the same times.
``HSTUPrefix(prefix_time="first_event")`` gives them each user's first event timestamp instead (each sequence
stays non-decreasing; 0 for a user with no events), and ``prefix_timestamps`` (``[B]`` or ``[]``) sets them
yourself, e.g. to the snapshot's data cut-off (``request_time - age_s``).

:func:`prepend_jagged` is the vectorised op (one scatter, no Python loop over users, export-friendly);
:func:`prepend_jagged_reference` is the plain per-user loop it is tested against.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn

from dv365.adapters._export import register_output_type
from dv365.adapters.errors import AdapterError
from dv365.adapters.projection import LinearProjection
from dv365.core.quantize import RowFormat


class JaggedPrefixOutput(NamedTuple):
    """The prefixed jagged batch.

    Attributes:
        values: ``[ΣL + B·K, D]`` each user's K prefix tokens, then the user's events in their original order.
        lengths: ``[B]`` = input lengths + K (dtype of the input lengths/offsets).
        offsets: ``[B+1]`` complete cumulative sum of ``lengths``.
        timestamps: ``[ΣL + B·K]`` the prefix tokens' timestamps, then the events' (unchanged).
        contextual_values: ``[B·K, D]`` the prefix tokens alone, user-major (GR's ``seq_payloads[name]``).
        contextual_offsets: ``[B+1]`` int64 ``0, K, …, B·K`` (GR's ``seq_payloads[name + "_offsets"]``).
    """

    values: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor
    timestamps: torch.Tensor
    contextual_values: torch.Tensor
    contextual_offsets: torch.Tensor


register_output_type(JaggedPrefixOutput, "dv365.adapters.JaggedPrefixOutput")


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` lengths -> ``[B+1]`` offsets (complete cumulative sum, same dtype and device).

    Example::

        offsets_from_lengths(torch.tensor([2, 0, 3]))   # tensor([0, 2, 2, 5])
    """
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, dim=0).to(lengths.dtype)])


def _check_jagged(prefix: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, timestamps: torch.Tensor) -> None:
    if prefix.dim() != 3:
        raise AdapterError(f"prepend_jagged: prefix must be [B, K, D], got shape {list(prefix.shape)}")
    if values.dim() != 2 or values.shape[1] != prefix.shape[2]:
        raise AdapterError(
            f"prepend_jagged: values must be [sum(L), D] with D = {prefix.shape[2]} (the prefix "
            f"dim), got shape {list(values.shape)}"
        )
    if offsets.dim() != 1 or offsets.shape[0] != prefix.shape[0] + 1:
        raise AdapterError(
            f"prepend_jagged: offsets must be [B+1] = [{prefix.shape[0] + 1}], got shape {list(offsets.shape)}"
        )
    if timestamps.dim() != 1 or timestamps.shape[0] != values.shape[0]:
        raise AdapterError(
            f"prepend_jagged: timestamps must be [sum(L)] = [{values.shape[0]}], got shape {list(timestamps.shape)}"
        )


def prepend_jagged(
    prefix: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    prefix_timestamps: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Puts ``prefix[b]`` (K rows) in front of user b's rows of a jagged tensor; differentiable in both inputs.

    Args:
        prefix: ``[B, K, D]`` tokens to prepend.
        values: ``[ΣL, D]`` jagged rows, user-major.
        offsets: ``[B+1]`` integer offsets of ``values`` (users may be empty).
        timestamps: ``[ΣL]`` per-row timestamps.
        prefix_timestamps: ``[B]`` or ``[]`` timestamps for the prefix tokens; None: 0 (generative-recommenders'
            contextual-token time; :func:`first_event_timestamps` gives each user's first event time).

    Returns:
        ``[values [ΣL + B·K, D], lengths [B], offsets [B+1], timestamps [ΣL + B·K]]``; lengths/offsets in the
        dtype of ``offsets``.

    Example::

        prefix = torch.randn(3, 2, 8)               # [B, K, D]
        values = torch.randn(5, 8)                  # [ΣL, D], lengths 2, 0, 3
        offsets = torch.tensor([0, 2, 2, 5])        # [B+1]
        ts = torch.arange(5)                        # [ΣL]
        v, lengths, offs, t = prepend_jagged(prefix, values, offsets, ts)
        v.shape, lengths, offs                      # [11, 8], [4, 2, 5], [0, 4, 6, 11]
    """
    _check_jagged(prefix, values, offsets, timestamps)
    batch, k = prefix.shape[0], prefix.shape[1]
    total = values.shape[0]
    device = values.device
    offs = offsets.to(device=device, dtype=torch.long)  # [B+1]
    lengths = offs[1:] - offs[:-1]  # [B]
    # data-dependent checks as tensor asserts: they stay in exported/scripted graphs (async on CUDA)
    torch._assert_async(offs[-1] == total, "prepend_jagged: offsets[-1] must equal values.shape[0]")
    torch._assert_async((lengths >= 0).all(), "prepend_jagged: offsets must be non-decreasing")
    users = torch.arange(batch, device=device, dtype=torch.long)  # [B]
    # destination rows: user b's event j moves down by K·(b+1); its prefix starts at offsets[b] + K·b
    event_user = torch.searchsorted(offs[1:], torch.arange(total, device=device, dtype=torch.long), right=True)
    event_dst = torch.arange(total, device=device, dtype=torch.long) + k * (event_user + 1)  # [ΣL]
    prefix_dst = (
        (offs[:-1] + k * users).unsqueeze(1) + torch.arange(k, device=device, dtype=torch.long).unsqueeze(0)
    ).reshape(-1)  # [B·K]
    dst = torch.cat([prefix_dst, event_dst])  # [B·K + ΣL], a permutation
    src = torch.cat([prefix.reshape(batch * k, prefix.shape[2]).to(values.dtype), values])  # [B·K + ΣL, D]
    out_values = torch.zeros_like(src).index_copy(0, dst, src)  # [ΣL + B·K, D]

    if prefix_timestamps is None:
        pts = timestamps.new_zeros(batch)  # [B]
    else:
        pts = prefix_timestamps.to(device=device, dtype=timestamps.dtype).reshape(-1).expand(batch)  # [B]
    ts_src = torch.cat([pts.unsqueeze(1).expand(batch, k).reshape(-1), timestamps])  # [B·K + ΣL]
    out_ts = torch.zeros_like(ts_src).index_copy(0, dst, ts_src)  # [ΣL + B·K]

    new_lengths = lengths + k  # [B]
    new_offsets = offs + k * torch.arange(batch + 1, device=device, dtype=torch.long)  # [B+1]
    return [out_values, new_lengths.to(offsets.dtype), new_offsets.to(offsets.dtype), out_ts]


def first_event_timestamps(offsets: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
    """``[B]`` each user's first event timestamp (0 for a user with no events): a ``prefix_timestamps`` choice.

    Example::

        first_event_timestamps(torch.tensor([0, 2, 2, 5]), torch.tensor([10, 11, 20, 21, 22]))  # [10, 0, 20]
    """
    offs = offsets.to(device=timestamps.device, dtype=torch.long)  # [B+1]
    padded = torch.cat([timestamps, timestamps.new_zeros(1)])  # [ΣL + 1]: an empty last user reads the pad
    first = padded[offs[:-1]]  # [B]
    return torch.where(offs[1:] > offs[:-1], first, torch.zeros_like(first))


def prepend_jagged_reference(
    prefix: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    timestamps: torch.Tensor,
    prefix_timestamps: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The same as :func:`prepend_jagged`, written as a plain loop over users (the test oracle)."""
    _check_jagged(prefix, values, offsets, timestamps)
    batch, k = prefix.shape[0], prefix.shape[1]
    offs = [int(o) for o in offsets.tolist()]
    out_v, out_t, lengths = [], [], []
    for b in range(batch):
        seg_v, seg_t = values[offs[b] : offs[b + 1]], timestamps[offs[b] : offs[b + 1]]
        if prefix_timestamps is not None:
            pts = prefix_timestamps.reshape(-1).expand(batch)[b].to(timestamps.dtype)
        else:
            pts = torch.zeros((), dtype=timestamps.dtype)
        out_v += [prefix[b].to(values.dtype), seg_v]
        out_t += [pts.expand(k), seg_t]
        lengths.append(offs[b + 1] - offs[b] + k)
    len_t = torch.tensor(lengths, dtype=offsets.dtype)
    return [torch.cat(out_v), len_t, offsets_from_lengths(len_t), torch.cat(out_t)]


def contextual_layout(prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, K, D]`` tokens -> GR's contextual-feature layout: ``([B·K, D] values, [B+1] offsets 0, K, …, B·K)``.

    Example::

        values, offsets = contextual_layout(torch.randn(3, 4, 8))   # [12, 8], [0, 4, 8, 12]
    """
    batch, k = prefix.shape[0], prefix.shape[1]
    offsets = k * torch.arange(batch + 1, device=prefix.device, dtype=torch.long)  # [B+1]
    return prefix.reshape(batch * k, prefix.shape[2]), offsets


PREFIX_TIMES = ("zero", "first_event")


class HSTUPrefix(nn.Module):
    """Projects DV365 tokens to the model's input embedding dim and prepends them to each user's jagged HSTU input.

    Args:
        embedding_dim: D, the dim of the jagged input embeddings the tokens are prepended to (GR's
            ``input_embedding_dim`` = ``hstu_embedding_table_dim``, not the HSTU/transducer dim).
        num_tokens: K, prefix tokens per user (a :class:`~dv365.adapters.LinearProjection` maps N -> K).
        row_format: shape of the DV365 tokens (default 58 × 256).
        name: the contextual-feature name of :meth:`contextual_payloads` (``seq_payloads[name]``,
            ``seq_payloads[name + "_offsets"]``).
        prefix_time: timestamps of the prefix tokens when ``forward`` gets no ``prefix_timestamps``:
            ``"zero"`` (GR's contextual tokens; default) or ``"first_event"`` (each user's first event).
        hstu_dim: deprecated name of ``embedding_dim`` (it always meant the input embedding dim).

    Example::

        prefix = HSTUPrefix(embedding_dim=64, num_tokens=4)
        tokens = torch.randn(3, 58, 256)                 # [B, N, 256] from DV365Input
        values = torch.randn(5, 64)                      # [ΣL, D] events of 3 users, lengths 2, 0, 3
        lengths = torch.tensor([2, 0, 3])                # [B]
        ts = torch.tensor([10, 11, 20, 21, 22])          # [ΣL]
        out = prefix(tokens, values, ts, lengths=lengths)
        out.values.shape        # [ΣL + B·K, D] = [17, 64]
        out.lengths             # [6, 4, 7]
        out.offsets             # [0, 6, 10, 17]
        out.timestamps[:4]      # [0, 0, 0, 0]: GR's contextual-token time
        payloads = prefix.contextual_payloads(tokens)  # GR only: {"dv365": [B·K, D], "dv365_offsets": [B+1]}
    """

    def __init__(
        self,
        embedding_dim: int | None = None,
        num_tokens: int = 8,
        row_format: RowFormat | None = None,
        name: str = "dv365",
        prefix_time: str = "zero",
        *,
        hstu_dim: int | None = None,
    ) -> None:
        super().__init__()
        if hstu_dim is not None:
            if embedding_dim is not None:
                raise AdapterError(
                    f"HSTUPrefix: pass embedding_dim={embedding_dim!r} or its deprecated name hstu_dim={hstu_dim!r}, "
                    "not both"
                )
            warnings.warn(
                "HSTUPrefix(hstu_dim=...) is deprecated: the argument is the input embedding dim (GR's "
                "input_embedding_dim), so it is now called embedding_dim",
                DeprecationWarning,
                stacklevel=2,
            )
            embedding_dim = hstu_dim
        if embedding_dim is None:
            raise AdapterError("HSTUPrefix: embedding_dim (the dim of the jagged input embeddings) is required")
        if prefix_time not in PREFIX_TIMES:
            raise AdapterError(f"HSTUPrefix: prefix_time={prefix_time!r} is not one of {PREFIX_TIMES}")
        self.projection = LinearProjection(num_tokens, embedding_dim, row_format)
        self.name: str = name
        self.num_tokens: int = num_tokens
        self.embedding_dim: int = embedding_dim
        self.first_event_time: bool = prefix_time == "first_event"

    def forward(
        self,
        tokens: torch.Tensor,
        values: torch.Tensor,
        timestamps: torch.Tensor,
        lengths: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
        prefix_timestamps: torch.Tensor | None = None,
    ) -> JaggedPrefixOutput:
        """
        Args:
            tokens: ``[B, N, D_in]`` DV365 tokens (``DV365Input(...).tokens``).
            values: ``[ΣL, D]`` the HSTU input embeddings, user-major.
            timestamps: ``[ΣL]``.
            lengths: ``[B]`` events per user (give this or ``offsets``).
            offsets: ``[B+1]`` (give this or ``lengths``).
            prefix_timestamps: ``[B]`` or ``[]``: timestamps of the prefix tokens (default: per ``prefix_time``).

        Returns:
            :class:`JaggedPrefixOutput`.
        """
        if offsets is None:
            if lengths is None:
                raise AdapterError("HSTUPrefix: pass lengths [B] or offsets [B+1] (got neither)")
            offs = offsets_from_lengths(lengths)
        else:
            if lengths is not None:
                raise AdapterError("HSTUPrefix: pass lengths [B] or offsets [B+1], not both")
            offs = offsets
        if prefix_timestamps is None and self.first_event_time:
            prefix_timestamps = first_event_timestamps(offs, timestamps)  # [B]
        prefix = self.projection(tokens)  # [B, K, D]
        out = prepend_jagged(prefix, values, offs, timestamps, prefix_timestamps)
        ctx_values, ctx_offsets = contextual_layout(prefix)
        return JaggedPrefixOutput(out[0], out[1], out[2], out[3], ctx_values.to(values.dtype), ctx_offsets)

    @torch.jit.export
    def contextual_payloads(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Only what a GR model's ``seq_payloads`` needs: ``{name: [B·K, D], name + "_offsets": [B+1]}``.

        Runs the projection alone (no prepend): for models that put the tokens in front themselves (GR's
        ``ContextualPreprocessor`` with ``contextual_feature_to_max_length`` holding ``{name: K}``).

        Args:
            tokens: ``[B, N, D_in]`` DV365 tokens.
        """
        values, offsets = contextual_layout(self.projection(tokens))
        return {self.name: values, self.name + "_offsets": offsets}

    @torch.jit.export
    def seq_payloads(self, out: JaggedPrefixOutput) -> dict[str, torch.Tensor]:
        """The payloads of an already prefixed batch: ``{name: [B·K, D], name + "_offsets": [B+1]}``.

        Without a prefixed batch in hand use :meth:`contextual_payloads`, which skips the prepend.
        """
        return {self.name: out.contextual_values, self.name + "_offsets": out.contextual_offsets}
