"""ReplicaSet: the serving replica of each collection, swapped by rebinding one reference.

A request reads a collection's replica once and uses that object to the end, so a swap never
changes data under a request in flight; the old replica is freed when its last reader is done
(plain reference counting). Only the event loop thread mutates the set.
"""

from __future__ import annotations

from collections.abc import Iterator

from .replica import ReplicaIndex


class ReplicaSet:
    def __init__(self) -> None:
        self._by_id: dict[str, ReplicaIndex] = {}

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
        return old

    def drop(self, collection_id: str) -> ReplicaIndex | None:
        return self._by_id.pop(collection_id, None)

    def drop_where(self, tenant: str | None = None, database: str | None = None) -> list[str]:
        """Drop every replica in a tenant (and database); all of them when both are None."""
        gone = [
            cid
            for cid, r in self._by_id.items()
            if tenant in (None, r.manifest.collection["tenant"])
            and database in (None, r.manifest.collection["database"])
        ]
        for cid in gone:
            del self._by_id[cid]
        return gone

    def __iter__(self) -> Iterator[ReplicaIndex]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)
