"""Answering reads from a replica with exactly the bytes' meaning the primary would send.

Each answer_* function parses the request strictly, evaluates it on an immutable replica and
encodes Chroma's response shape (field order, nulls, the echoed `include`, float32 numbers).
Anything not certain to match the primary (unknown fields, invalid values, edge cases) raises
NotLocal and the request is forwarded; the primary then produces its own answer or error.
These functions are pure and thread-safe: handlers run them in a worker thread, where the
searches release the GIL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from index.columns import Mask
from index.errors import NotLocal
from index.filters import Filter, parse_where, parse_where_document
from index.replica import ReplicaIndex, Rows
from proxy.replica.cache import canonical_digest

INCLUDE_VALUES = frozenset({"distances", "documents", "embeddings", "metadatas", "uris"})
GET_DEFAULT_INCLUDE = ["documents", "metadatas"]
QUERY_DEFAULT_INCLUDE = ["documents", "metadatas", "distances"]
_GET_KEYS = frozenset({"ids", "where", "where_document", "limit", "offset", "include"})
_QUERY_KEYS = frozenset({"ids", "where", "where_document", "n_results", "include"})
_QUERY_KEYS |= {"query_embeddings"}
_DUMPS = orjson.OPT_SERIALIZE_NUMPY
# Chroma 1.5.9 fails a get with metadatas and limit beyond this (chroma-wire.md section 14.8);
# forward so the client sees the primary's own answer.
_SQL_VARIABLE_LIMIT = 32766
Vectors = np.ndarray[Any, np.dtype[np.float32]]


def _body(raw: bytes, allowed: frozenset[str]) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise NotLocal("body is not JSON") from None
    if not isinstance(body, dict) or not set(body) <= allowed:
        raise NotLocal("unexpected body shape")
    return body


def _count(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise NotLocal(f"{name} must be a non-negative integer")
    return value


def _include(body: dict[str, Any], default: list[str]) -> list[str]:
    if "include" not in body:
        return default
    include = body["include"]
    # isinstance first: `{} in frozenset` raises TypeError (found by fuzzing: a 500).
    if not isinstance(include, list) or not all(
        isinstance(v, str) and v in INCLUDE_VALUES for v in include
    ):
        raise NotLocal("unknown include value")
    return include


def _ids(value: object) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise NotLocal("ids must be a list of strings")
    return value


def _filters(body: dict[str, Any]) -> list[Filter]:
    filters = []
    if body.get("where") is not None:
        filters.append(parse_where(body["where"]))
    if body.get("where_document") is not None:
        filters.append(parse_where_document(body["where_document"]))
    return filters


def _columns(replica: ReplicaIndex, rows: Rows, include: list[str]) -> dict[str, Any]:
    """The per-row fields of a response, in Chroma's key order; absent ones are null."""
    records = replica.records
    take = rows.tolist()
    return {
        "embeddings": replica.embeddings(rows) if "embeddings" in include else None,
        "documents": [records.documents[r] for r in take] if "documents" in include else None,
        "uris": [records.uris[r] for r in take] if "uris" in include else None,
        "metadatas": [records.metadatas[r] for r in take] if "metadatas" in include else None,
    }


@dataclass(frozen=True, slots=True)
class Prepared:
    """A read parsed once on the event loop: what to compute, and its cache digest."""

    op: str
    body: dict[str, Any] | None
    digest: bytes
    may_hold_bools: bool = False
    tenant: str | None = None
    database: str | None = None
    vectors: Vectors | None = None  # a query's embeddings as float32, shape (n, dim)


def prepare(
    op: str, raw: bytes, query: Mapping[str, str], tenant: str | None, database: str | None
) -> Prepared:
    """Parse a local-read candidate; NotLocal if it is not one the replica answers."""
    # The primary ignores query strings on these; keying on them anyway is merely cautious.
    if op == "query":
        body = _body(raw, _QUERY_KEYS)
        bools = b"true" in raw or b"false" in raw
        vectors = _float32_vectors(body.get("query_embeddings"))
        # The vectors enter the digest as the float32 bytes the primary searches with:
        # writing 384 numbers back out as sorted JSON cost as much as parsing them.
        rest = {key: value for key, value in body.items() if key != "query_embeddings"}
        digest = canonical_digest([rest, sorted(query.items()), vectors.shape])
        return Prepared(op, body, digest + vectors.tobytes(), bools, vectors=vectors)
    if op == "get":
        body = _body(raw, _GET_KEYS)
        return Prepared(op, body, canonical_digest([body, sorted(query.items())]))
    if op == "count":
        _check_count_query(query)
        return Prepared(op, None, b"")
    if op in ("get_collection", "get_collection_by_id"):
        # The answer depends on the tenant and database in the path (a collection looked up
        # in another database is a 404), so they are part of the cache key.
        digest = canonical_digest([tenant, database])
        return Prepared(op, None, digest, tenant=tenant, database=database)
    raise NotLocal(f"{op} is not answered locally")


