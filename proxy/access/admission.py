"""Admission control: decide, without I/O, whether a request may use a scarce resource now.

* SearchGate: local searches take one of a bounded number of slots; past that they wait in a
  bounded queue for at most a deadline; past that they are shed at once (503, Retry-After).
* TokenBuckets: optional per-tenant request rates (429).
* InFlightLimit: a cap on requests forwarded to the primary at once (503).

Cache hits, health checks and metrics never come here: they cost almost nothing, and shedding
them would turn an overload into an outage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from proxy.errors import Overloaded, RateLimited


class SearchGate:
    """Bounds local searches: ``slots`` run at once (one per search thread), up to
    ``queue_max`` more wait in the search queue (proxy/replica/batching.py), and anything beyond is
    refused at once. A queued search that waited longer than ``timeout_s`` is refused when its
    turn comes, before any work is done. The search threads take queued work themselves rather
    than through event-loop callbacks: handing a slot over through the loop left them idle
    until the loop got round to it (about 12% of throughput, measured with bench/guards.py).
    (With batching, a "slot" runs a batch: up to search_batch_max stacked queries.)"""

    def __init__(self, slots: int, queue_max: int, timeout_s: float, retry_after_s: int) -> None:
        self.slots = slots
        self.queue_max = queue_max
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.admitted = 0  # running or queued

    @property
    def queued(self) -> int:
        return max(0, self.admitted - self.slots)

    def refuse_if_full(self) -> None:
        """Raise Overloaded at once when no search can be admitted. Called before a request
        is parsed too: under overload most requests are refused, and parsing and hashing a
        query was a fifth of the event loop's time at 3x load (py-spy during bench/guards.py)."""
        if self.admitted >= self.slots + self.queue_max:
            raise Overloaded("search queue full", self.retry_after_s, reason="queue_full")

    def enter(self) -> bool:
        """Admit a search (True if it will have to queue) or raise Overloaded at once."""
        self.refuse_if_full()
        self.admitted += 1
        return self.admitted > self.slots

    def exit(self) -> None:
        self.admitted -= 1

    def check_deadline(self, admitted_at: float) -> None:
        """Called by the search thread when the search's turn comes (any thread)."""
        waited = time.monotonic() - admitted_at
        if waited > self.timeout_s:
            raise Overloaded(
                f"waited {waited:.2f}s for a search slot (limit {self.timeout_s:g}s)",
                self.retry_after_s,
                reason="queue_timeout",
            )


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


@dataclass(slots=True)
class TokenBuckets:
    """One bucket per key (tenant): ``rate_per_s`` tokens a second, at most ``burst``."""

    rate_per_s: float
    burst: float
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, key: str, now: float | None = None) -> None:
        """Spend a token or raise RateLimited."""
        if self.rate_per_s <= 0:
            return
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate_per_s)
        bucket.stamp = now
        if bucket.tokens < 1:
            wait = (1 - bucket.tokens) / self.rate_per_s
            raise RateLimited(f"tenant {key!r} is over {self.rate_per_s:g} requests/s", wait)
        bucket.tokens -= 1


@dataclass(slots=True)
class InFlightLimit:
    limit: int
    retry_after_s: int
    what: str = "requests to the primary"
    reason: str = "forward_limit"
    current: int = 0

    def enter(self) -> None:
        if self.current >= self.limit:
            raise Overloaded(
                f"{self.limit} {self.what} in flight", self.retry_after_s, reason=self.reason
            )
        self.current += 1

    def exit(self) -> None:
        self.current -= 1
