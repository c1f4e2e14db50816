"""Client of a ``dv365 serve`` service (``grpc://host:port``; ``grpcs://host:port?ca=ca.pem`` for TLS).

The token is sent as ``authorization: Bearer <token>``; give it as ``token=`` (or ``token_file=``), or set
``DV365_STORE_TOKEN``. Every payload row is checked against the checksum the service sent with it. Batches
are read through the unary ``Get``: the answer's payload is viewed in place (a read-only array over the received
message, no copy) and each row is hashed once, here, against its stored checksum (the server skips its own check
for this client: ``GetRequest.client_verifies``). A single user goes through the unary ``GetUser`` (the online
path), which sends the version's record only when it changed.
Publishing sends the snapshot URL: the *server* reads the snapshot, so it must be a path or URL it can reach.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from dv365.store.api import DEFAULT_KEEP, EmbeddingStore, Progress, RawLookup, VersionInfo
from dv365.store.errors import StoreError, StoreUnavailableError
from dv365.store.grpc_common import (
    CHANNEL_OPTIONS,
    ERROR_KEY,
    SERVICE,
    decode_get_response,
    error_class,
    version_from_pb,
)
from dv365.store.proto import store_pb2 as pb
from dv365.store.proto import store_pb2_grpc as pb_grpc
from dv365.store.records import checksum, verify_payloads
from dv365.store.urls import reject_unknown


class GrpcStore(EmbeddingStore):
    """A remote store.

    Args:
        target: ``host:port``.
        tls: use TLS (``grpcs://``).
        ca: PEM file of the CA that signed the server certificate (default: the system roots).
        token: bearer token (reader or writer); default ``$DV365_STORE_TOKEN``.
        server_name: TLS name to check instead of the host (e.g. when connecting by IP).
        timeout: seconds per read call (publish has none).

    Example::

        store = GrpcStore("emb.internal:7365", tls=True, ca="/etc/dv365/ca.pem", token=token)
        store.get([1, 2, 3]).present
    """

    OPTIONS = {"keep", "ca", "token", "token_file", "server_name", "timeout"}

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        ca: str | None = None,
        token: str | None = None,
        server_name: str | None = None,
        timeout: float = 30.0,
        keep: int = DEFAULT_KEEP,
    ) -> None:
        super().__init__(f"{'grpcs' if tls else 'grpc'}://{target}", keep)
        options = list(CHANNEL_OPTIONS)
        if tls:
            root = None
            if ca:
                with open(ca, "rb") as f:
                    root = f.read()
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root), options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.stub = pb_grpc.EmbeddingStoreStub(self.channel)
        # Get without the generated deserializer: the big fields are read in place (grpc_common.decode_get_response)
        self._get_raw = self.channel.unary_unary(
            f"/{SERVICE}/Get", request_serializer=pb.GetRequest.SerializeToString, response_deserializer=None
        )
        self._get_user = self.channel.unary_unary(
            f"/{SERVICE}/GetUser",
            request_serializer=pb.GetUserRequest.SerializeToString,
            response_deserializer=pb.GetUserResponse.FromString,
        )
        self._user_rpc = True
        self._known: VersionInfo | None = None  # the VersionInfo of the last version GetUser answered from
        token = token if token is not None else os.environ.get("DV365_STORE_TOKEN")
        self._md = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = float(timeout)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> GrpcStore:
        reject_unknown(options, url, cls.OPTIONS)
        scheme, _, rest = url.partition("://")
        target = rest.rstrip("/")
        if not target or "/" in target:
            raise StoreError(f"{url}: expected {scheme}://host:port")
        token = options.get("token")
        if options.get("token_file"):
            with open(options["token_file"], encoding="utf-8") as f:
                token = f.read().strip()
        return cls(
            target,
            tls=scheme == "grpcs",
            ca=options.get("ca"),
            token=token,
            server_name=options.get("server_name"),
            timeout=float(options.get("timeout", 30.0)),
            keep=int(options.get("keep", DEFAULT_KEEP)),
        )

    def _call(self, what: str, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        try:
            return method(request, metadata=self._md, timeout=timeout)
        except grpc.RpcError as e:
            raise self._error(what, e) from None

    def _error(self, what: str, e: grpc.RpcError) -> StoreError:
        code = e.code()  # type: ignore[attr-defined]
        trailing = dict(e.trailing_metadata() or ())  # type: ignore[attr-defined]
        cls = error_class(trailing.get(ERROR_KEY), code)
        detail = e.details()  # type: ignore[attr-defined]
        if cls is StoreUnavailableError or ERROR_KEY not in trailing:
            detail = f"{self.url}: {what}: {code.name}: {detail}"
        return cls(detail)

    # ---- reads -------------------------------------------------------------------------------------
    def lookup(self, ids: np.ndarray) -> RawLookup:
        """One user: the unary GetUser (falls back to Get for good on a server without it). A batch: the unary
        Get, asking the server to leave the checksum check to this client (``client_verifies``), which views the
        answer's payload in place and checks every row of it once (:meth:`_answer`)."""
        if len(ids) == 1 and self._user_rpc:
            one = self._lookup_user(int(ids[0]))
            if one is not None:
                return one
        request = pb.GetRequest(user_ids=ids.tolist(), client_verifies=True)
        return self._answer(ids, self._call(f"get {len(ids)} users", self._get_raw, request, self.timeout))

    def _lookup_user(self, uid: int) -> RawLookup | None:
        """One user through the unary GetUser (None: the server lacks it, use Get from now on). The VersionInfo
        crosses the wire only when the version changed since the last answer."""
        known = self._known
        request = pb.GetUserRequest(user_id=uid, known_version=known.version if known else "")
        try:
            resp = self._get_user(request, metadata=self._md, timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                self._user_rpc = False
                return None
            raise self._error(f"get user {uid}", e) from None
        if resp.HasField("info"):
            known = self._known = version_from_pb(resp.info)
        if known is None or known.version != resp.version or known.published_at != resp.published_at:
            raise StoreError(
                f"{self.url}: malformed answer for user {uid}: version {resp.version!r} without its record"
            )
        n = known.row_format.user_bytes
        payload = np.zeros((1, n), dtype=np.uint8)
        present = np.zeros(1, dtype=bool)
        checksums = np.zeros(1, dtype=np.uint64)
        errors = {0: resp.error} if resp.error else {}
        if resp.present:
            if len(resp.payload) != n:
                raise StoreError(f"{self.url}: malformed answer for user {uid}: {len(resp.payload)} bytes, not {n}")
            if checksum(resp.payload, uid) != resp.checksum:
                errors[0] = (
                    f"{self.url} version {known.version!r}: user {uid}: payload fails its checksum after transfer"
                )
            else:
                payload[0] = np.frombuffer(resp.payload, dtype=np.uint8)
                present[0] = True
                checksums[0] = resp.checksum
        return RawLookup(payload, present, checksums, errors, known)

    def _answer(self, ids: np.ndarray, data: bytes) -> RawLookup:
        """The answer in one serialized GetResponse, without copying its payload: ``payload`` is a read-only
        ``[B, user_bytes]`` view of ``data`` (np.frombuffer), every present row checked against the checksum the
        server sent (the stored one: this check covers the store and the wire). A row that fails is reported in
        ``errors`` naming its user, not present, and zeroed in a copy of the payload (the only case that copies
        it). A message that does not hold ``len(ids)`` users of its version's format raises StoreError."""
        B = len(ids)
        try:
            pay, pres, sums, resp = decode_get_response(data)
            if not resp.HasField("version"):
                raise ValueError("no version")
            info = version_from_pb(resp.version)
        except (ValueError, IndexError, DecodeError) as e:
            raise StoreError(f"{self.url}: malformed answer for {B} users: {e}") from e
        n = info.row_format.user_bytes
        if pres.nbytes != B or pay.nbytes != B * n or sums.nbytes != 8 * B or not info.version:
            raise StoreError(
                f"{self.url}: malformed answer for {B} users from version {info.version!r}: {pres.nbytes} "
                f"presence flags, {pay.nbytes} payload bytes ({B} x {n} expected), {sums.nbytes // 8} checksums"
            )
        payload = np.frombuffer(pay, dtype=np.uint8).reshape(B, n)
        present = np.frombuffer(pres, dtype=np.uint8) != 0
        checksums = np.frombuffer(sums, dtype="<u8").astype(np.uint64)
        errors = {int(i): msg for i, msg in resp.errors.items()}
        bad = verify_payloads(payload, ids, checksums, present)
        if len(bad):
            payload = payload.copy()
            for i in bad.tolist():
                errors[i] = (
                    f"{self.url} version {info.version!r}: user {int(ids[i])}: payload fails its checksum "
                    "(corrupted in the store or in transfer): not returned"
                )
            present[bad] = False
            payload[bad] = 0
            checksums[bad] = 0
        return RawLookup(payload, present, checksums, errors, info)

    # ---- versions ----------------------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        resp = self._call("list versions", self.stub.Versions, pb.VersionsRequest(), self.timeout)
        return [version_from_pb(v) for v in resp.versions]

    def activate(self, version: str) -> VersionInfo:
        return version_from_pb(
            self._call(f"activate {version!r}", self.stub.Activate, pb.ActivateRequest(version=version), self.timeout)
        )

    def rollback(self) -> VersionInfo:
        return version_from_pb(self._call("rollback", self.stub.Rollback, pb.RollbackRequest(), self.timeout))

    def delete_version(self, version: str) -> None:
        self._call(f"delete {version!r}", self.stub.Delete, pb.DeleteRequest(version=version), self.timeout)

    def prune(self, keep: int | None = None) -> list[str]:
        """Prunes on the server (``keep=None``: the server's own retention)."""
        return list(self._call("prune", self.stub.Prune, pb.PruneRequest(keep=keep or 0), self.timeout).deleted)

    def publish(self, snapshot_url: str, *, activate: bool = True, progress: Progress | None = None) -> VersionInfo:
        """Asks the server to publish ``snapshot_url``: a directory under one of the server's ``--snapshot-root``
        directories (absolute, or relative to the roots); retention is the server's."""
        return version_from_pb(
            self._call(
                f"publish {snapshot_url}",
                self.stub.Publish,
                pb.PublishRequest(snapshot_url=snapshot_url, no_activate=not activate),
                None,
            )
        )

    def close(self) -> None:
        self.channel.close()
