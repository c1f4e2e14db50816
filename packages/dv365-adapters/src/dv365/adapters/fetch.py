"""Fetching a batch's DV365 inputs from a store (any :class:`dv365.core.lookup.EmbeddingReader`).

For a dataloader or a serving path: user ids in, ``DV365Batch(payload, present, age_s)`` tensors out, ready
for :class:`~dv365.adapters.DV365Input`. Repeated users in a batch (many training rows share a user, RecD) are
looked up once. No dv365-store import: any object with ``get(user_ids) -> LookupResult`` works.

numpy (the store's array type, a dependency of dv365-core) is imported when a fetch function first runs, so
``import dv365.adapters`` needs nothing but torch and dv365-core's pure-torch modules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from dv365.adapters.errors import AdapterError
from dv365.core.quantize import RowFormat

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from dv365.core.lookup import EmbeddingReader, LookupResult

logger = logging.getLogger(__name__)

Device = str | torch.device | None


class DV365Batch(NamedTuple):
    """The tensors :class:`~dv365.adapters.DV365Input` takes for one batch.

    Attributes:
        payload: ``[B, N, row_bytes]`` uint8 (rows of missing users are zero).
        present: ``[B]`` bool, False where the store had no (valid) embedding for the user.
        age_s: ``[B]`` float32 seconds between the snapshot's data cut-off and the lookup.
    """

    payload: torch.Tensor
    present: torch.Tensor
    age_s: torch.Tensor


def _to_device(t: torch.Tensor, device: Device) -> torch.Tensor:
    if device is None:
        return t
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


_RESULT_FIELDS = ("payload", "present", "snapshot_id", "age_s", "row_format", "errors")


def _check_result(result: LookupResult, batch: int | None, expected_format: RowFormat | None) -> None:
    """Raises :class:`AdapterError` unless ``result`` is a well-formed answer for ``batch`` users: a
    LookupResult (not None), the expected row format and shapes, ``errors`` keyed by batch positions
    ``0..B-1``, a finite ``age_s``."""
    import numpy as np

    if result is None or not all(hasattr(result, f) for f in _RESULT_FIELDS):
        got = "None" if result is None else type(result).__name__
        raise AdapterError(f"the reader returned {got}, expected a LookupResult")
    fmt = result.row_format
    where = f"snapshot {result.snapshot_id!r}"
    if expected_format is not None and fmt != expected_format:
        raise AdapterError(f"{where}: row_format = {fmt} but the model expects {expected_format}")
    payload, present = np.asarray(result.payload), np.asarray(result.present)
    want = (payload.shape[0] if batch is None else batch, fmt.rows_per_user, fmt.row_bytes)
    if payload.dtype != np.uint8 or payload.shape != want:
        raise AdapterError(f"{where}: payload is {payload.dtype} {payload.shape}, expected uint8 {want}")
    if present.shape != (want[0],):
        raise AdapterError(f"{where}: present has shape {present.shape}, expected ({want[0]},)")
    for key in result.errors:
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= key < want[0]:
            raise AdapterError(
                f"{where}: errors has key {key!r}, expected a batch position 0..{want[0] - 1} "
                f"(the batch has {want[0]} users)"
            )
    try:
        age = float(result.age_s)
    except (TypeError, ValueError):
        raise AdapterError(f"{where}: age_s = {result.age_s!r} is not a number") from None
    if not np.isfinite(age):
        raise AdapterError(f"{where}: age_s = {age!r}: the snapshot's age must be a finite number of seconds")


def batch_from_lookup(
    result: LookupResult,
    device: Device = None,
    expected_format: RowFormat | None = None,
) -> DV365Batch:
    """Turns a store answer into :class:`DV365Batch` tensors on ``device``.

    Users listed in ``result.errors`` (failed integrity checks) are treated as missing, and logged; so are
    present users with a row whose fp16 scale or bias is NaN/inf (a corrupted row: its de-quantized values would
    not be finite). A malformed answer raises :class:`~dv365.adapters.AdapterError`: None instead of a
    LookupResult, ``errors`` keys outside ``0..B-1`` (negative included), a NaN/inf ``age_s``, wrong shapes.

    Args:
        result: a :class:`dv365.core.lookup.LookupResult`.
        device: where to put the tensors (None: CPU; a CUDA device pins and copies asynchronously).
        expected_format: raise :class:`~dv365.adapters.AdapterError` if the snapshot's row format differs.

    Example::

        batch = batch_from_lookup(reader.get([1, 2, 3]))
        batch.payload   # [3, 58, 132] uint8
        batch.present   # [3] bool
        batch.age_s     # [3] float32
    """
    import numpy as np

    _check_result(result, None, expected_format)
    present = np.array(result.present, dtype=bool, copy=True)  # [B]
    if result.errors:
        bad = sorted(result.errors)
        present[bad] = False
        logger.warning(
            "snapshot %r: %d user(s) failed the integrity check and are treated as missing: %s",
            result.snapshot_id,
            len(bad),
            "; ".join(f"#{i}: {result.errors[i]}" for i in bad[:5]),
        )
    raw = np.ascontiguousarray(result.payload, dtype=np.uint8)  # [B, N, row_bytes]
    if not raw.flags.writeable:  # a zero-copy answer (the gRPC client's): torch wants a writable array
        raw = raw.copy()
    sb = np.ascontiguousarray(raw[:, :, -4:]).view("<f2")  # [B, N, 2]: each row's fp16 scale and bias
    corrupt = np.flatnonzero(present & ~np.isfinite(sb).all(axis=(1, 2)))
    if corrupt.size:
        present[corrupt] = False
        logger.warning(
            "snapshot %r: %d user(s) have a row with a NaN/inf scale or bias and are treated as missing: "
            "batch positions %s",
            result.snapshot_id,
            corrupt.size,
            corrupt[:5].tolist(),
        )
    payload = torch.from_numpy(raw)  # [B, N, row_bytes]
    age = torch.full((present.shape[0],), float(result.age_s), dtype=torch.float32)  # [B]
    return DV365Batch(
        _to_device(payload, device), _to_device(torch.from_numpy(present), device), _to_device(age, device)
    )


def fetch_dv365(
    reader: EmbeddingReader,
    user_ids: Sequence[int] | np.ndarray | torch.Tensor,
    device: Device = None,
    expected_format: RowFormat | None = None,
    dedup: bool = True,
) -> DV365Batch:
    """Looks up a batch of users and returns the :class:`DV365Batch` tensors for :class:`~dv365.adapters.DV365Input`.

    Args:
        reader: any :class:`dv365.core.lookup.EmbeddingReader` (a dv365-store client, or your own).
        user_ids: ``[B]`` int user ids (list, numpy array or tensor); repeats allowed.
        device: where to put the tensors (None: CPU).
        expected_format: the row format the model was built for (None: accept the store's).
        dedup: look each distinct user up once and expand (RecD-style); the result is the same.

    Example::

        batch = fetch_dv365(reader, torch.tensor([7, 8, 7]))   # reader: e.g. a dv365-store client
        out = DV365Input()(*batch)                              # out.tokens: [3, 58, 256]
    """
    import numpy as np

    from dv365.core.lookup import LookupResult

    if isinstance(user_ids, torch.Tensor):
        ids = user_ids.detach().cpu().numpy()
    else:
        ids = np.asarray(user_ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise AdapterError(f"fetch_dv365: user_ids must be a 1-D integer sequence, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64, copy=False)
    if not dedup:
        result = reader.get(ids)
        _check_result(result, ids.shape[0], expected_format)
        return batch_from_lookup(result, device, expected_format)
    unique, inverse = np.unique(ids, return_inverse=True)
    result = reader.get(unique)  # a duck-typed reader may return anything: checked before use
    _check_result(result, unique.shape[0], expected_format)
    inverse = inverse.reshape(-1)
    errors = {int(pos): msg for upos, msg in result.errors.items() for pos in np.flatnonzero(inverse == upos)}
    expanded = LookupResult(
        payload=np.asarray(result.payload)[inverse],
        present=np.asarray(result.present)[inverse],
        snapshot_id=result.snapshot_id,
        age_s=result.age_s,
        row_format=result.row_format,
        errors=errors,
    )
    return batch_from_lookup(expanded, device, expected_format)
