"""LinearProjection: the paper's downstream projection for DLRM rankers (§2.4, Table 3).

The 58 DV365 tokens of dim 256 become K tokens of the ranker's embedding dim D: a learned mix along the token
axis (``[N] -> [K]``, shared by every dim, like the FSA's token-wise layers) followed by a linear map along the
dim axis (``[256] -> [D]``). The result is ``[B, K, D]``, ready to concatenate with the ranker's other pooled
sparse embeddings (``[B, F, D]`` in torchrec's DLRM) before the interaction arch.

The two maps are :class:`Affine` modules, not ``nn.Linear``: generative-recommenders' ``HSTUTransducer``
re-initialises every ``nn.Linear`` it holds outside its STU stack with ``xavier_normal_`` when it is built,
which would silently replace the projection's own (or the user's) initialisation when the projection sits in
its input preprocessor (:mod:`dv365.adapters.gr`). ``Affine`` has the same parameters, state-dict keys and
default initialisation as ``nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from dv365.adapters.errors import AdapterError
from dv365.core.quantize import RowFormat


class Affine(nn.Module):
    """``y = x W^T + b``: ``nn.Linear``'s parameters and default initialisation, but not an ``nn.Linear``.

    Frameworks that re-initialise every ``nn.Linear`` of a model they are handed (GR's ``HSTUTransducer``)
    leave it alone, so the initialisation its owner chose is kept.

    Args:
        in_features: input dim.
        out_features: output dim.
        bias: learn an additive bias.

    Example::

        layer = Affine(256, 64)
        layer(torch.randn(8, 256)).shape          # [8, 64]
        layer.weight.shape, layer.bias.shape      # [64, 256], [64]
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        init = nn.Linear(in_features, out_features, bias=bias)  # torch's default init, then its parameters
        self.in_features: int = in_features
        self.out_features: int = out_features
        self.weight = init.weight  # [out, in]
        self.bias = init.bias  # [out] or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class LinearProjection(nn.Module):
    """Learnable linear projection of the N DV365 tokens to K tokens of dim D.

    ``out[b, k] = W_d · (Σ_n W_t[k, n] · x[b, n]) + bias``: a token-wise mix then a dim-wise linear map (no
    non-linearity: the paper's "linear projection"). Parameters: ``K·N + D_in·D (+ D)``.

    Args:
        num_tokens: K, output tokens (e.g. 4 to add 4 sparse "features" to a DLRM).
        embedding_dim: D, the downstream model's embedding dim.
        row_format: shape of the input tokens (``rows_per_user`` = N, ``dim`` = D_in); default 58 × 256.
        bias: add a learned bias along D.

    Example::

        proj = LinearProjection(num_tokens=4, embedding_dim=64)
        tokens = torch.randn(8, 58, 256)         # [B, N, D_in] from DV365Input
        dv = proj(tokens)                        # [B, K, D] = [8, 4, 64]
        sparse = torch.randn(8, 26, 64)          # [B, F, D] the ranker's pooled sparse embeddings
        feats = torch.cat([sparse, dv], dim=1)   # [B, F + K, D] -> interaction arch
    """

    def __init__(
        self,
        num_tokens: int,
        embedding_dim: int,
        row_format: RowFormat | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        fmt = row_format if row_format is not None else RowFormat()
        if num_tokens <= 0 or embedding_dim <= 0:
            raise AdapterError(
                f"LinearProjection: num_tokens={num_tokens!r} and embedding_dim={embedding_dim!r} must be positive"
            )
        self.num_tokens: int = num_tokens
        self.embedding_dim: int = embedding_dim
        self.in_tokens: int = fmt.rows_per_user
        self.in_dim: int = fmt.dim
        self.token_mix = Affine(fmt.rows_per_user, num_tokens, bias=False)  # [K, N]
        self.dim_proj = Affine(fmt.dim, embedding_dim, bias=bias)  # [D, D_in]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tokens: ``[B, N, D_in]`` float (the ``tokens`` of :class:`~dv365.adapters.DV365Input`).

        Returns:
            ``[B, K, D]``.
        """
        if tokens.dim() != 3 or tokens.shape[1] != self.in_tokens or tokens.shape[2] != self.in_dim:
            raise AdapterError(
                f"LinearProjection: tokens shape {list(tokens.shape)} is not [B, {self.in_tokens}, {self.in_dim}]"
            )
        mixed = self.token_mix(tokens.transpose(1, 2))  # [B, D_in, K]
        out: torch.Tensor = self.dim_proj(mixed.transpose(1, 2))  # [B, K, D]
        return out
