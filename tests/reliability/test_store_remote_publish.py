"""``Publish`` over gRPC reads a snapshot on the server: only from the ``--snapshot-root`` directories, and its
errors do not tell the client the server's paths. Against a real ``dv365 serve`` on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from dv365.store import PublishError, StoreError, open_store
from dv365.store.synthetic import write_synthetic_snapshot

TOKEN = "writer-token-0123456789"


@pytest.fixture
def serve(store_url: str) -> Iterator[Callable[..., str]]:
    """``serve(*flags)`` starts ``dv365 serve`` over ``store_url`` and returns a grpc:// URL."""
    procs: list[subprocess.Popen[str]] = []

    def start(*flags: str) -> str:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dv365.core.cli", "serve", "--backend", store_url, "--port", "0", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "DV365_STORE_WRITER_TOKENS": TOKEN},
        )
        procs.append(proc)
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "listening on 127.0.0.1:" in line, line + proc.stderr.read()  # type: ignore[union-attr]
        return f"grpc://127.0.0.1:{line.split('listening on 127.0.0.1:')[1].split(' ')[0]}"

    yield start
    for p in procs:
        p.terminate()
        p.wait(30)


def _snap(path: Path, sid: str) -> str:
    write_synthetic_snapshot(str(path), sid, np.arange(1000, 1020, dtype=np.int64), seed=2)
    return str(path)


def _active(url: str) -> str:
    with open_store(url, token=TOKEN) as c:
        return c.active().version  # type: ignore[union-attr]


def test_no_snapshot_root_refuses_remote_publish(serve: Callable[..., str], tmp_path: Path, store_url: str) -> None:
    url = serve()
    snap = _snap(tmp_path / "elsewhere" / "v2", "v2")
    with open_store(url, token=TOKEN) as c, pytest.raises(PublishError, match="no snapshot root is configured") as e:
        c.publish(snap)
    assert str(tmp_path) not in str(e.value).replace(snap, "")  # only what the client sent is named
    assert _active(url) == "v1"


def test_publish_is_confined_to_the_snapshot_roots(serve: Callable[..., str], tmp_path: Path) -> None:
    root = tmp_path / "roots" / "a"
    _snap(root / "v2", "v2")
    inside2 = _snap(tmp_path / "roots" / "v4", "v4")
    outside = _snap(tmp_path / "elsewhere" / "v3", "v3")
    os.symlink(outside, root / "link")  # a symlink out of the root
    url = serve("--snapshot-root", str(root), "--snapshot-root", str(tmp_path / "roots"))
    with open_store(url, token=TOKEN) as c:
        for bad in (
            outside,
            f"{root}/../../elsewhere/v3",
            "../../elsewhere/v3",
            str(root / "link"),
            "link",
            "s3://x/y",
        ):
            with pytest.raises(PublishError, match="not under a snapshot root|give a directory under") as e:
                c.publish(bad)
            assert str(tmp_path) not in str(e.value).replace(bad, ""), e.value
        assert [v.version for v in c.versions()] == ["v1"]  # nothing published, v1 still active
        assert c.publish("v2").version == "v2"  # relative to the roots (found under the first)
        assert c.publish(f"file://{inside2}").version == "v4"  # absolute, under the second root
        assert c.get([1000]).snapshot_id == "v4"


def test_publish_errors_do_not_name_server_paths(serve: Callable[..., str], tmp_path: Path, store_url: str) -> None:
    root = tmp_path / "roots"
    broken = root / "half-written"
    broken.mkdir(parents=True)  # no manifest.json
    url = serve("--snapshot-root", str(root))
    with open_store(url, token=TOKEN) as c:
        with pytest.raises(StoreError) as e:
            c.publish("half-written")
    msg = str(e.value)
    assert str(tmp_path) not in msg and store_url not in msg, msg
    assert "<snapshot-root>/half-written" in msg, msg
    assert _active(url) == "v1"


def test_a_snapshot_root_that_is_not_a_directory_is_refused(store_url: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dv365.core.cli", "serve", "--backend", store_url, "--port", "0"]
        + ["--allow-anonymous", "--snapshot-root", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and f"--snapshot-root {tmp_path / 'nope'}: not a directory" in proc.stderr


def test_cli_publish_of_a_path_relative_to_the_servers_root(serve: Callable[..., str], tmp_path: Path) -> None:
    root = tmp_path / "roots"
    _snap(root / "v5", "v5")
    url = serve("--snapshot-root", str(root))
    cli = [sys.executable, "-m", "dv365.core.cli", "store", "--store", url, "--token", TOKEN, "publish"]
    ok = subprocess.run([*cli, "v5"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ok.returncode == 0 and "v5 (20 users)" in ok.stdout, (ok.stdout, ok.stderr)
    bad = subprocess.run([*cli, "../store"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 1 and "not under a snapshot root" in bad.stderr and "Traceback" not in bad.stderr
    assert _active(url) == "v5"
