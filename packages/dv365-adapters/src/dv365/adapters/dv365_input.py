"""DV365Input: the stored int4 rows of a batch of users -> float tokens, a missing indicator and staleness.

Paper §2.4: downstream models de-quantize the 58 × 256 user embedding and learn a projection on top. This
module is the de-quantization step (bit-exact with fbgemm's ``FusedNBitRowwiseQuantizedSBHalfToFloat``, through
:func:`dv365.core.quantize.dequantize_rows`) plus what a production model needs around it:

* users the store does not have (new users, failed integrity checks) get a *learned* default embedding
  instead of zeros, and a missing indicator the model can use as a dense feature;
* the embedding's age (seconds since the snapshot's data cut-off) becomes an optional dense feature,
  ``log1p(age_s / age_unit_s)``, so a model can learn how much to trust a stale embedding (App. B);
* optional standardisation (``standardize=True`` + :meth:`DV365Input.fit_standardization`): every
  (row, dim) value minus its mean over users, divided by its std. Upstream tokens share a large common
  component (on the simulated data, two users' embeddings sit at cosine ~0.95 and the mean is ~4 stds
  away from zero), so a freshly initialised downstream projection mostly sees that constant; standardised,
  it sees the user-specific part at unit scale. The statistics are buffers: they are saved with the model
  and travel with ``torch.export`` / TorchScript.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from dv365.adapters._export import register_output_type
from dv365.adapters.errors import AdapterError
from dv365.core.quantize import RowFormat, dequantize_rows

if TYPE_CHECKING:  # pragma: no cover
    from dv365.core.lookup import LookupResult


@dataclass(frozen=True)
class DV365InputConfig:
    """Configuration of :class:`DV365Input`.

    Args:
        row_format: the stored row format (default: 58 rows × 256 dims at 4 bits, 132 B per row).
        use_age: emit the staleness feature (then ``age_s`` must be passed to ``forward``).
        age_unit_s: the age feature is ``log1p(age_s / age_unit_s)``; 3600 s: about 3.2 at one day, 5.1 at a week.
        default_init_std: init of the learned default embedding for missing users (0: zeros).
        standardize: standardise present users' tokens with the per-(row, dim) mean and std set by
            :meth:`DV365Input.fit_standardization` (identity until it is called). Missing users get the
            learned default, which then lives in the standardised space.

    Example::

        cfg = DV365InputConfig(use_age=False, standardize=True)
    """

    row_format: RowFormat = field(default_factory=RowFormat)
    use_age: bool = True
    age_unit_s: float = 3600.0
    default_init_std: float = 0.0
    standardize: bool = False

    def __post_init__(self) -> None:
        if not self.age_unit_s > 0:
            raise AdapterError(f"DV365InputConfig.age_unit_s must be > 0, got {self.age_unit_s!r}")
        if self.default_init_std < 0:
            raise AdapterError(f"DV365InputConfig.default_init_std must be >= 0, got {self.default_init_std!r}")


class DV365Features(NamedTuple):
    """What :class:`DV365Input` returns.

    Attributes:
        tokens: ``[B, N, D]`` float: de-quantized embeddings; missing users' rows are the learned default.
        missing: ``[B]`` bool: True where the user had no embedding.
        side: ``[B, S]`` float dense features: ``side[:, 0]`` is the missing indicator (0/1) and, with
            ``use_age``, ``side[:, 1]`` is ``log1p(age_s / age_unit_s)`` (0 for missing users).
    """

    tokens: torch.Tensor
    missing: torch.Tensor
    side: torch.Tensor


register_output_type(DV365Features, "dv365.adapters.DV365Features")


class DV365Input(nn.Module):
    """De-quantizes a batch of DV365 user embeddings and fills in missing users.

    The de-quantization is :func:`dv365.core.quantize.dequantize_rows` (pure PyTorch, bit-exact with fbgemm),
    so the module runs wherever the payload tensor lives (CPU or CUDA) without fbgemm.

    Args:
        config: a :class:`DV365InputConfig` (row format, staleness feature, default-embedding init).

    Example::

        dv_in = DV365Input(DV365InputConfig())
        payload = torch.zeros(4, 58, 132, dtype=torch.uint8)  # [B, N, row_bytes] uint8 from the store
        present = torch.tensor([True, False, True, True])     # [B]
        age_s = torch.full((4,), 7200.0)                      # [B] seconds since the snapshot cut-off
        out = dv_in(payload, present, age_s)
        out.tokens   # [B, N, D] = [4, 58, 256] float32
        out.missing  # [B] bool
        out.side     # [B, 2]: missing indicator, log1p(age / 1 h)
    """

    def __init__(self, config: DV365InputConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else DV365InputConfig()
        self.config = cfg
        fmt = cfg.row_format
        self._bits: int = fmt.bits
        self._rows: int = fmt.rows_per_user
        self._row_bytes: int = fmt.row_bytes
        self._use_age: bool = cfg.use_age
        self._age_unit_s: float = float(cfg.age_unit_s)
        self.default_embedding = nn.Parameter(torch.zeros(fmt.rows_per_user, fmt.dim))  # [N, D]
        if cfg.default_init_std > 0:
            nn.init.normal_(self.default_embedding, std=cfg.default_init_std)
        self._standardize: bool = cfg.standardize
        # per-(row, dim) statistics of the stored tokens (identity until fit_standardization is called)
        self.register_buffer("token_mean", torch.zeros(fmt.rows_per_user, fmt.dim))  # [N, D]
        self.register_buffer("token_std", torch.ones(fmt.rows_per_user, fmt.dim))  # [N, D]

    @torch.jit.unused
    def fit_standardization(
        self, payload: torch.Tensor, present: torch.Tensor | None = None, eps: float = 1e-6
    ) -> DV365Input:
        """Sets the standardisation statistics from a sample of stored embeddings (training users only).

        Args:
            payload: ``[U, N, row_bytes]`` uint8, one row block per sampled user (e.g. the snapshot rows of
                the training split's users; each user once).
            present: ``[U]`` bool; users marked False are left out (None: all).
            eps: floor of the std (a value that never varies is centred, not blown up).

        Returns:
            ``self`` (the buffers ``token_mean`` / ``token_std`` are set in place).

        Example::

            dv_in = DV365Input(DV365InputConfig(standardize=True))
            dv_in.fit_standardization(train_payload)      # [U, 58, 132] uint8 of the training users
        """
        if not self._standardize:
            raise AdapterError(
                "DV365Input.fit_standardization: build the module with "
                "DV365InputConfig(standardize=True) to use the statistics"
            )
        if payload.dtype != torch.uint8 or payload.dim() != 3 or payload.shape[1:] != (self._rows, self._row_bytes):
            raise AdapterError(
                f"DV365Input.fit_standardization: payload must be [U, {self._rows}, {self._row_bytes}] "
                f"uint8, got {tuple(payload.shape)} {payload.dtype}"
            )
        if present is not None:
            payload = payload[present.to(device=payload.device, dtype=torch.bool)]
        if payload.shape[0] < 2:
            raise AdapterError(
                f"DV365Input.fit_standardization: needs at least 2 present users, got {payload.shape[0]}"
            )
        with torch.no_grad():
            x = dequantize_rows(payload, self._bits).to(torch.float64)  # [U, N, D]
            self.token_mean.copy_(x.mean(0))
            self.token_std.copy_(x.std(0, unbiased=False).clamp(min=eps))
        return self

    @property
    def num_side_features(self) -> int:
        """Width S of :attr:`DV365Features.side` (1, or 2 with the age feature)."""
        return 2 if self._use_age else 1

    def forward(
        self,
        payload: torch.Tensor,
        present: torch.Tensor | None = None,
        age_s: torch.Tensor | None = None,
    ) -> DV365Features:
        """
        Args:
            payload: ``[B, N, row_bytes]`` uint8 rows in the :mod:`dv365.core.quantize` format.
            present: ``[B]`` bool, False for users the store does not have (None: all present).
            age_s: ``[B]`` (or ``[]`` / ``[1]``) float seconds since the snapshot cut-off; required with
                ``use_age``.

        Returns:
            :class:`DV365Features` ``(tokens [B, N, D], missing [B], side [B, S])``.

        Bad input (docs/validation.md, "Import and storage"):

        * ``present`` / ``age_s`` of another length than the payload's batch: :class:`AdapterError` naming
          the argument and both lengths.
        * a user whose de-quantized tokens are not all finite (a corrupted row: NaN/inf fp16 scale or bias)
          is treated as missing: the learned default, ``missing`` True, age feature 0. :func:`batch_from_lookup`
          already marks such users absent and logs how many.
        * a NaN or infinite ``age_s``: :class:`AdapterError` (eager mode; the check reads the values, so on
          CUDA it waits for them). A ``torch.export`` graph cannot raise: there a non-finite age gives
          age feature 0.
        """
        if payload.dtype != torch.uint8:
            raise AdapterError(f"DV365Input: payload must be uint8 fused rows, got dtype {payload.dtype}")
        if payload.dim() != 3 or payload.shape[1] != self._rows or payload.shape[2] != self._row_bytes:
            raise AdapterError(
                f"DV365Input: payload shape {tuple(payload.shape)} does not match the row format "
                f"[B, {self._rows}, {self._row_bytes}] ({self.config.row_format})"
            )
        batch = payload.shape[0]
        if batch == 0:  # dv365.core's dequantize_rows cannot reshape zero rows (reported to dv365-core)
            tokens = self.default_embedding.new_zeros(0, self._rows, self.default_embedding.shape[1])
            finite = torch.ones(0, dtype=torch.bool, device=payload.device)
        else:
            tokens = dequantize_rows(payload, self._bits).to(self.default_embedding.dtype)  # [B, N, D]
        finite = torch.isfinite(tokens).flatten(1).all(dim=1)  # [B]; False: a corrupted scale/bias
        if self._standardize:
            tokens = (tokens - self.token_mean) / self.token_std
        if present is None:
            present_b = torch.ones(batch, dtype=torch.bool, device=payload.device)  # [B]
        else:
            if present.dim() != 1 or present.shape[0] != batch:
                raise AdapterError(
                    f"DV365Input: present must be [B] bool with B = {batch} (the payload's users), "
                    f"got shape {tuple(present.shape)}"
                )
            present_b = present.to(device=payload.device, dtype=torch.bool)
        present_b = present_b & finite  # non-finite tokens: treated as missing
        missing = ~present_b  # [B]
        tokens = torch.where(present_b[:, None, None], tokens, self.default_embedding.unsqueeze(0))  # [B, N, D]
        missing_f = missing.to(tokens.dtype).unsqueeze(1)  # [B, 1]
        if not self._use_age:
            return DV365Features(tokens, missing, missing_f)
        if age_s is None:
            raise AdapterError(
                "DV365Input: age_s is required because DV365InputConfig.use_age is True "
                "(pass LookupResult.age_s, or build the module with use_age=False)"
            )
        age = age_s.to(device=payload.device, dtype=tokens.dtype).reshape(-1)
        if age.shape[0] != batch and age.shape[0] != 1:  # batch first: equal symbols under torch.export
            raise AdapterError(
                f"DV365Input: age_s has {age.shape[0]} values but the payload has {batch} users "
                f"(pass [B] or one value), shape {tuple(age_s.shape)}"
            )
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(age).all()):
            raise AdapterError(
                f"DV365Input: age_s holds NaN or infinite values ({age[~torch.isfinite(age)][:3].tolist()}): "
                "the age of a snapshot must be a finite number of seconds"
            )
        age = age.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).expand(batch)  # [B]
        age_feat = torch.log1p(age.clamp(min=0.0) / self._age_unit_s) * present_b.to(tokens.dtype)  # [B]
        return DV365Features(tokens, missing, torch.cat([missing_f, age_feat.unsqueeze(1)], dim=1))

    @torch.jit.unused
    def forward_lookup(self, result: LookupResult) -> DV365Features:
        """Runs :meth:`forward` on a store answer (:class:`dv365.core.lookup.LookupResult`), on this module's device.

        Example::

            out = dv_in.forward_lookup(reader.get([7, 8, 9]))   # out.tokens: [3, 58, 256]
        """
        from dv365.adapters.fetch import batch_from_lookup

        batch = batch_from_lookup(result, device=self.default_embedding.device, expected_format=self.config.row_format)
        out: DV365Features = self(batch.payload, batch.present, batch.age_s)
        return out
