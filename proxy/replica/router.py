"""ReplicaRouter: what the request path needs of the replicas, in one object.

It finds the replica a request addresses, decides the consistency level, and keeps the write
bookkeeping (WriteTracker, rebuild requests, dropping replicas of deleted collections) that the
consistency gate relies on.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from index.holder import ReplicaSet
from index.live import LiveView
from index.replica import ReplicaIndex
from proxy.config import Config
from proxy.errors import BadRequest
from proxy.replica.batching import SearchBatcher
from proxy.replica.consistency import (
    PENDING,
    Level,
    LogMarks,
    Writes,
    WriteTracker,
    replica_may_answer,
)
from proxy.replica.overlay import Ticket, WriteOverlay
from proxy.routes import Route
from sync.follower import StoreFollower
from sync.logstream import BuilderLog
from sync.scheduler import RebuildScheduler
from sync.tailer import StorageTailer

log = logging.getLogger(__name__)

CONSISTENCY_HEADER = "X-Proxy-Consistency"
_UUID = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
# Do not ask the primary again for a collection it just said does not exist.
_MISSING_TTL_S = 30.0
# Where replicas come from: this process' own builds, or a builder's store (role replica).
ReplicaSource = RebuildScheduler | StoreFollower | StorageTailer


@dataclass(slots=True)
class WriteToken:
    """What a forwarded write touched, to be settled when its response is in."""

    route: Route
    collection_id: str | None
    ticket: Ticket | None = None  # export mode: the write will be applied locally
    applied: bool = False


class ReplicaRouter:
    def __init__(
        self,
        config: Config,
        scheduler_factory: Callable[[ReplicaRouter], ReplicaSource],
        check_deadline: Callable[[float], None],
        writes: Writes | None = None,
    ) -> None:
        self.config = config
        self.replicas = ReplicaSet()
        # Shared with the other worker processes when there are several (proxy/ops/ledger.py).
        self.tracker: Writes = WriteTracker() if writes is None else writes
        self._default_level = Level(config.consistency)
        self.scheduler = scheduler_factory(self)
        # One thread per admitted search slot (proxy/access/admission.py SearchGate).
        self.executor = ThreadPoolExecutor(
            max_workers=config.search_slots, thread_name_prefix="replica-search"
        )
        self._missing: dict[str, float] = {}
        # Export mode, where this process builds its replicas: its own writes applied to them.
        self.overlay: WriteOverlay | None = None
        if isinstance(self.scheduler, RebuildScheduler) and config.export_overlay_max_rows:
            self.overlay = WriteOverlay(
                self.replicas,
                self.tracker,
                # One thread: a write's apply never competes with another's for the graph.
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="replica-writes"),
                config.export_overlay_max_rows,
                self._compact,
            )
            self.scheduler.adopt = self.overlay.adopt
        self.log_marks = LogMarks()  # storage mode: see caught_up
        self._learning: set[asyncio.Task[None]] = set()
        self.batcher = SearchBatcher(
            self.executor,
            config.search_slots,
            config.search_batch_max,
            config.exact_search_max_rows,
            check_deadline,
        )

    async def close(self) -> None:
        await asyncio.to_thread(self.executor.shutdown, wait=True)
        if self.overlay is not None:
            await asyncio.to_thread(self.overlay.close)

    # --- reads --------------------------------------------------------------------------------

    def replica_for(self, route: Route) -> ReplicaIndex | None:
        if route.collection is None:
            return None
        if route.op == "get_collection":
            return self.replicas.find_by_name(
                route.tenant or "", route.database or "", route.collection
            )
        replica = self.replicas.get(route.collection)
        if replica is None and self.config.replicate_on_demand:
            self._request_on_demand(route)
        return replica

    def _request_on_demand(self, route: Route) -> None:
        cid = route.collection or ""
        if not _UUID.fullmatch(cid) or route.tenant is None or route.database is None:
            return
        if self.scheduler.wants(cid) or time.monotonic() < self._missing.get(cid, 0.0):
            return
        self._missing[cid] = time.monotonic() + _MISSING_TTL_S
        self.scheduler.request(cid, route.tenant, route.database)

    def level(self, request: web.Request) -> Level:
        sent = request.headers.get(CONSISTENCY_HEADER)
        if sent is None:
            return self._default_level
        try:
            return Level(sent.strip().lower())
        except ValueError:
            raise BadRequest(
                f"{CONSISTENCY_HEADER} must be one of strong, session, bounded, eventual"
            ) from None

    def fresh_enough(self, replica: ReplicaIndex, level: Level, age_s: float) -> bool:
        if isinstance(replica, LiveView) and replica.follows_log:  # caught_up() saw to it
            return level is Level.EVENTUAL or age_s <= self.config.max_staleness_s
        return replica_may_answer(
            level,
            covers_seq=replica.covers_write_seq,
            cut_at=replica.manifest.created_at,
            tracker=self.tracker,
            collection_id=replica.collection_id,
            age_s=age_s,
            max_staleness_s=self.config.max_staleness_s,
            withheld=0 if self.overlay is None else self.overlay.withheld(replica.collection_id),
        )

    def _log(self) -> StorageTailer | BuilderLog | None:
        """Where a storage-mode replica's log position comes from: this process' tailer, or
        the builder it follows (role replica with builder_url)."""
        scheduler = self.scheduler
        if isinstance(scheduler, StorageTailer):
            return scheduler
        return scheduler.log if isinstance(scheduler, StoreFollower) else None

    async def caught_up(self, view: LiveView, level: Level) -> ReplicaIndex | None:
        """Storage mode: the collection's current view once it has applied every write the
        level requires, or None if that takes longer than storage_wait_s (forward).

        strong: every write the primary has acknowledged, learned from its log now.
        session: every write this proxy forwarded to the collection (its log mark, or the log
        read now while the mark is being learned); writes by others are at most one poll
        behind. bounded, eventual: as is."""
        scheduler = self._log()
        cid = view.collection_id
        if level is Level.EVENTUAL or level is Level.BOUNDED:
            return view
        if scheduler is None:
            return None
        current = self.replicas.get(cid)
        if not isinstance(current, LiveView) or not current.follows_log:  # dropped meanwhile
            return None
        target = self._session_target(current) if level is Level.SESSION else PENDING
        if target is None:
            return current
        if target == PENDING:
            try:
                target = await scheduler.position_now()
            except (OSError, RuntimeError, ValueError, aiohttp.ClientError) as exc:
                # A builder that does not answer (or a database that cannot be read): the
                # primary answers instead.
                log.warning("the log's newest position is unknown (%s): forwarding", exc)
                return None
        if current.position >= target:
            return current
        if not await scheduler.wait_applied(cid, target, self.config.storage_wait_s):
            return None
        return self.replicas.get(cid)

    def _session_target(self, current: LiveView) -> int | None:
        """The log position a session read must see (PENDING: look it up), None for none."""
        cid = current.collection_id
        if self.tracker.busy(cid):
            # A write is in flight: its answer may already have reached its client (the
            # response is streamed before the books are closed), so it must be visible.
            return PENDING
        mark = self.log_marks.mark(cid)
        written_at = self.tracker.last_write_at(cid)  # across worker processes too
        if isinstance(mark, tuple) and written_at <= mark[1]:
            return mark[0]
        if mark is None and written_at < current.owner.confirmed_at:
            return None  # no write since the tailer last confirmed it had everything
        return PENDING

    def _learn_mark(self, cid: str) -> None:
        """After a write's answer, in the background: the log position that covers it."""
        scheduler = self._log()
        if scheduler is None:
            return
        self.log_marks.wrote(cid)

        async def learn() -> None:
            started = time.time()
            try:
                position: int | None = await scheduler.position_now()
            except Exception as exc:  # reads then look the log up themselves
                log.warning("reading the primary's log position failed: %s", exc)
                position = None
            self.log_marks.learned(cid, position, started)

        task = asyncio.create_task(learn())
        self._learning.add(task)
        task.add_done_callback(self._learning.discard)

    # --- writes -------------------------------------------------------------------------------

    def applies_writes(self, route: Route) -> bool:
        """Whether a write's body is read first, to be applied to the replica (overlay.py)."""
        return (
            self.overlay is not None
            and route.op in ("add", "upsert", "update", "delete")
            and route.collection is not None
            and self.replicas.get(route.collection) is not None
        )

    def begin_write(self, route: Route, body: object = None, applies: bool = False) -> WriteToken:
        """Before a write is forwarded: mark the collection busy so reads go to the primary."""
        cid = self._written_collection(route)
        token = WriteToken(route, cid)
        if cid is not None:
            if self.overlay is not None and applies:  # applies_writes(): body parsed
                token.ticket = self.overlay.begin(route, body)
            elif self.overlay is not None:
                self.overlay.end(cid, "other_write", route.op)
            self.tracker.begin(cid)
        return token

    async def settle(self, token: WriteToken, status: int | None) -> None:
        """Export mode, once the primary answered a write with a ticket: apply it locally."""
        if token.ticket is not None and self.overlay is not None:
            token.applied = await self.overlay.settle(token.ticket, status)

    def end_write(self, token: WriteToken, status: int | None = None) -> None:
        """After the primary answered ``status`` (None: no answer): the write may have been
        applied. Replicas a reset or a delete removed are dropped unless the primary refused
        it (a refused reset, say with allow_reset off, would otherwise drop every replica)."""
        if token.ticket is not None and not token.applied and self.overlay is not None:
            self.overlay.abandon(token.ticket)
        if status is None or status < 400:
            self._drop_removed(token)
        self.tracker.end(token.collection_id)
        if token.ticket is not None and token.applied and self.overlay is not None:
            self.overlay.counted(token.ticket)
        if token.collection_id is None:
            return
        if token.route.op != "delete_collection" and not token.applied:
            self.scheduler.notify_write(token.collection_id)
            if self._log() is not None:
                self._learn_mark(token.collection_id)

    def _drop_removed(self, token: WriteToken) -> None:
        route = token.route
        if route.op == "reset":
            for replica in self.replicas:
                self._forget(replica.collection_id)
            self.tracker.bump_all()
        elif route.op == "delete_database":
            for gone in self.replicas.drop_where(route.tenant, route.database):
                self._forget(gone)
            self.tracker.bump_all()
        elif route.op == "delete_collection" and token.collection_id is not None:
            self._forget(token.collection_id)

    def _forget(self, cid: str) -> None:
        if self.overlay is not None:
            self.overlay.end(cid, "collection_gone")
        self.scheduler.forget(cid)

    def _compact(self, cid: str) -> None:
        """The overlay passed its bound: rebuild (adopted with the writes since, overlay.py)."""
        scheduler = self.scheduler
        if isinstance(scheduler, RebuildScheduler) and scheduler.wants(cid):
            scheduler.request(cid, *scheduler.where(cid), even_if_building=False)

    def _written_collection(self, route: Route) -> str | None:
        if route.collection is None:
            return None
        if route.op == "delete_collection":  # addressed by name
            replica = self.replicas.find_by_name(
                route.tenant or "", route.database or "", route.collection
            )
            return None if replica is None else replica.collection_id
        return route.collection
