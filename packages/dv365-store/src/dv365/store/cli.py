"""``dv365 serve`` and ``dv365 store …`` (publish, versions, activate, rollback, prune, get).

Registered through the ``dv365.commands`` entry-point group; heavy modules are imported by the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

STORE_HELP = (
    "store URL: lmdb:///path (embedded), redis://[user:pass@]host:port/db, "
    "redis+cluster://[user:pass@]host:port[,host:port...], grpc[s]://host:port; "
    "default $DV365_STORE_URL"
)


def _tokens(env: str, path: str | None, flag: str) -> frozenset[str]:
    """Tokens from ``$env`` (comma-separated) and the file ``path`` given with ``flag`` (one per line)."""
    from dv365.store.errors import StoreError

    toks = {t.strip() for t in os.environ.get(env, "").split(",") if t.strip()}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                toks |= {line.strip() for line in f if line.strip() and not line.startswith("#")}
        except FileNotFoundError:
            raise StoreError(f"dv365 serve: {flag} {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise StoreError(f"dv365 serve: {flag} {path}: cannot read the token file: {e}") from None
    return frozenset(toks)


def _port(text: str) -> int:
    """argparse type of ``--port``: an integer 0..65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port: use 0..65535 (0 = any free port)")
    return port


def register_serve(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="serve a store over gRPC (TLS, reader/writer tokens, health)",
        description=(
            "Serve an embedding store over gRPC: batched Get, Versions, and writer-only Publish/Activate/"
            "Rollback/Delete/Prune. Tokens: files with one token per line, or comma-separated in "
            "DV365_STORE_READER_TOKENS / DV365_STORE_WRITER_TOKENS. SIGTERM: health NOT_SERVING, in-flight "
            "calls get --grace seconds, exit 0. See docs/store.md."
        ),
    )
    p.add_argument(
        "--backend",
        default=os.environ.get("DV365_STORE_URL"),
        required="DV365_STORE_URL" not in os.environ,
        help=STORE_HELP,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=7365, help="port (0 = any free port; the bound one is printed)")
    p.add_argument("--tls-cert", help="server certificate chain (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--reader-token-file", help="file of reader tokens (one per line)")
    p.add_argument("--writer-token-file", help="file of writer tokens (one per line; writers can read too)")
    p.add_argument(
        "--allow-anonymous", action="store_true", help="no tokens needed (everyone is a writer): development only"
    )
    p.add_argument("--reflection", action="store_true", help="enable gRPC server reflection (needs a reader token)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT, one grpcio server each; default 1)",
    )
    p.add_argument("--threads", type=int, default=16, help="request threads per process (default 16)")
    p.add_argument(
        "--snapshot-root",
        action="append",
        default=[],
        metavar="DIR",
        help="directory a remote Publish may read snapshots from (repeatable); none: remote publish is refused",
    )
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on SIGTERM (default 10)")
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="serve Prometheus /metrics on --host at this port (0 = any free port; needs prometheus-client)",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from dv365.store.server import ServeConfig, serve_forever

    cfg = ServeConfig(
        backend=args.backend,
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        reader_tokens=_tokens("DV365_STORE_READER_TOKENS", args.reader_token_file, "--reader-token-file"),
        writer_tokens=_tokens("DV365_STORE_WRITER_TOKENS", args.writer_token_file, "--writer-token-file"),
        allow_anonymous=args.allow_anonymous,
        reflection=args.reflection,
        workers=args.workers,
        threads=args.threads,
        grace_s=args.grace,
        snapshot_roots=tuple(args.snapshot_root),
        metrics_port=args.metrics_port,
    )
    return serve_forever(cfg)


def _version_row(v: Any) -> dict[str, Any]:
    return {
        "version": v.version,
        "active": v.active,
        "state": v.state,
        "users": v.user_count,
        "model_version": v.model_version,
        "data_cutoff_ts": v.data_cutoff_ts,
        "published_at": round(v.published_at, 3),
        "simulated": v.simulated,
        "source": v.source,
    }


