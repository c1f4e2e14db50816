"""Tower outputs -> quantized rows: the export's encoder (paper §2.3.2, App. A.2.2).

:func:`quantize_fbgemm` is the export path: fbgemm's fused n-bit row-wise op
``FloatToFusedNBitRowwiseQuantizedSBHalf`` (4 bits default, 8 as an option; for 8 bits the *n-bit* op with
``bit_rate=8`` is used, whose fp16 scale/bias rows are :class:`dv365.core.quantize.RowFormat`'s, 260 B at
D = 256 -- fbgemm's other 8-bit op ``FloatToFused8BitRowwiseQuantized`` writes fp32 scale/bias, 264 B, a
different format). Its bytes decode with core's pure-PyTorch :func:`~dv365.core.quantize.dequantize_rows`,
bit for bit, so readers never need fbgemm. ``quantizer="torch"`` uses core's
:func:`~dv365.core.quantize.quantize_rows` instead (same bytes except, where a row's minimum is a zero, possibly
the sign of that zero bias; decoded values identical).

:class:`UserEncoder` runs the user tower over timelines: slice at the request time (the snapshot's data
cut-off; the slicer drops the last ``gap`` seconds, as in training), build the KJT, run ``eta`` in eval mode
under ``torch.inference_mode``, quantize. Every tower call sees exactly ``batch_users`` users (a short batch is
padded by repeating its first user), so a user's bytes do not depend on which other users share its batch:
resumed, sharded and incremental exports reproduce a full export byte for byte (a CPU GEMM with a different
number of rows may round differently).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dv365.core.quantize import FP16_MAX, RowFormat, quantize_rows
from dv365.core.slicing import SliceSpec
from dv365.core.timeline import Timelines, take_rows
from dv365.core.vocab import Vocabulary
from dv365.export.errors import ExportError

QUANTIZERS = ("fbgemm", "torch")


def quantize_fbgemm(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """``[..., D]`` float -> ``[..., D*bits/8 + 4]`` uint8 with fbgemm's fused n-bit row-wise op.

    CUDA tensors use fbgemm's CUDA kernel when the installed fbgemm-gpu has one, else they are moved to the CPU.

    Example::

        q = quantize_fbgemm(torch.randn(8, 58, 256))    # [8, 58, 132] uint8
    """
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
    except ImportError as e:
        raise ExportError(
            "the fbgemm quantizer needs fbgemm-gpu (pip install fbgemm-gpu-cpu, or fbgemm-gpu on "
            "CUDA hosts); or export with --quantizer torch (core's bit-compatible pure-PyTorch "
            "quantizer)"
        ) from e
    if bits not in (4, 8):
        raise ExportError(f"--bits must be 4 or 8, got {bits}")
    D = x.shape[-1]
    rows = x.reshape(-1, D).to(torch.float32).contiguous()  # [R, D]
    op = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf
    if rows.is_cuda:
        try:
            q = op(rows, bits).cpu()
        except (RuntimeError, NotImplementedError):  # a CPU-only fbgemm build has no CUDA kernel
            q = op(rows.cpu(), bits)
    else:
        q = op(rows, bits)
    return q.reshape(*x.shape[:-1], q.shape[-1])


def quantize(x: torch.Tensor, bits: int, quantizer: str = "fbgemm") -> torch.Tensor:
    """Row-wise quantization with ``quantizer`` (``"fbgemm"`` or ``"torch"``); result on the CPU."""
    if quantizer == "fbgemm":
        return quantize_fbgemm(x, bits)
    if quantizer == "torch":
        return quantize_rows(x.cpu(), bits)
    raise ExportError(f"--quantizer must be one of {QUANTIZERS}, got {quantizer!r}")


def resolve_device(name: str | None) -> torch.device:
    """``auto``/``None`` -> CUDA when available, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ExportError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"--device {name!r}: CUDA is not available on this host (use auto or cpu)")
    return dev


