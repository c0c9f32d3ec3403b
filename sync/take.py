"""Take a collection from the primary's storage: its HNSW segment, its records, its log tail.

A take never holds a SQLite transaction (the primary's writes would wait, chroma-wire.md 11.5):
the segment files are copied and re-checked (sync/storage/hnsw_segment.py), the records are read
in chunks of short statements, and the log rows after the segment's seq complete the graph. Since
records are read while the primary keeps writing, each record carries the seq of its last write,
and the log rows after the take's first look at the database are replayed onto the records that
do not have them yet (settle); rows that a delete removed mid-read are replayed from absent.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from index.live import ADD, DELETE, UPDATE, Base, Graph, LiveReplica, Op, Row, inserted, merged

from .storage import (
    CollectionRow,
    LogGap,
    LogRow,
    copy_segment,
    deleted_labels,
    label_lengths,
    queue_max,
    read_queue,
    read_records,
    segment_seq,
)

FLOAT32 = "FLOAT32"


class UnknownEncoding(ValueError):
    """A log row's vector is in an encoding this version does not read."""


def decode(row: LogRow) -> Op:
    vector = None
    if row.vector is not None:
        if (row.encoding or FLOAT32).upper() != FLOAT32:
            raise UnknownEncoding(f"log row {row.seq}: vector encoding {row.encoding!r}")
        vector = np.frombuffer(row.vector, dtype="<f4").astype(np.float32)
    return Op(row.seq, row.op, row.id, vector, row.metadata)


def hnsw_settings(c: CollectionRow) -> tuple[str, dict[str, int]]:
    """The space and HNSW parameters the primary uses: the schema's ``#embedding`` vector
    index (where Chroma 1.5 keeps them; its config_json_str is often ``{}``), else the
    configuration's ``hnsw``, else Chroma's defaults. Never the collection metadata
    (chroma-wire.md 8.2)."""
    vector_index = (
        ((c.schema or {}).get("keys") or {}).get("#embedding", {}).get("float_list", {})
    ).get("vector_index", {})
    config = vector_index.get("config") or {}
    hnsw = config.get("hnsw") or {}
    space = config.get("space")
    if not hnsw:
        hnsw = c.config.get("hnsw") or {}
        space = hnsw.get("space")
    params = {
        "M": int(hnsw.get("max_neighbors", 16)),
        "ef_construction": int(hnsw.get("ef_construction", 100)),
        "ef_search": int(hnsw.get("ef_search", 100)),
    }
    return str(space or "l2"), params


def model_of(c: CollectionRow) -> dict[str, Any]:
    """What the request path needs of the collection model. Not the primary's full model
    (its schema is computed by the primary), so collection lookups are still forwarded."""
    return {"id": c.id, "name": c.name, "tenant": c.tenant, "database": c.database}


def take(conn: sqlite3.Connection, persist: Path, c: CollectionRow, scratch: Path) -> LiveReplica:
    """Blocking: a LiveReplica of ``c`` as of the log position it returns with."""
    started = time.time()
    records_from = segment_seq(conn, c.metadata_segment) or 0
    dest = scratch / c.id
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    try:
        copy = copy_segment(
            persist / c.vector_segment, dest, lambda: segment_seq(conn, c.vector_segment)
        )
        records = [r for chunk in read_records(conn, c.metadata_segment) for r in chunk]
        position = queue_max(conn)
        tail = [decode(r) for r in read_queue(conn, c.topic, copy.seq, limit=1 << 30)]
        if (segment_seq(conn, c.vector_segment) or 0) != copy.seq:
            # A flush after the copy may have purged tail rows we did not read yet.
            raise LogGap(f"{c.id}: the primary flushed during the take; taking again")
        tail = [op for op in tail if op.seq <= position]
        graph = _graph(c, copy)
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    for op in tail:
        graph.apply(op)
    read = [(r.id, r.seq, Row(r.document, r.uri, r.metadata)) for r in records]
    release(records)
    ids, rows = settle(read, [op for op in tail if op.seq > records_from])
    release(read)
    base = Base(ids, [r.document for r in rows], [r.uri for r in rows], [r.metadata for r in rows])
    return LiveReplica(model_of(c), hnsw_settings(c)[1], graph, base, position, started)


def _graph(c: CollectionRow, copy: Any) -> Graph:
    space, params = hnsw_settings(c)
    dim = int(c.dimension or 0)
    if copy.hnswlib_path is None:  # never flushed: every row is in the log
        return Graph(None, space, dim, {}, 1, params)
    index = hnswlib.Index(space=space, dim=dim)
    index.load_index(str(copy.hnswlib_path))
    index.set_ef(params["ef_search"])
    gone = set(int(label) for label in deleted_labels(copy))
    id_to_label = {i: lab for i, lab in copy.labels.id_to_label.items() if lab not in gone}
    graph = Graph(index, space, dim, id_to_label, copy.labels.total_elements_added + 1, params)
    labels, lengths = label_lengths(copy)
    if len(labels):
        graph.lengths = np.zeros(int(labels.max()) + 1, np.float32)
        graph.lengths[labels.astype(np.int64)] = lengths
    return graph


def settle(records: list[tuple[str, int, Row]], ops: list[Op]) -> tuple[list[str], list[Row]]:
    """Records read over a span of log positions, brought to the end of ``ops``: an op
    applies to a record only if the record does not already include it (its seq is older)."""
    state = {rid: (seq, row) for rid, seq, row in records}
    order = [rid for rid, _, _ in records]
    for op in ops:
        current = state.get(op.id)
        if current is not None and current[0] >= op.seq:
            continue
        if op.kind == DELETE:
            state.pop(op.id, None)
        elif current is not None and op.kind != ADD:
            state[op.id] = (op.seq, merged(current[1], op))
        elif current is None and op.kind != UPDATE:
            state[op.id] = (op.seq, inserted(op))
            order.append(op.id)  # an insert goes to the end (a re-added id moves there)
    last = {rid: i for i, rid in enumerate(order)}
    keep = [rid for i, rid in enumerate(order) if last[rid] == i and rid in state]
    rows = [state[rid][1] for rid in keep]
    for big in (state, last, order):
        release(big)
    return keep, rows


def release(items: list[Any] | dict[Any, Any], chunk: int = 2048) -> None:
    """Empty a large container a chunk at a time. Dropped whole, 100k records are freed in
    one C call that holds the GIL for tens of milliseconds while the event loop waits."""
    if isinstance(items, dict):
        while items:
            for _ in range(min(chunk, len(items))):
                items.popitem()
    else:
        while items:
            del items[-chunk:]
