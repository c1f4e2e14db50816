"""Project exceptions. Every error raised for bad *input* names the user, the field and the value."""

from __future__ import annotations

from typing import Any


class Dv365Error(Exception):
    """Base class of every error dv365 raises on purpose."""


class TimelineError(Dv365Error, ValueError):
    """A timeline record (or a whole timeline) breaks the UniTi contract.

    Attributes:
        field: the column at fault (``"dwell_time"``, ``"action"``, ``"<timeline>"`` for whole-timeline errors).
        user_id: the user the record belongs to (``None`` if the user id itself is unusable).
        value: the offending value, as read.
        record: index of the record in its input (row number), when known.
        reason: short machine-readable reason (``"nan"``, ``"negative"``, ``"unknown_action"``, ...).
        detail: the explanation the message ends with, in parentheses (``""`` if none).
    """

    def __init__(
        self,
        field: str,
        value: Any,
        reason: str,
        *,
        user_id: Any = None,
        record: int | None = None,
        source: str | None = None,
        detail: str = "",
    ) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        self.user_id = user_id
        self.record = record
        self.source = source
        self.detail = detail
        where = []
        if source:
            where.append(source)
        if record is not None:
            where.append(f"record {record}")
        where.append(f"user {user_id!r}")
        msg = f"{', '.join(where)}: field {field!r} = {value!r}: {reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class SliceSpecError(Dv365Error, ValueError):
    """A slice spec is malformed; the message names the feature and the key."""


class DatasetError(Dv365Error, IOError):
    """A UniTi dataset on disk is missing, incomplete or of an unknown format."""
