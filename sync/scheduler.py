"""RebuildScheduler: decides when a collection's replica is rebuilt, builds it aside, publishes
the snapshot and swaps it in.

A rebuild runs: fetch the collection model -> export (sync/export.py) -> build the HNSW index in
a worker thread -> publish the snapshot atomically -> swap. Any failure leaves the serving replica
untouched and is retried with backoff. Rebuilds are requested on demand (a read of a collection
without a replica), after writes this proxy forwarded (debounced), and when a replica is older
than refresh_interval_s. One rebuild runs at a time: on a small machine a second one would only
compete with the first and with serving.

In the `builder` role (serve=False) the same loop publishes snapshots for `replica` processes
(sync/follower.py) and keeps none in memory. Those processes (and the other workers of a
standalone proxy) cannot export: they ask for on-demand replicas through the store (ask_for),
and the scheduler picks the requests up once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from index.errors import SnapshotError
from index.holder import ReplicaSet
from index.replica import ReplicaIndex
from index.snapshot import Manifest, generations, prune, verify

from .build import build_and_publish, open_snapshot
from .export import Export, ExportChanged, PrimaryClient, export_collection

log = logging.getLogger(__name__)

EXPORT_ATTEMPTS = 3
# store/.wanted/<collection id>: replicas that serving processes asked the builder for.
WANTED = ".wanted"
_UUID = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


@dataclass(frozen=True, slots=True)
class SyncSettings:
    store: Path
    replicate: tuple[str, ...]  # "tenant/database" (database "*" = all of the tenant's)
    page_rows: int
    export_concurrency: int
    build_threads: int
    refresh_interval_s: float
    debounce_s: float
    keep_snapshots: int
    retry_backoff_s: float = 5.0
    serve: bool = True  # False in the builder role: publish only
    validate: tuple[int, float] = (20, 0.5)  # (sample queries, recall@10 floor) before serving
    poll_interval_s: float = 2.0  # replica role: how often the store is scanned
    write_ledger: str | None = None  # with worker processes: the ledger they share


BuildObserver = Callable[[str, float, int], None]  # (result, seconds, rows)


class RebuildScheduler:
    def __init__(
        self,
        client: PrimaryClient,
        replicas: ReplicaSet,
        settings: SyncSettings,
        write_seq: Callable[[str], int],
        on_build: BuildObserver | None = None,
    ) -> None:
        self._client = client
        self._replicas = replicas
        self._settings = settings
        self._write_seq = write_seq
        self._on_build = on_build or (lambda result, seconds, rows: None)
        self._where: dict[str, tuple[str, str]] = {}  # collection id -> (tenant, database)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._failures: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._built_at: dict[str, float] = {}  # collection id -> cut time of its newest snapshot
        self._overrides: dict[str, dict[str, int]] = {}  # HNSW parameters set by an admin
        self.building: str | None = None
        # Export mode's overlay (proxy/replica/overlay.py): makes a build ready to serve,
        # keeping the writes the proxy applied while its export ran.
        self.adopt: Callable[[ReplicaIndex], Awaitable[ReplicaIndex]] | None = None
        self.last_error: str | None = None
        self.ready = False  # the store's snapshots are loaded (readiness waits for this)

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> RebuildScheduler:
        # In the background: the server listens (and /healthz answers) while the store loads;
        # /readyz says "loading" until it is done.
        self._spawn(self._start())
        return self

    async def _start(self) -> None:
        try:
            await self._load_store()
        except Exception as exc:  # an unreadable store: serve what the primary has
            self.last_error = f"loading the snapshot store: {exc}"
            log.exception("loading the snapshot store failed")
        self.ready = True
        for coro in (self._worker(), self._ticker(), self.discover()):
            self._spawn(coro)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def __aexit__(self, *exc_info: object) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- requests ---------------------------------------------------------------------------

    def request(
        self,
        collection_id: str,
        tenant: str,
        database: str,
        hnsw: dict[str, int] | None = None,
        even_if_building: bool = False,
    ) -> None:
        """Build (or rebuild) a replica of the collection soon; ``hnsw`` sets new HNSW
        parameters for this and later builds (the admin API's rebuild). A build already
        running satisfies the request unless ``even_if_building``: after a write, or an admin
        rebuild, the running build's export may predate what was asked for, so it is queued
        to run once more (dropping it left a replica missing a write until the next refresh)."""
        self._where[collection_id] = (tenant, database)
        if hnsw:
            self._overrides[collection_id] = {**self._overrides.get(collection_id, {}), **hnsw}
        busy = collection_id == self.building and not even_if_building
        if collection_id not in self._queued and not busy:
            self._queued.add(collection_id)
            self._queue.put_nowait(collection_id)

    def wants(self, collection_id: str) -> bool:
        return collection_id in self._where

    def where(self, collection_id: str) -> tuple[str, str]:
        """The tenant and database of a collection this scheduler replicates."""
        return self._where[collection_id]

    def known(self) -> list[str]:
        """The collections this scheduler replicates."""
        return list(self._where)

    def notify_write(self, collection_id: str) -> None:
        """A write to the collection went through: rebuild once writes pause for debounce_s."""
        where = self._where.get(collection_id)
        if where is None:
            return
        old = self._timers.pop(collection_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[collection_id] = loop.call_later(
            self._settings.debounce_s, self._debounced, collection_id
        )

    def _debounced(self, collection_id: str) -> None:
        self._timers.pop(collection_id, None)
        where = self._where.get(collection_id)
        if where is not None:
            self.request(collection_id, *where, even_if_building=True)

    def forget(self, collection_id: str) -> None:
        """The collection is gone: stop serving and rebuilding it, and delete its snapshots
        (replica processes following the store then drop it too)."""
        self._where.pop(collection_id, None)
        self._built_at.pop(collection_id, None)
        self._overrides.pop(collection_id, None)
        timer = self._timers.pop(collection_id, None)
        if timer is not None:
            timer.cancel()
        self._replicas.drop(collection_id)
        shutil.rmtree(self._settings.store / collection_id, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        """For the admin API: what is known, queued and being built."""
        return {
            "building": self.building,
            "queued": sorted(self._queued),
            "last_error": self.last_error,
            "known": {cid: {"tenant": t, "database": d} for cid, (t, d) in self._where.items()},
            "built_at": dict(self._built_at),
            "hnsw_overrides": dict(self._overrides),
        }

    # --- background loops -------------------------------------------------------------------

    async def discover(self) -> None:
        """Request replicas of every collection in the configured databases."""
        for spec in self._settings.replicate:
            tenant, _, database = spec.partition("/")
            try:
                for db in await self._databases(tenant, database):
                    for model in await self._collections(tenant, db):
                        self.request(model["id"], tenant, db)
            except Exception as exc:  # the primary may be down; the ticker retries later
                self.last_error = f"discovery of {spec}: {exc}"
                log.warning("replica discovery of %s failed: %s", spec, exc)

    async def _databases(self, tenant: str, database: str) -> list[str]:
        if database != "*":
            return [database]
        status, raw = await self._client.call_raw("GET", f"/api/v2/tenants/{tenant}/databases")
        if status != 200:
            raise RuntimeError(f"listing databases answered {status}")
        return [db["name"] for db in orjson.loads(raw)]

    async def _collections(self, tenant: str, database: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while True:
            path = f"/api/v2/tenants/{tenant}/databases/{database}/collections"
            status, raw = await self._client.call_raw(
                "GET", f"{path}?limit=100&offset={len(found)}"
            )
            if status != 200:
                raise RuntimeError(f"listing collections answered {status}")
            page = orjson.loads(raw)
            found += page
            if len(page) < 100:
                return found

    async def _worker(self) -> None:
        while True:
            collection_id = await self._queue.get()
            self._queued.discard(collection_id)
            if collection_id not in self._where:
                continue
            self.building = collection_id
            try:
                await self._rebuild(collection_id)
                self._failures.pop(collection_id, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(collection_id, exc)
            finally:
                self.building = None

    async def _ticker(self) -> None:
        """Refresh replicas that are older than refresh_interval_s; build what other
        processes asked for (ask_for)."""
        while True:
            await asyncio.sleep(1.0)
            oldest = time.time() - self._settings.refresh_interval_s
            for cid, built_at in list(self._built_at.items()):
                if built_at < oldest and cid in self._where:
                    self.request(cid, *self._where[cid])
            try:
                wanted = await asyncio.to_thread(take_wanted, self._settings.store)
            except OSError as exc:
                log.warning("reading on-demand requests from the store failed: %s", exc)
                continue
            for want in wanted:
                if want.rebuild or want.collection_id not in self._where:
                    log.info("collection %s asked for by another process", want.collection_id)
                    self.request(
                        want.collection_id,
                        want.tenant,
                        want.database,
                        hnsw=want.hnsw,
                        even_if_building=want.rebuild,
                    )

    def _failed(self, collection_id: str, exc: Exception) -> None:
        count = self._failures.get(collection_id, 0) + 1
        self._failures[collection_id] = count
        delay = min(self._settings.retry_backoff_s * 2 ** (count - 1), 300.0)
        self.last_error = f"{collection_id}: {exc}"
        log.warning(
            "rebuild of %s failed (%s); the serving replica is unchanged; retry in %.0fs",
            collection_id,
            exc,
            delay,
        )
        self._on_build("error", 0.0, 0)
        where = self._where.get(collection_id)
        if where is not None:
            asyncio.get_running_loop().call_later(delay, self.request, collection_id, *where)

    # --- one rebuild ------------------------------------------------------------------------

    async def _rebuild(self, collection_id: str) -> None:
        started = time.monotonic()
        tenant, database = self._where[collection_id]
        covers = self._write_seq(collection_id)  # writes acknowledged before the export starts
        path = f"/api/v2/tenants/{tenant}/databases/{database}/collections/by-id/{collection_id}"
        status, raw = await self._client.call_raw("GET", path)
        if status in (400, 404):
            # 404: deleted. 400: the names it was asked under are invalid (a read of
            # databases/0/collections/ID asks for a replica on demand); asking again cannot
            # change either, and retrying kept every such id, forever, with a retry timer.
            log.info("collection %s not found (%d); dropping its replica", collection_id, status)
            self.forget(collection_id)
            return
        if status != 200:
            raise RuntimeError(f"collection lookup answered {status}")
        model = orjson.loads(raw)
        export = await self._export(model)
        s = self._settings
        replica = await asyncio.to_thread(
            build_and_publish,
            export,
            s.store,
            self._client.base_url,
            covers,
            s.build_threads,
            self._overrides.get(collection_id),
            s.validate,
            s.write_ledger,
        )
        if collection_id not in self._where:  # deleted while we were building
            return
        self._built_at[collection_id] = replica.manifest.created_at
        if s.serve:
            self._replicas.swap(replica if self.adopt is None else await self.adopt(replica))
        seconds = time.monotonic() - started
        self._on_build("ok", seconds, replica.n)
        log.info(
            "replica %s (%s) generation %d %s: %d rows, built in %.1fs",
            model["name"],
            collection_id,
            replica.generation,
            "serving" if s.serve else "published",
            replica.n,
            seconds,
        )
        del replica  # a builder keeps nothing in memory
        await asyncio.to_thread(prune, s.store, collection_id, s.keep_snapshots)

    async def _export(self, model: dict[str, Any]) -> Export:
        for attempt in range(1, EXPORT_ATTEMPTS + 1):
            try:
                return await export_collection(
                    self._client, model, self._settings.page_rows, self._settings.export_concurrency
                )
            except ExportChanged as exc:
                if attempt == EXPORT_ATTEMPTS:
                    raise
                log.info("export changed under us (%s); exporting again", exc)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _load_store(self) -> None:
        """At start-up: the newest valid snapshot of each collection, loaded one at a time in
        a worker thread and served at once; each is then rebuilt (it may be stale). A builder
        only checks and notes what is there."""
        store = self._settings.store
        for snapshots in await asyncio.to_thread(newest_snapshots, store):
            for snapshot in snapshots:
                manifest = await self._open(snapshot)
                if manifest is not None:
                    cid, model = manifest.collection_id, manifest.collection
                    self._built_at[cid] = manifest.created_at
                    self.request(cid, model["tenant"], model["database"])
                    break

    async def _open(self, snapshot: Path) -> Manifest | None:
        """Check (builder) or load and serve (standalone) one snapshot; None if refused."""
        try:
            if not self._settings.serve:
                return await asyncio.to_thread(verify, snapshot)
            replica = await asyncio.to_thread(open_snapshot, snapshot, self._settings.validate)
        except (SnapshotError, OSError, RuntimeError, ValueError) as exc:
            log.error("refusing snapshot %s: %s", snapshot, exc)
            return None
        self._replicas.swap(replica)
        return replica.manifest


def newest_snapshots(store: Path) -> list[list[Path]]:
    """Per collection directory of the store, its published snapshots, newest first."""
    if not store.is_dir():
        return []
    return [
        generations(store, d.name)
        for d in sorted(store.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    ]


@dataclass(frozen=True, slots=True)
class Wanted:
    """A request left in the store by a process that cannot build (ask_for)."""

    collection_id: str
    tenant: str
    database: str
    rebuild: bool = False  # an admin rebuild: build even if replicated (else only if not)
    hnsw: dict[str, int] | None = None


def ask_for(store: Path, wanted: Wanted) -> None:
    """Blocking: ask the process that builds for this store for a replica of a collection,
    or (``rebuild``) for a new one now."""
    directory = store / WANTED
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{wanted.collection_id}.{os.getpid()}.tmp"
    body = {"tenant": wanted.tenant, "database": wanted.database, "rebuild": wanted.rebuild}
    tmp.write_bytes(orjson.dumps({**body, "hnsw": wanted.hnsw}))
    os.replace(tmp, directory / wanted.collection_id)


def take_wanted(store: Path) -> list[Wanted]:
    """Blocking: the requests ask_for left, removed as they are read. Anything malformed is
    dropped (and logged)."""
    directory = store / WANTED
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        if entry.name.startswith("."):
            continue
        try:
            raw = orjson.loads(entry.read_bytes())
            hnsw = raw.get("hnsw")
            wanted = Wanted(
                entry.name,
                str(raw["tenant"]),
                str(raw["database"]),
                raw.get("rebuild") is True,
                {str(k): int(v) for k, v in hnsw.items()} if hnsw else None,
            )
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            wanted = None
        entry.unlink(missing_ok=True)
        if wanted is not None and _UUID.fullmatch(entry.name):
            found.append(wanted)
        else:
            log.warning("dropping a malformed request %s from the store", entry)
    return found
