"""Export mode: the writes this proxy forwards, applied to its own replicas.

Without this, a write leaves the replica behind the primary until a rebuild (a full export)
covers it, and every session read of the collection is forwarded meanwhile: under a steady
trickle of writes nothing is served locally (issue 11). With it, a write's request body is
applied to the replica once the primary has acknowledged it, the way storage mode replays the
primary's log (index/live.py: one row at a time into a private copy of the graph, records in
a side table), and the replica then covers the write.

That is only right when the order of the collection's writes is known. The replica follows a
collection (a :class:`Follow`) from a replica that includes every write the proxy counted,
and goes on following only while every write to it is one this process applies:

* another write to the collection in flight anywhere (another worker process, or this one with
  ids in common or a filter) makes the order unknowable; so do two in flight together that
  may both add rows (new ids go at the end, in the order the primary happened to take them,
  which is what a get without ids returns them in);
* a write counted that this process did not apply (another worker), a failure or a lost answer
  (the primary may or may not have applied it), a body this module cannot replay.

Then the follow ends and the collection falls back to the rebuild path: reads that must see
the write go to the primary until a rebuild covers it. Writes that bypass the proxy are seen
at the next rebuild, as before.

A rebuild that lands while a collection is followed (the periodic refresh, or compaction once
the overlay passes export_overlay_max_rows) is adopted, not swapped in as it is: its export ran
while writes went on, so the rows those writes touched may be in it at any point of their
history. Each such row is copied from the followed replica, which has them right.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index.errors import NotLocal, ReplayFailed
from index.filters import Filter, parse_where, parse_where_document
from index.holder import ReplicaSet
from index.live import (
    ADD,
    DELETE,
    DOCUMENT_KEY,
    UPDATE,
    UPSERT,
    URI_KEY,
    LiveReplica,
    LiveView,
    Op,
    copied,
    replaced,
)
from index.replica import ReplicaIndex, load_index
from proxy.replica.consistency import Writes
from proxy.routes import Route

log = logging.getLogger(__name__)

_KINDS = {"add": ADD, "upsert": UPSERT, "update": UPDATE}
_RECORD_KEYS = frozenset({"ids", "embeddings", "metadatas", "documents", "uris"})
_DELETE_KEYS = frozenset({"ids", "where", "where_document", "limit"})
# An adopted rebuild copies the rows touched since its export began outside the follow's lock
# while more than this many remain, so that writes are not held up for the whole copy.
_COPY_UNLOCKED_ABOVE = 64
_COPY_ROUNDS = 4
# Per write applied: (write counter, ids it touched, ids it deleted).
Journal = list[tuple[int, frozenset[str], frozenset[str]]]


@dataclass(frozen=True, slots=True)
class Planned:
    """A write's effect, decoded from its request body before it is forwarded."""

    ops: list[Op]
    ids: frozenset[str] | None  # None: a delete by filter, resolved when it is applied
    delete_ids: list[str] | None = None  # a delete by filter: its ids, if given
    delete_filters: list[Filter] = field(default_factory=list)


def plan_write(op: str, body: object) -> Planned:
    """The ops a write's parsed body means (NotLocal: not one this module replays exactly)."""
    if not isinstance(body, dict):
        raise NotLocal("body is not an object")
    if op == "delete":
        return _plan_delete(body)
    kind = _KINDS.get(op)
    if kind is None or not set(body) <= _RECORD_KEYS:
        raise NotLocal(f"{op} is not replayed")
    ids = _ids(body.get("ids"))
    n = len(ids)
    vectors = _vectors(body.get("embeddings"), n)
    if vectors is None and kind != UPDATE:
        raise NotLocal("an insert without embeddings")
    metadatas = _column(body.get("metadatas"), n, dict)
    documents = _column(body.get("documents"), n, str)
    uris = _column(body.get("uris"), n, str)
    ops = []
    for i, rid in enumerate(ids):
        meta = _metadata(metadatas[i], kind)
        meta[DOCUMENT_KEY], meta[URI_KEY] = documents[i], uris[i]
        ops.append(Op(0, kind, rid, None if vectors is None else vectors[i], meta))
    return Planned(ops, frozenset(ids))


