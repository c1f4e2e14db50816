"""dv365.core.fsio: URL resolution and the atomic writer, on the local file system and on memory://."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from dv365.core.fsio import open_atomic, url_to_fs, write_bytes_atomic, write_json_atomic


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path) if request.param == "local" else f"memory://fsio-{uuid.uuid4().hex[:8]}"


def test_url_to_fs_drops_the_trailing_slash_but_keeps_the_root(tmp_path: Path) -> None:
    assert url_to_fs(str(tmp_path) + "/")[1] == url_to_fs(tmp_path)[1] == str(tmp_path)
    assert url_to_fs("/")[1] == "/"
    assert url_to_fs("memory://a/b/")[1].endswith("/a/b")


def test_atomic_writes_replace_the_file_and_leave_no_temporary(root: str) -> None:
    fs, path = url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    target = f"{path}/manifest.json"
    write_json_atomic(fs, target, {"b": 1, "a": [1, 2]})
    write_json_atomic(fs, target, {"b": 2, "a": "x"})
    assert fs.cat_file(target).decode() == json.dumps({"a": "x", "b": 2}, indent=2, sort_keys=True)
    write_bytes_atomic(fs, f"{path}/blob", b"\x00\x01", tmp_suffix=".tmp-7")
    with open_atomic(fs, f"{path}/text.txt", "w") as f:
        f.write("héllo")
    assert fs.cat_file(f"{path}/blob") == b"\x00\x01"
    assert fs.cat_file(f"{path}/text.txt").decode("utf-8") == "héllo"
    assert sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) == [
        "blob",
        "manifest.json",
        "text.txt",
    ]


def test_a_failed_write_leaves_the_old_file_and_only_the_temporary(root: str) -> None:
    fs, path = url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    target = f"{path}/part.parquet"
    write_bytes_atomic(fs, target, b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with open_atomic(fs, target) as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert fs.cat_file(target) == b"old"
    assert fs.exists(target + ".tmp")


def test_open_atomic_refuses_read_and_append_modes(tmp_path: Path) -> None:
    fs, path = url_to_fs(tmp_path)
    with pytest.raises(ValueError, match="mode must be"):
        with open_atomic(fs, f"{path}/x", "ab"):
            pass
