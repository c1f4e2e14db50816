"""File-system access for every dv365 package: one way to resolve a URL, one atomic writer.

:func:`url_to_fs` turns a local path or fsspec URL (``memory://``, ``s3://``...) into a file system and a
path without a trailing slash. :func:`open_atomic` writes ``<path><tmp_suffix>`` and renames it onto
``path`` only once the write completed, so a reader never sees a truncated file: a killed or failed
write leaves at most the temporary file (the writers' clean-up steps recognise ``*.tmp``) and ``path``
untouched. On the local file system the data is fsynced before the rename and the folder after it, so
a file that is visible survives a power loss too; remote file systems only get the rename (object stores
make an upload visible when it completes).

Example::

    fs, root = url_to_fs("memory://snap")
    write_json_atomic(fs, f"{root}/manifest.json", {"format": "dv365.snapshot"})
    with open_atomic(fs, f"{root}/part-0.parquet") as f:
        pq.write_table(table, f)
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_SUFFIX = ".tmp"


def url_to_fs(url: str | os.PathLike[str]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system of a local path or fsspec URL, and the path in it (no trailing ``/``; the root stays ``/``)."""
    fs, path = fsspec.core.url_to_fs(os.fspath(url))
    return fs, path.rstrip("/") or "/"


@contextmanager
def open_atomic(
    fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb", *, tmp_suffix: str = TMP_SUFFIX
) -> Iterator[IO[Any]]:
    """A file opened for writing (``"wb"`` or ``"w"``) that appears at ``path`` only when the block ends without error.

    Args:
        fs: the file system (see :func:`url_to_fs`).
        path: the final path; its folder must exist.
        mode: ``"wb"`` (bytes) or ``"w"`` (UTF-8 text).
        tmp_suffix: the temporary file is ``path + tmp_suffix``; writers that may race on one path (several
            processes merging one manifest) pass a per-process suffix such as ``f".tmp-{os.getpid()}"``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"open_atomic: mode must be 'wb' or 'w', got {mode!r}")
    tmp = path + tmp_suffix
    encoding = "utf-8" if mode == "w" else None
    if isinstance(fs, LocalFileSystem):
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(posixpath.dirname(path) or ".")
    else:
        with fs.open(tmp, mode, **({"encoding": encoding} if encoding else {})) as f:
            yield f
        fs.mv(tmp, path)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, tmp_suffix: str = TMP_SUFFIX) -> None:
    """Writes ``data`` to ``path`` atomically (see :func:`open_atomic`)."""
    with open_atomic(fs, path, "wb", tmp_suffix=tmp_suffix) as f:
        f.write(data)


def write_json_atomic(
    fs: fsspec.AbstractFileSystem,
    path: str,
    obj: Any,
    *,
    tmp_suffix: str = TMP_SUFFIX,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """Writes ``json.dumps(obj, indent=2, sort_keys=True, default=default)`` to ``path`` atomically (UTF-8)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=default)
    write_bytes_atomic(fs, path, text.encode(), tmp_suffix=tmp_suffix)


def _fsync_dir(path: str) -> None:
    """Makes a rename in folder ``path`` durable, where the platform can open a folder (not on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
