"""Read-only readers of a running Chroma 1.5.9 primary's ``chroma.sqlite3``.

The database is in rollback-journal mode (not WAL, chroma-wire.md section 11.5): a reader that
holds a read transaction or an unfinished cursor keeps a SHARED lock and every write of the
primary waits for it. So every function here runs short autocommit statements and fetches each
one completely (``fetchall``) before returning; nothing is held between calls. Large reads go in
chunks of ``embeddings.id`` ranges, a few thousand rows per statement.

A connection from :func:`connect` may be used from any thread, but by one at a time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from .errors import SchemaMismatch

# embeddings_queue.operation codes.
ADD = 0
UPDATE = 1
UPSERT = 2
DELETE = 3

DOCUMENT_KEY = "chroma:document"
URI_KEY = "chroma:uri"
# The server drops every key with this prefix from the metadata it returns (the frontend's
# CHROMA_KEY filter), not only the document and the uri.
INTERNAL_PREFIX = "chroma:"

# The queue's topic does not depend on the tenant or database: the local server builds it from
# a fixed tenant and namespace, both "default" (checked on a collection in tenant1/db_one).
TOPIC_PREFIX = "persistent://default/default/"

# (dir, version, filename) of every row in ``migrations`` of a database created by Chroma 1.5.9
# (recorded from a fresh `chroma run` database; the same list as rust/sqlite/migrations/ at the
# 1.5.9 tag). Fewer rows is an older database, more rows a newer one: both refused.
MIGRATIONS_1_5_9: frozenset[tuple[str, int, str]] = frozenset(
    {
        ("embeddings_queue", 1, "00001-embeddings.sqlite.sql"),
        ("embeddings_queue", 2, "00002-embeddings-queue-config.sqlite.sql"),
        ("metadb", 1, "00001-embedding-metadata.sqlite.sql"),
        ("metadb", 2, "00002-embedding-metadata.sqlite.sql"),
        ("metadb", 3, "00003-full-text-tokenize.sqlite.sql"),
        ("metadb", 4, "00004-metadata-indices.sqlite.sql"),
        ("metadb", 5, "00005-max-seq-id-int.sqlite.sql"),
        ("metadb", 6, "00006-metadata-array-support.sqlite.sql"),
        ("sysdb", 1, "00001-collections.sqlite.sql"),
        ("sysdb", 2, "00002-segments.sqlite.sql"),
        ("sysdb", 3, "00003-collection-dimension.sqlite.sql"),
        ("sysdb", 4, "00004-tenants-databases.sqlite.sql"),
        ("sysdb", 5, "00005-remove-topic.sqlite.sql"),
        ("sysdb", 6, "00006-collection-segment-metadata.sqlite.sql"),
        ("sysdb", 7, "00007-collection-config.sqlite.sql"),
        ("sysdb", 8, "00008-maintenance-log.sqlite.sql"),
        ("sysdb", 9, "00009-segment-collection-not-null.sqlite.sql"),
        ("sysdb", 10, "00010-collection-schema.sqlite.sql"),
    }
)

_VALUE_COLUMNS = ("id", "key", "string_value", "int_value", "float_value", "bool_value")

# The tables and columns the readers below use.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "migrations": ("dir", "version", "filename"),
    "databases": ("id", "name", "tenant_id"),
    "collections": ("id", "name", "dimension", "database_id", "config_json_str"),
    "segments": ("id", "type", "scope", "collection"),
    "max_seq_id": ("segment_id", "seq_id"),
    "embeddings_queue": ("seq_id", "operation", "topic", "id", "vector", "encoding", "metadata"),
    "embeddings": ("id", "segment_id", "embedding_id", "seq_id"),
    "embedding_metadata": _VALUE_COLUMNS,
    "embedding_metadata_array": _VALUE_COLUMNS,
}


def connect(path: Path, busy_timeout_s: float = 5.0) -> sqlite3.Connection:
    """A read-only autocommit connection to ``chroma.sqlite3`` at ``path``.

    ``mode=ro`` so that this process can never write (nor create a missing file); autocommit so
    that no transaction outlives a statement; the busy timeout rides out the primary's short
    exclusive locks while it commits."""
    uri = f"file:{quote(str(path.absolute()))}?mode=ro"
    return sqlite3.connect(
        uri,
        uri=True,
        timeout=busy_timeout_s,
        isolation_level=None,
        check_same_thread=False,
    )


def _all(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run one statement and fetch every row, so its read lock is released on return."""
    return conn.execute(sql, params).fetchall()