@dataclass(frozen=True)
class TowerModel:
    """A trained user tower and how it was trained (what an export needs from a checkpoint).

    Attributes:
        tower: ``eta`` in eval mode on ``device``: KJT -> ``[B, N_out, D]``.
        spec: the slice spec training used (``data.spec`` with its ``hash_sizes``), so export slices alike.
        model_version: ``<checkpoint folder>@step<N>:<sha256 of the file, 12 hex>``.
        checkpoint: the checkpoint file.
        step: its training step.
        data_url: the training dataset (``data.url``), the default export input.
        device: where the tower runs.
    """

    tower: torch.nn.Module
    spec: SliceSpec
    model_version: str
    checkpoint: str
    step: int
    data_url: str
    device: torch.device

    @property
    def out_tokens(self) -> int:
        return int(self.tower.out_tokens)

    @property
    def dim(self) -> int:
        return int(self.tower.dim)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_tower_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> TowerModel:
    """Loads the user tower of a dv365 training checkpoint (a ``step_*.pt`` file or its folder: the latest).

    Example::

        m = load_tower_model("out/train/synth-fsa")
        m.model_version, m.out_tokens, m.dim       # ('synth-fsa@step150:...', 58, 64)
    """
    from dv365.train.checkpoint import load_checkpoint, load_user_tower
    from dv365.train.config import TrainConfig
    from dv365.train.data import load_spec

    ckpt = load_checkpoint(checkpoint)  # CheckpointError (a Dv365Error) for a missing / unreadable file
    cfg = TrainConfig.from_dict(ckpt["config"])
    path = Path(ckpt["path"])
    dev = torch.device(device)
    tower = load_user_tower(path, dev)  # CheckpointError for a baseline model (no tower)
    # the tower's pooling mode stays "auto": under torch.inference_mode (UserEncoder) it takes torchrec's
    # per-feature EBC forward, the faster one without gradients (`dv365 bench tower`)
    spec = load_spec(cfg.data)
    version = f"{path.parent.name or path.stem}@step{int(ckpt['step'])}:{file_sha256(path)[:12]}"
    return TowerModel(tower, spec, version, str(path), int(ckpt["step"]), cfg.data.url, dev)


