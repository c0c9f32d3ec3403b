"""A replica that follows the primary's own storage: its HNSW graph plus its log tail.

In storage mode (sync/tailer.py) the base of a replica is a validated copy of the primary's own
HNSW segment, so a search walks the very graph the primary walks (same answers, chroma-wire.md
11.6), and the records come from its SQLite file. Writes after that are replayed from the
primary's log (``embeddings_queue``) the way the primary applied them:

* into the graph in place, one row at a time in seq order (an insert, a replacement of an
  existing label, a marked delete): measured 99.75% top-10 parity with the primary, where a side
  overlay searched exactly and merged by distance gave 97.75%, since the primary's graph changes
  as it absorbs rows. hnswlib forbids a search during an insert, so the graph is guarded by a
  readers/writer lock (index/rwlock.py);
* into a small side table of records (documents, metadata), merged with the immutable base when
  a view is made.

:class:`LiveReplica` is the mutable owner (one writer: the tailer). After each applied batch it
makes a :class:`LiveView`, an immutable ReplicaIndex that requests use: the base's rows in
storage order, then rows the log appended, with updated rows in place and deleted rows masked.
A view is valid only while the graph is as it was when the view was made; a search on a view
that the graph has moved past raises Superseded (checked under the read lock) and the request
takes the current view instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import hnswlib
import numpy as np
import numpy.typing as npt

from .columns import Columns, Mask
from .errors import NotLocal, ReplayFailed, Superseded
from .filters import Filter, plain_ascii
from .replica import EXACT_SHARE, Records, ReplicaIndex, Rows, Vectors, exact_top
from .rwlock import RWLock
from .snapshot import Manifest

# Log operations (embeddings_queue.operation, chroma-wire.md 11.3).
ADD, UPDATE, UPSERT, DELETE = 0, 1, 2, 3
DOCUMENT_KEY = "chroma:document"
URI_KEY = "chroma:uri"
_last_generation = [0]
_generation_lock = threading.Lock()


def _next_generation() -> int:
    """Like a snapshot's (index/snapshot.py new_generation: the clock in ns), and rising
    with every view, so a view replaces the snapshot it was made from (ReplicaSet.swap).
    Views are made in worker threads, hence the lock."""
    with _generation_lock:
        _last_generation[0] = max(_last_generation[0] + 1, time.time_ns())
        return _last_generation[0]


@dataclass(frozen=True, slots=True)
class Op:
    """One row of the primary's log, decoded."""

    seq: int
    kind: int  # ADD, UPDATE, UPSERT or DELETE
    id: str
    vector: npt.NDArray[np.float32] | None
    metadata: dict[str, Any]  # user keys plus chroma:document / chroma:uri; None deletes a key


@dataclass(slots=True)
class Row:
    document: str | None
    uri: str | None
    metadata: dict[str, Any] | None


def inserted(op: Op) -> Row:
    """The record an ADD (or the UPSERT of a new id) creates."""
    meta = {k: v for k, v in op.metadata.items() if v is not None}
    document, uri = meta.get(DOCUMENT_KEY), meta.get(URI_KEY)
    return Row(document, uri, _visible(meta, uri))


def merged(row: Row, op: Op) -> Row:
    """An UPDATE (or the UPSERT of an existing id): keys set, keys given as null removed;
    a null document or uri means "unchanged" (chroma-wire.md 5)."""
    meta = dict(row.metadata or {})
    document, uri = row.document, row.uri
    for key, value in op.metadata.items():
        if key == DOCUMENT_KEY:
            document = value if value is not None else document
        elif key == URI_KEY:
            uri = value if value is not None else uri
        elif value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return Row(document, uri, _visible(meta, uri))


def copied(rid: str, state: tuple[Vectors, Row] | None) -> list[Op]:
    """Ops that make ``rid`` what ``state`` says (LiveReplica.state_of) whatever it was:
    delete, then add the vector and the record whole (an update would merge)."""
    ops = [Op(0, DELETE, rid, None, {})]
    if state is not None:
        vector, row = state
        meta = {**(row.metadata or {}), DOCUMENT_KEY: row.document, URI_KEY: row.uri}
        ops.append(Op(0, ADD, rid, vector, meta))
    return ops


def replaced(rid: str, was: Row, state: tuple[Vectors, Row]) -> Op | None:
    """An op that makes an existing row what ``state`` says in place, keeping its position
    (as an update does on the primary); None if no update can (a document or uri, once set,
    is never unset: chroma-wire.md 5)."""
    vector, row = state
    if (was.document is not None and row.document is None) or (
        was.uri is not None and row.uri is None
    ):
        return None
    meta: dict[str, Any] = {key: None for key in was.metadata or {}}
    meta.update(row.metadata or {})
    meta[DOCUMENT_KEY], meta[URI_KEY] = row.document, row.uri
    return Op(0, UPSERT, rid, vector, meta)


