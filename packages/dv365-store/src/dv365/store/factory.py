"""``open_store(url)``: the backend is chosen by the URL's scheme and imported only then.

==========================================  ==================================================================
``lmdb:///srv/dv365`` (or a bare path)       embedded LMDB store in that directory (no server)
``redis://[user:pass@]host:port/db``         Redis (``rediss://`` for TLS)
``redis+cluster://host:port[,host:port]``    Redis Cluster (``rediss+cluster://`` for TLS)
``grpc://host:port``                         a ``dv365 serve`` service (``grpcs://`` for TLS)
==========================================  ==================================================================

Query parameters are backend options (``?keep=5``, ``lmdb:///srv/dv365?mode=ro``, ``redis://…?prefix=dv365``,
``grpcs://…?ca=/etc/dv365/ca.pem``); keyword arguments of :func:`open_store` override them.
"""

from __future__ import annotations

import importlib
from typing import Any

from dv365.store.api import EmbeddingStore
from dv365.store.errors import StoreError
from dv365.store.urls import scheme_of, split_url

__all__ = ["BACKENDS", "open_store", "scheme_of", "split_url"]  # the URL helpers live in dv365.store.urls

# scheme -> (module, class, the extra that brings its client library)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "lmdb": ("dv365.store.backends.lmdb_store", "LmdbStore", "lmdb"),
    "redis": ("dv365.store.backends.redis_store", "RedisStore", "redis"),
    "rediss": ("dv365.store.backends.redis_store", "RedisStore", "redis"),
    "redis+cluster": ("dv365.store.backends.redis_cluster_store", "RedisClusterStore", "redis"),
    "rediss+cluster": ("dv365.store.backends.redis_cluster_store", "RedisClusterStore", "redis"),
    "grpc": ("dv365.store.backends.grpc_client", "GrpcStore", "grpc"),
    "grpcs": ("dv365.store.backends.grpc_client", "GrpcStore", "grpc"),
}


def open_store(url: str, **options: Any) -> EmbeddingStore:
    """Opens the store at ``url`` with the backend its scheme names.

    Example::

        store = open_store("lmdb:///srv/dv365", keep=5)
        store = open_store("redis://writer:secret@127.0.0.1:6379/0?prefix=dv365")
        store = open_store("grpcs://emb.internal:7365?ca=/etc/dv365/ca.pem", token=os.environ["DV365_STORE_TOKEN"])
    """
    scheme = scheme_of(url)
    if scheme not in BACKENDS:
        raise StoreError(
            f"{url}: unknown store scheme {scheme!r}; use one of {sorted(BACKENDS)} "
            "(lmdb:///path, redis://host:port/db, grpc://host:port)"
        )
    module, cls_name, extra = BACKENDS[scheme]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise StoreError(
            f"{url}: the {scheme} backend needs {e.name or 'its client library'}: pip install 'dv365-store[{extra}]'"
        ) from e
    cls = getattr(mod, cls_name)
    base, query = split_url(url)
    return cls.from_url(base, **{**query, **options})  # type: ignore[no-any-return]
