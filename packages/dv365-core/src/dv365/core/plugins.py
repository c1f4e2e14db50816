"""Plug-ins found through entry points: the one loader every ``dv365`` registry uses.

A registry is an entry-point group whose values are ``module:attribute`` references; packages add to it in
their ``pyproject.toml``. Groups used by dv365:

* ``dv365.commands``: ``register(subparsers) -> None`` adds one ``dv365`` sub-command;
* ``dv365.stores``: ``open_store(url, **options)`` opens an embedding store (dv365-store registers it);
* ``dv365.benchmarks`` / ``dv365.experiments``: extra ``dv365 bench`` / ``dv365 eval`` entries.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

logger = logging.getLogger(__name__)


def load_ref(ref: str) -> Any:
    """Imports ``"package.module:attribute"`` and returns the attribute."""
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def iter_plugins(group: str, skip: frozenset[str] | set[str] = frozenset()) -> Iterator[tuple[str, Any]]:
    """``(name, loaded object)`` of every entry point of ``group``, sorted by name.

    A plug-in that fails to load is left out with a warning naming it, so one broken package does not take the
    others down with it. Names in ``skip`` (a registry's built-ins, which win) are not loaded.
    """
    seen: set[str] = set()
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        if ep.name in skip or ep.name in seen:
            continue
        seen.add(ep.name)
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - any failure of a third-party import is reported the same way
            logger.warning(
                "dv365: %s plug-in %r (%s) could not be loaded and is left out: %s: %s",
                group,
                ep.name,
                ep.value,
                type(e).__name__,
                e,
            )
            continue
        yield ep.name, obj


def load_plugin(group: str, name: str, missing: str) -> Any:
    """The entry point ``name`` of ``group``; ``missing`` is the message of the error raised when none exists."""
    from dv365.core.errors import Dv365Error

    for ep in entry_points(group=group):
        if ep.name == name:
            return ep.load()
    raise Dv365Error(missing)


def open_store(url: str, **options: Any) -> Any:
    """Opens the embedding store at ``url`` through the installed dv365-store (``dv365.stores`` entry point).

    Lets the packages below dv365-store (the export job's publish step) write to a store without importing it.
    """
    opener = load_plugin(
        "dv365.stores", "open_store", f"{url}: publishing to a store needs dv365-store: pip install dv365-store"
    )
    return opener(url, **options)
