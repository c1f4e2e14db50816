"""The single-user online path (gRPC GetUser, one MGET on Redis) and the counters: the embedded client's
``store.metrics`` and a real scrape of ``dv365 serve``'s Prometheus ``/metrics``."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dv365.store import open_store
from dv365.store.metrics import LATENCY_BUCKETS
from dv365.store.server import ServeConfig, start_server

from .conftest import READER_TOKEN, WRITER_TOKEN, flip_lmdb

TOKENS = {"reader_tokens": frozenset({READER_TOKEN}), "writer_tokens": frozenset({WRITER_TOKEN})}


def _scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {sample line without its value: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_grpc_single_user_path_and_metrics_scrape(tmp_path: Path, snapshots) -> None:  # type: ignore[no-untyped-def]
    srv = start_server(
        ServeConfig(backend=f"lmdb://{tmp_path}/s", port=0, metrics_port=0, snapshot_roots=(snapshots.root,), **TOKENS)
    )
    try:
        writer = open_store(f"grpc://127.0.0.1:{srv.port}", token=WRITER_TOKEN)
        writer.publish(snapshots("u1", fill=1))
        reader = open_store(f"grpc://127.0.0.1:{srv.port}", token=READER_TOKEN)
        one = reader.get([1003])
        assert one.snapshot_id == "u1" and one.present.tolist() == [True] and (one.payload[..., :128] == 1).all()
        assert reader.get([7]).present.tolist() == [False]  # unknown user
        flip_lmdb(srv.store, "u1", 1005)
        bad = reader.get([1005])
        assert not bad.present[0] and "checksum" in bad.errors[0] and not bad.payload.any()
        batch = reader.get([1000, 1001, 9])
        assert batch.present.tolist() == [True, True, False]
        writer.publish(snapshots("u2", fill=2))  # the version record travels again once it changes
        two = reader.get([1003])
        assert two.snapshot_id == "u2" and (two.payload[..., :128] == 2).all() and two.row_format == one.row_format
        m = srv.servicer.metrics.snapshot()["methods"]
        assert m["GetUser"]["requests"] == 4 and m["Get"]["requests"] == 1  # single users never took the batch path
        assert (m["GetUser"]["users"], m["GetUser"]["missing"], m["GetUser"]["checksum_failures"]) == (4, 1, 1)
        assert m["Get"]["users"] == 3 and m["Get"]["missing"] == 1
        with pytest.raises(Exception, match="needs a writer token"):
            reader.activate("u1")
        scraped = _scrape(srv.metrics_port)
        assert scraped['dv365_store_requests_total{method="GetUser"}'] == 4
        assert scraped['dv365_store_users_missing_total{method="GetUser"}'] == 1
        assert scraped['dv365_store_checksum_failures_total{method="GetUser"}'] == 1
        assert scraped['dv365_store_users_requested_total{method="Get"}'] == 3
        assert scraped['dv365_store_request_seconds_count{method="GetUser"}'] == 4
        assert scraped['dv365_store_request_seconds_bucket{le="+Inf",method="GetUser"}'] == 4
        assert scraped['dv365_store_requests_total{method="Publish"}'] == 2
        assert scraped['dv365_store_active_version_info{version="u2"}'] == 1
        assert 3500 < scraped["dv365_store_active_data_age_seconds"] < 3700  # synthetic cut-off: 1 h ago
        assert "dv365_store_active_published_timestamp_seconds" in scraped
        for s in (writer, reader):
            s.close()
    finally:
        srv.stop(0)


def test_embedded_client_counts_the_same(tmp_path: Path, snapshots) -> None:  # type: ignore[no-untyped-def]
    store = open_store(f"lmdb://{tmp_path}/e")
    store.publish(snapshots("e1", fill=1))
    store.get([1000])
    store.get(np.array([1001, 1002, 5, 6]))
    snap = store.metrics.snapshot()
    get = snap["methods"]["get"]
    assert (get["requests"], get["users"], get["missing"], get["checksum_failures"], get["errors"]) == (2, 5, 2, 0, 0)
    assert sum(get["buckets"]) == 2 and len(get["buckets"]) == len(LATENCY_BUCKETS) + 1 and get["seconds"] > 0
    assert snap["active"]["version"] == "e1" and 3500 < snap["active"]["data_age_s"] < 3700
    with pytest.raises(Exception, match="1-D"):
        store.get(np.zeros((2, 2), dtype=np.int64))  # refused before any read: not a backend error
    store.close()


def test_metrics_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Exception, match=f"cannot serve /metrics on 127.0.0.1:{port}"):
            start_server(ServeConfig(backend=f"lmdb://{tmp_path}/m", port=0, metrics_port=port, **TOKENS))