class UserEncoder:
    """Timelines -> quantized user embeddings ``[U, user_bytes]`` uint8 (and the floats, for measurements).

    The slicing and the KJT come from dv365-train's one data path (:class:`dv365.train.features.UserFeatures`);
    :meth:`forward` runs one fixed-size tower batch and times its pooling and summarization
    (:attr:`seconds`).

    Args:
        model: the tower and its slice spec.
        vocab: the vocabulary of the dataset being exported.
        fmt: the row format (``dim`` and ``rows_per_user`` must match the tower).
        batch_users: users per tower call (every call is padded to exactly this many).
        quantizer: ``"fbgemm"`` (default) or ``"torch"``.
        backend: the slicer backend: ``auto`` (default: numba when it imports), ``numba`` or ``numpy`` (the
            reference). The bags are put in one canonical order (ascending ids), so every backend gives the
            same bytes (tested).

    Example::

        enc = UserEncoder(model, dataset.vocab, RowFormat(dim=model.dim, rows_per_user=model.out_tokens))
        payload = enc.encode(timelines, cutoff_ts)     # [U, 7656] uint8 at 58 x 256, 4 bits
        floats = enc.embed(timelines, per_user_cutoffs)  # [U, 58, 256]: one cut-off per user
    """

    def __init__(
        self,
        model: TowerModel,
        vocab: Vocabulary,
        fmt: RowFormat,
        batch_users: int = 64,
        quantizer: str = "fbgemm",
        backend: str = "auto",
    ) -> None:
        from dv365.train.features import UserFeatures

        if (fmt.dim, fmt.rows_per_user) != (model.dim, model.out_tokens):
            raise ExportError(
                f"row format {fmt.rows_per_user} x {fmt.dim} does not match the tower's output "
                f"{model.out_tokens} x {model.dim}"
            )
        if batch_users <= 0:
            raise ExportError(f"--batch-users must be positive, got {batch_users}")
        if quantizer not in QUANTIZERS:
            raise ExportError(f"--quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        self.model, self.fmt, self.batch_users, self.quantizer = model, fmt, batch_users, quantizer
        self.features = UserFeatures(model.spec, vocab, backend=backend, canonical=True)
        self.slicer = self.features.slicer
        self.seconds = {"pool": 0.0, "fsa": 0.0, "quantize": 0.0}  # summed over calls (CPU clock; see forward)

    def forward(self, kjt: Any) -> torch.Tensor:
        """The tower on one batch's KJT (on the model's device) -> ``[B, N_out, D]`` float32 on the CPU.
        Pooling and summarization are timed separately (on CUDA without a sync: the split is approximate)."""
        from dv365.train.dedup import expand, strip_inverse

        tower = self.model.tower
        with torch.inference_mode():
            t0 = time.perf_counter()
            unique, inverse = strip_inverse(kjt)
            pooled = tower.pooling(unique)
            t1 = time.perf_counter()
            y = expand(tower.arch(pooled), inverse).float().cpu()
            t2 = time.perf_counter()
        self.seconds["pool"] += t1 - t0
        self.seconds["fsa"] += t2 - t1
        return y

    def embed(
        self, timelines: Timelines, cutoff_ts: int | np.ndarray, on_batch: Callable[[int], object] | None = None
    ) -> torch.Tensor:
        """Float tower outputs ``[U, N_out, D]`` (CPU) of every user of ``timelines`` at ``cutoff_ts`` (one time
        for all, or one per user); ``on_batch(n)`` is called after each batch of ``n`` users (progress)."""
        U, B = len(timelines), self.batch_users
        cuts = np.broadcast_to(np.asarray(cutoff_ts, dtype=np.int64), (U,))
        out = torch.empty(U, self.fmt.rows_per_user, self.fmt.dim, dtype=torch.float32)
        for s in range(0, U, B):
            rows = np.arange(s, min(s + B, U))
            padded = np.concatenate([rows, np.full(B - len(rows), rows[0])])  # fixed batch size
            batch = Timelines(
                timelines.user_ids[padded],
                take_rows(timelines.explicit, padded),
                take_rows(timelines.implicit, padded),
                timelines.vocab,
            )
            y = self.forward(self.features.kjt(batch, np.ascontiguousarray(cuts[padded]), self.model.device))
            out[s : s + len(rows)] = y[: len(rows)]
            if on_batch is not None:
                on_batch(len(rows))
        return out

    def quantize(self, emb: torch.Tensor, user_ids: np.ndarray) -> np.ndarray:
        """``[U, N_out, D]`` floats -> ``[U, user_bytes]`` uint8; a non-finite or out-of-fp16-range output is an
        :class:`ExportError` naming the user."""
        flat = emb.reshape(len(emb), -1)
        bad = ~(torch.isfinite(flat) & (flat.abs() <= FP16_MAX)).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ExportError(
                f"user {int(user_ids[i])}: the tower's output has a non-finite value or one beyond "
                f"the fp16 range ({flat[i][~torch.isfinite(flat[i])][:3].tolist()}...); "
                "the checkpoint may be broken"
            )
        t0 = time.perf_counter()
        q = quantize(emb, self.fmt.bits, self.quantizer)  # [U, N_out, row_bytes]
        out = np.ascontiguousarray(q.numpy().reshape(len(emb), self.fmt.user_bytes))
        self.seconds["quantize"] += time.perf_counter() - t0
        return out

    def encode(
        self, timelines: Timelines, cutoff_ts: int, on_batch: Callable[[int], object] | None = None
    ) -> np.ndarray:
        """Quantized embeddings ``[U, user_bytes]`` uint8 of every user of ``timelines`` at ``cutoff_ts``."""
        return self.quantize(self.embed(timelines, cutoff_ts, on_batch), timelines.user_ids)
