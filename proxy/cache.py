"""The result cache and single-flight coalescing. Event-loop thread only (cachetools is not
thread-safe, and nothing here needs to be).

Entries are encoded response bodies, bounded in bytes (not just in count) and by age. Keys carry
the replica's generation and the collection's write counter, so a swap or a write through the
proxy makes every older entry unreachable at once (O(1) invalidation; the LRU evicts them
later), and a stale answer can never be served once the proxy knows of a write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
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


class ResultCache:
    """LRU + TTL, bounded by the total size of the stored bodies."""

    def __init__(self, max_bytes: int, max_entry_bytes: int, ttl_s: float) -> None:
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._lru: cachetools.TTLCache[Hashable, Cached] = cachetools.TTLCache(
            maxsize=max_bytes, ttl=ttl_s, getsizeof=lambda e: len(e.body) + e.key_bytes
        )

    def get(self, key: Hashable) -> Cached | None:
        return self._lru.get(key)

    def put(self, key: Hashable, entry: Cached) -> bool:
        """Store unless the entry is over the per-entry cap; True if stored."""
        if len(entry.body) + entry.key_bytes > self.max_entry_bytes:
            return False
        self._lru[key] = entry
        return True

    @property
    def bytes_used(self) -> int:
        return int(self._lru.currsize)

    def __len__(self) -> int:
        return len(self._lru)


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
