"""StorageTailer: storage mode. Replicas follow the primary's own files and log.

Where the proxy can read the primary's persist directory (the embedded primary, or a sidecar
with the volume mounted read-only), a replica is the primary's HNSW segment plus its log tail
(sync/take.py, index/live.py), and this tailer keeps it current:

* every poll_interval_s (or at once when a read is waiting for it) SQLite's data_version says
  whether anything changed; if so, one short statement reads the log rows after the last
  position, and they are replayed into each followed collection's replica;
* whatever breaks continuity takes the collection again from storage, never patched over:
  rows purged before they were read (the primary deletes a collection's rows below its last
  flush), a take or catch-up that raced a flush, a row that cannot be replayed, an overlay
  past its bound. Each reason is logged and counted; the old replica keeps serving reads that
  accept its age meanwhile. A row in an unknown vector encoding stops the collection's local
  reads (forwarded). Seqs reused after the newest collection was deleted are read again from
  the last row of a surviving collection (_rewind);
* strong and session reads learn the log's position (position_now) and wait until the replica
  has applied it (wait_applied), so they are answered locally too.

It has the scheduler's interface (proxy/replica/router.py uses either). It never sends the primary a
request: everything comes from the files, through SQLite's API for the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from index.holder import ReplicaSet
from index.live import LiveReplica, Op
from index.snapshot import prune

from .published import publish_take
from .storage import (
    CollectionRow,
    LogGap,
    LogRow,
    StorageError,
    check_schema,
    connect,
    list_collections,
    queue_max,
    queue_tops,
    read_queue_after,
    segment_seq,
    segment_seqs,
)
from .take import UnknownEncoding, decode, take
from .waiting import serves_position, until

log = logging.getLogger(__name__)

DATABASE = "chroma.sqlite3"
# Log rows read per statement; more are read in the next round of the same poll.
ROWS_PER_READ = 5000
RetakeObserver = Callable[[str], None]  # the reason
# A builder keeps every log row applied since its last published take, for replicas to fetch;
# past this many it takes (and publishes) the collection again.
JOURNAL_MAX_ROWS = 50_000
T = TypeVar("T")


@dataclass(slots=True)
class Followed:
    """One collection this tailer keeps a replica of."""

    tenant: str
    database: str
    row: CollectionRow | None = None
    live: LiveReplica | None = None
    taking: bool = False
    take_again: bool = False  # the log was reset under a take in progress
    failed: str | None = None
    retakes: Counter[str] = field(default_factory=Counter)
    # A builder (publish_to set): the generation of the published take ``live`` started
    # from, and every log row applied since, in order, for replicas elsewhere (ops_since).
    published: int | None = None
    journal: list[Op] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TailerSettings:
    persist: Path  # the primary's persist directory
    scratch: Path  # where segment copies are made (under the proxy's data_dir)
    replicate: tuple[str, ...]  # "tenant/database" ("*" database = all of the tenant's)
    poll_interval_s: float = 0.1
    # Rows changed since a take before the collection is taken again (compaction): every
    # view copies the overlay's records into a small column table, so it must stay small.
    overlay_max_rows: int = 5000
    # A builder: publish every take to this snapshot store, keep this many generations.
    publish_to: Path | None = None
    keep_snapshots: int = 2


def _untraced(fn: Callable[..., T], *args: Any) -> T:
    """Run a take with the cyclic garbage collector paused, then move what it made out of the
    collector's sight. A take allocates a million-odd container objects (records, metadata,
    columns), and the collections they trigger scan every tracked object while holding the
    GIL: growing stalls of the event loop, 20 ms rising to 170 ms over a 100k take. With
    the collector paused and the result frozen the longest stall was under 50 ms and the
    take a quarter faster. The replica's objects form no cycles: reference counting frees them
    when it is replaced, frozen or not."""
    gc.disable()
    try:
        return fn(*args)
    finally:
        gc.freeze()
        gc.enable()


class StorageUnusable(RuntimeError):
    """Storage mode was asked for (replica_source storage) and the primary's persist
    directory cannot be followed; the proxy does not start."""


def storage_problem(persist: Path) -> str | None:
    """Why storage mode cannot follow the primary in ``persist`` (None: it can). Blocking."""
    path = persist / DATABASE
    if not path.is_file():
        return f"no Chroma database at {path}"
    try:
        conn = connect(path)
        try:
            check_schema(conn)
        finally:
            conn.close()
    except (StorageError, sqlite3.Error) as exc:
        return f"{path}: {exc}"
    return None


class StorageTailer:
    def __init__(
        self,
        replicas: ReplicaSet,
        settings: TailerSettings,
        on_retake: RetakeObserver | None = None,
    ) -> None:
        self._replicas = replicas
        self._settings = settings
        self._on_retake = on_retake or (lambda reason: None)
        self._followed: dict[str, Followed] = {}
        self._position = 0  # every log row up to here is applied to every followed replica
        self._newest = 0  # the newest log seq seen (position_now, or a poll)
        # The newest seq read of each topic, to tell where seqs may be reused (_rewind).
        self._topic_seq: dict[str, int] = {}
        self._data_seen: tuple[int, int] | None = None
        self._kick = asyncio.Event()
        self._applied = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn: sqlite3.Connection | None = None
        self._conn_lock = threading.Lock()  # one statement at a time on the connection
        self._takes = asyncio.Semaphore(1)  # one take at a time: they compete for the CPU
        # Polls, takes and position look-ups (one each at a time, at most).
        self._executor = ThreadPoolExecutor(max_workers=3, thread_name_prefix="storage")
        self.building: str | None = None
        self.last_error: str | None = None
        self.ready = False
        self.polls = 0
        self.seq_resets = 0  # times the log's newest seqs were deleted (and will be reused)

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> StorageTailer:
        self._spawn(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A cancelled task's blocking call goes on in its thread: wait for it to finish.
        await asyncio.to_thread(self._executor.shutdown, True)
        if self._conn is not None:
            self._conn.close()

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the tailer's own threads. Not asyncio.to_thread: on the way out those
        threads must have finished with the SQLite connection and the hnswlib graphs before
        either is closed or freed (a take left running into interpreter shutdown crashed the
        process)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self._settings.persist / DATABASE)
            check_schema(self._conn)
        return self._conn

    def _sql(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Blocking: run ``fn`` on the read-only connection (one caller at a time)."""
        with self._conn_lock:
            return fn(self._db())

    async def _run(self) -> None:
        try:
            await self._start()
        except Exception as exc:
            self.last_error = f"storage mode: {exc}"
            log.exception("storage mode could not start; reads are forwarded")
        self.ready = True
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self._settings.poll_interval_s)
            self._kick.clear()
            try:
                await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed poll logs and tries again next time
                self.last_error = f"poll: {exc}"
                log.exception("reading the primary's log failed")
                await asyncio.sleep(1.0)

    async def _start(self) -> None:
        self._topic_seq = await self._blocking(self._sql, queue_tops)
        self._position = max(self._topic_seq.values(), default=0)
        rows = await self._blocking(self._sql, list_collections)
        for spec in self._settings.replicate:
            tenant, _, database = spec.partition("/")
            for row in rows:
                if row.tenant == tenant and database in ("*", row.database):
                    self.request(row.id, row.tenant, row.database)
        # Loaded one after another, before /readyz says ready.
        for cid in list(self._followed):
            await self._take(cid, "start")

    # --- the scheduler's interface ----------------------------------------------------------

    def request(self, collection_id: str, tenant: str, database: str, **_: Any) -> None:
        """Follow a collection (on demand, or at start-up); taken in the background."""
        if collection_id in self._followed:
            return
        self._followed[collection_id] = Followed(tenant, database)
        if self.ready:
            self._spawn(self._take(collection_id, "on_demand"))

    def retake(self, collection_id: str) -> bool:
        """Take a followed collection again from storage now (the admin API's rebuild)."""
        if collection_id not in self._followed:
            return False
        self._spawn(self._take(collection_id, "admin"))
        return True

    def wants(self, collection_id: str) -> bool:
        return collection_id in self._followed

    def known(self) -> list[str]:
        return list(self._followed)

    def notify_write(self, collection_id: str) -> None:
        """A write went through the proxy: look at the log now rather than at the next tick."""
        self._kick.set()

    def forget(self, collection_id: str) -> None:
        self._followed.pop(collection_id, None)
        self._replicas.drop(collection_id)
        if self._settings.publish_to is not None:  # replicas elsewhere drop it too
            shutil.rmtree(self._settings.publish_to / collection_id, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        return {
            "mode": "storage",
            "persist_path": str(self._settings.persist),
            "position": self._position,
            "lag_s": round(self.gauges()["lag_s"], 3),
            "polls": self.polls,
            "seq_resets": self.seq_resets,
            "last_error": self.last_error,
            "collections": {
                cid: {
                    "position": None if f.live is None else f.live.position,
                    "overlay_rows": None if f.live is None else f.live.overlay_rows,
                    "taking": f.taking,
                    "failed": f.failed,
                    "retakes": dict(f.retakes),
                }
                for cid, f in self._followed.items()
            },
        }

    def gauges(self) -> dict[str, Any]:
        """For /metrics (proxy/ops/metrics.py StorageCollector)."""
        oldest = min(
            (f.live.confirmed_at for f in self._followed.values() if f.live is not None),
            default=time.time(),
        )
        return {
            "position": self._position,
            "lag_s": max(0.0, time.time() - oldest),
            "collections": [
                (cid, f.live.overlay_rows, max(0, self._newest - f.live.position))
                for cid, f in self._followed.items()
                if f.live is not None
            ],
        }

    # --- consistency: what strong and session reads wait for --------------------------------

    async def position_now(self) -> int:
        """The log's newest seq right now (one short statement): every write the primary has
        acknowledged is at or below it."""
        found: int = await self._blocking(self._sql, queue_max)
        self._newest = max(self._newest, found)
        return found

    async def wait_applied(self, collection_id: str, seq: int, timeout_s: float) -> bool:
        """Wait until the collection's replica includes log position ``seq``; False on time out
        (or when it is not followed). The tailer polls at once instead of at its next tick."""
        return await until(
            self._applied,
            partial(serves_position, self._replicas, collection_id, seq),
            timeout_s,
            give_up=lambda: collection_id not in self._followed,
            nudge=self._kick.set,
        )

    async def _notify_applied(self) -> None:
        async with self._applied:
            self._applied.notify_all()

    # --- following the log ------------------------------------------------------------------

    def _data_version(self, conn: sqlite3.Connection) -> tuple[int, int]:
        """The log's newest seq and SQLite's change counter for this connection, which moves
        when another connection commits anything (a collection dropped, say). The counter is
        refreshed only by a read, hence the query first. (A stat of the file is not enough:
        mtime is kept in kernel ticks of a few ms, and two commits within one tick that do not
        grow the file look alike.)"""
        top = queue_max(conn)
        found: int = conn.execute("PRAGMA data_version").fetchone()[0]
        return top, found

    async def _poll(self) -> None:
        self.polls += 1
        now = time.time()
        version = await self._blocking(self._sql, self._data_version)
        if version == self._data_seen:
            self._confirm(now)
            return
        rows, top, collections, seqs = await self._blocking(self._read_changes)
        by_id = {c.id: c for c in collections}
        for cid in list(self._followed):
            if cid not in by_id:
                log.info("collection %s is gone from the primary; dropping its replica", cid)
                self.forget(cid)
        if self._rewind({c.topic for c in collections}):
            return
        if top < self._position:  # rows vanished without their collection: trust nothing
            log.warning("the log's newest seq fell to %d below %d; taking every replica again",
                        top, self._position)  # fmt: skip
            self._position, self._data_seen = top, None
            for cid in list(self._followed):
                self._spawn(self._take(cid, "seq_reset"))
            return
        self._newest = max(self._newest, top)
        end = max([self._position] + [r.seq for r in rows])
        holes = (end - self._position) != len(rows)
        for cid, followed in list(self._followed.items()):
            followed.row = by_id.get(cid, followed.row)
            await self._advance(cid, followed, rows, end, holes, seqs.get(cid))
        self._position = end
        for r in rows:
            self._topic_seq[r.topic] = r.seq
        if len(rows) >= ROWS_PER_READ:
            self._kick.set()  # more to read: not caught up yet, so nothing is confirmed
        else:
            self._data_seen = version
            self._confirm(now)
        await self._notify_applied()

    def _rewind(self, topics: set[str]) -> bool:
        """After a collection was deleted: its log rows went with it, and if they were the
        newest, their seqs will be handed out again to new rows, which a tailer reading only
        after its position would never see. Every row of a surviving collection is at or
        below the newest one read of such a collection, so go back there (and read again
        what this poll read). True if it went back."""
        for gone in [t for t in self._topic_seq if t not in topics]:
            del self._topic_seq[gone]
        surviving = max(self._topic_seq.values(), default=0)
        if surviving >= self._position:
            return False
        log.info("log rows after seq %d went with a deleted collection; reading on from there",
                 surviving)  # fmt: skip
        self.seq_resets += 1
        for followed in self._followed.values():
            followed.take_again = followed.taking  # a take under way may have read past it
            if followed.live is not None and not followed.taking:
                live = followed.live
                live.position = live.view.position = min(live.position, surviving)
        self._position = surviving
        self._data_seen = None
        self._kick.set()
        return True

    def _read_changes(self) -> tuple[list[Any], int, list[CollectionRow], dict[str, int]]:
        """Blocking: new log rows, then the collections and their segments' flush points.
        Read in this order: a flush between the two is then seen as one that may have purged
        rows we did not read."""

        def read(conn: sqlite3.Connection) -> tuple[list[Any], int, list[CollectionRow], Any]:
            rows = read_queue_after(conn, self._position, ROWS_PER_READ)
            top = queue_max(conn)
            collections = list_collections(conn)
            vector_segments = {c.vector_segment: c.id for c in collections}
            seqs = {
                vector_segments[seg]: seq
                for seg, seq in segment_seqs(conn, list(vector_segments)).items()
            }
            return rows, top, collections, seqs

        result: tuple[list[Any], int, list[CollectionRow], dict[str, int]] = self._sql(read)
        return result

    async def _advance(
        self,
        cid: str,
        followed: Followed,
        rows: list[Any],
        end: int,
        holes: bool,
        flushed_at: int | None,
    ) -> None:
        live = followed.live
        if live is None or followed.taking:
            return
        if holes and flushed_at is not None and flushed_at > live.position + 1:
            # The primary purges a collection's log below its last flush: rows of this
            # collection between our position and that flush may never have been read.
            self._spawn(self._take(cid, "purged"))
            return
        topic = None if followed.row is None else followed.row.topic
        try:
            ops = [decode(r) for r in rows if r.topic == topic and r.seq > live.position]
        except UnknownEncoding as exc:
            followed.failed = str(exc)
            self._replicas.drop(cid)
            log.error("collection %s: %s; its reads are forwarded", cid, exc)
            return
        if ops:
            log.debug("collection %s: applying log rows %d..%d", cid, ops[0].seq, ops[-1].seq)
            try:
                view = await self._blocking(live.apply, ops, end)
            except Exception as exc:  # the replica may be half-applied: never answer from it
                log.error("collection %s: replaying the log failed (%s); taking it again", cid, exc)
                self._replicas.drop(cid)
                followed.live = None
                self._spawn(self._take(cid, "replay_failed"))
                return
            self._replicas.swap(view)
            if followed.published is not None:
                followed.journal.extend(ops)
            too_long = len(followed.journal) > JOURNAL_MAX_ROWS
            if live.overlay_rows > self._settings.overlay_max_rows or too_long:
                self._spawn(self._take(cid, "compaction"))
        else:  # nothing for this collection: its current view holds up to ``end`` too
            live.position = live.view.position = end

    def _confirm(self, now: float) -> None:
        for followed in self._followed.values():
            if followed.live is not None and not followed.taking:
                followed.live.confirmed_at = now

    # --- takes ------------------------------------------------------------------------------

    async def _take(self, cid: str, reason: str) -> None:
        followed = self._followed.get(cid)
        if followed is None or followed.taking:
            return
        followed.taking = True
        followed.retakes[reason] += 1
        if reason not in ("start", "on_demand"):
            log.info("taking collection %s from storage again: %s", cid, reason)
            self._on_retake(reason)
        try:
            async with self._takes:
                self.building = cid
                taken = await self._take_caught_up(cid, followed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            followed.failed = f"{type(exc).__name__}: {exc}"
            self.last_error = f"{cid}: {followed.failed}"
            delay = min(0.5 * 2 ** followed.retakes["retry"], 30.0)
            log.warning("taking %s from storage failed (%s); retry in %.1fs", cid, exc, delay)
            followed.taking = False
            await asyncio.sleep(delay)
            if cid in self._followed:
                self._spawn(self._take(cid, "retry"))
            return
        finally:
            self.building = None
        live, followed.published, followed.journal = taken
        followed.live, followed.taking, followed.failed = live, False, None
        followed.retakes.pop("retry", None)  # the backoff starts again
        if cid in self._followed:
            # A view newer than any of the replaced replica's (made in the take's thread, the
            # first one could be older, and the set refuses older generations).
            self._replicas.swap(live.renew_view())
        if followed.take_again:
            followed.take_again = False
            self._spawn(self._take(cid, "seq_reset"))
        await self._notify_applied()

    async def _take_caught_up(
        self, cid: str, followed: Followed
    ) -> tuple[LiveReplica, int | None, list[Op]]:
        """A take, caught up with the log; the generation it was published as (a builder),
        and the log rows applied after it."""
        rows = await self._blocking(self._sql, list_collections)
        row = next((c for c in rows if c.id == cid), None)
        if row is None:
            raise StorageError(f"collection {cid} is not in the primary's database")
        followed.row = row
        live, generation = await self._blocking(self._take_apart, row)
        journal: list[Op] = []
        # The take ends at its own position; the tailer may be further on by now.
        while live.position < self._position:
            target = self._position
            ops = await self._blocking(self._tail_of, row, live.position, target)
            await self._blocking(live.apply, ops, target)
            journal += ops if generation is not None else []
        return live, generation, journal

    def _take_apart(self, row: CollectionRow) -> tuple[LiveReplica, int | None]:
        """Blocking: a take, on a connection of its own (the tailer's connection serves one
        statement at a time, and a take's few seconds on it would hold up every poll and
        every strong read's look at the log); published as a snapshot by a builder."""
        conn = connect(self._settings.persist / DATABASE)
        try:
            live = _untraced(take, conn, self._settings.persist, row, self._settings.scratch)
        finally:
            conn.close()
        store = self._settings.publish_to
        if store is None:
            return live, None
        directory, _ = publish_take(store, live)
        prune(store, row.id, self._settings.keep_snapshots)
        return live, int(directory.name)

    # --- the log stream (a builder, for replicas elsewhere: sync/follower.py) --------------

    async def ops_since(
        self, cid: str, generation: int, offset: int, position: int, wait_s: float
    ) -> tuple[int, list[Op], float] | None:
        """The log rows applied to a collection's published take ``generation`` from the
        ``offset``-th on, once there are some or the collection's position passed
        ``position`` (else after ``wait_s``): (position, rows, when the position was last
        confirmed current). None if that take is not the one followed (any more)."""

        def moved() -> bool:
            f = self._followed.get(cid)
            if f is None or f.published != generation or f.live is None:
                return True
            return len(f.journal) > offset or f.live.position > position

        await until(self._applied, moved, wait_s)
        f = self._followed.get(cid)
        if f is None or f.published != generation or f.live is None or offset > len(f.journal):
            return None
        return f.live.position, f.journal[offset:], f.live.confirmed_at

    def _tail_of(self, row: CollectionRow, after: int, upto: int) -> list[Op]:
        """Blocking: the collection's log rows in (after, upto], or LogGap if the primary
        flushed past ``after`` around the read (it purges the rows below a flush)."""

        def read(conn: sqlite3.Connection) -> list[LogRow]:
            before = segment_seq(conn, row.vector_segment) or 0
            found = read_queue_after(conn, after, 1 << 30, topic=row.topic)
            if max(before, segment_seq(conn, row.vector_segment) or 0) > after + 1:
                raise LogGap(f"{row.id}: the primary flushed past seq {after}; taking again")
            return found

        rows: list[LogRow] = self._sql(read)
        return [decode(r) for r in rows if r.seq <= upto]