def _visible(meta: dict[str, Any], uri: str | None) -> dict[str, Any] | None:
    """The metadata the primary returns: never its `chroma:` keys; ``{}`` rather than null
    when the row has a uri (stored as one of those keys), null when it has nothing else."""
    shown = {k: v for k, v in meta.items() if not k.startswith("chroma:")}
    return shown or ({} if uri is not None else None)


class Table:
    """Rows' metadata and documents as filters see them (index/filters.py Filterable)."""

    def __init__(self, documents: list[str | None], metadatas: list[dict[str, Any] | None]):
        self.n = len(documents)
        self.documents = documents
        self.columns = Columns(metadatas)
        self.documents_plain_ascii = plain_ascii(documents)

    @classmethod
    def of(cls, replica: ReplicaIndex) -> Table:
        """A snapshot replica's rows, reusing the columns it already built."""
        table = cls.__new__(cls)
        table.n, table.documents, table.columns = replica.n, replica.documents, replica.columns
        table.documents_plain_ascii = replica.documents_plain_ascii
        return table


class Graph:
    """The hnswlib index and who owns which label. Mutated only under ``lock.writing()``."""

    def __init__(
        self,
        index: Any,
        space: str,
        dim: int,
        id_to_label: dict[str, int],
        next_label: int,
        params: dict[str, int],
    ) -> None:
        self.index = index  # hnswlib.Index, or None until the first vector
        self.params = params  # M, ef_construction, ef_search (sync/take.py hnsw_settings)
        self.space = space
        self.dim = dim
        self.id_to_label = id_to_label
        self.next_label = next_label
        self.lock = RWLock()
        self.version = 0  # bumped by every mutation; a view remembers the one it was made at
        # Cosine: the primary's stored length of each base label (sync/take.py), and the
        # labels whose vectors the replay wrote (their unit vectors are this hnswlib's, not
        # the primary's bits, so their embeddings are left to the primary).
        self.lengths = np.zeros(0, np.float32)
        self.replayed: set[int] = set()
        # Export mode: the snapshot's vectors (exactly the primary's bits), by label = row.
        self.base_vectors: Vectors | None = None

    def apply(self, op: Op) -> None:
        """Replay one log row the way the primary applied it (call under the write lock)."""
        label = self.id_to_label.get(op.id)
        if op.kind == DELETE:
            if label is not None:
                self.index.mark_deleted(label)
                del self.id_to_label[op.id]
            return
        if op.kind == UPDATE and label is None:
            return
        if op.kind == ADD and label is not None:
            return
        if op.vector is None:  # a metadata-only update: the graph is unchanged
            return
        if label is None:
            label = self.id_to_label[op.id] = self.next_label
            self.next_label += 1
        self._insert(op.vector, label)
        self.replayed.add(label)

    def _insert(self, vector: npt.NDArray[np.float32], label: int) -> None:
        if self.index is None and not self.dim:  # the collection's first vector sets it
            self.dim = len(vector)
        if len(vector) != self.dim:
            raise ReplayFailed(f"log row of dimension {len(vector)}, graph has {self.dim}")
        if self.index is None:
            p = self.params
            self.index = hnswlib.Index(space=self.space, dim=self.dim)
            self.index.init_index(1024, ef_construction=p["ef_construction"], M=p["M"])
            self.index.set_ef(p["ef_search"])
        if self.index.get_current_count() >= self.index.get_max_elements():
            self.index.resize_index(max(16, int(self.index.get_max_elements() * 1.2) + 1))
        # One row at a time in seq order. (The primary inserts a batch's rows on several
        # threads in no fixed order, so no replay reproduces its graph exactly; this one came
        # closest in measurements, chroma-wire.md 11.6.)
        self.index.add_items(vector[None, :], np.array([label]), num_threads=1)


@dataclass
class Base(Records):
    """The records of a take, in the primary's storage order; never changed afterwards."""

    def __post_init__(self) -> None:
        self.row_of = {rid: row for row, rid in enumerate(self.ids)}
        self.table = Table(self.documents, self.metadatas)

    @classmethod
    def of(cls, replica: ReplicaIndex) -> Base:
        """A snapshot replica's records, reusing its id map and columns (never changed)."""
        base = cls.__new__(cls)
        r = replica.records
        Records.__init__(base, r.ids, r.documents, r.uris, r.metadatas)
        base.row_of, base.table = replica.row_of, Table.of(replica)
        return base