# -- schema ---------------------------------------------------------------------------------


def check_schema(conn: sqlite3.Connection) -> None:
    """Raise :class:`SchemaMismatch` unless this is a Chroma 1.5.9 database: exactly the
    recorded migrations, and every table and column the readers use."""
    columns = _table_columns(conn)
    if "migrations" not in columns:
        raise SchemaMismatch("no migrations table: not a Chroma database")
    rows = _all(conn, "SELECT dir, version, filename FROM migrations")
    _compare_migrations({(str(d), int(v), str(f)) for d, v, f in rows})
    _check_columns(columns)


def _table_columns(conn: sqlite3.Connection) -> dict[str, set[str]]:
    """Every table's column names, in one statement."""
    rows = _all(
        conn,
        "SELECT m.name, p.name FROM sqlite_master AS m JOIN pragma_table_info(m.name) AS p "
        "WHERE m.type = 'table'",
    )
    tables: dict[str, set[str]] = {}
    for table, column in rows:
        tables.setdefault(table, set()).add(column)
    return tables


def _compare_migrations(found: set[tuple[str, int, str]]) -> None:
    missing = sorted(MIGRATIONS_1_5_9 - found)
    unknown = sorted(found - MIGRATIONS_1_5_9)
    if not missing and not unknown:
        return
    parts = [f"found {len(found)} migrations, expected the {len(MIGRATIONS_1_5_9)} of Chroma 1.5.9"]
    if missing:
        parts.append("missing (an older database?): " + ", ".join(map(_migration_name, missing)))
    if unknown:
        parts.append("unknown (a newer Chroma?): " + ", ".join(map(_migration_name, unknown)))
    raise SchemaMismatch("; ".join(parts))


def _migration_name(row: tuple[str, int, str]) -> str:
    return f"{row[0]}/{row[2]}"


def _check_columns(columns: dict[str, set[str]]) -> None:
    for table, needed in REQUIRED_COLUMNS.items():
        if table not in columns:
            raise SchemaMismatch(f"table {table} is missing")
        absent = [c for c in needed if c not in columns[table]]
        if absent:
            raise SchemaMismatch(f"table {table} lacks column(s) {', '.join(absent)}")


# -- collections and positions ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CollectionRow:
    """A collection with its tenant, database and its two segments."""

    id: str
    name: str
    tenant: str
    database: str
    dimension: int | None
    config: dict[str, Any]  # parsed collections.config_json_str ({} when NULL)
    vector_segment: str  # also the name of its HNSW directory in the persist directory
    metadata_segment: str  # its rows are embeddings.segment_id
    schema: dict[str, Any] | None = None  # parsed collections.schema_str (where 1.5 keeps
    # the vector index's space and HNSW parameters; config_json_str is often just {})

    @property
    def topic(self) -> str:
        """The collection's ``embeddings_queue.topic``."""
        return TOPIC_PREFIX + self.id


def list_collections(conn: sqlite3.Connection) -> list[CollectionRow]:
    """Every collection of every tenant and database, ordered by tenant, database and name."""
    rows = _all(
        conn,
        "SELECT c.id, c.name, d.tenant_id, d.name, c.dimension, c.config_json_str, v.id, m.id, "
        "c.schema_str "
        "FROM collections AS c "
        "JOIN databases AS d ON d.id = c.database_id "
        "JOIN segments AS v ON v.collection = c.id AND v.scope = 'VECTOR' "
        "JOIN segments AS m ON m.collection = c.id AND m.scope = 'METADATA' "
        "ORDER BY d.tenant_id, d.name, c.name",
    )
    return [
        CollectionRow(
            id=cid,
            name=name,
            tenant=tenant,
            database=database,
            dimension=dimension,
            config=_parse_config(cid, config),
            vector_segment=vector,
            metadata_segment=metadata,
            schema=None if schema is None else _parse_config(cid, schema),
        )
        for cid, name, tenant, database, dimension, config, vector, metadata, schema in rows
    ]