def answer(replica: ReplicaIndex, prepared: Prepared, exact_max_rows: int) -> bytes:
    """Compute a prepared read on a replica (pure; runs in a worker thread)."""
    if prepared.op == "query":
        return answer_query(replica, prepared, exact_max_rows)
    if prepared.op == "get":
        assert prepared.body is not None
        return answer_get(replica, prepared.body)
    if prepared.op == "count":
        return str(replica.n).encode()
    return answer_collection(replica, prepared.tenant, prepared.database)


def answer_get(replica: ReplicaIndex, body: dict[str, Any]) -> bytes:
    include = _include(body, GET_DEFAULT_INCLUDE)
    limit = _count(body.get("limit"), "limit")
    offset = _count(body.get("offset"), "offset") or 0
    if limit is not None and limit > _SQL_VARIABLE_LIMIT and "metadatas" in include:
        raise NotLocal("the primary fails this request; let it answer")
    allowed = replica.mask(_ids(body.get("ids")), _filters(body))
    rows = replica.select(allowed, offset, limit)
    out = {
        "ids": [replica.records.ids[r] for r in rows.tolist()],
        **_columns(replica, rows, include),
    }
    out["include"] = include
    return orjson.dumps(out, option=_DUMPS)


@dataclass(frozen=True, slots=True)
class QueryPlan:
    """A parsed query: what to search for and how to shape the answer."""

    include: list[str]
    k: int
    queries: Vectors
    allowed: Mask | None


SearchResults = list[tuple[Rows, np.ndarray[Any, np.dtype[np.float32]]]]


def answer_query(replica: ReplicaIndex, prepared: Prepared, exact_max_rows: int) -> bytes:
    plan = plan_query(replica, prepared)
    return encode_query(replica, plan, replica.search(plan.queries, plan.k, plan.allowed,
                                                      exact_max_rows))  # fmt: skip


def plan_query(replica: ReplicaIndex, prepared: Prepared) -> QueryPlan:
    body, vectors = prepared.body, prepared.vectors
    assert body is not None and vectors is not None
    include = _include(body, QUERY_DEFAULT_INCLUDE)
    k = _count(body.get("n_results"), "n_results")
    if k is None:
        raise NotLocal("n_results missing")
    _check_vectors(vectors, body["query_embeddings"], replica, prepared.may_hold_bools)
    ids, filters = _ids(body.get("ids")), _filters(body)
    allowed = replica.mask(ids, filters)
    if ids and not filters and allowed is not None and int(allowed.sum()) < len(set(ids)):
        # Without a filter Chroma looks each id up in its HNSW map and fails the whole query
        # (500 "IdNotFound") on one it does not have: let it answer.
        raise NotLocal("query ids include one the collection does not have")
    return QueryPlan(include, k, vectors, allowed)


def encode_query(replica: ReplicaIndex, plan: QueryPlan, results: SearchResults) -> bytes:
    include = plan.include
    per_query = [_columns(replica, rows, include) for rows, _ in results]
    out: dict[str, Any] = {
        "ids": [[replica.records.ids[r] for r in rows.tolist()] for rows, _ in results]
    }
    for field in ("embeddings", "documents", "uris", "metadatas"):
        out[field] = [c[field] for c in per_query] if per_query[0][field] is not None else None
    out["distances"] = [d for _, d in results] if "distances" in include else None
    out["include"] = include
    return orjson.dumps(out, option=_DUMPS)


def _float32_vectors(value: object) -> Vectors:
    """Plain number lists, else NotLocal: base64 strings are a 422 on /query, and an empty
    list is an edge case the primary answers in its own way."""
    if not isinstance(value, list) or not value:
        raise NotLocal("query_embeddings must be a non-empty list of vectors")
    try:
        vectors = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise NotLocal("query_embeddings holds something other than numbers") from None
    if vectors.ndim != 2:
        raise NotLocal("query_embeddings must be a list of vectors")
    return vectors


def _check_vectors(
    vectors: Vectors, value: list[Any], replica: ReplicaIndex, may_hold_bools: bool
) -> None:
    """Vectors this replica can search as the primary would, else NotLocal: a wrong dimension
    or an empty replica are edge cases the primary answers in its own way."""
    if replica.n == 0 or vectors.shape[1] != replica.manifest.dimension:
        raise NotLocal("query vector of another dimension, or an empty collection")
    if not np.isfinite(vectors).all():
        raise NotLocal("query vector out of float32 range")
    # numpy turns JSON true/false into 1/0; the primary refuses them. Checked only when the
    # body holds such a token at all, since the per-element test costs more than the search.
    if may_hold_bools and any(isinstance(x, bool) for v in value for x in v):
        raise NotLocal("query vector holds a boolean")


_READ_LEVELS = frozenset({"index_and_wal", "index_only"})


def _check_count_query(query: Mapping[str, str]) -> None:
    if set(query) - {"read_level"} or query.get("read_level", "index_and_wal") not in _READ_LEVELS:
        raise NotLocal("unknown query parameter")


def answer_collection(replica: ReplicaIndex, tenant: str | None, database: str | None) -> bytes:
    """The collection model (get by name, get by id) as of the replica's export."""
    model = replica.manifest.collection
    if not replica.has_collection_model:
        raise NotLocal("this replica does not hold the primary's collection model")
    if (model["tenant"], model["database"]) != (tenant, database):
        raise NotLocal("collection lives in another tenant or database")
    return orjson.dumps(model)
