"""ReplicaSet: the serving replica of each collection, swapped by rebinding one reference.

A request reads a collection's replica once and uses that object to the end, so a swap never
changes data under a request in flight; the old replica is freed when its last reader is done
(plain reference counting). Only the event loop thread mutates the set.

When a replaced replica is finally freed, the C heap is trimmed: hnswlib's per-node link lists
and Python's small objects leave freed memory that glibc keeps (and RSS counts) otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import weakref
from collections.abc import Iterator

from .replica import ReplicaIndex


def _load_malloc_trim() -> ctypes._NamedFuncPointer | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_malloc_trim = _load_malloc_trim()


def _release_memory() -> None:
    # In a thread of its own: trimming a large heap takes milliseconds, and the last
    # reference may well be dropped on the event loop thread.
    if _malloc_trim is not None:
        threading.Thread(target=_malloc_trim, args=(0,), name="malloc-trim", daemon=True).start()


class ReplicaSet:
    def __init__(self) -> None:
        self._by_id: dict[str, ReplicaIndex] = {}
        self.swaps = 0

    def get(self, collection_id: str) -> ReplicaIndex | None:
        return self._by_id.get(collection_id)

    def find_by_name(self, tenant: str, database: str, name: str) -> ReplicaIndex | None:
        for replica in self._by_id.values():
            model = replica.manifest.collection
            if (model["name"], model["tenant"], model["database"]) == (name, tenant, database):
                return replica
        return None

    def swap(self, replica: ReplicaIndex) -> ReplicaIndex | None:
        """Serve ``replica`` from now on; returns the one it replaces. An older generation
        never replaces a newer one (two builds may finish out of order)."""
        old = self._by_id.get(replica.collection_id)
        if old is not None and old.generation > replica.generation:
            return None
        self._by_id[replica.collection_id] = replica
        self.swaps += 1
        _release_when_freed(old)
        return old

    def drop(self, collection_id: str) -> ReplicaIndex | None:
        old = self._by_id.pop(collection_id, None)
        _release_when_freed(old)
        return old

    def drop_where(self, tenant: str | None = None, database: str | None = None) -> list[str]:
        """Drop every replica in a tenant (and database); all of them when both are None."""
        gone = [
            cid
            for cid, r in self._by_id.items()
            if tenant in (None, r.manifest.collection["tenant"])
            and database in (None, r.manifest.collection["database"])
        ]
        for cid in gone:
            _release_when_freed(self._by_id.pop(cid))
        return gone

    def __iter__(self) -> Iterator[ReplicaIndex]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)


def _release_when_freed(replica: ReplicaIndex | None) -> None:
    if replica is not None:
        weakref.finalize(replica, _release_memory)
