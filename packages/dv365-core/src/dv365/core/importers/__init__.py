"""Importers: MovieLens (modern and classic layouts), KuaiRand logs, generic column-mapped CSV/Parquet.

Each importer reads a public data layout and writes a UniTi dataset (:class:`~dv365.core.timeline.DatasetWriter`),
so everything downstream (slicing, training) sees one format. docs/importers.md shows how each layout
maps to UniTi fields, with the exact ``dv365 import`` commands.

Importing this package is cheap: the importer functions are loaded on first use, so ``dv365 --help``
does not pay for pyarrow.

Example::

    from dv365.core.importers import import_movielens
    summary = import_movielens("shared/data/movielens-latest-small", "data/ml-small")
    print(summary.line())  # one line: users, ratings, tags, events, validation
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from dv365.core.importers.generic import GenericSummary, MappingError, import_generic
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
    "MappingError": "generic",
}


def __getattr__(name: str) -> Any:
    """Loads an importer module on first access to one of its public names (PEP 562)."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


_BASE_FIELDS = ("source", "url", "users", "explicit_events", "implicit_events", "requests", "validation")


@dataclass
class ImportSummary:
    """What one import wrote; each importer subclasses it to add its own input counts (int fields).

    Args:
        source: the dataset's ``source`` tag (e.g. ``"movielens:ml-latest-small"``).
        url: where the UniTi dataset was written.
        users: users with at least one event.
        explicit_events: explicit events written (after validation).
        implicit_events: implicit events written (after validation).
        requests: request rows written (after validation).
        validation: the writer's validation summary, one clause per table kind.

    Example::

        s = import_movielens(src, "memory://ml")
        s.users, s.events, s.counts()  # 610, 104519, {"ratings": 100836, "tags": 3683, ...}
        print(s.line())
    """

    source: str = ""
    url: str = ""
    users: int = 0
    explicit_events: int = 0
    implicit_events: int = 0
    requests: int = 0
    validation: str = ""

    @property
    def events(self) -> int:
        """Explicit plus implicit events written."""
        return self.explicit_events + self.implicit_events

    def counts(self) -> dict[str, int]:
        """The importer-specific input counts (the int fields a subclass adds), in declaration order."""
        out: dict[str, int] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in _BASE_FIELDS and isinstance(v, int) and not isinstance(v, bool):
                out[f.name] = v
        return out

    def line(self) -> str:
        """The one-line summary the CLI prints last."""
        parts = [f"{self.users:,} users"] + [f"{v:,} {k.replace('_', ' ')}" for k, v in self.counts().items()]
        parts.append(f"{self.events:,} events ({self.explicit_events:,} explicit, {self.implicit_events:,} implicit)")
        parts.append(f"{self.requests:,} requests")
        return f"imported {self.source} -> {self.url}: {', '.join(parts)}; validation: {self.validation or 'n/a'}"
