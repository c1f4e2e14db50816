"""The DV365 embedding row format: fbgemm's fused n-bit row-wise layout with fp16 scale and bias.

This is the one written definition of the bytes that dv365-export writes, dv365-store serves and
dv365-adapters read (paper §2.3.2, App. A.2.2). A user embedding is ``rows_per_user`` rows (58) of
``dim`` floats (256); each row is quantized independently::

    byte 0 .. dim*bits/8 - 1   packed codes, little-end first: element 2k in the low nibble of byte k (4-bit)
    next 2 bytes               scale, IEEE fp16 (little endian)
    next 2 bytes               bias = the row minimum rounded to fp16
    => dim*bits/8 + 4 bytes per row: 132 B for dim=256 at 4 bits (the paper pads to 136 = 17 int64)

Encoding (as fbgemm's ``FloatToFusedNBitRowwiseQuantizedSBHalf``): ``bias = fp16(min)``,
``scale = fp16((max - bias) / (2**bits - 1))`` (1.0 when that is 0, or its inverse is infinite),
``code = clamp(rint((x - bias) * (1/scale)), 0, 2**bits - 1)``, with fp32 arithmetic and
round-half-to-even. Decoding: ``x_hat = code * scale + bias`` in fp32.

:func:`quantize_rows` / :func:`dequantize_rows` are pure PyTorch (no fbgemm: downstream teams must not
need it) and match fbgemm bit for bit; ``tests/core/test_quantize.py`` checks that against the fbgemm ops.
One known difference: when a row's minimum is a zero, fbgemm's vectorised min and ``torch.amin`` may
disagree on its sign (+0.0 vs -0.0), so the bias's sign bit can differ; the decoded values are identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8)
FORMAT_NAME = "fbgemm-fused-nbit-rowwise-sbhalf"
FP16_MAX = 65504.0  # scale and bias are fp16: larger values cannot be encoded


@dataclass(frozen=True)
class RowFormat:
    """Shape of one user's quantized embedding.

    Args:
        dim: floats per row (256 in the paper).
        bits: bits per element: 4 (default) or 8 (2 also decodes).
        rows_per_user: rows per user embedding (58 = the FSA's N_out).

    Example::

        fmt = RowFormat()                 # 256-dim, 4-bit, 58 rows
        fmt.row_bytes, fmt.user_bytes     # (132, 7656)
    """

    dim: int = 256
    bits: int = 4
    rows_per_user: int = 58

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"RowFormat.bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.dim <= 0 or (self.dim * self.bits) % 16:
            raise ValueError(
                f"RowFormat.dim={self.dim} must be positive and pack into an even number of bytes "
                f"at {self.bits} bits (fbgemm keeps the fp16 scale/bias 2-byte aligned)"
            )
        if self.rows_per_user <= 0:
            raise ValueError(f"RowFormat.rows_per_user must be positive, got {self.rows_per_user}")

    @property
    def packed_bytes(self) -> int:
        return self.dim * self.bits // 8

    @property
    def row_bytes(self) -> int:
        return self.packed_bytes + 4

    @property
    def user_bytes(self) -> int:
        return self.rows_per_user * self.row_bytes

    @property
    def float_bytes(self) -> int:
        """Bytes of the same embedding in fp32."""
        return self.rows_per_user * self.dim * 4

    def to_dict(self) -> dict[str, int | str]:
        return {
            "name": FORMAT_NAME,
            "dim": self.dim,
            "bits": self.bits,
            "rows_per_user": self.rows_per_user,
            "row_bytes": self.row_bytes,
            "user_bytes": self.user_bytes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> RowFormat:
        if d.get("name", FORMAT_NAME) != FORMAT_NAME:
            raise ValueError(f"unknown row format {d.get('name')!r}; this dv365 reads {FORMAT_NAME!r}")
        fmt = cls(dim=int(d["dim"]), bits=int(d["bits"]), rows_per_user=int(d["rows_per_user"]))  # type: ignore[call-overload]
        for key in ("row_bytes", "user_bytes"):
            if key in d and int(d[key]) != getattr(fmt, key):  # type: ignore[call-overload]
                raise ValueError(f"row format {key}={d[key]} does not match dim/bits/rows ({getattr(fmt, key)})")
        return fmt


def quantize_rows(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Quantizes the last dimension row-wise: ``[..., D]`` float -> ``[..., D*bits/8 + 4]`` uint8.

    Bit-exact with ``torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(x, bits)`` for finite input.

    Example::

        q = quantize_rows(torch.randn(8, 58, 256))    # [8, 58, 132] uint8
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if not torch.is_floating_point(x):
        raise TypeError(f"quantize_rows needs a floating tensor, got {x.dtype}")
    D = x.shape[-1]
    if (D * bits) % 16:
        raise ValueError(
            f"last dimension {D} does not pack into an even number of bytes at {bits} bits "
            "(fbgemm keeps the fp16 scale/bias 2-byte aligned)"
        )
    xf = x.to(torch.float32)
    rows = xf.reshape(-1, D)  # [R, D]
    bad_rows = ~(torch.isfinite(rows) & (rows.abs() <= FP16_MAX)).all(dim=1)
    if bool(bad_rows.any()):
        r = int(bad_rows.nonzero()[0, 0])
        raise ValueError(
            f"quantize_rows: row {r} has a non-finite value or one beyond the fp16 range "
            f"(|x| > {FP16_MAX:g}): {rows[r][~(torch.isfinite(rows[r]) & (rows[r].abs() <= FP16_MAX))][:3].tolist()}"
        )
    qmax = (1 << bits) - 1
    bias = rows.amin(dim=1).to(torch.float16).to(torch.float32)  # [R]
    top = rows.amax(dim=1)
    scale = ((top - bias) / qmax).to(torch.float16).to(torch.float32)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    inv = 1.0 / scale
    bad = torch.isinf(inv)
    scale = torch.where(bad, torch.ones_like(scale), scale)
    inv = torch.where(bad, torch.ones_like(inv), inv)
    codes = torch.round((rows - bias[:, None]) * inv[:, None]).clamp_(0, qmax).to(torch.uint8)  # [R, D]
    per_byte = 8 // bits
    codes = codes.reshape(rows.shape[0], D // per_byte, per_byte)
    packed = torch.zeros(codes.shape[:2], dtype=torch.uint8, device=x.device)
    for k in range(per_byte):
        packed |= codes[:, :, k] << (k * bits)
    sb = torch.stack([scale, bias], dim=1).to(torch.float16).view(torch.uint8)  # [R, 4]
    out = torch.cat([packed, sb], dim=1)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def dequantize_rows(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """De-quantizes rows written by :func:`quantize_rows` (or fbgemm): ``[..., B]`` uint8 -> ``[..., D]`` fp32.

    Bit-exact with ``torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(q, bits)``.

    Example::

        x_hat = dequantize_rows(q)    # [8, 58, 132] uint8 -> [8, 58, 256] float32
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if q.dtype != torch.uint8:
        raise TypeError(f"dequantize_rows needs uint8 rows, got {q.dtype}")
    nbytes = q.shape[-1] - 4
    if nbytes <= 0:
        raise ValueError(f"a row of {q.shape[-1]} bytes is too short for the fused n-bit format")
    rows = q.reshape(-1, q.shape[-1])
    sb = rows[:, nbytes:].contiguous().view(torch.float16).to(torch.float32)  # [R, 2]
    scale, bias = sb[:, 0:1], sb[:, 1:2]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    packed = rows[:, :nbytes]
    codes = torch.stack([(packed >> (k * bits)) & mask for k in range(per_byte)], dim=2).reshape(
        rows.shape[0], nbytes * per_byte
    )
    out = codes.to(torch.float32) * scale + bias
    return out.reshape(*q.shape[:-1], out.shape[-1])