def _plan_delete(body: dict[str, Any]) -> Planned:
    if not set(body) <= _DELETE_KEYS or body.get("limit") is not None:
        raise NotLocal("a delete with a limit is not replayed")
    ids = None if body.get("ids") is None else _ids(body["ids"])
    filters = []
    if body.get("where") is not None:
        filters.append(parse_where(body["where"]))
    if body.get("where_document") is not None:
        filters.append(parse_where_document(body["where_document"]))
    if filters:
        return Planned([], None, ids, filters)
    ids = ids or []  # neither ids nor a filter: nothing is deleted (chroma-wire.md 5)
    return Planned([Op(0, DELETE, rid, None, {}) for rid in ids], frozenset(ids))


def _ids(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(i, str) and i for i in value):
        raise NotLocal("ids must be non-empty strings")
    if len(set(value)) != len(value):
        raise NotLocal("an id twice in one write")
    return value


def _vectors(value: object, n: int) -> list[np.ndarray[Any, np.dtype[np.float32]]] | None:
    """Embeddings as sent: base64 of little-endian float32 (what the clients send after the
    pre-flight check) or number lists (chroma-wire.md 2.1)."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n:
        raise NotLocal("embeddings do not match ids")
    out = []
    for v in value:
        if isinstance(v, str):
            try:
                out.append(np.frombuffer(base64.b64decode(v, validate=True), "<f4"))
            except (binascii.Error, ValueError):
                raise NotLocal("an embedding that is not base64 float32") from None
        elif isinstance(v, list) and all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in v
        ):
            out.append(np.asarray(v, np.float32))
        else:
            raise NotLocal("an embedding that is neither base64 nor numbers")
    return [np.ascontiguousarray(v, np.float32) for v in out]


def _column(value: object, n: int, kind: type) -> list[Any]:
    if value is None:
        return [None] * n
    if not isinstance(value, list) or len(value) != n:
        raise NotLocal("a column that does not match ids")
    if not all(v is None or isinstance(v, kind) for v in value):
        raise NotLocal("a column value of another type")
    return value


def _metadata(meta: dict[str, Any] | None, kind: int) -> dict[str, Any]:
    """A row's metadata as a log row holds it: user keys, None for "delete this key"."""
    out: dict[str, Any] = {}
    for key, value in (meta or {}).items():
        if key.startswith("chroma:") or isinstance(value, dict):
            raise NotLocal("a metadata key or value the primary may refuse")
        if value == []:
            if kind != ADD:  # an add drops the key (chroma-wire.md 5); otherwise unknown
                raise NotLocal("an empty list in an update")
            continue
        if isinstance(value, list) and len({type(x) for x in value}) > 1:
            raise NotLocal("a list of mixed types")
        out[key] = value
    return out


@dataclass(eq=False)
class Follow:
    """One collection whose replica this process keeps up with its own writes."""

    covered: int  # the write counter (consistency.Writes.seq) the replica includes
    start: int  # covered when the follow began: the journal holds every write after it
    live: LiveReplica | None = None  # made from the snapshot on the first write
    # Writes in flight: their ids (None: a delete by filter) and whether they may add rows.
    pending: dict[int, tuple[frozenset[str] | None, bool]] = field(default_factory=dict)
    # Writes applied whose count (Writes.end) is still to come: the handler counts a write
    # after settle() returned, and another write's settle may run in between.
    uncounted: int = 0
    journal: Journal = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True, slots=True)
class Ticket:
    """A write being forwarded that its follow will apply once the primary acknowledged it."""

    collection_id: str
    follow: Follow
    planned: Planned
    key: int


