"""torchrec glue for sliced batches (the ``dv365-core[torchrec]`` extra).

:func:`to_kjt` turns a :class:`~dv365.core.slicing.SlicedBatch` into a weighted ``KeyedJaggedTensor``
without a host sync (``length_per_key``/``offset_per_key`` are passed in), and :func:`embedding_bag_configs`
gives the matching ``EmbeddingBagConfig`` list: one table per table-sharing group of the spec, SUM
pooling (the per-sample weights already hold ``count/len`` or ``s/sum(s)``, so SUM is the paper's mean /
weighted-mean pooling).

:func:`to_kjt` reads a batch through the :class:`KeyedBags` protocol, so this module depends on the slice
spec only and ``SlicedBatch.to_kjt()`` can call it without an import circle.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from dv365.core.slicing.spec import SliceSpec


class KeyedBags(Protocol):
    """Bags in KJT key-major layout, as :class:`~dv365.core.slicing.SlicedBatch` holds them."""

    keys: list[str]
    batch_size: int
    values: np.ndarray  # [total] int64
    weights: np.ndarray  # [total] float32
    lengths: np.ndarray  # [N * B]

    def length_per_key(self) -> np.ndarray: ...


def _torchrec() -> Any:
    try:
        import torchrec
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "dv365.core.kjt needs torchrec: pip install 'dv365-core[torchrec]' "
            "(on CPU: torchrec --no-deps plus fbgemm-gpu-cpu, see the README)"
        ) from e
    return torchrec


def to_kjt(batch: KeyedBags, device: torch.device | str | None = None) -> Any:
    """A weighted KJT with one key per feature and ``batch.batch_size`` bags per key.

    Example::

        kjt = sliced.to_kjt()
        kjt.keys()[:2], kjt.stride()        # feature names, B
    """
    torchrec = _torchrec()
    lpk = batch.length_per_key()
    opk = np.concatenate([[0], np.cumsum(lpk)])
    kjt = torchrec.KeyedJaggedTensor(
        keys=list(batch.keys),
        values=torch.from_numpy(np.ascontiguousarray(batch.values, dtype=np.int64)),
        weights=torch.from_numpy(np.ascontiguousarray(batch.weights, dtype=np.float32)),
        lengths=torch.from_numpy(np.ascontiguousarray(batch.lengths, dtype=np.int32)),
        stride=batch.batch_size,
        length_per_key=[int(x) for x in lpk],
        offset_per_key=[int(x) for x in opk],
    )
    return kjt.to(torch.device(device)) if device is not None else kjt


def embedding_bag_configs(spec: SliceSpec, embedding_dim: int) -> list[Any]:
    """One ``EmbeddingBagConfig`` per shared table of ``spec`` (SUM pooling, rows = hash_size)."""
    torchrec = _torchrec()
    from torchrec.modules.embedding_configs import PoolingType

    return [
        torchrec.EmbeddingBagConfig(
            name=t.name,
            embedding_dim=embedding_dim,
            num_embeddings=t.hash_size,
            feature_names=list(t.features),
            pooling=PoolingType.SUM,
        )
        for t in spec.tables.values()
    ]
