"""Cache, single flight, admission and the breaker, without network (decisions, not timings)."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.access.admission import InFlightLimit, SearchGate, TokenBuckets
from proxy.errors import Overloaded, RateLimited, UpstreamCircuitOpen
from proxy.ops.metrics import Metrics
from proxy.primary.upstream import Breaker
from proxy.replica.cache import Cached, ResultCache, SingleFlight, _fingerprint, canonical_digest


def test_canonical_digest_ignores_key_order_not_values() -> None:
    a = {"n_results": 3, "query_embeddings": [[1.0, 2.0]], "include": ["a", "b"]}
    b = {"include": ["a", "b"], "query_embeddings": [[1.0, 2.0]], "n_results": 3}
    assert canonical_digest(a) == canonical_digest(b)
    assert canonical_digest(a) != canonical_digest({**a, "include": ["b", "a"]})
    assert canonical_digest(a) != canonical_digest({**a, "query_embeddings": [[1.0, 2.5]]})


def test_cache_is_bounded_in_bytes_and_caps_entries() -> None:
    cache = ResultCache(max_bytes=1000, max_entry_bytes=300, ttl_s=60)
    assert not cache.put("big", Cached(200, b"x" * 301))
    assert cache.get("big") is None
    for i in range(20):
        assert cache.put(i, Cached(200, b"y" * 100))
        assert cache.bytes_used <= 1000
    assert len(cache) == 10
    assert cache.get(0) is None and cache.get(19) is not None  # least recently used went


def test_cache_returns_the_same_bytes() -> None:
    cache = ResultCache(max_bytes=1000, max_entry_bytes=1000, ttl_s=60)
    body = b'{"ids":[["a"]]}'
    cache.put(("c", 1, 0, "query", b"k"), Cached(200, body))
    hit = cache.get(("c", 1, 0, "query", b"k"))
    assert hit is not None and hit.body is body
    # A new generation or write counter is a different key: the old entry is unreachable.
    assert cache.get(("c", 2, 0, "query", b"k")) is None
    assert cache.get(("c", 1, 1, "query", b"k")) is None


def test_cache_entries_expire_after_their_ttl() -> None:
    now = [100.0]
    cache = ResultCache(max_bytes=1000, max_entry_bytes=1000, ttl_s=5, clock=lambda: now[0])
    cache.put("k", Cached(200, b"old"))
    now[0] = 104.9
    assert cache.get("k") is not None
    now[0] = 105.0
    assert cache.get("k") is None
    assert len(cache) == 0 and cache.bytes_used == 0  # an expired entry read is dropped


def test_exact_lookup_never_answers_a_different_request() -> None:
    """Long bodies are keyed by a sample of their bytes: two bodies that differ only where
    the sample does not look share a slot, and must then miss rather than swap answers."""
    cache = ResultCache(max_bytes=100_000, max_entry_bytes=100_000, ttl_s=60)
    a = b'{"query_embeddings": [[' + b"1" * 5000 + b"]]}"
    b = a[:1001] + b"2" + a[1002:]  # one byte apart, at a position the sample skips
    assert _fingerprint(a) == _fingerprint(b)  # the case under test
    cache.put_exact("scope", a, Cached(200, b"answer-a"))
    assert cache.get_exact("scope", b) is None
    hit = cache.get_exact("scope", a)
    assert hit is not None and hit.body == b"answer-a"
    cache.put_exact("scope", b, Cached(200, b"answer-b"))
    hit = cache.get_exact("scope", b)
    assert hit is not None and hit.body == b"answer-b"
    assert cache.get_exact("scope", a) is None
    assert cache.get_exact("other-scope", b) is None
    short = b'{"ids": ["x"]}'
    cache.put_exact("scope", short, Cached(200, b"answer-short"))
    assert cache.get_exact("scope", b'{"ids": ["y"]}') is None
    # The request bytes held for the comparison count against the bound.
    assert cache.bytes_used == len(b) + len(b"answer-b") + len(short) + len(b"answer-short")


async def test_single_flight_runs_identical_work_once() -> None:
    flights: SingleFlight[int] = SingleFlight()
    release = asyncio.Event()
    runs = 0

    async def compute() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        return 42

    tasks = [asyncio.create_task(flights.run("k", compute)) for _ in range(10)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*tasks)
    assert runs == 1
    assert [r for r, _ in results] == [42] * 10
    assert sum(coalesced for _, coalesced in results) == 9


async def test_single_flight_shares_errors_and_forgets_them() -> None:
    flights: SingleFlight[int] = SingleFlight()

    async def boom() -> int:
        await asyncio.sleep(0)
        raise ValueError("nope")

    results = await asyncio.gather(
        *(flights.run("k", boom) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ValueError) for r in results)

    async def fine() -> int:
        return 1

    assert await flights.run("k", fine) == (1, False)


def test_gate_sheds_when_slots_and_queue_are_full() -> None:
    gate = SearchGate(slots=2, queue_max=1, timeout_s=30, retry_after_s=3)
    assert gate.enter() is False
    assert gate.enter() is False
    assert gate.enter() is True  # both slots busy: this one queues
    assert gate.queued == 1
    with pytest.raises(Overloaded) as info:
        gate.enter()  # slots busy, queue full: refused at once
    assert info.value.reason == "queue_full"
    assert info.value.headers() == {"Retry-After": "3"}
    gate.exit()
    assert gate.queued == 0
    assert gate.enter() is True  # room again


def test_gate_deadline() -> None:
    gate = SearchGate(slots=1, queue_max=5, timeout_s=0.5, retry_after_s=1)
    gate.check_deadline(admitted_at=time.monotonic())  # just admitted: fine
    with pytest.raises(Overloaded) as info:
        gate.check_deadline(admitted_at=time.monotonic() - 10)  # waited 10 s for its turn
    assert info.value.reason == "queue_timeout"


def test_token_buckets() -> None:
    buckets = TokenBuckets(rate_per_s=2, burst=3)
    for _ in range(3):
        buckets.take("t1", now=100.0)
    with pytest.raises(RateLimited) as info:
        buckets.take("t1", now=100.0)
    assert info.value.status == 429 and info.value.error_name == "RateLimitError"
    buckets.take("t2", now=100.0)  # other tenants are unaffected
    buckets.take("t1", now=100.5)  # one token back after half a second at 2/s
    TokenBuckets(rate_per_s=0, burst=0).take("anyone")  # off


def test_in_flight_limit() -> None:
    limit = InFlightLimit(limit=1, retry_after_s=1)
    limit.enter()
    with pytest.raises(Overloaded):
        limit.enter()
    limit.exit()
    limit.enter()


def test_breaker_opens_half_opens_and_closes() -> None:
    breaker = Breaker(failures=3, open_s=0.0, metrics=Metrics())
    for _ in range(2):
        breaker.check()
        breaker.failure()
    assert breaker.state == Breaker.CLOSED
    breaker.failure()
    assert breaker.state == Breaker.OPEN
    breaker.check()  # open_s elapsed (0): one trial request goes through
    assert breaker.state == Breaker.HALF_OPEN
    breaker.failure()  # the trial failed: open again
    assert breaker.state == Breaker.OPEN
    breaker.check()
    breaker.success()
    assert breaker.state == Breaker.CLOSED


def test_open_breaker_fails_fast() -> None:
    breaker = Breaker(failures=1, open_s=60.0, metrics=Metrics())
    breaker.failure()
    with pytest.raises(UpstreamCircuitOpen) as info:
        breaker.check()
    assert info.value.status == 503 and "Retry-After" in info.value.headers()
