"""dv365.core: UniTi timelines, validation, importers, the long-history generator and multi-slicing."""

from dv365.core.__about__ import __version__
from dv365.core.errors import DatasetError, Dv365Error, SliceSpecError, TimelineError
from dv365.core.timeline import (
    EXPLICIT_SCHEMA,
    IMPLICIT_SCHEMA,
    REQUEST_SCHEMA,
    DatasetWriter,
    EventTable,
    TimelineDataset,
    Timelines,
)
from dv365.core.validation import ValidationPolicy, ValidationReport, validate_table
from dv365.core.vocab import Vocabulary

__all__ = [
    "__version__", "DatasetError", "Dv365Error", "SliceSpecError", "TimelineError", "EXPLICIT_SCHEMA",
    "IMPLICIT_SCHEMA", "REQUEST_SCHEMA", "DatasetWriter", "EventTable", "TimelineDataset", "Timelines",
    "ValidationPolicy", "ValidationReport", "validate_table", "Vocabulary",
]
