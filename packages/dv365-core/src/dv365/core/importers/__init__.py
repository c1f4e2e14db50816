"""Importers: MovieLens (modern and classic layouts), KuaiRand logs, generic column-mapped CSV/Parquet.

Each importer reads a public data layout and writes a UniTi dataset (:class:`~dv365.core.timeline.DatasetWriter`),
so everything downstream (slicing, training) sees one format. docs/importers.md shows how each layout
maps to UniTi fields, with the exact ``dv365 import`` commands.

This package only re-exports: the importers live in :mod:`.movielens`, :mod:`.kuairand` and :mod:`.generic`,
what they share (:class:`ImportSummary`, the file helpers) in :mod:`.common`. Importing it is cheap: the
names are loaded on first use, so ``dv365 --help`` does not pay for pyarrow.

Example::

    from dv365.core.importers import import_movielens
    summary = import_movielens("shared/data/movielens-latest-small", "data/ml-small")
    print(summary.line())  # one line: users, ratings, tags, events, validation
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from dv365.core.importers.common import ImportSummary, MappingError
    from dv365.core.importers.generic import GenericSummary, import_generic
    from dv365.core.importers.kuairand import DEFAULT_TAB_SURFACES, KuaiRandSummary, import_kuairand
    from dv365.core.importers.movielens import MovieLensSummary, detect_movielens_layout, import_movielens

__all__ = [
    "DEFAULT_TAB_SURFACES",
    "GenericSummary",
    "ImportSummary",
    "KuaiRandSummary",
    "MappingError",
    "MovieLensSummary",
    "detect_movielens_layout",
    "import_generic",
    "import_kuairand",
    "import_movielens",
]

_LAZY = {
    "import_movielens": "movielens",
    "detect_movielens_layout": "movielens",
    "MovieLensSummary": "movielens",
    "import_kuairand": "kuairand",
    "KuaiRandSummary": "kuairand",
    "DEFAULT_TAB_SURFACES": "kuairand",
    "import_generic": "generic",
    "GenericSummary": "generic",
    "ImportSummary": "common",
    "MappingError": "common",
}


def __getattr__(name: str) -> Any:
    """Loads an importer module on first access to one of its public names (PEP 562)."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