class LiveReplica:
    """Base records + graph + the log replayed on both; makes immutable views."""

    def __init__(
        self,
        model: dict[str, Any],
        hnsw: dict[str, int],
        graph: Graph,
        base: Base,
        position: int,
        confirmed_at: float = 0.0,
        source: str = "storage",
    ) -> None:
        self.model = model
        self.hnsw = hnsw
        self.graph = graph
        self.base = base
        self.position = position  # the log seq everything up to which is applied
        # "storage": follows the primary's log (position is a log seq). "export": a snapshot
        # plus the writes this proxy forwarded (proxy/replica/overlay.py); position is then the
        # proxy's write counter the replica includes (proxy/replica/consistency.py).
        self.source = source
        # Every write the primary committed before this time is applied. Set by whoever read
        # the log, from a clock reading taken *before* it read (a later one would claim writes
        # that landed between the read and now).
        self.confirmed_at = confirmed_at
        self.base_labels = np.array([graph.id_to_label[i] for i in base.ids], np.int64)
        self.dead: set[int] = set()  # rows deleted since the base
        self.touched: dict[int, Row] = {}  # rows whose record changed, or were appended
        self.appended: list[str] = []
        self.appended_labels: list[int] = []
        self.appended_row_of: dict[str, int] = {}
        self.view = self._make_view()

    @classmethod
    def from_snapshot(cls, replica: ReplicaIndex, index: Any) -> LiveReplica:
        """Export mode: a snapshot replica made writable. ``index`` must be a copy of its
        graph that nothing else searches (hnswlib forbids a search during an insert)."""
        m = replica.manifest
        graph = Graph(index, m.space, int(m.dimension or 0), dict(replica.row_of), replica.n,
                      dict(m.hnsw))  # fmt: skip
        graph.base_vectors = replica.vectors
        replica.shares_parts = True  # the reaper (index/reaper.py) must leave them whole
        return cls(m.collection, dict(m.hnsw), graph, Base.of(replica), replica.covers_write_seq,
                   m.created_at, source="export")  # fmt: skip

    @property
    def collection_id(self) -> str:
        return str(self.model["id"])

    def state_of(self, rid: str) -> tuple[Vectors, Row] | None:
        """The id's vector and record now, or None if it is absent (blocking: takes the
        graph's read lock)."""
        with self.graph.lock.reading():
            row = self.row_of(rid)
            if row is None:
                return None
            label = self.graph.id_to_label[rid]
            vector = np.asarray(self.graph.index.get_items([label]), np.float32)[0]
            return vector, self.record(row)

    @property
    def overlay_rows(self) -> int:
        return len(self.touched) + len(self.dead)

    def row_of(self, rid: str) -> int | None:
        row = self.appended_row_of.get(rid)
        if row is None:
            row = self.base.row_of.get(rid)
        return None if row is None or row in self.dead else row

    def record(self, row: int) -> Row:
        found = self.touched.get(row)
        if found is not None:
            return found
        b = self.base
        return Row(b.documents[row], b.uris[row], b.metadatas[row])

    def apply(self, ops: Iterable[Op], position: int) -> LiveView:
        """Replay log rows (seq order, all after ``position``) on the graph and the records;
        blocking (run it off the event loop). Returns the new view to serve."""
        graph = self.graph
        with graph.lock.writing():
            for op in ops:
                graph.apply(op)
                self._apply_record(op)
            graph.version += 1
            self.position = position
            self.view = self._make_view()
        return self.view

    def _apply_record(self, op: Op) -> None:
        row = self.row_of(op.id)
        if op.kind == DELETE:
            if row is not None:
                self.dead.add(row)
                self.touched.pop(row, None)
                self.appended_row_of.pop(op.id, None)
        elif row is not None and op.kind != ADD:
            self.touched[row] = merged(self.record(row), op)
        elif row is None and op.kind != UPDATE:
            label = self.graph.id_to_label.get(op.id)
            if label is None:  # an insert without a vector: the graph did not take it
                raise ReplayFailed(f"log row {op.seq} inserts {op.id!r} without a vector")
            row = len(self.base.ids) + len(self.appended)
            self.appended.append(op.id)
            self.appended_labels.append(label)
            self.appended_row_of[op.id] = row
            self.touched[row] = inserted(op)

    def renew_view(self) -> LiveView:
        """The same rows under a new generation (call on the event loop, before a swap)."""
        self.view = self._make_view()
        return self.view

    def _make_view(self) -> LiveView:
        return LiveView(self, _next_generation())


