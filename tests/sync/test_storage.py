"""The storage readers (sync/storage) against files a real Chroma 1.5.9 server wrote.

One server for the module, on a directory of its own so its persist path is known. Every write
goes over HTTP, and every answer of the readers is compared with what the same server answers
over HTTP (get, query) or with the writes themselves (the queue). Two collections are flushed:
``recs`` (2,500 adds, flushed at 2,000, then a tail of updates, upserts and deletes) and
``graph`` (flushed exactly at its last write, with deleted elements in the files).
"""

from __future__ import annotations

import base64
import pickle
import sqlite3
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import hnswlib
import httpx
import numpy as np
import pytest

from sync.storage import (
    ADD,
    DELETE,
    UPDATE,
    UPSERT,
    CollectionRow,
    SchemaMismatch,
    SegmentCopy,
    SegmentCorrupt,
    SegmentUnstable,
    check_schema,
    connect,
    copy_segment,
    decode_seq,
    deleted_labels,
    list_collections,
    parse_header,
    queue_bounds,
    queue_max,
    read_label_map,
    read_queue,
    read_queue_after,
    read_records,
    segment_seq,
    segment_seqs,
    validate,
)
from tests.helpers import ChromaServer, wait_until

DIM = 16
TENANT, DATABASE = "storage_tenant", "storage_db"
DEFAULT = ("default_tenant", "default_database")
Vectors = np.ndarray[Any, np.dtype[np.float32]]


# -- talking to the server ---------------------------------------------------------------------


