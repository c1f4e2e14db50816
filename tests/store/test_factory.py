"""open_store: backends chosen by URL, imported only when selected; options and errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dv365.store import StoreError, open_store
from dv365.store.backends.lmdb_store import LmdbStore
from dv365.store.factory import scheme_of, split_url


def test_urls_pick_backends(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert scheme_of("/srv/x") == scheme_of("rel/x") == scheme_of("lmdb:///srv/x") == "lmdb"
    assert scheme_of("redis://h:1/0") == "redis" and scheme_of("grpcs://h:1") == "grpcs"
    assert split_url("lmdb:///a/b?keep=4&mode=ro") == ("lmdb:///a/b", {"keep": "4", "mode": "ro"})
    s = open_store(f"lmdb://{tmp_path}/s?keep=4")
    assert isinstance(s, LmdbStore) and s.keep == 4 and s.path == f"{tmp_path}/s"
    s.close()
    s = open_store(str(tmp_path / "bare"), keep=5)  # a bare path is the embedded store; kwargs override the query
    assert isinstance(s, LmdbStore) and s.keep == 5
    s.close()


def test_bad_urls_and_options_are_clear(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StoreError, match="unknown store scheme 'mongodb'"):
        open_store("mongodb://x")
    with pytest.raises(StoreError, match=r"unknown option\(s\) \['colour'\]"):
        open_store(f"lmdb://{tmp_path}/s?colour=red")
    with pytest.raises(StoreError, match="keep=0"):
        open_store(f"lmdb://{tmp_path}/s", keep=0)
    with pytest.raises(StoreError, match="no dv365 store here"):
        open_store(f"lmdb://{tmp_path}/missing?mode=ro")
    with pytest.raises(StoreError, match="expected grpc://host:port"):
        open_store("grpc://")


def test_backends_are_imported_only_when_selected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = ("import sys; from dv365.store import open_store; s = open_store(sys.argv[1]); s.close(); "
            "print(sorted(m for m in ('redis', 'grpc', 'lmdb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, f"lmdb://{tmp_path}/s"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['lmdb']"
