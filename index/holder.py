"""ReplicaSet: the serving replica of each collection, swapped by rebinding one reference.

A request reads a collection's replica once and uses that object to the end, so a swap never
changes data under a request in flight. Only the event loop thread mutates the set.

A replaced replica goes to the reaper (index/reaper.py), which frees it in a thread of its own
once the last request using it is done: freeing 100k rows' objects on the event loop would stall
every reader for tens of milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterator

from .reaper import REAPER
from .replica import ReplicaIndex


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
        REAPER.retire(replica)
