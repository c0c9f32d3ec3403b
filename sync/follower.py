"""StoreFollower: the `replica` role. Serves what a builder publishes; never exports.

It scans the snapshot store every poll_interval_s. A collection whose newest published
generation is newer than the one serving is verified (checksums, row counts), loaded and
validated (recall against exact search) in a worker thread, then swapped in; requests in
flight finish on the old replica. A snapshot that fails any check is refused once, logged and
remembered, and the old generation keeps serving. A collection whose directory disappeared
(the builder saw it deleted) stops being served.

It has the scheduler's interface (proxy/replica/router.py uses either). A replica never asks the
primary for anything; it asks the builder, through the store (scheduler.ask_for), for a
collection it does not serve (on a read) and for a new cut of one it forwarded a write to
(once writes to it pause for debounce_s), so that its reads are local again without waiting
for the builder's next refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from index.errors import SnapshotError
from index.holder import ReplicaSet
from index.live import LiveReplica
from index.replica import ReplicaIndex

from .build import open_snapshot
from .logstream import BuilderLog
from .published import is_take, open_take
from .scheduler import SyncSettings, Wanted, ask_for, newest_snapshots

log = logging.getLogger(__name__)


class StoreFollower:
    def __init__(
        self,
        replicas: ReplicaSet,
        settings: SyncSettings,
        asks_on_write: bool = True,
        log: BuilderLog | None = None,
    ) -> None:
        """``asks_on_write`` False: another process relays this one's writes to the builder
        (the first of several workers, proxy/ops/workers.py relay_writes). ``log``: the log
        stream of a builder in storage mode, whose takes are then served and followed."""
        self._replicas = replicas
        self._settings = settings
        self._asks_on_write = asks_on_write
        self.log = log
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._refused: set[Path] = set()
        self._unfollowable: set[Path] = set()  # takes, without builder_url to follow them
        self._task: asyncio.Task[None] | None = None
        self._asking: set[asyncio.Task[None]] = set()
        self.building: str | None = None  # the collection being loaded
        self.last_error: str | None = None
        self.ready = False
        self.loads = 0

    async def __aenter__(self) -> StoreFollower:
        # In the background, so the server listens (and /healthz answers) while a large store
        # loads; /readyz says "loading" until everything already in the store serves.
        self._task = asyncio.create_task(self._follow(), name="store-follower")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for timer in self._timers.values():
            timer.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.log is not None:
            await self.log.close()

    # --- the scheduler's interface: a replica cannot build ----------------------------------

    def request(self, collection_id: str, tenant: str, database: str, **_: Any) -> None:
        """On demand: ask the builder (proxy/replica/router.py asks at most every 30 s)."""
        self._spawn_ask(Wanted(collection_id, tenant, database))

    def _spawn_ask(self, wanted: Wanted) -> None:
        task = asyncio.create_task(self._ask(wanted))
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def _ask(self, wanted: Wanted) -> None:
        try:
            await self.ask_builder(wanted)
        except OSError as exc:
            log.warning("could not ask the builder for %s: %s", wanted.collection_id, exc)

    async def ask_builder(self, wanted: Wanted) -> None:
        """Leave a request in the store for the builder (OSError if the store is unwritable)."""
        await asyncio.to_thread(ask_for, self._settings.store, wanted)

    def wants(self, collection_id: str) -> bool:
        return self._replicas.get(collection_id) is not None

    def notify_write(self, collection_id: str) -> None:
        """A write to a collection this process serves went through it: once writes to it
        pause for debounce_s, ask the builder for a new cut."""
        if not self._asks_on_write or self._replicas.get(collection_id) is None:
            return
        if self.log is not None and self.log.generation(collection_id) is not None:
            return  # followed through the builder's log: the write arrives by itself
        old = self._timers.pop(collection_id, None)
        if old is not None:
            old.cancel()
        self._timers[collection_id] = asyncio.get_running_loop().call_later(
            self._settings.debounce_s, self._ask_rebuild, collection_id
        )

    def _ask_rebuild(self, collection_id: str) -> None:
        self._timers.pop(collection_id, None)
        replica = self._replicas.get(collection_id)
        if replica is not None:
            model = replica.manifest.collection
            self._spawn_ask(Wanted(collection_id, model["tenant"], model["database"], True))

    def known(self) -> list[str]:
        """The collections this process serves."""
        return [replica.collection_id for replica in self._replicas]

    def forget(self, collection_id: str) -> None:
        # Deleted through this proxy: stop serving now; the builder removes the snapshots.
        if self.log is not None:
            self.log.forget(collection_id)
        self._replicas.drop(collection_id)

    def status(self) -> dict[str, Any]:
        return {
            "building": self.building,
            "last_error": self.last_error,
            "refused": sorted(str(p) for p in self._refused),
            "loads": self.loads,
            "builder_log": None if self.log is None else self.log.status(),
        }

    # --- following the store ----------------------------------------------------------------

    async def _follow(self) -> None:
        await self._scan_logged()
        self.ready = True  # even if the store was unreadable: the primary can still answer
        while True:
            await asyncio.sleep(self._settings.poll_interval_s)
            await self._scan_logged()

    async def _scan_logged(self) -> None:
        try:
            await self.scan()
        except Exception as exc:  # e.g. the shared volume went away; keep serving
            self.last_error = f"store scan: {exc}"
            log.exception("scanning the snapshot store failed")

    async def scan(self) -> None:
        found = await asyncio.to_thread(newest_snapshots, self._settings.store)
        present = set()
        for snapshots in found:
            if snapshots:
                present.add(snapshots[0].parent.name)
            for snapshot in snapshots:
                if await self._consider(snapshot):
                    break
        for replica in self._replicas:
            if replica.collection_id not in present:
                log.info("collection %s left the store; no longer served", replica.collection_id)
                self.forget(replica.collection_id)

    async def _consider(self, snapshot: Path) -> bool:
        """True when ``snapshot`` (or something newer) serves; False to try an older one."""
        cid = snapshot.parent.name
        followed = None if self.log is None else self.log.generation(cid)
        serving = self._replicas.get(cid)
        if followed is not None:  # a take: its views' generations are not the snapshot's
            if followed >= int(snapshot.name):
                return True
        elif serving is not None and serving.generation >= int(snapshot.name):
            return True
        take = await asyncio.to_thread(is_take, snapshot)
        if take and self.log is None:
            # A builder's take of the primary's storage is followed through its log stream,
            # which needs builder_url. An older (export) generation would be staler than the
            # primary, so the collection's reads are forwarded.
            if snapshot not in self._unfollowable:
                self._unfollowable.add(snapshot)
                log.warning("%s is a take of the primary's storage: following it needs "
                            "builder_url; reads of it are forwarded", snapshot)  # fmt: skip
            return True
        if snapshot in self._refused:
            return False
        settings = self._settings
        opener = partial(open_snapshot, validate=settings.validate,
                         write_ledger=settings.write_ledger)  # fmt: skip
        loaded = await self._load(snapshot, open_take if take else opener)
        if loaded is None:
            return False
        self.loads += 1
        if isinstance(loaded, LiveReplica):
            assert self.log is not None
            self.log.follow(loaded, int(snapshot.name))
            log.info("collection %s: take %s serving at log position %d (%d rows), following "
                     "the builder's log", cid, snapshot.name, loaded.position,
                     len(loaded.base.ids))  # fmt: skip
            return True
        self._replicas.swap(loaded)
        log.info(
            "replica %s (%s) generation %d serving: %d rows",
            loaded.manifest.collection["name"],
            loaded.collection_id,
            loaded.generation,
            loaded.n,
        )
        return True

    async def _load(
        self, snapshot: Path, opener: Callable[[Path], ReplicaIndex | LiveReplica]
    ) -> ReplicaIndex | LiveReplica | None:
        """Verify and load a snapshot in a worker thread; None if it is refused (logged and
        remembered) or was pruned by the builder meanwhile."""
        self.building = snapshot.parent.name
        try:
            return await asyncio.to_thread(opener, snapshot)
        except (SnapshotError, OSError, RuntimeError, ValueError) as exc:
            if await asyncio.to_thread(snapshot.exists):
                self._refused.add(snapshot)
                self.last_error = f"refused {snapshot}: {exc}"
                log.error("refusing snapshot %s (still serving the previous one): %s",
                          snapshot, exc)  # fmt: skip
            return None
        finally:
            self.building = None