class WriteOverlay:
    def __init__(
        self,
        replicas: ReplicaSet,
        writes: Writes,
        executor: ThreadPoolExecutor,
        max_rows: int,
        compact: Callable[[str], None],
    ) -> None:
        self._replicas = replicas
        self._writes = writes
        self._executor = executor
        self._max_rows = max_rows
        self._compact = compact  # asks for a rebuild of a collection
        self._follows: dict[str, Follow] = {}
        self._keys = 0
        self.ended: dict[str, int] = {}  # follows ended, by reason (for /admin/status)

    def close(self) -> None:
        """Blocking: wait for an apply under way (hnswlib must not be freed mid-insert)."""
        self._executor.shutdown(wait=True)

    def withheld(self, collection_id: str) -> int:
        """Writes to the collection in flight whose answers wait until the replica includes
        them (or the follow ends): reads need not wait for those."""
        follow = self._follows.get(collection_id)
        return 0 if follow is None else len(follow.pending) + follow.uncounted

    # --- the write path -----------------------------------------------------------------------

    def begin(self, route: Route, body: object) -> Ticket | None:
        """Before a write (``body``: its parsed JSON) is forwarded and counted: a ticket if
        its effect will be applied locally, else None (and any follow of the collection
        ends)."""
        cid = route.collection
        if cid is None:
            return None
        try:
            planned = plan_write(route.op, body)
        except NotLocal as exc:
            self.end(cid, "not_replayable", str(exc))
            return None
        follow = self._follows.get(cid) or self._start(cid)
        if follow is None:
            return None
        if not self._only_mine(cid, follow, 0):
            return None
        if not _disjoint(planned.ids, [ids for ids, _ in follow.pending.values()]):
            self.end(cid, "concurrent_write", "concurrent writes to the same rows")
            return None
        adds = _may_add(route.op, planned.ids, follow.live)
        if adds and any(other for _, other in follow.pending.values()):
            self.end(cid, "concurrent_write", "concurrent writes adding rows (order unknown)")
            return None
        self._keys += 1
        follow.pending[self._keys] = (planned.ids, adds)
        return Ticket(cid, follow, planned, self._keys)

    def _only_mine(self, cid: str, follow: Follow, unsettled: int) -> bool:
        """Every write counted is applied, and every one in flight is this follow's (its
        pending ones plus ``unsettled``); else the follow ends."""
        writes = self._writes
        counted = writes.seq(cid) + follow.uncounted == follow.covered
        in_flight = len(follow.pending) + unsettled + follow.uncounted
        if counted and writes.in_flight(cid) == in_flight:
            return True
        detail = (
            f"counter {writes.seq(cid)} + {follow.uncounted} uncounted, applied "
            f"{follow.covered}; {writes.in_flight(cid)} in flight, {in_flight} this one's"
        )
        self.end(cid, "foreign_write", detail)
        return False

    def _start(self, cid: str) -> Follow | None:
        """Follow a collection whose replica includes every write counted and none in flight."""
        replica = self._snapshot(cid)
        if replica is None:
            return None
        covers = replica.covers_write_seq
        if covers < 0 or covers != self._writes.seq(cid) or self._writes.busy(cid):
            return None
        follow = self._follows[cid] = Follow(covers, covers)
        return follow

    def _snapshot(self, cid: str) -> ReplicaIndex | None:
        """The collection's serving replica if it is a snapshot on disk (its graph can be
        copied from there), not a view already following writes."""
        replica = self._replicas.get(cid)
        if replica is None or isinstance(replica, LiveView) or replica.directory is None:
            return None
        return replica

    async def settle(self, ticket: Ticket, status: int | None) -> bool:
        """After the primary answered ``status`` (None: no answer), before the write is
        counted: True if the replica now includes it. The write stays pending until it is
        applied: writes begun meanwhile must still see it in flight, and its rows taken."""
        cid, follow = ticket.collection_id, ticket.follow
        if self._follows.get(cid) is not follow:
            follow.pending.pop(ticket.key, None)
            return False
        if status is None or not 200 <= status < 300:
            # A failure may have been applied in part, or not at all; a 4xx almost surely
            # was not, but counting it needs a new view for nothing: rebuild instead.
            self.abandon(ticket, f"the primary answered {status}")
            return False
        async with follow.lock:
            if self._follows.get(cid) is not follow or not self._only_mine(cid, follow, 0):
                follow.pending.pop(ticket.key, None)
                return False
            loop = asyncio.get_running_loop()
            try:
                view, touched = await loop.run_in_executor(
                    self._executor, self._apply, cid, follow, ticket.planned
                )
            except (NotLocal, ReplayFailed, OSError, RuntimeError, ValueError) as exc:
                self.abandon(ticket, f"applying it failed: {exc}")
                return False
            follow.pending.pop(ticket.key, None)
            if self._follows.get(cid) is not follow:  # ended while it was applied
                return False
            follow.covered += 1
            follow.uncounted += 1  # until counted(): the caller counts the write next
            follow.journal.append((follow.covered, *touched))
            self._replicas.swap(view)
        if view.owner.overlay_rows > self._max_rows:
            self._compact(cid)
        return True

    def _apply(
        self, cid: str, follow: Follow, planned: Planned
    ) -> tuple[LiveView, tuple[frozenset[str], frozenset[str]]]:
        """In a worker thread: the write's ops on the follow's replica; its new view."""
        live = follow.live
        if live is None:
            replica = self._snapshot(cid)
            if replica is None:
                raise ReplayFailed("the replica changed before the first write was applied")
            live = follow.live = LiveReplica.from_snapshot(replica, _private_graph(replica))
        ops = planned.ops
        if planned.ids is None:  # a delete by filter: the rows it matches now, as it did
            view = live.view
            rows = view.select(view.mask(planned.delete_ids, planned.delete_filters), 0, None)
            ops = [Op(0, DELETE, view.records.ids[r], None, {}) for r in rows.tolist()]
        touched = frozenset(op.id for op in ops)
        deleted = frozenset(op.id for op in ops if op.kind == DELETE)
        return live.apply(ops, follow.covered + 1), (touched, deleted)

    def counted(self, ticket: Ticket) -> None:
        """A settled write has been counted (Writes.end)."""
        ticket.follow.uncounted -= 1

    def abandon(self, ticket: Ticket, why: str = "its outcome is unknown") -> None:
        """A write that will not be applied: failed, cancelled, or one that cannot be."""
        ticket.follow.pending.pop(ticket.key, None)
        if self._follows.get(ticket.collection_id) is ticket.follow:
            self.end(ticket.collection_id, "write_not_applied", why)

    def end(self, cid: str, reason: str, detail: str = "") -> None:
        """Stop following a collection: its writes go the rebuild path again."""
        if self._follows.pop(cid, None) is not None:
            self.ended[reason] = self.ended.get(reason, 0) + 1
            log.info("collection %s: local writes stop (%s: %s); rebuilds cover them", cid,
                     reason, detail)  # fmt: skip

    # --- rebuilds -----------------------------------------------------------------------------

    async def adopt(self, replica: ReplicaIndex) -> ReplicaIndex:
        """A rebuild of a collection, made ready to serve: as it is, or, if the collection is
        followed, with the rows written since its export began copied from the follow."""
        cid = replica.collection_id
        follow = self._follows.get(cid)
        if follow is None:
            return replica
        if follow.live is None:  # no write applied yet: the build is as good
            self.end(cid, "rebuilt")
            return replica
        if replica.covers_write_seq < follow.start or replica.index is None:
            self.end(cid, "rebuild_too_old", "the rebuild's export began before the follow")
            return replica
        try:
            view = await self._adopt(follow, replica)
        except (ReplayFailed, NotLocal, RuntimeError, ValueError) as exc:
            self.end(cid, "adopt_failed", str(exc))
            return replica
        if view is None:
            return replica
        log.info("collection %s: rebuild adopted, %d writes since its export kept", cid,
                 len(follow.journal))  # fmt: skip
        return view

    async def _adopt(self, follow: Follow, replica: ReplicaIndex) -> LiveView | None:
        loop = asyncio.get_running_loop()
        fresh = await loop.run_in_executor(
            self._executor, LiveReplica.from_snapshot, replica, replica.index
        )
        done = replica.covers_write_seq
        for _ in range(_COPY_ROUNDS):  # most of the copying while writes go on
            todo = [e for e in follow.journal if e[0] > done]
            if len(todo) <= _COPY_UNLOCKED_ABOVE:
                break
            await loop.run_in_executor(self._executor, _copy_rows, follow, fresh, todo)
            done = todo[-1][0]
        async with follow.lock:
            if self._follows.get(replica.collection_id) is not follow:
                return None
            todo = [e for e in follow.journal if e[0] > done]
            view = await loop.run_in_executor(self._executor, _copy_rows, follow, fresh, todo)
            follow.live, follow.start = fresh, replica.covers_write_seq
            follow.journal = [e for e in follow.journal if e[0] > follow.start]
        return view

    def status(self) -> dict[str, Any]:
        """For /admin/status: the collections followed, and why follows ended."""
        followed = {
            cid: {
                "covers_write_seq": f.covered,
                "overlay_rows": 0 if f.live is None else f.live.overlay_rows,
                "writes_since_rebuild": len(f.journal),
            }
            for cid, f in self._follows.items()
        }
        return {"collections": followed, "ended": dict(self.ended)}