class LiveView(ReplicaIndex):
    """What requests read: an immutable picture of a LiveReplica at one log position."""

    def __init__(self, owner: LiveReplica, generation: int) -> None:
        # Deliberately not ReplicaIndex.__init__: the rows are the base's plus the overlay's.
        base, touched = owner.base, owner.touched
        total = len(base.ids) + len(owner.appended)
        ids, documents = base.ids + owner.appended, base.documents + [None] * len(owner.appended)
        uris, metadatas = base.uris + [None] * len(owner.appended), base.metadatas.copy()
        metadatas += [None] * len(owner.appended)
        for row, record in touched.items():
            documents[row], uris[row], metadatas[row] = (
                record.document,
                record.uri,
                record.metadata,
            )
        self.owner = owner
        self.graph = owner.graph
        self.graph_version = owner.graph.version
        self.records = Records(ids, documents, uris, metadatas)
        self.total = total
        self.live = np.ones(total, np.bool_)
        if owner.dead:
            self.live[list(owner.dead)] = False
        self.n = int(self.live.sum())
        self.collection_id = owner.collection_id
        self.position = owner.position
        self.label_of_row = np.concatenate(
            [owner.base_labels, np.array(owner.appended_labels, np.int64)]
        )
        self.row_of_label = np.full(owner.graph.next_label + 1, -1, np.int64)
        live_rows = np.flatnonzero(self.live)
        self.row_of_label[self.label_of_row[live_rows]] = live_rows
        self.touched_rows = sorted(touched)
        self.overlay = Table(
            [documents[r] for r in self.touched_rows], [metadatas[r] for r in self.touched_rows]
        )
        self.base_table = base.table
        self.documents_plain_ascii = base.table.documents_plain_ascii and (
            self.overlay.documents_plain_ascii
        )
        self.manifest = _manifest(owner, generation, self.n)
        self.directory = None  # not a snapshot on disk
        # Storage mode: consistency is by log position (proxy/replica/router.py caught_up). Export
        # mode: by the proxy's write counter, like a snapshot's (proxy/replica/consistency.py).
        self.follows_log = owner.source == "storage"
        self.covers_write_seq = -1 if self.follows_log else owner.position
        # Ids look-ups: the base's map, then this view's appended rows (_row_of_id). Searches
        # and vectors go through self.graph, under its lock.
        self.appended_row_of = dict(owner.appended_row_of)
        # The reaper (index/reaper.py) must not take apart parts other views share.
        self.shares_parts = True
        # A take keeps only what the request path needs of the model (sync/take.py
        # model_of): lookups of the collection are forwarded. A snapshot has all of it.
        self.has_collection_model = not self.follows_log

    # --- what the request path reads ---------------------------------------------------------

    @property
    def documents(self) -> list[str | None]:
        return self.records.documents

    @property
    def generation(self) -> int:
        return self.manifest.generation

    def latest(self) -> LiveView:
        """The collection's newest view. A search that waited for a thread while the log
        moved the graph on runs there rather than failing as Superseded: a newer view holds
        every write an older one did, so any consistency level is still met."""
        return self.owner.view

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the tailer last confirmed this position is the primary's newest."""
        return (now or time.time()) - self.owner.confirmed_at

    def mask(self, ids: list[str] | None, filters: list[Filter]) -> Mask | None:
        if ids is None and not filters:
            return None  # every live row: select() and search() exclude the deleted ones
        out = self.live.copy()
        if ids is not None:
            chosen = np.zeros(self.total, np.bool_)
            rows = [r for r in map(self._row_of_id, ids) if r is not None]
            chosen[rows] = True
            out &= chosen
        nb = len(self.owner.base.ids)
        for f in filters:
            m = np.zeros(self.total, np.bool_)
            m[:nb] = f(self.base_table)
            if self.touched_rows:
                m[self.touched_rows] = f(self.overlay)
            out &= m
        return out

    def _row_of_id(self, rid: str) -> int | None:
        row = self.appended_row_of.get(rid)
        if row is None:
            row = self.owner.base.row_of.get(rid)
        return None if row is None or not self.live[row] else row

    def select(self, allowed: Mask | None, offset: int, limit: int | None) -> Rows:
        rows = np.flatnonzero(self.live if allowed is None else allowed)
        end = None if limit is None else offset + limit
        result: Rows = rows[offset:end].astype(np.int64)
        return result

    def search(
        self, queries: Vectors, k: int, allowed: Mask | None, exact_max_rows: int = 0
    ) -> list[tuple[Rows, npt.NDArray[np.float32]]]:
        """The primary's own graph walk: unfiltered, or with the allowed rows as hnswlib's
        filter (as Chroma searches with a filter); exact only where hnswlib cannot return k."""
        candidates = self.n if allowed is None else int(allowed.sum())
        k = min(k, candidates)
        if k == 0:
            return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in queries]
        # Export mode searches as its snapshot did (index/replica.py): a graph that is not
        # the primary's gets closer to its answers by exact search over a small filter.
        exact = allowed is not None and not self.follows_log
        exact = exact and candidates <= max(exact_max_rows, EXACT_SHARE * self.n)
        with self.graph.lock.reading():
            self._check_current()
            if exact or self._brute_force():
                return self._exact_over(queries, k, self.live if allowed is None else allowed)
            if allowed is None:
                return self._walk(queries, k, None) or self._exact_over(queries, k, self.live)
            labels = np.zeros(len(self.row_of_label), np.uint8)
            labels[self.label_of_row[allowed]] = 1
            return self._walk(queries, k, labels.tobytes().__getitem__) or self._exact_over(
                queries, k, allowed
            )

    def _brute_force(self) -> bool:
        """Chroma's own switch (rust/segment/src/local_hnsw.rs query_embedding): exact search
        when over 20% of the graph's elements are deleted and fewer than 100 are live. It
        never depends on how many rows a filter allows."""
        if self.graph.index is None:
            return False
        total = int(self.graph.index.get_current_count())
        return total > 0 and (total - self.n) / total > 0.2 and self.n < 100

    def search_hnsw(self, queries: Vectors, k: int) -> list[tuple[Rows, npt.NDArray[np.float32]]]:
        with self.graph.lock.reading():
            self._check_current()
            return [] if self._brute_force() else self._walk(queries, k, None)

    def _walk(
        self, queries: Vectors, k: int, allow: Any
    ) -> list[tuple[Rows, npt.NDArray[np.float32]]]:
        try:
            labels, dists = self.graph.index.knn_query(queries, k=k, filter=allow)
        except RuntimeError:  # fewer than k reachable: exact search answers instead
            return []
        rows = self.row_of_label[labels.astype(np.int64)]
        return [(rows[i], dists[i].astype(np.float32)) for i in range(len(queries))]

    def _exact_over(
        self, queries: Vectors, k: int, allowed: Mask
    ) -> list[tuple[Rows, npt.NDArray[np.float32]]]:
        rows = np.flatnonzero(allowed).astype(np.int64)
        sub = np.asarray(self.graph.index.get_items(self.label_of_row[rows]), np.float32)
        inverse = None
        if self.graph.space == "cosine":
            norms = np.linalg.norm(sub, axis=1)
            inverse = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1), 0).astype(np.float32)
        return exact_top(self.graph.space, sub, rows, queries, k, inverse)

    def embeddings(self, rows: Rows) -> Vectors:
        if len(rows) == 0:
            return np.empty((0, self.graph.dim), np.float32)
        labels = self.label_of_row[rows]
        graph = self.graph
        with graph.lock.reading():
            self._check_current()
            done = graph.replayed
            replayed = np.fromiter((x in done for x in labels.tolist()), np.bool_, len(labels))
            if graph.space == "cosine" and replayed.any():
                raise NotLocal("embeddings of cosine rows the log wrote: the primary answers")
            base = graph.base_vectors
            if base is not None and not replayed.any():
                return np.asarray(base[labels], np.float32)
            found: Vectors = np.asarray(graph.index.get_items(labels), np.float32)
            if base is not None:  # the snapshot's bits (the primary's) where it has them
                found[~replayed] = base[labels[~replayed]]
                return found
            if graph.space != "cosine":
                return found  # l2 and ip keep the vectors as written
            # The primary's own arithmetic: stored unit vector times stored length, float32.
            scaled: Vectors = found * self.graph.lengths[labels][:, None]
            return scaled

    def _check_current(self) -> None:
        if self.graph.version != self.graph_version:
            raise Superseded(f"{self.collection_id}: the log moved past this view")

    def validate(self, queries: int, min_recall: float) -> float:
        return 1.0  # the base was validated as files (sync/storage); the graph is the primary's


def _manifest(owner: LiveReplica, generation: int, count: int) -> Manifest:
    config = owner.hnsw
    return Manifest(
        format_version=0,  # not a snapshot on disk
        collection=owner.model,
        space=owner.graph.space,
        hnsw={
            "M": config.get("M", 16),
            "ef_construction": config.get("ef_construction", 100),
            "ef_search": config.get("ef_search", 100),
        },
        count=count,
        dimension=owner.graph.dim,
        created_at=owner.confirmed_at,
        source=owner.source,
        covers_write_seq=-1,
        generation=generation,
        files={},
    )
