"""Admission control: decide, without I/O, whether a request may use a scarce resource now.

* SearchGate: local searches take one of a bounded number of slots; past that they wait in a
  bounded queue for at most a deadline; past that they are shed at once (503, Retry-After).
* TokenBuckets: optional per-tenant request rates (429).
* InFlightLimit: a cap on requests forwarded to the primary at once (503).

Cache hits, health checks and metrics never come here: they cost almost nothing, and shedding
them would turn an overload into an outage.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from .errors import Overloaded, RateLimited


class SearchGate:
    def __init__(self, slots: int, queue_max: int, timeout_s: float, retry_after_s: int) -> None:
        self.slots = slots
        self.queue_max = queue_max
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> bool:
        """Take a slot; returns True if the request had to queue. Raises Overloaded."""
        if self.busy < self.slots and not self._waiters:
            self.busy += 1
            return False
        if len(self._waiters) >= self.queue_max:
            raise Overloaded("search queue full", self.retry_after_s, reason="queue_full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, self.timeout_s)
        except TimeoutError:
            raise Overloaded(
                f"waited {self.timeout_s:g}s for a search slot",
                self.retry_after_s,
                reason="queue_timeout",
            ) from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return True

    def release(self) -> None:
        # Hand the slot straight to the oldest live waiter, so queued requests run in order.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.busy -= 1


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
    current: int = 0

    def enter(self) -> None:
        if self.current >= self.limit:
            raise Overloaded(
                f"{self.limit} requests to the primary in flight",
                self.retry_after_s,
                reason="forward_limit",
            )
        self.current += 1

    def exit(self) -> None:
        self.current -= 1
