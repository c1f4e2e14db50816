"""A store path that holds no store (a mistyped ``lmdb://`` path): readers and ``dv365 serve`` refuse it and
create nothing; only a publish creates a store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dv365.store import NoActiveVersionError, StoreError, open_store


def _dv365(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dv365.core.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _refused(proc: subprocess.CompletedProcess[str], path: Path) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"no dv365 store at {path}; create one with `dv365 store publish`" in proc.stderr, proc.stderr
    assert not path.exists(), f"{path} was created"


@pytest.mark.parametrize("cmd", [["versions"], ["get", "1000", "1001"]])
def test_store_readers_refuse_a_path_without_a_store(tmp_path: Path, store_url: str, cmd: list[str]) -> None:
    typo = tmp_path / "stroe"
    _refused(_dv365("store", "--store", f"lmdb://{typo}", *cmd), typo)
    ok = _dv365("store", "--store", store_url, *cmd)  # the real store still reads
    assert ok.returncode == 0 and "v1" in ok.stdout + ok.stderr, (ok.stdout, ok.stderr)


def test_serve_refuses_a_path_without_a_store(tmp_path: Path) -> None:
    typo = tmp_path / "stroe"
    proc = _dv365("serve", "--backend", f"lmdb://{typo}", "--port", "0", "--allow-anonymous")
    _refused(proc, typo)
    assert "listening" not in proc.stdout


def test_serve_failing_its_token_check_leaves_nothing_behind(tmp_path: Path) -> None:
    typo = tmp_path / "stroe"
    proc = _dv365(
        "serve",
        "--backend",
        f"lmdb://{typo}",
        "--port",
        "0",
        env={"DV365_STORE_READER_TOKENS": "", "DV365_STORE_WRITER_TOKENS": ""},
    )
    assert proc.returncode == 1 and "no tokens configured" in proc.stderr, proc.stderr
    assert not typo.exists()


def test_library_readers_create_nothing_and_publish_creates(tmp_path: Path, snapshot: str) -> None:
    typo = tmp_path / "stroe"
    with pytest.raises(StoreError, match=f"no dv365 store at {typo}; create one with"):
        open_store(f"lmdb://{typo}?mode=ro")
    with pytest.raises(StoreError, match=f"no dv365 store at {typo}"):
        open_store(f"lmdb://{typo}?create=0")
    writer = open_store(f"lmdb://{typo}")  # a writer client: still nothing on disk until it publishes
    assert writer.versions() == [] and writer.active() is None
    with pytest.raises(NoActiveVersionError, match=f"no dv365 store at {typo}"):
        writer.get([1000])
    with pytest.raises(NoActiveVersionError, match="no dv365 store at"):
        writer.activate("v1")
    assert not typo.exists()
    writer.publish(snapshot)
    assert writer.get([1000]).present.all()
    writer.close()
    with open_store(f"lmdb://{typo}?mode=ro") as reader:
        assert reader.active().version == "v1"  # type: ignore[union-attr]
