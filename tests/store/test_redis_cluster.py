"""Redis Cluster backend specifics (the shared contract runs in test_contract.py): keys spread over every
master, a batch read is one round per node without CROSSSLOT, deleted versions leave no key behind."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from dv365.store import StoreError, open_store
from dv365.store.backends.redis_cluster_store import RedisClusterStore

from .conftest import REDIS_PASS, USERS, RedisCluster


def _node_keys(cluster: RedisCluster, pattern: str) -> dict[int, int]:
    out = {}
    for port in cluster.ports:
        r = redis.Redis(port=port, username="writer", password=REDIS_PASS["writer"])
        out[port] = sum(1 for _ in r.scan_iter(match=pattern, count=1000))
        r.close()
    return out


def test_records_spread_over_every_master_and_old_versions_leave_nothing(redis_cluster, snapshots) -> None:  # type: ignore[no-untyped-def]
    url = redis_cluster.url("writer", "spread") + "&keep=1&buckets=16"
    store = open_store(url)
    assert isinstance(store, RedisClusterStore)
    store.publish(snapshots("s1", fill=1))
    per_node = _node_keys(redis_cluster, "{spread:*}:v:s1:*")
    assert sum(per_node.values()) == len(USERS) and all(n > 0 for n in per_node.values()), per_node
    store.publish(snapshots("s2", fill=2))  # keep=1: s1 goes, records and markers on every node
    assert [v.version for v in store.versions()] == ["s2"]
    assert sum(_node_keys(redis_cluster, "{spread:*}:v:s1:*").values()) == 0
    assert sum(_node_keys(redis_cluster, "{spread:*}:live:s1").values()) == 0
    r = store.get(np.r_[USERS, [-5, 7]])  # every bucket, every node, in one round: no CROSSSLOT
    assert r.snapshot_id == "s2" and r.present.sum() == len(USERS) and (r.payload[: len(USERS), :, :128] == 2).all()
    one = store.get([int(USERS[7])])
    assert one.present.tolist() == [True] and (one.payload[..., :128] == 2).all()
    # a reader opened with another bucket option still reads the store's own layout
    reader = open_store(redis_cluster.url("reader", "spread") + "&buckets=64")
    np.testing.assert_array_equal(reader.get(USERS[:20]).payload, r.payload[:20])
    with pytest.raises(StoreError, match="laid out with 16 buckets"):
        open_store(redis_cluster.url("writer", "spread") + "&buckets=64").publish(snapshots("s3", fill=3))
    for s in (store, reader):
        s.close()


def test_cluster_urls_name_what_is_wrong() -> None:
    with pytest.raises(StoreError, match="'nohost' is not host:port"):
        open_store("redis+cluster://127.0.0.1:7000,nohost?prefix=x")
    with pytest.raises(StoreError, match=r"buckets=0: use 1\.\.16384"):
        open_store("redis+cluster://127.0.0.1:7000?buckets=0")
    with pytest.raises(StoreError, match="unknown option"):
        open_store("redis+cluster://127.0.0.1:7000?bucket=3")


def test_an_open_client_reads_on_after_the_cluster_restarts(redis_cluster, snapshots) -> None:  # type: ignore[no-untyped-def]
    """Every node killed (-9) and restarted under an open reader: its next get reconnects, re-learns the slot
    map and answers from the published version (which the publish saved on every primary)."""
    writer = open_store(redis_cluster.url("writer", "restart"))
    writer.publish(snapshots("r1", fill=1))
    reader = open_store(redis_cluster.url("reader", "restart"))
    before = reader.get(USERS[:40])
    redis_cluster.restart()
    after = reader.get(USERS[:40])
    assert after.snapshot_id == "r1" and after.present.all()
    np.testing.assert_array_equal(after.payload, before.payload)
    assert reader.get([int(USERS[3])]).present.all()
    for s in (writer, reader):
        s.close()