class Api:
    """The few HTTP calls the tests make; vectors go as base64 float32, as the client sends."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url + "/api/v2", timeout=60)

    def create(self, name: str, where: tuple[str, str] = DEFAULT, space: str = "l2") -> str:
        body = {"name": name, "metadata": {"hnsw:space": space}, "get_or_create": False}
        resp = self.http.post(f"/tenants/{where[0]}/databases/{where[1]}/collections", json=body)
        resp.raise_for_status()
        cid: str = resp.json()["id"]
        return cid

    def drop(self, name: str) -> None:
        self.http.delete(f"/tenants/{DEFAULT[0]}/databases/{DEFAULT[1]}/collections/{name}")

    def write(self, cid: str, op: str, body: dict[str, Any]) -> Any:
        resp = self.http.post(f"{self._records(cid)}/{op}", json=body)
        assert resp.status_code in (200, 201), resp.text
        return resp.json()

    def get(self, cid: str) -> dict[str, Any]:
        body = {"include": ["metadatas", "documents", "uris"]}
        result: dict[str, Any] = self.write(cid, "get", body)
        return result

    def query(self, cid: str, vectors: Vectors, k: int) -> dict[str, Any]:
        body = {"query_embeddings": vectors.tolist(), "n_results": k, "include": ["distances"]}
        result: dict[str, Any] = self.write(cid, "query", body)
        return result

    @staticmethod
    def _records(cid: str) -> str:
        # Record endpoints ignore the tenant and database in the path (chroma-wire.md 14.11).
        return f"/tenants/{DEFAULT[0]}/databases/{DEFAULT[1]}/collections/{cid}"


def b64(vectors: Vectors) -> list[str]:
    return [base64.b64encode(v.tobytes()).decode() for v in vectors]


@dataclass
class Log:
    """The writes made to one collection, one entry per id in request order, as the queue
    should hold them: (op, id, vector bytes or None)."""

    entries: list[tuple[int, str, bytes | None]] = field(default_factory=list)

    def note(self, op: int, ids: list[str], vectors: Vectors | None) -> None:
        for i, rid in enumerate(ids):
            self.entries.append((op, rid, None if vectors is None else vectors[i].tobytes()))


@dataclass
class World:
    persist: Path
    recs: str  # collection ids
    graph: str
    fresh: str  # written to, never flushed
    untouched: str  # never written to
    recs_log: Log
    graph_vectors: Vectors
    expected_recs_order: list[str]


def recs_metadata(j: int) -> dict[str, Any] | None:
    """Every kind of value: ints vs floats, bools, arrays, negative and large ints, unicode."""
    shapes: list[dict[str, Any] | None] = [
        None,
        {"f": 2.0, "i": 2},
        {"b": True, "bf": False},
        {"tags": ["a", f"t{j}"], "nums": [3, 1, 2], "fl": [1.5, 2.0], "flags": [True, False]},
        {"s": f"s{j}", "neg": -j, "big": 2**40},
        {"x": j / 7},
        {"unicode": "héllo ✓"},
    ]
    return shapes[j % 7]


def write_leak_prelude(api: Api) -> None:
    """A deleted collection's array rows stay behind (chroma-wire.md 14.2); the next rows
    written anywhere reuse their embeddings ids and inherit them."""
    cid = api.create("leaky")
    vectors = np.ones((2, DIM), np.float32)
    metadatas = [{"leaked": ["secret", "x"]}, {"leaked_n": [1, 2]}]
    api.write(cid, "add", {"ids": ["l0", "l1"], "embeddings": b64(vectors), "metadatas": metadatas})
    api.drop("leaky")


def write_recs(api: Api, rng: np.random.Generator) -> tuple[str, Log, list[str]]:
    """2,500 adds in batches of 500 (a flush at 2,000), then a tail of fewer than 1,000 ops."""
    api.http.post("/tenants", json={"name": TENANT}).raise_for_status()
    api.http.post(f"/tenants/{TENANT}/databases", json={"name": DATABASE}).raise_for_status()
    cid, log = api.create("recs", (TENANT, DATABASE)), Log()

    def send(op: int, path: str, ids: list[str], vectors: Vectors | None, **rest: Any) -> None:
        api.write(
            cid, path, {"ids": ids, "embeddings": None if vectors is None else b64(vectors), **rest}
        )
        log.note(op, ids, vectors)

    for start in range(0, 2500, 500):
        js = range(start, start + 500)
        send(
            ADD, "add", [f"r{j}" for j in js], rng.standard_normal((500, DIM), np.float32),
            metadatas=[recs_metadata(j) for j in js],
            documents=[None if j % 3 == 0 else f"doc {j}" for j in js],
            uris=[f"uri://{j}" if j % 5 == 0 else None for j in js],
        )  # fmt: skip
    tail(send, rng)
    order = [f"r{j}" for j in range(2500) if not 30 <= j < 35 and not 40 <= j < 45]
    order += [f"r{j}" for j in range(2500, 2505)] + [f"r{j}" for j in range(30, 35)] + ["r2505"]
    return cid, log, order


def tail(send: Callable[..., None], rng: np.random.Generator) -> None:
    """Updates in place (metadata only, and with vectors; a null deletes a key), upserts of
    existing and new ids, delete + re-add (moves to the end), deletes, no-ops, a uri-only row."""
    ids = [f"r{j}" for j in range(10, 15)]
    send(UPDATE, "update", ids, None, metadatas=[{"i": 99, "new": "yes", "f": None}] * 5)
    ids = [f"r{j}" for j in range(15, 20)]
    send(UPDATE, "update", ids, rng.standard_normal((5, DIM), np.float32), documents=["upd"] * 5)
    ids = [f"r{j}" for j in [20, 21, 22, 23, 24, 2500, 2501, 2502, 2503, 2504]]
    send(
        UPSERT, "upsert", ids, rng.standard_normal((10, DIM), np.float32), metadatas=[{"u": 1}] * 10
    )
    ids = [f"r{j}" for j in range(30, 35)]
    send(DELETE, "delete", ids, None)
    send(
        ADD, "add", ids, rng.standard_normal((5, DIM), np.float32), metadatas=[{"again": True}] * 5
    )
    send(DELETE, "delete", [f"r{j}" for j in range(40, 45)], None)
    send(UPDATE, "update", ["nope"], rng.standard_normal((1, DIM), np.float32))  # no-op, queued
    send(ADD, "add", ["r50"], rng.standard_normal((1, DIM), np.float32))  # no-op, queued
    send(ADD, "add", ["r2505"], rng.standard_normal((1, DIM), np.float32), uris=["only-uri"])


def write_graph(api: Api, rng: np.random.Generator) -> tuple[str, Vectors]:
    """Flushes at op 1,000 and exactly at its last op, 2,000; 100 deleted elements in between,
    so the files cover everything and hold elements marked deleted."""
    cid = api.create("graph", space="cosine")
    vectors = rng.standard_normal((1900, DIM), np.float32)
    for start in (0, 500, 1000):
        ids = [f"g{j}" for j in range(start, start + 500)]
        api.write(cid, "add", {"ids": ids, "embeddings": b64(vectors[start : start + 500])})
    api.write(cid, "delete", {"ids": [f"g{j}" for j in range(0, 1000, 10)]})
    ids = [f"g{j}" for j in range(1500, 1900)]
    api.write(cid, "add", {"ids": ids, "embeddings": b64(vectors[1500:])})
    return cid, vectors


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    server = ChromaServer(tmp_path_factory.mktemp("storage") / "data").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(server: ChromaServer) -> Iterator[Api]:
    api = Api(server.url)
    yield api
    api.http.close()


@pytest.fixture(scope="module")
def conn(server: ChromaServer) -> Iterator[sqlite3.Connection]:
    conn = connect(server.path / "chroma.sqlite3")
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def world(server: ChromaServer, api: Api, conn: sqlite3.Connection) -> World:
    rng = np.random.default_rng(7)
    write_leak_prelude(api)
    recs, log, order = write_recs(api, rng)
    graph, graph_vectors = write_graph(api, rng)
    fresh = api.create("fresh")
    api.write(fresh, "add", {"ids": ["f0", "f1"], "embeddings": b64(np.ones((2, DIM), np.float32))})
    untouched = api.create("untouched")
    rows = {c.id: c for c in list_collections(conn)}
    # A write returns after its flush (chroma-wire.md 11.3); poll rather than rely on it.
    for cid, count in ((recs, 2000), (graph, 1900)):
        header = server.path / rows[cid].vector_segment / "header.bin"
        wait_until(partial(_header_is, header, count), 30, "a flush")
    wait_until(partial(_no_tail, conn, rows[graph]), 30, "graph's files to cover its last write")
    return World(server.path, recs, graph, fresh, untouched, log, graph_vectors, order)


def _header_is(path: Path, count: int) -> bool:
    return path.exists() and parse_header(path.read_bytes()).cur_element_count == count


def _no_tail(conn: sqlite3.Connection, c: CollectionRow) -> bool:
    return segment_seq(conn, c.vector_segment) == segment_seq(conn, c.metadata_segment)


def collection(conn: sqlite3.Connection, cid: str) -> CollectionRow:
    return next(c for c in list_collections(conn) if c.id == cid)


def typed(value: Any) -> Any:
    """The value with every scalar tagged by its type, so that 2 != 2.0 and 1 != True."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value).__name__, value)


