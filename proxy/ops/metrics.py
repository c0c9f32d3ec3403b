"""Every Prometheus metric of the proxy, defined once.

Each app gets its own registry so that several apps (tests, or a future multi-listener process)
never clash on global registration.

What the event loop updates on every request (request counts and latencies, cache results,
admission decisions, fallbacks) is kept in LoopCounter/LoopHistogram: plain numbers, read when
/metrics is scraped. prometheus-client's own types take a lock on every update and walk the
histogram buckets in Python; on a cache hit that was ~6% of the request (py-spy, bench/guards.py).
Only the event-loop thread touches them, so they need no lock.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.routes import Route, RouteClass

# Buckets from 0.5 ms (a cache hit) to 30 s (a slow forwarded export page).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


LAG_WINDOW_S = 10


class Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Observations:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # buckets are "<= bound"
        self.sum += value


C = TypeVar("C", Count, Observations)


class _LoopFamily(Collector, Generic[C]):
    """Labelled series updated from the event-loop thread only (see the module docstring),
    registered as a collector that reports them when /metrics is scraped."""

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: tuple[str, ...],
        registry: CollectorRegistry,
        new: Callable[[], C],
    ) -> None:
        self.name, self.doc, self.labelnames = name, doc, labelnames
        self._new: Callable[[], C] = new
        self._children: dict[tuple[str, ...], C] = {}
        registry.register(self)

    def labels(self, *values: str) -> C:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new()
        return child


class LoopCounter(_LoopFamily[Count]):
    def __init__(
        self, name: str, doc: str, labelnames: tuple[str, ...], registry: CollectorRegistry
    ) -> None:
        super().__init__(name, doc, labelnames, registry, Count)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in self._children.items():
            family.add_metric(values, child.value)
        yield family


class LoopHistogram(_LoopFamily[Observations]):
    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        # the label values prometheus-client's own Histogram writes (untyped in its stubs)
        self._bounds = [floatToGoString(b) for b in buckets] + ["+Inf"]  # type: ignore[no-untyped-call]
        super().__init__(name, doc, labelnames, registry, lambda: Observations(buckets))

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in self._children.items():
            cumulative, buckets = 0, []
            for bound, count in zip(self._bounds, child.counts, strict=True):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            family.add_metric(values, buckets, child.sum)
        yield family


class StorageCollector(Collector):
    """Storage mode's log position, lag and overlays, read from the tailer at scrape time
    (sync/tailer.py StorageTailer.gauges)."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, Any]] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.source is None:
            return
        found = self.source()
        yield GaugeMetricFamily(
            "replica_proxy_storage_log_position",
            "Newest primary log seq (embeddings_queue) applied to the replicas.",
            value=found["position"],
        )
        yield GaugeMetricFamily(
            "replica_proxy_storage_lag_seconds",
            "Seconds since the replicas were last confirmed to hold the primary's newest log row.",
            value=found["lag_s"],
        )
        overlay = GaugeMetricFamily(
            "replica_proxy_storage_overlay_rows",
            "Rows changed by the log since the replica's base was taken, per collection.",
            labels=["collection"],
        )
        behind = GaugeMetricFamily(
            "replica_proxy_storage_behind_seq",
            "Log rows between the primary's newest seq and the replica's, per collection.",
            labels=["collection"],
        )
        for cid, rows, seqs in found["collections"]:
            overlay.add_metric([cid], rows)
            behind.add_metric([cid], seqs)
        yield overlay
        yield behind


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[RouteClass, str, str, str], tuple[Count, Observations | None]]
        self._children = {}
        r = self.registry
        self.requests = LoopCounter(
            "replica_proxy_requests_total",
            "Requests answered, by route class, operation, status code and source.",
            ("route_class", "op", "status", "source"),
            registry=r,
        )
        self.latency = LoopHistogram(
            "replica_proxy_request_duration_seconds",
            "Time from request start to the last byte of the response.",
            ("route_class", "source"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = 0  # requests being handled now
        Gauge(
            "replica_proxy_requests_in_flight", "Requests being handled now.", registry=r
        ).set_function(lambda: self.in_flight)
        self.upstream_errors = Counter(
            "replica_proxy_upstream_errors_total",
            "Failed exchanges with the primary, by reason.",
            ["reason"],
            registry=r,
        )
        self.primary_up = Gauge(
            "replica_proxy_primary_up", "1 if the primary answered its last heartbeat.", registry=r
        )
        self.draining = Gauge(
            "replica_proxy_draining", "1 while shutting down (readiness off).", registry=r
        )

        self.local_fallbacks = LoopCounter(
            "replica_proxy_local_fallbacks_total",
            "Local-read candidates forwarded after all, by reason.",
            ("reason",),
            registry=r,
        )
        self.rebuilds = Counter(
            "replica_proxy_rebuilds_total", "Replica rebuilds, by result.", ["result"], registry=r
        )
        self.rebuild_seconds = Histogram(
            "replica_proxy_rebuild_seconds",
            "Time to export, build, publish and swap one replica.",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.replicas = Gauge(
            "replica_proxy_replicas", "Collections served from a local replica.", registry=r
        )
        self.retakes = Counter(
            "replica_proxy_storage_retakes_total",
            "Storage mode: collections taken again from the primary's files, by reason "
            "(purged: the primary purged log rows before they were read; compaction: the "
            "overlay passed storage_overlay_max_rows; replay_failed; seq_reset; retry: a take "
            "failed, e.g. it raced a flush; admin).",
            ["reason"],
            registry=r,
        )
        self.storage = StorageCollector()
        r.register(self.storage)

        self.breaker_state = Gauge(
            "replica_proxy_breaker_state",
            "Circuit breaker towards the primary: 0 closed, 1 open, 2 half-open.",
            registry=r,
        )
        self.breaker_trips = Counter(
            "replica_proxy_breaker_trips_total", "Times the circuit breaker opened.", registry=r
        )
        self.cache = LoopCounter(
            "replica_proxy_cache_requests_total",
            "Cacheable reads, by result: hit, miss (computed) or coalesced (waited for an "
            "identical computation).",
            ("result",),
            registry=r,
        )
        self.cache_hit = self.cache.labels("hit")
        self.cache_miss = self.cache.labels("miss")
        self.cache_coalesced = self.cache.labels("coalesced")
        self.cache_bytes = Gauge(
            "replica_proxy_cache_bytes", "Bytes of response bodies in the cache.", registry=r
        )
        self.cache_entries = Gauge(
            "replica_proxy_cache_entries", "Entries in the cache.", registry=r
        )
        self.admission = LoopCounter(
            "replica_proxy_admission_total",
            "Admission decisions: admitted, queued, or shed by reason (queue_full, "
            "queue_timeout, forward_limit, rate_limited, breaker).",
            ("decision",),
            registry=r,
        )
        self.queue_depth = Gauge(
            "replica_proxy_search_queue_depth", "Local searches waiting for a slot.", registry=r
        )  # read from the search gate at scrape time (Guards.from_config)

        self.loop_lag = Histogram(
            "replica_proxy_event_loop_lag_seconds",
            "How late the event loop woke up for a 5 ms timer: time no request could progress.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "replica_proxy_event_loop_lag_max_seconds",
            f"Longest event loop stall in the last {LAG_WINDOW_S} seconds.",
            registry=r,
        )
        self.loop_lag_max.set_function(self.recent_max_lag)
        self._lag_seconds: deque[tuple[int, float]] = deque()  # (second, max lag in it)

    def on_loop_lag(self, lag: float) -> None:
        self.loop_lag.observe(lag)
        second = int(time.monotonic())
        lags = self._lag_seconds
        if lags and lags[-1][0] == second:
            if lag > lags[-1][1]:
                lags[-1] = (second, lag)
        else:
            lags.append((second, lag))
            while lags[0][0] <= second - LAG_WINDOW_S:
                lags.popleft()

    def recent_max_lag(self) -> float:
        horizon = int(time.monotonic()) - LAG_WINDOW_S
        return max((lag for second, lag in self._lag_seconds if second > horizon), default=0.0)

    def observe(self, route: Route, status: str, source: str, seconds: float) -> None:
        """Count one finished request and its latency."""
        key = (route.kind, route.op, status, source)
        children = self._children.get(key)
        if children is None:
            kind = route.kind.value
            latency = None
            if route.kind is not RouteClass.OPS:
                latency = self.latency.labels(kind, source)
            children = (self.requests.labels(kind, route.op, status, source), latency)
            self._children[key] = children
        children[0].inc()
        if children[1] is not None:
            children[1].observe(seconds)

    def on_retake(self, reason: str) -> None:
        self.retakes.labels(reason).inc()

    def on_build(self, result: str, seconds: float, rows: int) -> None:
        self.rebuilds.labels(result).inc()
        if result == "ok":
            self.rebuild_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
