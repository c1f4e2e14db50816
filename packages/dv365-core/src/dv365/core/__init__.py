"""dv365.core: UniTi timelines, validation, importers, the long-history generator, multi-slicing, and the
shared formats (row quantization, snapshots, the lookup contract).

Names are loaded lazily, so ``import dv365.core.quantize`` (what dv365-adapters needs) does not pull
pyarrow: ``from dv365.core import TimelineDataset`` imports :mod:`dv365.core.timeline` on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from dv365.core.__about__ import __version__

_LAZY = {
    "DatasetError": "errors",
    "Dv365Error": "errors",
    "SliceSpecError": "errors",
    "TimelineError": "errors",
    "EXPLICIT_SCHEMA": "schema",
    "IMPLICIT_SCHEMA": "schema",
    "REQUEST_SCHEMA": "schema",
    "DatasetWriter": "timeline",
    "EventTable": "timeline",
    "TimelineDataset": "timeline",
    "Timelines": "timeline",
    "ValidationPolicy": "validation",
    "ValidationReport": "validation",
    "validate_table": "validation",
    "validate_rows": "validation",
    "Vocabulary": "vocab",
    "SliceSpec": "slicing",
    "Slicer": "slicing",
    "SlicedBatch": "slicing",
    "RowFormat": "quantize",
    "quantize_rows": "quantize",
    "dequantize_rows": "quantize",
    "LookupResult": "lookup",
    "EmbeddingReader": "lookup",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'dv365.core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dv365.core.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
