"""dv365-store exceptions. Every message names the store URL and, where it applies, the version, shard or user."""

from __future__ import annotations

from dv365.core.errors import Dv365Error


class StoreError(Dv365Error, IOError):
    """Base class of every error an embedding store raises on purpose."""


class InvalidRequestError(StoreError, ValueError):
    """Bad input: user ids that are not a 1-D integer batch, a batch over the limit, a malformed version name."""


class VersionNotFoundError(StoreError, LookupError):
    """The named version is not (or no longer) in the store."""


class NoActiveVersionError(StoreError):
    """``get`` on a store with no active version: publish a snapshot first."""


class PublishError(StoreError):
    """A snapshot could not be published; the active version is untouched."""


class StoreAuthError(StoreError, PermissionError):
    """The caller is not authenticated, or its credentials do not allow the operation (e.g. a reader publishing)."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The store's server cannot be reached (connection refused, timeout, TLS failure)."""
