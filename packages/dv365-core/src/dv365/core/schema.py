"""The UniTi Arrow schemas (paper §2.1): one per table kind, ``explicit``, ``implicit`` and ``requests``.

Every column is typed here once; :mod:`dv365.core.validation` canonicalises tables into these schemas and
:mod:`dv365.core.timeline` stores them (and re-exports these names).
"""

from __future__ import annotations

import pyarrow as pa

_MEDIA_FIELDS = [
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("ts", pa.int64(), nullable=False),  # unix seconds, UTC
    pa.field("media_id", pa.int64(), nullable=False),
    pa.field("author_id", pa.int64()),  # null: unknown author
    pa.field("topic_ids", pa.list_(pa.int64())),
    pa.field("media_type", pa.string()),
]
EXPLICIT_SCHEMA = pa.schema(
    _MEDIA_FIELDS
    + [
        pa.field("action", pa.string(), nullable=False),
        pa.field("surface", pa.string()),
        pa.field("value", pa.float32()),  # optional action value (a MovieLens rating); null if none
    ]
)
IMPLICIT_SCHEMA = pa.schema(
    _MEDIA_FIELDS
    + [
        pa.field("surface", pa.string()),
        pa.field("video_duration", pa.float32()),  # seconds; null: not a video
        pa.field("dwell_time", pa.float32(), nullable=False),  # seconds
    ]
)
# Training requests: the target item at request time ``ts`` plus any number of float ``label_*`` columns.
REQUEST_SCHEMA = pa.schema(_MEDIA_FIELDS + [pa.field("surface", pa.string()), pa.field("video_duration", pa.float32())])


def schema_for(kind: str) -> pa.Schema:
    """The Arrow schema of ``"explicit"``, ``"implicit"`` or ``"requests"`` tables."""
    try:
        return {"explicit": EXPLICIT_SCHEMA, "implicit": IMPLICIT_SCHEMA, "requests": REQUEST_SCHEMA}[kind]
    except KeyError:
        raise ValueError(f"unknown table kind {kind!r}; expected explicit, implicit or requests") from None
