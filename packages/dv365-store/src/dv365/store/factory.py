"""``open_store(url)``: the backend is chosen by the URL's scheme and imported only then.

=====================================  ==================================================================
``lmdb:///srv/dv365`` (or a bare path)  embedded LMDB store in that directory (no server)
``redis://[user:pass@]host:port/db``    Redis (``rediss://`` for TLS)
``grpc://host:port``                    a ``dv365 serve`` service (``grpcs://`` for TLS)
=====================================  ==================================================================

Query parameters are backend options (``?keep=5``, ``lmdb:///srv/dv365?mode=ro``, ``redis://…?prefix=dv365``,
``grpcs://…?ca=/etc/dv365/ca.pem``); keyword arguments of :func:`open_store` override them.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from dv365.store.api import EmbeddingStore
from dv365.store.errors import StoreError

# scheme -> (module, class, the extra that brings its client library)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "lmdb": ("dv365.store.backends.lmdb_store", "LmdbStore", "lmdb"),
    "redis": ("dv365.store.backends.redis_store", "RedisStore", "redis"),
    "rediss": ("dv365.store.backends.redis_store", "RedisStore", "redis"),
    "grpc": ("dv365.store.backends.grpc_client", "GrpcStore", "grpc"),
    "grpcs": ("dv365.store.backends.grpc_client", "GrpcStore", "grpc"),
}


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """(the URL without its query, the query as a dict). Not urlunsplit: it turns ``lmdb:///p`` into ``lmdb:/p``."""
    base, _, query = url.partition("?")
    return base.partition("#")[0], dict(parse_qsl(query.partition("#")[0], keep_blank_values=True))


def scheme_of(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if "://" not in url or len(scheme) <= 1:  # a bare path (or a Windows drive letter)
        return "lmdb"
    return scheme


def open_store(url: str, **options: Any) -> EmbeddingStore:
    """Opens the store at ``url`` with the backend its scheme names.

    Example::

        store = open_store("lmdb:///srv/dv365", keep=5)
        store = open_store("redis://writer:secret@127.0.0.1:6379/0?prefix=dv365")
        store = open_store("grpcs://emb.internal:7365?ca=/etc/dv365/ca.pem", token=os.environ["DV365_STORE_TOKEN"])
    """
    scheme = scheme_of(url)
    if scheme not in BACKENDS:
        raise StoreError(f"{url}: unknown store scheme {scheme!r}; use one of {sorted(BACKENDS)} "
                         "(lmdb:///path, redis://host:port/db, grpc://host:port)")
    module, cls_name, extra = BACKENDS[scheme]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise StoreError(f"{url}: the {scheme} backend needs {e.name or 'its client library'}: "
                         f"pip install 'dv365-store[{extra}]'") from e
    cls = getattr(mod, cls_name)
    base, query = split_url(url)
    return cls.from_url(base, **{**query, **options})  # type: ignore[no-any-return]


def parse_bool(value: Any, name: str, url: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise StoreError(f"{url}: option {name}={value!r} is not a boolean")


def reject_unknown(options: dict[str, Any], url: str, allowed: set[str]) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise StoreError(f"{url}: unknown option(s) {sorted(unknown)}; this backend takes {sorted(allowed)}")
