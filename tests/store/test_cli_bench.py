"""`dv365 store …`, `dv365 serve --help` and a tiny `dv365 bench store` / `store-kv` run (smoke, 0 errors)."""

from __future__ import annotations

import json

import pytest

from dv365.core.cli import main


def test_store_commands(tmp_path, snapshots, capsys) -> None:  # type: ignore[no-untyped-def]
    url = f"lmdb://{tmp_path}/s"
    assert main(["store", "--store", url, "publish", snapshots("a", fill=1)]) == 0
    assert main(["store", "--store", url, "publish", snapshots("b", fill=2), "--no-activate"]) == 0
    assert "a (300 users)" in capsys.readouterr().out
    assert main(["store", "--store", url, "versions"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["version"], r["active"]) for r in rows] == [("a", True), ("b", False)]
    assert main(["store", "--store", url, "activate", "b"]) == 0
    assert main(["store", "--store", url, "rollback"]) == 0
    assert "a is active" in capsys.readouterr().out
    assert main(["store", "--store", url, "get", "1000", "7"]) == 0
    out = capsys.readouterr().out
    assert "1/2 present, version a" in out
    assert main(["store", "--store", url, "activate", "nope"]) == 1  # a clear error, not a traceback
    assert "no version 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "SIGTERM" in capsys.readouterr().out


def test_bench_store_smoke(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DV365_BENCH_SECONDS", "0.3")
    monkeypatch.setenv("DV365_BENCH_CLIENTS", "1,2")
    assert main(["bench", "store", "--quick", "--users", "3000", "--batch-users", "200", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["benchmark"] == "store" and res["users"] == 3000 and res["total_errors"] == 0
    kinds = {"embedded", "grpc", "grpc-2w", "grpc-raw", "redis", "redis-mget", "redis-cluster"}
    assert {k.rsplit("_c", 1)[0] for k in res["runs"]} == kinds
    for r in res["runs"].values():
        assert r["requests"] > 0 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert "embedded_p99_le_5ms" in res["targets"] and "grpc_p99_le_2x_embedded" in res["targets"]
    assert "grpc_over_raw_grpcio_p50" in res["targets"]


def test_bench_store_single_user_smoke(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """--batch-users 1: every backend and the raw references (redis-py GET on Redis and on a Redis Cluster, a bare
    grpcio unary call), 0 errors, and the single-user targets computed."""
    monkeypatch.setenv("DV365_BENCH_SECONDS", "0.3")
    monkeypatch.setenv("DV365_BENCH_CLIENTS", "1,2")
    assert main(["bench", "store", "--quick", "--users", "2000", "--batch-users", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["mode"] == "single-user" and res["total_errors"] == 0
    kinds = {"embedded", "grpc", "grpc-2w", "grpc-raw", "redis", "redis-get", "redis-cluster", "redis-cluster-get"}
    assert {k.rsplit("_c", 1)[0] for k in res["runs"]} == kinds
    for r in res["runs"].values():
        assert r["requests"] > 0 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"] > 0 and r["users_per_s"] > 0
    t = res["targets"]
    assert {"embedded_p99_le_0.2ms", "grpc_p99_le_1.5x_raw_grpcio_c2", "redis_ge_70pct_raw_get_c2"} <= set(t)
    assert t["redis-cluster_over_raw_get_throughput_c2"] > 0 and t["grpc_2_workers_over_1_users_per_s_c2"] > 0


def test_bench_kv_choice_smoke(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", "store-kv", "--quick", "--users", "2000", "--batch-users", "100", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["lmdb"]["p50_ms"] > 0 and res["sqlite"]["p50_ms"] > 0 and res["rows"]["p50_ms"] > 0
    assert res["rows_over_lmdb_p50"] > 0


def test_bench_store_kept_dir_and_trace(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """A kept work dir's snapshot is reused by the next run with the same parameters (and rewritten for other
    ones); DV365_BENCH_TRACE gets every timed latency of every client, in order."""
    monkeypatch.setenv("DV365_BENCH_SECONDS", "0.2")
    monkeypatch.setenv("DV365_BENCH_CLIENTS", "1")
    monkeypatch.setenv("DV365_BENCH_STORE_BACKENDS", "embedded")
    monkeypatch.setenv("DV365_BENCH_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("DV365_BENCH_TRACE", str(tmp_path / "trace"))
    args = ["bench", "store", "--quick", "--users", "500", "--batch-users", "50", "--json"]

    err: list[str] = []

    def run(*extra: str) -> dict:  # type: ignore[type-arg]
        assert main(args + list(extra)) == 0
        cap = capsys.readouterr()
        err.append(cap.err)
        return json.loads(cap.out.strip().splitlines()[-1])  # type: ignore[no-any-return]

    first = run()
    assert "snapshot_write_s" in first and "snapshot_reused" not in first
    assert "writing a SIMULATED snapshot of 500 users" in err[0] and "embedded, 1 client(s): p50" in err[0]
    second = run()
    assert "reusing the snapshot" in err[1]  # progress goes to stderr, stdout's last line is the JSON
    assert second["snapshot_reused"] == str(tmp_path / "work" / "snapshot") and "snapshot_write_s" not in second
    assert second["total_errors"] == 0 and second["runs"]["embedded_c1"]["requests"] > 0
    third = run("--seed", "1")
    assert "snapshot_write_s" in third  # other parameters: written again
    trace = json.loads((tmp_path / "trace" / "embedded_c1_client0.json").read_text())
    assert trace["kind"] == "embedded" and trace["seed"] == 1000  # seed * 1000 + client
    assert len(trace["lat_ms"]) == third["runs"]["embedded_c1"]["requests"] and min(trace["lat_ms"]) > 0
    assert "load_1m" in second["runs"]["embedded_c1"] and "steal_pct" in second["runs"]["embedded_c1"]
