"""Store URLs: the scheme that picks a backend, and the query options a backend takes.

The factory (:func:`dv365.store.factory.open_store`) and every backend's ``from_url`` use these helpers, so
they sit below both.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

from dv365.store.errors import StoreError


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """(the URL without its query, the query as a dict). Not urlunsplit: it turns ``lmdb:///p`` into ``lmdb:/p``."""
    base, _, query = url.partition("?")
    return base.partition("#")[0], dict(parse_qsl(query.partition("#")[0], keep_blank_values=True))


def scheme_of(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if "://" not in url or len(scheme) <= 1:  # a bare path (or a Windows drive letter)
        return "lmdb"
    return scheme


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