# -- SQLite ------------------------------------------------------------------------------------


def test_a_real_database_passes_the_schema_check(world: World, conn: sqlite3.Connection) -> None:
    check_schema(conn)


def test_the_connection_is_read_only_and_holds_nothing_between_calls(
    world: World, conn: sqlite3.Connection, api: Api
) -> None:
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM embeddings_queue")
    segment = collection(conn, world.recs).metadata_segment
    chunks = read_records(conn, segment, chunk_rows=100)
    first = next(chunks)  # a reader paused between two chunks...
    assert len(first) == 100 and not conn.in_transaction
    # ... holds no lock: the primary's writes go on (one that waited would time out here).
    bystander = api.create("bystander")
    api.http.timeout = httpx.Timeout(5.0)
    try:
        api.write(
            bystander, "add", {"ids": ["b"], "embeddings": b64(np.ones((1, DIM), np.float32))}
        )
    finally:
        api.http.timeout = httpx.Timeout(60.0)
    assert sum(len(chunk) for chunk in chunks) > 2000


def _backup(server_db: Path, dest: Path) -> sqlite3.Connection:
    """A writable copy of the live database, taken through SQLite (its backup API)."""
    source, copy = connect(server_db), sqlite3.connect(dest, isolation_level=None)
    source.backup(copy)
    source.close()
    return copy


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (  # a database of an older Chroma
            "DELETE FROM migrations WHERE dir = 'metadb' AND version = 6",
            r"missing.*metadb/00006-metadata-array-support",
        ),
        (  # of a newer one
            "INSERT INTO migrations VALUES ('sysdb', 11, '00011-future.sqlite.sql', '', '')",
            r"found 19 .* unknown .*sysdb/00011-future",
        ),
        (  # without a column the readers use
            "ALTER TABLE embeddings_queue DROP COLUMN encoding",
            r"embeddings_queue lacks column.*encoding",
        ),
    ],
)
def test_a_database_of_another_schema_is_refused(
    world: World, tmp_path: Path, change: str, refusal: str
) -> None:
    copy = _backup(world.persist / "chroma.sqlite3", tmp_path / "copy.sqlite3")
    copy.execute(change)
    copy.close()
    with pytest.raises(SchemaMismatch, match=refusal):
        check_schema(connect(tmp_path / "copy.sqlite3"))


