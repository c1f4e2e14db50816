"""dv365.store: versioned DV365 user-embedding snapshots served by user id (paper §2.5).

One client interface for every backend, chosen by URL and imported only when selected::

    from dv365.store import open_store
    store = open_store("lmdb:///srv/dv365")        # embedded (default), or redis://…, redis+cluster://…, grpc[s]://…
    store.publish("/data/snapshots/2026-11-22T06")  # verify, load, activate atomically, keep the last 3
    r = store.get([42, 7])                          # LookupResult: int4 payload [2, 58, 132], present, snapshot_id, age_s
    x = store.get_float([42, 7]).embeddings         # de-quantized [2, 58, 256] float32
    store.rollback()

``dv365 serve --backend URL`` puts a gRPC service (TLS, reader/writer tokens, health) in front of any backend;
``dv365 store publish|versions|activate|rollback|prune|get`` manages a store; ``dv365 bench store`` load-tests.
"""

from dv365.store.__about__ import __version__
from dv365.store.api import MAX_BATCH, EmbeddingStore, FloatLookupResult, VersionInfo
from dv365.store.errors import (
    InvalidRequestError,
    NoActiveVersionError,
    PublishError,
    StoreAuthError,
    StoreError,
    StoreUnavailableError,
    VersionNotFoundError,
)
from dv365.store.factory import open_store

__all__ = [
    "__version__",
    "open_store",
    "EmbeddingStore",
    "VersionInfo",
    "FloatLookupResult",
    "MAX_BATCH",
    "StoreError",
    "InvalidRequestError",
    "NoActiveVersionError",
    "PublishError",
    "StoreAuthError",
    "StoreUnavailableError",
    "VersionNotFoundError",
]
