"""Guards: the read path's shared state (caches, coalescing, admission control), built once
from the config and kept on the app."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.access.admission import InFlightLimit, SearchGate, TokenBuckets
from proxy.access.limits import Limits
from proxy.config import Config
from proxy.ops.metrics import Metrics
from proxy.replica.cache import ResultCache, SingleFlight


@dataclass(slots=True)
class Guards:
    """The read path's shared state: caches, coalescing and admission control."""

    cache: ResultCache | None
    forwarded: ResultCache | None
    flights: SingleFlight[bytes]
    gate: SearchGate
    buckets: TokenBuckets
    forward_limit: InFlightLimit
    request_limit: InFlightLimit
    limits: Limits  # what one request may ask for (proxy/access/limits.py)
    metrics: Metrics = field(repr=False)

    @classmethod
    def from_config(cls, config: Config, metrics: Metrics) -> Guards:
        def cache(ttl_s: float) -> ResultCache | None:
            if config.cache_max_bytes == 0 or ttl_s == 0:
                return None
            return ResultCache(config.cache_max_bytes, config.cache_max_entry_bytes, ttl_s)

        guards = cls(
            cache=cache(config.cache_ttl_s),
            forwarded=cache(config.forwarded_cache_ttl_s),
            flights=SingleFlight(),
            gate=SearchGate(
                config.search_slots,
                config.search_queue_max,
                config.search_queue_timeout_s,
                config.retry_after_s,
            ),
            buckets=TokenBuckets(config.tenant_rate_per_s, config.tenant_burst),
            limits=Limits.from_config(config),
            forward_limit=InFlightLimit(config.max_forwarded_in_flight, config.retry_after_s),
            request_limit=InFlightLimit(
                config.max_requests_in_flight, config.retry_after_s, "requests", "request_limit"
            ),
            metrics=metrics,
        )
        metrics.queue_depth.set_function(lambda: guards.gate.queued)
        return guards
