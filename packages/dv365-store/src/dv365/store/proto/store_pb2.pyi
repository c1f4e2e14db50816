from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RowFormat(_message.Message):
    __slots__ = ("dim", "bits", "rows_per_user")
    DIM_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_USER_FIELD_NUMBER: _ClassVar[int]
    dim: int
    bits: int
    rows_per_user: int
    def __init__(self, dim: _Optional[int] = ..., bits: _Optional[int] = ..., rows_per_user: _Optional[int] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "model_version", "data_cutoff_ts", "user_count", "row_format", "published_at", "source", "state", "active", "simulated")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_CUTOFF_TS_FIELD_NUMBER: _ClassVar[int]
    USER_COUNT_FIELD_NUMBER: _ClassVar[int]
    ROW_FORMAT_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    version: str
    model_version: str
    data_cutoff_ts: int
    user_count: int
    row_format: RowFormat
    published_at: float
    source: str
    state: str
    active: bool
    simulated: bool
    def __init__(self, version: _Optional[str] = ..., model_version: _Optional[str] = ..., data_cutoff_ts: _Optional[int] = ..., user_count: _Optional[int] = ..., row_format: _Optional[_Union[RowFormat, _Mapping]] = ..., published_at: _Optional[float] = ..., source: _Optional[str] = ..., state: _Optional[str] = ..., active: _Optional[bool] = ..., simulated: _Optional[bool] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("user_ids", "client_verifies")
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERIFIES_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[int]
    client_verifies: bool
    def __init__(self, user_ids: _Optional[_Iterable[int]] = ..., client_verifies: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("payload", "present", "checksums", "version", "errors")
    class ErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    present: bytes
    checksums: bytes
    version: VersionInfo
    errors: _containers.ScalarMap[int, str]
    def __init__(self, payload: _Optional[bytes] = ..., present: _Optional[bytes] = ..., checksums: _Optional[bytes] = ..., version: _Optional[_Union[VersionInfo, _Mapping]] = ..., errors: _Optional[_Mapping[int, str]] = ...) -> None: ...

class GetUserRequest(_message.Message):
    __slots__ = ("user_id", "known_version")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    known_version: str
    def __init__(self, user_id: _Optional[int] = ..., known_version: _Optional[str] = ...) -> None: ...

class GetUserResponse(_message.Message):
    __slots__ = ("payload", "present", "checksum", "version", "published_at", "info", "error")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    present: bool
    checksum: int
    version: str
    published_at: float
    info: VersionInfo
    error: str
    def __init__(self, payload: _Optional[bytes] = ..., present: _Optional[bool] = ..., checksum: _Optional[int] = ..., version: _Optional[str] = ..., published_at: _Optional[float] = ..., info: _Optional[_Union[VersionInfo, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class VersionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("snapshot_url", "no_activate")
    SNAPSHOT_URL_FIELD_NUMBER: _ClassVar[int]
    NO_ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    snapshot_url: str
    no_activate: bool
    def __init__(self, snapshot_url: _Optional[str] = ..., no_activate: _Optional[bool] = ...) -> None: ...

class ActivateRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class PruneRequest(_message.Message):
    __slots__ = ("keep",)
    KEEP_FIELD_NUMBER: _ClassVar[int]
    keep: int
    def __init__(self, keep: _Optional[int] = ...) -> None: ...

class PruneResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[_Iterable[str]] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