def test_list_collections_finds_tenant_database_and_segments(
    world: World, conn: sqlite3.Connection
) -> None:
    rows = {c.id: c for c in list_collections(conn)}
    recs, graph = rows[world.recs], rows[world.graph]
    assert (recs.name, recs.tenant, recs.database, recs.dimension) == ("recs", TENANT, DATABASE, 16)
    assert (graph.tenant, graph.database) == DEFAULT
    assert rows[world.untouched].dimension is None
    assert isinstance(recs.config, dict)
    assert (world.persist / recs.vector_segment / "index_metadata.pickle").exists()
    # The topic has the same prefix in every tenant: it is what the queue rows hold.
    assert recs.topic == f"persistent://default/default/{world.recs}"
    assert queue_bounds(conn, recs.topic) is not None
    assert queue_bounds(conn, "persistent://default/default/none") is None


def test_read_records_equals_the_servers_get(
    world: World, conn: sqlite3.Connection, api: Api
) -> None:
    for cid in (world.recs, world.graph, world.fresh):
        segment = collection(conn, cid).metadata_segment
        records = [r for chunk in read_records(conn, segment) for r in chunk]
        assert [r.rowid for r in records] == sorted(r.rowid for r in records)
        got = api.get(cid)
        assert [r.id for r in records] == got["ids"]
        assert [r.document for r in records] == got["documents"]
        assert [r.uri for r in records] == got["uris"]
        assert typed([r.metadata for r in records]) == typed(got["metadatas"])
        small = [r for chunk in read_records(conn, segment, chunk_rows=97) for r in chunk]
        assert small == records


def test_records_keep_the_primarys_quirks(world: World, conn: sqlite3.Connection) -> None:
    segment = collection(conn, world.recs).metadata_segment
    records = {r.id: r for chunk in read_records(conn, segment) for r in chunk}
    order = [r.id for chunk in read_records(conn, segment) for r in chunk]
    assert order == world.expected_recs_order  # updates in place, re-adds at the end
    # The first rows reused the deleted collection's embeddings ids: its arrays show through.
    assert records["r0"].metadata == {"leaked": ["secret", "x"]}
    assert records["r1"].metadata == {"f": 2.0, "i": 2, "leaked_n": [1, 2]}
    assert typed(records["r8"].metadata) == typed({"f": 2.0, "i": 2})
    assert typed(records["r3"].metadata)["fl"] == [("float", 1.5), ("float", 2.0)]
    assert records["r11"].metadata == {"neg": -11, "s": "s11", "big": 2**40, "i": 99, "new": "yes"}
    assert records["r7"].metadata is None and records["r7"].document == "doc 7"
    assert (records["r2505"].metadata, records["r2505"].uri) == ({}, "only-uri")
    assert "r40" not in records and records["r30"].metadata == {"again": True}


def test_record_seq_is_the_last_write_of_the_record(world: World, conn: sqlite3.Connection) -> None:
    c = collection(conn, world.recs)
    records = {r.id: r for chunk in read_records(conn, c.metadata_segment) for r in chunk}
    last_write = {row.id: row.seq for row in read_queue(conn, c.topic, 0, 1 << 20)}
    for rid in ("r10", "r15", "r20", "r2500", "r30", "r2505"):  # updated, upserted, re-added
        assert records[rid].seq == last_write[rid]
    assert records["r50"].seq < records["r10"].seq  # an add of an existing id changes nothing
    assert decode_seq(records["r9"].seq.to_bytes(8, "big")) == records["r9"].seq
    assert decode_seq((5).to_bytes(24, "big")) == 5


