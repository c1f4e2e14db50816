"""Counters of a store client or of a ``dv365 serve`` process, and their Prometheus exposition.

:class:`StoreMetrics` is plain Python (no dependency, ~1 us per observation), so every
:class:`~dv365.store.api.EmbeddingStore` keeps one (``store.metrics.snapshot()``); ``dv365 serve --metrics-port``
publishes the server's through prometheus-client (the ``metrics`` extra), read at scrape time by
:func:`prometheus_registry`. Names (``method`` = ``get`` on a client, the gRPC method on a server)::

    dv365_store_requests_total{method}              calls
    dv365_store_request_errors_total{method}        calls that raised a StoreError
    dv365_store_request_seconds{method}             latency histogram (_bucket, _sum, _count)
    dv365_store_users_requested_total{method}       user ids asked for
    dv365_store_users_missing_total{method}         of those, not in the version (unknown users)
    dv365_store_checksum_failures_total{method}     of those, whose stored value failed its checksum
    dv365_store_active_version_info{version}        1 for the active version
    dv365_store_active_data_age_seconds             now - the active version's data cut-off
    dv365_store_active_published_timestamp_seconds  when the active version was published
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: upper bounds (seconds) of the latency histogram buckets (+Inf is implied)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass
class MethodStats:
    """The counters of one method."""

    requests: int = 0
    errors: int = 0
    users: int = 0
    missing: int = 0
    checksum_failures: int = 0
    seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))


@dataclass(frozen=True)
class ActiveVersion:
    """What the metrics say about the active version."""

    version: str
    data_cutoff_ts: int
    published_at: float


class StoreMetrics:
    """Thread-safe counters by method, and the version the last answer came from.

    Example::

        store.get([1, 2])
        store.metrics.snapshot()["methods"]["get"]["users"]     # 2
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.methods: dict[str, MethodStats] = {}
        self.version: ActiveVersion | None = None

    def observe(
        self,
        method: str,
        seconds: float,
        users: int = 0,
        missing: int = 0,
        checksum_failures: int = 0,
        error: bool = False,
    ) -> None:
        k = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            m = self.methods.get(method)
            if m is None:
                m = self.methods[method] = MethodStats()
            m.requests += 1
            m.errors += error
            m.users += users
            m.missing += missing
            m.checksum_failures += checksum_failures
            m.seconds += seconds
            m.buckets[k] += 1

    def answered_from(self, version: str, data_cutoff_ts: int, published_at: float) -> None:
        v = self.version
        if v is None or v.version != version or v.published_at != published_at:
            self.version = ActiveVersion(version, data_cutoff_ts, published_at)

    def snapshot(self) -> dict[str, Any]:
        """Every counter as plain data (``methods``: name -> counters; ``active``: version, data age)."""
        with self._lock:
            methods = {name: {**vars(m), "buckets": list(m.buckets)} for name, m in self.methods.items()}
        v = self.version
        active = None
        if v is not None:
            active = {
                "version": v.version,
                "data_age_s": time.time() - v.data_cutoff_ts,
                "published_at": v.published_at,
            }
        return {"methods": methods, "latency_buckets_s": list(LATENCY_BUCKETS), "active": active}


def prometheus_registry(metrics: StoreMetrics, active: Callable[[], ActiveVersion | None] | None = None) -> Any:
    """A prometheus-client registry exposing ``metrics`` (read at each scrape). ``active`` names the active
    version (a server asks its backend); by default the version of the last answer."""
    from prometheus_client.core import (
        CollectorRegistry,
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    class Collector:
        def collect(self) -> Any:
            snap = metrics.snapshot()
            counters = {
                "requests": ("requests", "calls"),
                "request_errors": ("errors", "calls that raised a StoreError"),
                "users_requested": ("users", "user ids asked for"),
                "users_missing": ("missing", "user ids not in the version answered from"),
                "checksum_failures": ("checksum_failures", "stored values that failed their checksum"),
            }
            for name, (key, doc) in counters.items():
                fam = CounterMetricFamily(f"dv365_store_{name}", doc, labels=["method"])
                for method, m in sorted(snap["methods"].items()):
                    fam.add_metric([method], m[key])
                yield fam
            hist = HistogramMetricFamily("dv365_store_request_seconds", "latency of a call", labels=["method"])
            for method, m in sorted(snap["methods"].items()):
                cum, buckets = 0, []
                for bound, n in zip([*LATENCY_BUCKETS, float("inf")], m["buckets"]):
                    cum += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
                hist.add_metric([method], buckets, m["seconds"])
            yield hist
            v = active() if active is not None else metrics.version
            info = GaugeMetricFamily("dv365_store_active_version_info", "1 for the active version", labels=["version"])
            age = GaugeMetricFamily("dv365_store_active_data_age_seconds", "now - the active version's data cut-off")
            pub = GaugeMetricFamily(
                "dv365_store_active_published_timestamp_seconds", "when the active version was published"
            )
            if v is not None:
                info.add_metric([v.version], 1)
                age.add_metric([], time.time() - v.data_cutoff_ts)
                pub.add_metric([], v.published_at)
            yield from (info, age, pub)

    registry = CollectorRegistry()
    registry.register(Collector())  # type: ignore[arg-type]
    return registry
