"""open_store: backends chosen by URL, imported only when selected; options and errors; LMDB prefault."""

from __future__ import annotations

import os
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
    with pytest.raises(StoreError, match="no dv365 store at"):
        open_store(f"lmdb://{tmp_path}/missing?mode=ro")
    with pytest.raises(StoreError, match="expected grpc://host:port"):
        open_store("grpc://")


def test_backends_are_imported_only_when_selected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import sys; from dv365.store import open_store; s = open_store(sys.argv[1]); s.close(); "
        "print(sorted(m for m in ('redis', 'grpc', 'lmdb') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, f"lmdb://{tmp_path}/s"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "['lmdb']"


def _mapped_kb(path: str) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = len(head) == 6 and head[5] == path
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_lmdb_prefault_maps_the_whole_file(tmp_path, snapshots) -> None:  # type: ignore[no-untyped-def]
    url = f"lmdb://{tmp_path}/s"
    with open_store(url) as w:
        w.publish(snapshots("v1", seed=1))
    with pytest.raises(StoreError, match="prefault='maybe'"):
        open_store(url + "?prefault=maybe")
    rows = os.path.realpath(f"{tmp_path}/s/rows/0000000001.rows")  # the version's row file (default layout)
    with open_store(url + "?mode=ro") as s:
        assert s.get([1000]).present.all()
        cold = _mapped_kb(rows)
        if not s.prefault():  # type: ignore[attr-defined]
            pytest.skip("MADV_POPULATE_READ needs Linux >= 5.14")
        assert _mapped_kb(rows) >= os.path.getsize(rows) // 1024 > 4 * cold
    with open_store(url + "?mode=ro&prefault=1") as s:
        assert s.get([1000, 5]).present.tolist() == [True, False]