def test_the_queue_after_the_flush_holds_the_writes_since(
    world: World, conn: sqlite3.Connection
) -> None:
    c = collection(conn, world.recs)
    flushed = segment_seq(conn, c.vector_segment)
    assert flushed is not None
    tail = read_queue(conn, c.topic, flushed)
    assert [(r.op, r.id, r.vector) for r in tail] == world.recs_log.entries[2000:]
    assert all(r.encoding == "FLOAT32" for r in tail if r.vector is not None)
    assert tail[0].seq == flushed + 1 and tail[-1].seq == queue_bounds(conn, c.topic)[1]  # type: ignore[index]
    update = next(r for r in tail if r.id == "r10")
    assert update.metadata == {"i": 99, "new": "yes", "f": None}
    assert next(r for r in tail if r.id == "r15").metadata == {"chroma:document": "upd"}
    assert [r.seq for r in read_queue(conn, c.topic, flushed, limit=3)] == [r.seq for r in tail[:3]]
    everything = read_queue_after(conn, flushed)
    assert [r for r in everything if r.topic == c.topic] == tail
    assert queue_max(conn) == everything[-1].seq
    assert segment_seqs(conn, [c.vector_segment, "nope"]) == {c.vector_segment: flushed}


# -- the HNSW segment --------------------------------------------------------------------------


def test_a_flushed_segment_loads_in_hnswlib_and_answers_as_the_server(
    world: World, conn: sqlite3.Connection, api: Api, tmp_path: Path
) -> None:
    c = collection(conn, world.graph)
    copy = copy_segment(
        world.persist / c.vector_segment,
        tmp_path / "copy",
        lambda: segment_seq(conn, c.vector_segment),
    )
    assert copy.header is not None and copy.hnswlib_path is not None
    assert copy.seq == segment_seq(conn, c.metadata_segment)  # no tail: the files cover all
    assert (copy.header.cur_element_count, len(copy.labels.id_to_label)) == (1900, 1800)
    deleted = deleted_labels(copy)
    assert len(deleted) == 100 and not set(deleted.tolist()) & set(copy.labels.label_to_id)
    index = hnswlib.Index(space="cosine", dim=DIM)
    index.load_index(str(copy.hnswlib_path))
    index.set_ef(100)  # the collection's ef_search
    queries = world.graph_vectors[::61]
    labels, distances = index.knn_query(queries, k=10)
    got = api.query(world.graph, queries, 10)
    assert [[copy.labels.label_to_id[int(x)] for x in row] for row in labels] == got["ids"]
    np.testing.assert_allclose(distances, np.array(got["distances"]), atol=1e-5)


def test_the_live_segment_with_a_tail_copies_and_validates(
    world: World, conn: sqlite3.Connection, tmp_path: Path
) -> None:
    c = collection(conn, world.recs)
    copy = copy_segment(
        world.persist / c.vector_segment,
        tmp_path / "copy",
        lambda: segment_seq(conn, c.vector_segment),
    )
    validate(copy)
    assert copy.header is not None and copy.header.cur_element_count == 2000
    assert copy.labels.total_elements_added == 2000 and len(deleted_labels(copy)) == 0
    assert copy.header.dimensionality == DIM and copy.labels.dimensionality is None


def test_never_flushed_segments_have_no_header(
    world: World, conn: sqlite3.Connection, tmp_path: Path
) -> None:
    for cid in (world.fresh, world.untouched):
        c = collection(conn, cid)
        copy = copy_segment(world.persist / c.vector_segment, tmp_path / cid, lambda: None)
        assert copy == SegmentCopy(tmp_path / cid, None, copy.labels, 0, None)
        assert copy.labels.id_to_label == {} and len(deleted_labels(copy)) == 0
    fresh = world.persist / collection(conn, world.fresh).vector_segment
    assert (fresh / "header.bin").exists() and not (fresh / "index_metadata.pickle").exists()
    assert not (world.persist / collection(conn, world.untouched).vector_segment).exists()


def _graph_files(world: World, conn: sqlite3.Connection, dest: Path) -> Path:
    """A private copy of the graph segment's files, to damage."""
    src = world.persist / collection(conn, world.graph).vector_segment
    dest.mkdir()
    for name in ("header.bin", "data_level0.bin", "length.bin", "link_lists.bin"):
        (dest / name).write_bytes((src / name).read_bytes())
    (dest / "index_metadata.pickle").write_bytes((src / "index_metadata.pickle").read_bytes())
    return dest