def register_store(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "store",
        help="publish snapshots into a store and manage its versions",
        description="Manage an embedding store: publish a snapshot, list/activate/roll back/prune "
        "versions, look users up. The store is chosen by URL (--store or $DV365_STORE_URL).",
    )
    p.add_argument("--store", default=os.environ.get("DV365_STORE_URL"), help=STORE_HELP)
    p.add_argument("--token", default=None, help="gRPC bearer token (default $DV365_STORE_TOKEN)")
    ss = p.add_subparsers(dest="store_command", metavar="<action>")
    pub = ss.add_parser("publish", help="load a snapshot folder, activate it, prune to --keep")
    pub.add_argument(
        "snapshot",
        help="snapshot folder/URL written by dv365 export (manifest.json inside); for a grpc:// store, a folder "
        "under one of the server's --snapshot-root directories (absolute, or relative to them)",
    )
    pub.add_argument("--no-activate", action="store_true", help="load it but keep the current active version")
    pub.add_argument("--keep", type=int, default=None, help="versions to retain (default 3, or the URL's ?keep=)")
    pub.set_defaults(func=_publish)
    ss.add_parser("versions", help="list versions (JSON lines)").set_defaults(func=_versions)
    act = ss.add_parser("activate", help="make a version active (atomic switch)")
    act.add_argument("version")
    act.set_defaults(func=_activate)
    ss.add_parser("rollback", help="activate the version published before the active one").set_defaults(func=_rollback)
    pr = ss.add_parser("prune", help="delete versions beyond --keep (never the active one)")
    pr.add_argument("--keep", type=int, default=None)
    pr.set_defaults(func=_prune)
    g = ss.add_parser("get", help="look users up (prints presence, version, age, errors)")
    g.add_argument("user_ids", nargs="+", type=int)
    g.set_defaults(func=_get)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _open(args: argparse.Namespace, **kw: Any) -> Any:
    from dv365.store.errors import StoreError
    from dv365.store.factory import open_store, scheme_of

    if not args.store:
        raise StoreError("no store: give --store URL or set DV365_STORE_URL")
    if args.token and scheme_of(args.store) in ("grpc", "grpcs"):
        kw["token"] = args.token
    return open_store(args.store, **kw)


def _open_reader(args: argparse.Namespace) -> Any:
    """A store opened for reading: an embedded one read-only, so a path that holds no store is refused
    ("no dv365 store at PATH") instead of being created."""
    from dv365.store.factory import scheme_of

    return _open(args, mode="ro") if args.store and scheme_of(args.store) == "lmdb" else _open(args)


def _publish(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dv365.core.snapshot import read_manifest
    from dv365.store.factory import scheme_of

    kw = {"keep": args.keep} if args.keep is not None else {}
    with _open(args, **kw) as store:
        remote = scheme_of(args.store) in ("grpc", "grpcs")  # the server reads the snapshot (under its roots)
        total = (
            read_manifest(args.snapshot).user_count
            if not remote and ("://" not in args.snapshot or args.snapshot.startswith("file"))
            else None
        )
        with tqdm(total=total, unit="user", desc="publish", disable=not sys.stderr.isatty()) as bar:
            info = store.publish(args.snapshot, activate=not args.no_activate, progress=bar.update)
        names = [v.version for v in store.versions()]
    print(
        f"dv365 store publish: {info.version} ({info.user_count} users) into {store.url}; "
        f"active={info.active}; versions now {names}"
    )
    return 0


def _versions(args: argparse.Namespace) -> int:
    with _open_reader(args) as store:
        vs = store.versions()
    for v in vs:
        print(json.dumps(_version_row(v)))
    print(f"dv365 store versions: {len(vs)} in {store.url}", file=sys.stderr)
    return 0


def _activate(args: argparse.Namespace) -> int:
    with _open(args) as store:
        v = store.activate(args.version)
    print(f"dv365 store activate: {v.version} is active in {store.url}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    with _open(args) as store:
        v = store.rollback()
    print(f"dv365 store rollback: {v.version} is active in {store.url}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    with _open(args) as store:
        gone = store.prune(args.keep)
    print(f"dv365 store prune: deleted {gone or 'nothing'} from {store.url}")
    return 0


def _get(args: argparse.Namespace) -> int:
    with _open_reader(args) as store:
        r = store.get(args.user_ids)
    for i, uid in enumerate(args.user_ids):
        print(json.dumps({"user_id": uid, "present": bool(r.present[i]), "error": r.errors.get(i)}))
    print(
        f"dv365 store get: {int(r.present.sum())}/{len(args.user_ids)} present, version {r.snapshot_id}, "
        f"age {r.age_s / 3600:.1f} h"
    )
    return 0 if not r.errors else 1