def _disjoint(ids: frozenset[str] | None, others: Any) -> bool:
    """Writes that commute: their order does not matter, so neither does the primary's."""
    return all(ids is not None and other is not None and ids.isdisjoint(other) for other in others)


def _may_add(op: str, ids: frozenset[str] | None, live: LiveReplica | None) -> bool:
    """Whether a write may put rows at the end: an add or upsert of an id the replica does
    not hold (before the first write, with no live copy yet, any add or upsert may)."""
    if op not in ("add", "upsert"):
        return False
    return live is None or ids is None or any(live.row_of(rid) is None for rid in ids)


def _private_graph(replica: ReplicaIndex) -> Any:
    """A copy of the snapshot's graph that only the follow uses: the serving replica's own
    may be searched at any moment, and hnswlib forbids a search during an insert."""
    if replica.n == 0 or replica.directory is None:
        return None
    m = replica.manifest
    return load_index(replica.directory / "index.hnsw", m.space, int(m.dimension or 0),
                      m.count, m.hnsw["ef_search"])  # fmt: skip


def _copy_rows(follow: Follow, fresh: LiveReplica, todo: Journal) -> LiveView:
    """In a worker thread: the rows these writes touched, as the follow has them, into the
    rebuilt replica, each where the primary keeps it: an updated row in place, a row
    inserted (or deleted and inserted again) since the export at the end, in the follow's
    order."""
    live = follow.live
    assert live is not None
    touched = set().union(*(t for _, t, _ in todo)) if todo else set()
    deleted = set().union(*(d for _, _, d in todo)) if todo else set()
    ops, appended = [], []
    for rid in touched:
        state = live.state_of(rid)
        row = fresh.row_of(rid)
        if state is None:
            ops.append(Op(0, DELETE, rid, None, {}))
        elif row is not None and rid not in deleted:
            op = replaced(rid, fresh.record(row), state)
            if op is None:
                raise ReplayFailed(f"{rid!r} cannot be made what the writes made it in place")
            ops.append(op)
        else:
            appended.append((live.row_of(rid) or 0, rid, state))
    for _, rid, state in sorted(appended):
        ops += copied(rid, state)
    return fresh.apply(ops, follow.covered)