def _damage(files: Path, how: str) -> None:
    header = parse_header((files / "header.bin").read_bytes())
    stride, count = header.size_data_per_element, header.cur_element_count
    data = bytearray((files / "data_level0.bin").read_bytes())
    links = bytearray((files / "link_lists.bin").read_bytes())
    raw_header = bytearray((files / "header.bin").read_bytes())
    if how == "link":  # the first link of an element that has one, past the last element
        element = next(e for e in range(count) if struct.unpack_from("<H", data, e * stride)[0])
        struct.pack_into("<I", data, element * stride + 4, count)
    elif how == "label0":
        struct.pack_into("<Q", data, 5 * stride + header.label_offset, 0)
    elif how == "duplicate-label":
        label = data[6 * stride + header.label_offset : 7 * stride]
        data[5 * stride + header.label_offset : 6 * stride] = label
    elif how == "live-count":  # a live element flagged deleted: the map has one id too many
        live = next(e for e in range(count) if not data[e * stride + 2] & 1)
        data[live * stride + 2] |= 1
    elif how == "truncated":
        del data[count * stride - stride // 2 :]
    elif how == "link-size":  # the first non-empty upper-level list, 4 bytes longer
        first = next(i for i in range(0, len(links), 4) if links[i : i + 4] != bytes(4))
        struct.pack_into("<I", links, first, struct.unpack_from("<I", links, first)[0] + 4)
    elif how == "offset-data":
        struct.pack_into("<Q", raw_header, 44, header.offset_data + 4)
    (files / "data_level0.bin").write_bytes(bytes(data))
    (files / "link_lists.bin").write_bytes(bytes(links))
    (files / "header.bin").write_bytes(bytes(raw_header))


DAMAGE = [
    "link",
    "label0",
    "duplicate-label",
    "live-count",
    "truncated",
    "link-size",
    "offset-data",
]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_copy_is_refused(
    world: World, conn: sqlite3.Connection, tmp_path: Path, how: str
) -> None:
    files = _graph_files(world, conn, tmp_path / "files")
    copy_segment(files, tmp_path / "good", lambda: 1)  # undamaged, it passes
    _damage(files, how)
    with pytest.raises(SegmentCorrupt):
        copy_segment(files, tmp_path / "bad", lambda: 1)


def test_a_segment_that_keeps_changing_is_unstable(
    world: World, conn: sqlite3.Connection, tmp_path: Path
) -> None:
    files = _graph_files(world, conn, tmp_path / "files")
    calls: list[int] = []

    def moving_seq() -> int:
        calls.append(1)
        return len(calls)

    with pytest.raises(SegmentUnstable, match="max_seq_id"):
        copy_segment(files, tmp_path / "copy", moving_seq, attempts=3)
    assert len(calls) == 6  # before and after each of the three copies
    # Files written a moment ago may be mid-flush (mtimes move in ticks): not trusted yet...
    (files / "length.bin").write_bytes((files / "length.bin").read_bytes())
    with pytest.raises(SegmentUnstable, match="written"):
        copy_segment(files, tmp_path / "copy", lambda: 1, attempts=1, quiet_s=60)
    # ... until they have been quiet for a while.
    assert copy_segment(files, tmp_path / "copy", lambda: 1).seq == 1


class Payload:
    pass


@pytest.mark.parametrize(
    "raw",
    [
        pickle.dumps(set(), protocol=2),  # builtins.set by reference
        pickle.dumps(Payload()),
        pickle.dumps({"id_to_label": OrderedDict()}),
        pickle.dumps(set()),  # protocol 5: no class reference, but not a dict either
        pickle.dumps({"id_to_label": {"a": 1}, "label_to_id": {1: "b"}, "total_elements_added": 1}),
        pickle.dumps({"id_to_label": {"a": True}, "label_to_id": {}, "total_elements_added": 1}),
        b"\x80\x03}q",  # truncated
    ],
    ids=["set-p2", "object", "ordereddict", "set-p5", "not-inverse", "bool-label", "truncated"],
)
def test_the_label_map_unpickler_refuses_anything_but_plain_data(raw: bytes) -> None:
    with pytest.raises(SegmentCorrupt):
        read_label_map(raw)


def test_the_label_map_reads_what_the_primary_writes(
    world: World, conn: sqlite3.Connection
) -> None:
    src = world.persist / collection(conn, world.graph).vector_segment / "index_metadata.pickle"
    labels = read_label_map(src.read_bytes())
    assert labels.total_elements_added == 1900 and labels.max_seq_id is None
    assert labels.label_to_id[labels.id_to_label["g1"]] == "g1" and "g0" not in labels.id_to_label


def test_parse_header_wants_exactly_100_bytes() -> None:
    with pytest.raises(SegmentCorrupt):
        parse_header(bytes(99))
