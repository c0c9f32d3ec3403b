"""The log replay of storage mode (index/live.py, sync/take.py settle) against a model of
Chroma's write semantics (chroma-wire.md 5 and 11.3), with random interleavings of writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from index.errors import Superseded
from index.filters import parse_where
from index.live import ADD, DELETE, UPDATE, UPSERT, Base, Graph, LiveReplica, Op, Row
from sync.take import settle

DIM = 4
IDS = [f"id{i}" for i in range(8)]
PARAMS = {"M": 16, "ef_construction": 100, "ef_search": 100}


@dataclass
class Model:
    """Chroma as measured: rows in rowid order; an insert takes max(rowid) + 1."""

    rows: dict[str, tuple[int, int, Row, np.ndarray[Any, Any]]] = field(default_factory=dict)

    def apply(self, op: Op) -> None:
        current = self.rows.get(op.id)
        if op.kind == DELETE:
            self.rows.pop(op.id, None)
        elif current is not None and op.kind != ADD:
            rowid, _, row, vector = current
            meta = dict(row.metadata or {})
            doc = row.document
            for key, value in op.metadata.items():
                if key == "chroma:document":
                    doc = value if value is not None else doc
                elif value is None:
                    meta.pop(key, None)
                else:
                    meta[key] = value
            new_vector = vector if op.vector is None else op.vector
            self.rows[op.id] = (rowid, op.seq, Row(doc, None, meta or None), new_vector)
        elif current is None and op.kind != UPDATE:
            rowid = max((r[0] for r in self.rows.values()), default=0) + 1
            meta = {k: v for k, v in op.metadata.items() if v is not None}
            doc = meta.pop("chroma:document", None)
            assert op.vector is not None
            self.rows[op.id] = (rowid, op.seq, Row(doc, None, meta or None), op.vector)

    def ordered(self) -> list[str]:
        return sorted(self.rows, key=lambda i: self.rows[i][0])


def op_strategy() -> st.SearchStrategy[list[Op]]:
    meta = st.fixed_dictionaries(
        {},
        optional={
            "k": st.one_of(st.none(), st.integers(0, 2), st.sampled_from(["a", "b"])),
            "n": st.one_of(st.none(), st.integers(0, 2)),
            "chroma:document": st.one_of(st.none(), st.sampled_from(["x", "y"])),
        },
    )
    one = st.tuples(
        st.sampled_from([ADD, UPDATE, UPSERT, DELETE]),
        st.sampled_from(IDS),
        st.booleans(),
        meta,
        st.integers(0, 10_000),
    )

    def build(raw: list[tuple[int, str, bool, dict[str, Any], int]]) -> list[Op]:
        ops = []
        for seq, (kind, rid, with_vector, metadata, seed) in enumerate(raw, start=1):
            vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
            if kind in (ADD, UPSERT):
                with_vector = True
                metadata = {k: v for k, v in metadata.items() if v is not None}
            if kind == DELETE:
                with_vector, metadata = False, {}
            ops.append(Op(seq, kind, rid, vector if with_vector else None, metadata))
        return ops

    return st.lists(one, max_size=40).map(build)


def empty_replica() -> LiveReplica:
    graph = Graph(None, "l2", DIM, {}, 1, PARAMS)
    return LiveReplica({"id": "c"}, PARAMS, graph, Base([], [], [], []), 0)


@settings(max_examples=150, deadline=None)
@given(op_strategy(), st.integers(1, 7))
def test_replayed_views_equal_the_model(ops: list[Op], batch: int) -> None:
    live, model = empty_replica(), Model()
    for start in range(0, len(ops), batch):
        chunk = ops[start : start + batch]
        for op in chunk:
            model.apply(op)
        view = live.apply(chunk, chunk[-1].seq)
        want = model.ordered()
        rows = view.select(view.mask(None, []), 0, None)
        assert [view.records.ids[r] for r in rows] == want
        assert view.n == len(want)
        for r, rid in zip(rows.tolist(), want, strict=True):
            assert view.records.documents[r] == model.rows[rid][2].document
            assert view.records.metadatas[r] == model.rows[rid][2].metadata
        # A filter over base and overlay rows alike.
        mask = view.mask(None, [parse_where({"k": {"$eq": 1}})])
        assert mask is not None
        matched = [view.records.ids[r] for r in np.flatnonzero(mask)]
        assert matched == [i for i in want if (model.rows[i][2].metadata or {}).get("k") == 1]
        if want:  # on a few points the graph walk is exhaustive: the exact top 3
            query = np.ones((1, DIM), np.float32)
            ((found, _),) = view.search(query, 3, None)
            dists = {i: float(((model.rows[i][3] - query[0]) ** 2).sum()) for i in want}
            expected = sorted(want, key=lambda i: (dists[i], i))[:3]
            got = [view.records.ids[r] for r in found.tolist()]
            assert sorted(dists[i] for i in got) == sorted(dists[i] for i in expected)


def test_a_view_the_log_moved_past_is_superseded() -> None:
    live = empty_replica()
    vector = np.zeros(DIM, np.float32)
    old = live.apply([Op(1, ADD, "a", vector, {})], 1)
    new = live.apply([Op(2, ADD, "b", vector + 1, {})], 2)
    query = np.zeros((1, DIM), np.float32)
    try:
        old.search(query, 1, None)
    except Superseded:
        pass
    else:
        raise AssertionError("a search on an outdated view must not answer")
    ((rows, _),) = new.search(query, 2, None)
    assert [new.records.ids[r] for r in rows.tolist()] == ["a", "b"]


@settings(max_examples=200, deadline=None)
@given(op_strategy(), st.data())
def test_settle_brings_a_read_made_during_writes_to_the_end(
    ops: list[Op], data: st.DataObject
) -> None:
    """Records read in rowid chunks while the log moves on, each chunk at a later moment,
    then settled with the log rows after the first moment, equal the final state."""
    before = data.draw(st.integers(0, len(ops)), "writes before the read starts")
    model = Model()
    for op in ops[:before]:
        model.apply(op)
    read: list[tuple[str, int, Row]] = []
    last_rowid, applied = 0, before
    while True:  # chunks of two rows in rowid order, each after some more writes
        more = data.draw(st.integers(0, len(ops) - applied), "writes before a chunk")
        for op in ops[applied : applied + more]:
            model.apply(op)
        applied += more
        chunk = sorted(
            (r for r in model.rows.items() if r[1][0] > last_rowid), key=lambda r: r[1][0]
        )[:2]
        read += [(rid, seq, row) for rid, (_, seq, row, _) in chunk]
        if len(chunk) < 2:  # a short chunk: the read is done
            break
        last_rowid = chunk[-1][1][0]
    for op in ops[applied:]:
        model.apply(op)
    ids, rows = settle(read, ops[before:])
    assert ids == model.ordered()
    assert [(r.document, r.metadata) for r in rows] == [
        (model.rows[i][2].document, model.rows[i][2].metadata) for i in ids
    ]


def test_settle_skips_log_rows_a_record_already_includes() -> None:
    """An update of a missing id (a no-op), then an add of it, both before the read: replaying
    the update onto the record read after the add would wrongly merge the no-op's keys."""
    v = np.zeros(DIM, np.float32)
    ops = [Op(1, UPDATE, "x", None, {"k": 1}), Op(2, ADD, "x", v, {"k": 2})]
    ids, rows = settle([("x", 2, Row(None, None, {"k": 2}))], ops)
    assert ids == ["x"] and rows[0].metadata == {"k": 2}
