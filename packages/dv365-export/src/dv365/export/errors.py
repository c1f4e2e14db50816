"""Exceptions of dv365.export (subclasses of :class:`dv365.core.errors.Dv365Error`, so ``dv365`` prints them).

A broken snapshot (missing / corrupted shard, bad manifest) raises core's
:class:`~dv365.core.snapshot.SnapshotError`; everything else the export job refuses raises :class:`ExportError`.
"""

from __future__ import annotations

from dv365.core.errors import Dv365Error


class ExportError(Dv365Error, ValueError):
    """An export cannot run as asked: bad option, wrong checkpoint, an occupied output folder, a previous
    snapshot that does not fit. The message names the option / file and the value."""
