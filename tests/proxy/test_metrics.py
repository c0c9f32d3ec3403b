"""The loop-only counters and histograms expose what prometheus-client's own types would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.ops.metrics import LATENCY_BUCKETS, LoopCounter, LoopHistogram


def _samples(registry: CollectorRegistry) -> set[str]:
    """Exposition lines without prometheus-client's `_created` timestamps."""
    return {
        line
        for line in generate_latest(registry).decode().splitlines()
        if line and "_created" not in line
    }


def test_loop_metrics_match_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = LoopCounter("x_requests_total", "Requests.", ("op", "status"), registry=ours)
    reference_counter = Counter("x_requests_total", "Requests.", ["op", "status"], registry=theirs)
    histogram = LoopHistogram("x_seconds", "Latency.", ("source",), LATENCY_BUCKETS, ours)
    reference = Histogram(
        "x_seconds", "Latency.", ["source"], buckets=LATENCY_BUCKETS, registry=theirs
    )
    # Bucket edges exactly, between edges, below the first and past the last.
    values = [0.0, 0.0005, 0.0007, 0.001, 0.0025, 0.3, 30.0, 45.0, 0.0005]
    for i, value in enumerate(values):
        source = "cache" if i % 2 else "replica"
        histogram.labels(source).observe(value)
        reference.labels(source).observe(value)
        counter.labels("query", "200").inc()
        reference_counter.labels("query", "200").inc()
    counter.labels("get", "503").inc(2)
    reference_counter.labels("get", "503").inc(2)
    assert _samples(ours) == _samples(theirs)
