"""What the gRPC service and its client share: message conversions, error <-> status mapping, channel options."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from dv365.core.quantize import RowFormat
from dv365.store import errors as E
from dv365.store.api import VersionInfo
from dv365.store.proto import store_pb2 as pb

SERVICE = "dv365.store.v1.EmbeddingStore"
WRITER_METHODS = frozenset({"Publish", "Activate", "Rollback", "Delete", "Prune"})
READER_METHODS = frozenset({"Get", "GetStream", "GetUser", "Versions"})
MAX_MESSAGE = 128 << 20  # a 10,000-user answer is 77 MB
# GetStream's piece size: ~1 MB (136 users of 7.6 KB; a 1,000-user answer in 8 pieces). Measured (docs/store.md):
# a bare grpcio stream of 7.7 MB in 8 pieces arrives ~2x sooner than one message, in 64 pieces no sooner; GetStream
# of 1,000 users on a 16-core host, p50: 256 KB pieces 16.5 ms, 512 KB 13.8, 1 MB 14.3, 2 MB 17.3, unary Get 27.8;
# on the 2-vCPU dev VM (1M users): 512 KB / 1 MB / 2 MB within noise (24-27 ms), one 7.7 MB piece 49 ms.
STREAM_CHUNK_BYTES = 1 << 20
# HTTP/2 flow control (server and client both use these). With BDP probing on (grpcio's default) the transport
# re-targets its window and max frame size from bandwidth estimates while it runs; on loopback a connection can
# settle in a slow state (timed like a fixed 16 MB max frame size): a bare 7.7 MB unary answer then takes
# 25-35 ms instead of 10-14 ms, and ~20 ms of client CPU instead of ~7 (docs/store.md, "Measured"). Probing off
# keeps the transport out of that state; a fixed 16 MiB window (more than a whole 1,000-user answer) stands in for
# what probing would have grown, so that links with a larger bandwidth-delay product than loopback are not throttled.
FLOW_CONTROL_WINDOW = 16 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", FLOW_CONTROL_WINDOW),
]
ERROR_KEY = "dv365-error"  # trailing metadata: the StoreError subclass name

# glibc malloc settings of a serving process (retain_freed_memory). A 1,000-user answer is a 7.7 MB message that
# grpcio copies once more into its own buffer; with glibc's defaults the two are freed at the end of the call and,
# depending on a few bytes of message size against the threshold glibc derived from earlier frees, the heap is
# trimmed (madvise DONTNEED) and the next answer faults every page in again: ~3,700 page faults and ~8 ms of
# server CPU per 1,000-user answer on the 2-vCPU dev VM (docs/store.md, "Measured", issue 21 zero-copy round).
RETAINED_HEAP_MB = 64  # freed memory each malloc arena keeps instead of returning it to the kernel
MMAP_THRESHOLD_MB = 32  # glibc's own upper bound for its dynamic threshold; larger blocks are mmapped


def retain_freed_memory() -> bool:
    """Makes this process's glibc malloc keep freed memory for reuse (trim threshold 64 MiB per arena, mmap
    threshold fixed at 32 MiB; :func:`dv365.core.process.keep_heap_memory`), so that answer-sized buffers are
    not returned to the kernel and faulted in again on every call. Called by the ``dv365 serve`` processes (and
    the benchmark's bare grpcio floor server, so that both run with the same allocator settings), not by the
    client library. False where it does not apply (not glibc)."""
    from dv365.core.process import keep_heap_memory

    return keep_heap_memory(MMAP_THRESHOLD_MB, RETAINED_HEAP_MB)


_CODES: list[tuple[type[E.StoreError], grpc.StatusCode]] = [
    (E.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (E.VersionNotFoundError, grpc.StatusCode.NOT_FOUND),
    (E.NoActiveVersionError, grpc.StatusCode.FAILED_PRECONDITION),
    (E.StoreAuthError, grpc.StatusCode.PERMISSION_DENIED),
    (E.StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (E.PublishError, grpc.StatusCode.FAILED_PRECONDITION),
    (E.StoreError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_of(e: E.StoreError) -> grpc.StatusCode:
    return next(code for cls, code in _CODES if isinstance(e, cls))


def error_class(name: str | None, code: grpc.StatusCode) -> type[E.StoreError]:
    cls = getattr(E, name or "", None)
    if isinstance(cls, type) and issubclass(cls, E.StoreError):
        return cls
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return E.StoreAuthError
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return E.StoreUnavailableError
    return E.StoreError


def version_to_pb(v: VersionInfo) -> pb.VersionInfo:
    f = v.row_format
    return pb.VersionInfo(
        version=v.version,
        model_version=v.model_version,
        data_cutoff_ts=v.data_cutoff_ts,
        user_count=v.user_count,
        published_at=v.published_at,
        source=v.source,
        state=v.state,
        active=v.active,
        simulated=v.simulated,
        row_format=pb.RowFormat(dim=f.dim, bits=f.bits, rows_per_user=f.rows_per_user),
    )


def version_from_pb(m: pb.VersionInfo) -> VersionInfo:
    f = m.row_format
    return VersionInfo(
        version=m.version,
        model_version=m.model_version,
        data_cutoff_ts=m.data_cutoff_ts,
        user_count=m.user_count,
        row_format=RowFormat(f.dim, f.bits, f.rows_per_user),
        published_at=m.published_at,
        source=m.source,
        state=m.state,
        active=m.active,
        simulated=m.simulated,
    )


# ---- GetResponse on the wire without extra copies -------------------------------------------------------
# GetResponse's three big fields are written/read directly (protobuf wire format: the message is the
# concatenation of its fields, in any order); the small ones (version, errors) go through the generated
# class. The bytes are exactly a serialized GetResponse, so clients built from store.proto read them as usual.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def payload_offset(payload_bytes: int) -> int:
    """Where the payload starts in :func:`encode_get_response`'s message (after field 1's tag and length)."""
    return 1 + len(_varint(payload_bytes)) if payload_bytes else 0


def encode_get_response(
    payload: Sequence[Any], payload_bytes: int, present: memoryview, checksums: memoryview, small: bytes
) -> bytes:
    """A serialized GetResponse in one ``b"".join``: field 1 from ``payload`` (buffers whose concatenation is the
    payload, ``payload_bytes`` in all: one buffer, or one view per row straight from the store: each byte is
    copied once), fields 2-3 from buffers, then ``small`` (fields 4-5, serialized). The payload starts at
    :func:`payload_offset` (``payload_bytes``)."""
    parts: list[Any] = []
    if payload_bytes:
        parts.append(b"\x0a" + _varint(payload_bytes))
        parts.extend(payload)
    for tag, buf in ((0x12, present), (0x1A, checksums)):
        if buf.nbytes:
            parts += [bytes([tag]) + _varint(buf.nbytes), buf]
    parts.append(small)
    return b"".join(parts)


def decode_get_response(data: bytes) -> tuple[memoryview, memoryview, memoryview, pb.GetResponse]:
    """(payload, present, checksums) as zero-copy views into ``data``, and the other fields parsed."""
    mv = memoryview(data)
    big: dict[int, memoryview] = {1: mv[:0], 2: mv[:0], 3: mv[:0]}
    rest = bytearray()
    i, n = 0, len(mv)
    while i < n:
        start = i
        key, i = _read_varint(mv, i)
        field, wire = key >> 3, key & 7
        if wire == 2:
            length, i = _read_varint(mv, i)
            end = i + length
        elif wire == 0:
            _, end = _read_varint(mv, i)
        elif wire == 1:
            end = i + 8
        elif wire == 5:
            end = i + 4
        else:
            raise ValueError(f"unexpected wire type {wire} in GetResponse")
        if end > n:
            raise ValueError(f"field {field} runs past the end of the message ({end} > {n} bytes): truncated")
        if field in big and wire == 2:
            big[field] = mv[i:end]
        else:
            rest += mv[start:end]
        i = end
    return big[1], big[2], big[3], pb.GetResponse.FromString(bytes(rest))


def _read_varint(mv: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = mv[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
