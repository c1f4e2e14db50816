"""``dv365 serve`` start-up checks, through the real command in a subprocess: a port another server listens
on, a port out of range, a token file that is not there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..store.conftest import free_port


def _dv365(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dv365.core.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **kw,  # type: ignore[arg-type]
    )


def test_a_second_serve_on_a_port_in_use_exits_1(store_url: str) -> None:
    port = str(free_port())
    first = _dv365("serve", "--backend", store_url, "--port", port, "--allow-anonymous")
    try:
        line = first.stdout.readline()  # type: ignore[union-attr]
        assert f"listening on 127.0.0.1:{port} " in line, line + first.stderr.read()  # type: ignore[union-attr]
        second = _dv365("serve", "--backend", store_url, "--port", port, "--allow-anonymous")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 1, (out, err)
        assert "listening" not in out
        assert f"port {port} is in use" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err  # one line, no grpc core log
        assert first.poll() is None  # the first one still serves
    finally:
        first.terminate()
        first.wait(30)


@pytest.mark.parametrize("port", ["99999", "-1", "65536", "x"])
def test_serve_port_out_of_range_is_a_usage_error(store_url: str, port: str) -> None:
    proc = _dv365("serve", "--backend", store_url, "--port", port, "--allow-anonymous")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    assert "argument --port" in err and "listening" not in out, err


@pytest.mark.parametrize("flag", ["--reader-token-file", "--writer-token-file"])
def test_missing_token_file_names_the_file_and_the_flag(store_url: str, tmp_path: Path, flag: str) -> None:
    missing = tmp_path / "no-such-tokens"
    proc = _dv365("serve", "--backend", store_url, "--port", "0", flag, str(missing))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert "Traceback" not in err, err
    assert f"{flag} {missing}: no such file" in err, err


@pytest.mark.parametrize("flag", ["--tls-cert", "--tls-key"])
def test_missing_tls_file_names_the_file_and_the_flag(store_url: str, tmp_path: Path, flag: str) -> None:
    other = tmp_path / "exists.pem"
    other.write_text("x")
    missing = tmp_path / "no-such.pem"
    files = {"--tls-cert": str(other), "--tls-key": str(other), flag: str(missing)}
    args = [a for kv in files.items() for a in kv]
    proc = _dv365("serve", "--backend", store_url, "--port", "0", "--allow-anonymous", *args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert f"{flag} {missing}: no such file" in err, err


def test_workers_share_one_port_and_a_different_serve_is_still_refused(store_url: str) -> None:
    """``--workers 2``: two processes, one grpcio server each, on one port (SO_REUSEPORT); connections are spread
    over both (each worker's /metrics counts its own calls); another serve on that port exits 1; SIGTERM stops
    every worker and exits 0."""
    import signal
    import urllib.request

    from dv365.store import open_store

    port, mport = free_port(), free_port()
    while mport + 1 == port:
        mport = free_port()
    group = _dv365(
        "serve", "--backend", store_url, "--port", str(port), "--allow-anonymous", "--workers", "2",
        "--threads", "4", "--metrics-port", str(mport), "--grace", "2",
    )  # fmt: skip
    try:
        line = group.stdout.readline()  # type: ignore[union-attr]
        assert f"listening on 127.0.0.1:{port} " in line and "2 worker processes" in line, line
        pids = [int(p) for p in line.split("pids ")[1].split(",")[:2] if p.strip().isdigit()]
        assert len(pids) == 2 and group.pid not in pids, line
        for k in range(24):  # each client its own connection: the kernel spreads them over the workers
            with open_store(f"grpc://127.0.0.1:{port}") as s:
                assert s.get([1000 + k]).present.all()
        served = []
        for i in range(2):
            text = urllib.request.urlopen(f"http://127.0.0.1:{mport + i}/metrics", timeout=5).read().decode()
            served.append(
                sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith("dv365_store_requests_total"))
            )
        assert sum(served) == 24 and min(served) > 0, served
        second = _dv365("serve", "--backend", store_url, "--port", str(port), "--allow-anonymous", "--workers", "2")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 1 and f"port {port} is in use" in err and "Traceback" not in err, (out, err)
        assert group.poll() is None
        group.send_signal(signal.SIGTERM)
        out, err = group.communicate(timeout=60)
        assert group.returncode == 0 and "stopped on SIGTERM" in out and "exit codes [0, 0]" in out, (out, err)
        for pid in pids:  # no worker is left behind
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if group.poll() is None:
            group.kill()
            group.wait(30)
