"""The result cache and single-flight coalescing. Event-loop thread only (cachetools is not
thread-safe, and nothing here needs to be).

Entries are encoded response bodies, bounded in bytes (not just in count) and by age. Keys carry
the replica's generation and the collection's write counter, so a swap or a write through the
proxy makes every older entry unreachable at once (O(1) invalidation; the LRU evicts them
later), and a stale answer can never be served once the proxy knows of a write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import cachetools
import orjson

T = TypeVar("T")


def canonical_digest(body: Any) -> bytes:
    """The request in a form that ignores key order and whitespace (the JS and Python
    clients order keys differently), vectors included. Kept whole rather than hashed: hashing
    cost more than the lookup, and equal keys are then certain to be equal requests."""
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class Cached:
    status: int
    body: bytes
    content_type: str = "application/json"
    key_bytes: int = 0  # size of the request held in the key, counted against the bound
    request: bytes = b""  # the exact request bytes an exact-request entry answers
    expires: float = 0.0  # set by ResultCache.put


# A request body longer than this is looked up by a sample of its bytes (and then compared
# whole): hashing an 8 KB query was the largest cost of a cache hit after aiohttp's own.
_FINGERPRINT_BYTES = 256


def _fingerprint(raw: bytes) -> bytes:
    if len(raw) <= _FINGERPRINT_BYTES:
        return raw
    return raw[:: len(raw) // _FINGERPRINT_BYTES]


class ResultCache:
    """LRU bounded by the total size of the stored bodies (and the requests held to answer
    them), with a time to live per entry.

    Expiry is checked when an entry is read rather than by cachetools.TTLCache, whose
    bookkeeping cost more than the rest of a lookup; an expired entry that is never read
    again still counts against the bound until the LRU evicts it."""

    def __init__(
        self,
        max_bytes: int,
        max_entry_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.ttl_s = ttl_s
        self._clock = clock
        self._lru: cachetools.LRUCache[Hashable, Cached] = cachetools.LRUCache(
            maxsize=max_bytes, getsizeof=_size
        )

    def get(self, key: Hashable) -> Cached | None:
        entry = self._lru.get(key)
        if entry is not None and entry.expires <= self._clock():
            del self._lru[key]
            return None
        return entry

    def put(self, key: Hashable, entry: Cached) -> bool:
        """Store unless the entry is over the per-entry cap; True if stored."""
        if _size(entry) > self.max_entry_bytes:
            return False
        self._lru[key] = replace(entry, expires=self._clock() + self.ttl_s)
        return True

    def get_exact(self, scope: Hashable, raw: bytes) -> Cached | None:
        """The entry stored by put_exact for exactly these request bytes in ``scope``. The
        key holds a sample of the bytes; the entry holds them all and must match."""
        entry = self.get((scope, len(raw), _fingerprint(raw)))
        return entry if entry is not None and entry.request == raw else None

    def put_exact(self, scope: Hashable, raw: bytes, entry: Cached) -> bool:
        """Two bodies that share a fingerprint take turns in one slot: misses, never a
        wrong answer."""
        return self.put((scope, len(raw), _fingerprint(raw)), replace(entry, request=raw))

    @property
    def bytes_used(self) -> int:
        return int(self._lru.currsize)

    def __len__(self) -> int:
        return len(self._lru)


def _size(entry: Cached) -> int:
    return len(entry.body) + entry.key_bytes + len(entry.request)


class SingleFlight(Generic[T]):
    """Identical concurrent computations run once; the others wait for its result (or its
    exception)."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[T]] = {}

    async def run(self, key: Hashable, compute: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Returns (result, coalesced): coalesced is True when another request computed it."""
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running), True
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            result = await compute()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # marks it retrieved when nobody else was waiting
            raise
        else:
            future.set_result(result)
            return result, False
        finally:
            del self._running[key]