def _parse_config(collection_id: str, raw: str | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        config = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SchemaMismatch(f"collection {collection_id}: config_json_str is not JSON") from exc
    if not isinstance(config, dict):
        raise SchemaMismatch(f"collection {collection_id}: config_json_str is not an object")
    return config


def decode_seq(value: object) -> int:
    """A seq_id as stored: an INTEGER (what 1.5.9 writes, in ``max_seq_id`` and in
    ``embeddings.seq_id`` despite its BLOB declaration) or, from databases written by old
    Python versions, a big-endian byte string (8 or 24 bytes)."""
    if isinstance(value, int):
        return value
    if isinstance(value, bytes):
        return int.from_bytes(value, "big")
    raise SchemaMismatch(f"unexpected seq_id value {value!r}")


def segment_seq(conn: sqlite3.Connection, segment_id: str) -> int | None:
    """The segment's ``max_seq_id``: for the vector segment, the last queue row its HNSW files
    cover (None before its first flush); for the metadata segment, the last row applied."""
    rows = _all(conn, "SELECT seq_id FROM max_seq_id WHERE segment_id = ?", (segment_id,))
    return decode_seq(rows[0][0]) if rows else None


def queue_tops(conn: sqlite3.Connection) -> dict[str, int]:
    """Each topic's newest seq in the queue (the queue is small: purged at every flush)."""
    rows = _all(conn, "SELECT topic, max(seq_id) FROM embeddings_queue GROUP BY topic")
    return {topic: int(seq) for topic, seq in rows}


def segment_seqs(conn: sqlite3.Connection, segment_ids: Iterable[str]) -> dict[str, int]:
    """``max_seq_id`` of each of ``segment_ids`` that has one, in one statement (the table holds
    at most two rows per collection, so it is read whole rather than bound id by id)."""
    wanted = set(segment_ids)
    rows = _all(conn, "SELECT segment_id, seq_id FROM max_seq_id")
    return {seg: decode_seq(seq) for seg, seq in rows if seg in wanted}


def queue_max(conn: sqlite3.Connection) -> int:
    """The highest seq_id in the whole queue, 0 when it is empty. Cheap (the rowid's max): a
    follower's "did anything change?" probe. It can go down: seq_ids are reused rowids."""
    rows = _all(conn, "SELECT max(seq_id) FROM embeddings_queue")
    return int(rows[0][0] or 0)


def queue_bounds(conn: sqlite3.Connection, topic: str) -> tuple[int, int] | None:
    """(min, max) seq_id of the topic's rows, None when it has none. The queue has no index on
    topic, so this scans it; it stays small (purged at every flush)."""
    rows = _all(
        conn, "SELECT min(seq_id), max(seq_id) FROM embeddings_queue WHERE topic = ?", (topic,)
    )
    low, high = rows[0]
    return None if low is None else (int(low), int(high))


# -- the queue ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogRow:
    """One ``embeddings_queue`` row.

    ``metadata`` is the parsed JSON object as written: user keys plus ``chroma:document`` and
    ``chroma:uri``; a None value means "delete this key" (update/upsert); {} when none."""

    seq: int
    op: int  # ADD, UPDATE, UPSERT or DELETE
    id: str
    vector: bytes | None  # the client's raw little-endian float32 bytes when encoding FLOAT32
    encoding: str | None
    metadata: dict[str, Any]
    topic: str  # the collection's CollectionRow.topic


_QUEUE_COLUMNS = (
    "SELECT seq_id, operation, id, vector, encoding, metadata, topic FROM embeddings_queue"
)


def read_queue(
    conn: sqlite3.Connection, topic: str, after_seq: int, limit: int = 10_000
) -> list[LogRow]:
    """Up to ``limit`` rows of ``topic`` with seq_id > ``after_seq``, in seq order."""
    return _log_rows(
        _all(
            conn,
            f"{_QUEUE_COLUMNS} WHERE topic = ? AND seq_id > ? ORDER BY seq_id LIMIT ?",
            (topic, after_seq, limit),
        )
    )


def read_queue_after(
    conn: sqlite3.Connection, after_seq: int, limit: int = 10_000, topic: str | None = None
) -> list[LogRow]:
    """Up to ``limit`` rows of every topic (or only ``topic``) with seq_id > ``after_seq``, in
    seq order: one statement for a follower of many collections."""
    if topic is not None:
        return read_queue(conn, topic, after_seq, limit)
    return _log_rows(
        _all(conn, f"{_QUEUE_COLUMNS} WHERE seq_id > ? ORDER BY seq_id LIMIT ?", (after_seq, limit))
    )


def _log_rows(rows: list[Any]) -> list[LogRow]:
    return [
        LogRow(seq, op, rid, vector, encoding, _parse_log_metadata(seq, metadata), topic)
        for seq, op, rid, vector, encoding, metadata, topic in rows
    ]


def _parse_log_metadata(seq: int, raw: str | bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    parsed = orjson.loads(raw)
    if not isinstance(parsed, dict):
        raise SchemaMismatch(f"queue row {seq}: metadata is not a JSON object")
    return parsed


# -- records of a metadata segment ------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """A record as the primary's ``get`` returns it (include metadatas, documents, uris)."""

    rowid: int  # embeddings.id: the primary's storage (and get) order
    seq: int  # embeddings.seq_id: the last queue row that added, updated or upserted it
    id: str
    document: str | None
    uri: str | None
    # User keys only. None when the record has no metadata rows at all (besides its document);
    # {} when it only has internal ones (a uri): that is what the server answers.
    metadata: dict[str, Any] | None


# The '+' keeps SQLite off the (segment_id, embedding_id) index: with it, every chunk would
# read the whole segment and sort it; without it each chunk is a short rowid range scan.
_EMBEDDINGS_CHUNK = (
    "SELECT id, embedding_id, seq_id FROM embeddings "
    "WHERE +segment_id = ? AND id > ? ORDER BY id LIMIT ?"
)
# A metadata row's value, picked in SQL as the server picks it (the first non-NULL of string,
# int, float, bool) so that Python builds one object per row instead of four. COALESCE keeps
# the storage class (TEXT, INTEGER, REAL); a bool comes back as a one-byte BLOB, a type no
# other column holds, so it stays distinguishable from an int.
_VALUE = (
    "COALESCE(string_value, int_value, float_value, "
    "CASE WHEN bool_value IS NULL THEN NULL WHEN bool_value THEN X'01' ELSE X'00' END)"
)
_TRUE = b"\x01"
# Rows of other segments fall into the same id range; they are dropped while assembling.
_SCALARS_IN_RANGE = f"SELECT id, key, {_VALUE} FROM embedding_metadata WHERE id >= ? AND id <= ?"
# Array elements in their stored order: the (id, key) index gives (id, key, rowid) order, the
# order the primary reads them in (its `id IN (...)` lookup uses the same index).
_ARRAYS_IN_RANGE = (
    f"SELECT id, key, {_VALUE} FROM embedding_metadata_array "
    "WHERE id >= ? AND id <= ? ORDER BY id, key, rowid"
)


def read_records(
    conn: sqlite3.Connection, metadata_segment: str, chunk_rows: int = 4096
) -> Iterator[list[Record]]:
    """The segment's records in ``embeddings.id`` order, ``chunk_rows`` at a time.

    Each chunk is three short statements (its embeddings rows, then the scalar and array
    metadata rows of its id range), so the primary's writers wait at most one of them. Neither
    the chunks nor a chunk's statements are one snapshot: a record written meanwhile may show
    its newer metadata (or none, if deleted) next to its older ``seq``. Replaying the queue from
    the metadata segment's max_seq_id, read before the first chunk, repairs that. Array
    metadata is read by ``embeddings.id`` as the primary reads it, so rows leaked by a deleted
    collection onto a reused id (chroma-wire.md section 14.2) are returned as the primary
    returns them."""
    last = -1
    while True:
        rows = _all(conn, _EMBEDDINGS_CHUNK, (metadata_segment, last, chunk_rows))
        if not rows:
            return
        yield _assemble_chunk(conn, rows)
        if len(rows) < chunk_rows:
            return
        last = rows[-1][0]


def _assemble_chunk(conn: sqlite3.Connection, rows: list[Any]) -> list[Record]:
    """Records for one chunk of ``embeddings`` rows (id, embedding_id, seq_id)."""
    first, last = rows[0][0], rows[-1][0]
    user: dict[int, dict[str, Any]] = {row[0]: {} for row in rows}
    internal: dict[int, dict[str, Any]] = {}  # only for rows that have chroma:* keys
    _merge_scalars(user, internal, _all(conn, _SCALARS_IN_RANGE, (first, last)))
    _merge_arrays(user, internal, _all(conn, _ARRAYS_IN_RANGE, (first, last)))
    return [_record(rowid, eid, seq, user[rowid], internal.get(rowid)) for rowid, eid, seq in rows]


# The two loops below run once per metadata row (several per record): kept inline and free of
# function calls, they are most of read_records' Python time. User keys and the internal
# ``chroma:`` keys go to separate dicts, so that no record's keys need scanning afterwards.


def _merge_scalars(
    user: dict[int, dict[str, Any]], internal: dict[int, dict[str, Any]], rows: list[Any]
) -> None:
    get = user.get
    for rowid, key, value in rows:
        meta = get(rowid)
        if meta is None or value is None:  # another segment's row, or a row without a value
            continue
        if type(value) is bytes:
            value = value == _TRUE
        if key.startswith(INTERNAL_PREFIX):
            internal.setdefault(rowid, {})[key] = value
        else:
            meta[key] = value


def _merge_arrays(
    user: dict[int, dict[str, Any]], internal: dict[int, dict[str, Any]], rows: list[Any]
) -> None:
    """Build arrays as the server does: each element is appended to the array of its key if
    that holds elements of the same type, otherwise it starts a new one (replacing a scalar of
    the same key too). The rows come in (id, key, rowid) order, so one key's elements are
    adjacent and the array being built is always the last one started."""
    get = user.get
    current: list[Any] = []
    last: tuple[int, str, type] | None = None
    for rowid, key, value in rows:
        meta = get(rowid)
        if meta is None or value is None:
            continue
        if type(value) is bytes:
            value = value == _TRUE
        if last == (rowid, key, type(value)):
            current.append(value)
            continue
        current, last = [value], (rowid, key, type(value))
        if key.startswith(INTERNAL_PREFIX):
            internal.setdefault(rowid, {})[key] = current
        else:
            meta[key] = current


def _record(
    rowid: int, eid: str, seq: object, meta: dict[str, Any], inner: dict[str, Any] | None
) -> Record:
    """A record from its user keys and its internal ones (None: it has none), as the server
    returns it: the document is taken out first, and a record with nothing else has metadata
    None; then the uri; every other ``chroma:`` key is dropped."""
    seq_id = seq if type(seq) is int else decode_seq(seq)
    if inner is None:
        return Record(rowid, seq_id, eid, None, None, meta or None)
    document = inner.pop(DOCUMENT_KEY, None)
    if type(document) is not str:
        document = None
    if not meta and not inner:
        return Record(rowid, seq_id, eid, document, None, None)
    uri = inner.get(URI_KEY)
    return Record(rowid, seq_id, eid, document, uri if type(uri) is str else None, meta)
