"""Restore: load backup snapshots into a primary where the collections are absent or empty,
then check the primary's records and query answers against the snapshot (sync/backup.py
has the command line and the shared parts)."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from index.errors import SnapshotError
from index.replica import ReplicaIndex, Vectors
from index.snapshot import Manifest, verify

from .backup import (
    MAX_BODY_BYTES,
    PROG,
    QUERIES_PER_REQUEST,
    RECALL_K,
    BackupError,
    db_path,
    label,
    newest_snapshots,
    read_manifest,
    reason,
    sample_rows,
)
from .build import hnsw_settings
from .export import (
    Export,
    ExportError,
    PrimaryClient,
    call,
    collection_path,
    export_collection,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Target:
    """Where one snapshot goes, decided before anything is written."""

    directory: Path
    model: dict[str, Any]  # the collection model in the snapshot
    existing: dict[str, Any] | None  # an empty collection of that name on the target, reused


@dataclass(frozen=True, slots=True)
class WriteLimits:
    max_rows: int
    base64: bool
    max_bytes: int = MAX_BODY_BYTES


def select_snapshots(root: Path, names: Sequence[str]) -> list[tuple[Path, Manifest]]:
    """Newest verified snapshot per tenant/database/name (a collection deleted and re-created
    between backups has two ids: the newer cut wins)."""
    chosen: dict[str, tuple[Path, Manifest]] = {}
    for directory in newest_snapshots(root):
        manifest = read_manifest(directory)
        if manifest is not None and names and manifest.collection["name"] not in names:
            continue
        try:
            manifest = verify(directory)
        except SnapshotError as exc:
            raise BackupError(f"{exc}; nothing restored (see `{PROG} verify`)") from exc
        key = label(manifest.collection)
        if key in chosen and chosen[key][1].created_at >= manifest.created_at:
            log.warning("restore %s: skipping the older snapshot %s", key, directory)
            continue
        chosen[key] = (directory, manifest)
    missing = sorted(set(names) - {m.collection["name"] for _, m in chosen.values()})
    if missing or not chosen:
        raise BackupError(f"no snapshot of {', '.join(missing) or 'any collection'} in {root}")
    return sorted(chosen.values(), key=lambda item: label(item[1].collection))


async def plan(client: PrimaryClient, directory: Path, model: dict[str, Any]) -> Target:
    path = f"{db_path(model['tenant'], model['database'])}/collections/{model['name']}"
    status, raw = await client.call_raw("GET", path)
    if status == 404:
        return Target(directory, model, None)
    if status != 200:
        raise BackupError(f"looking up {label(model)}: {reason(status, raw)}")
    existing = orjson.loads(raw)
    count = int(await call(client, "GET", collection_path(existing) + "/count"))
    if count:
        raise BackupError(
            f"{label(model)} already exists on {client.base_url} with {count} records; "
            "refusing to overwrite it, nothing restored"
        )
    if hnsw_settings(existing) != hnsw_settings(model):
        raise BackupError(
            f"{label(model)} exists (empty) on {client.base_url} with HNSW settings "
            f"{hnsw_settings(existing)}, the snapshot has {hnsw_settings(model)}; "
            "delete it first, nothing restored"
        )
    return Target(directory, model, existing)


async def write_limits(client: PrimaryClient) -> WriteLimits:
    # max_batch_size is enforced only by Chroma's clients, but honouring it costs nothing.
    data = await call(client, "GET", "/api/v2/pre-flight-checks")
    return WriteLimits(
        int(data.get("max_batch_size") or 1000), bool(data.get("supports_base64_encoding"))
    )


async def ensure_database(client: PrimaryClient, tenant: str, database: str) -> None:
    steps = (
        (f"/api/v2/tenants/{tenant}", "/api/v2/tenants", tenant),
        (db_path(tenant, database), f"/api/v2/tenants/{tenant}/databases", database),
    )
    for lookup, create, name in steps:
        status, raw = await client.call_raw("GET", lookup)
        if status == 404:
            status, raw = await client.call_raw("POST", create, {"name": name})
            if status == 200:
                log.info("restore: created %s", lookup.removeprefix("/api/v2/"))
        if status not in (200, 409):  # 409: someone created it meanwhile, fine
            raise BackupError(f"{lookup}: {reason(status, raw)}")


async def create_collection(client: PrimaryClient, model: dict[str, Any]) -> dict[str, Any]:
    """Same name, metadata and configuration (configuration_json is accepted as sent and
    reproduces the configuration and schema; sending the schema too is refused by Chroma)."""
    await ensure_database(client, model["tenant"], model["database"])
    body = {
        "name": model["name"],
        "metadata": model.get("metadata") or None,
        "configuration": model.get("configuration_json"),
        "get_or_create": False,
    }
    path = db_path(model["tenant"], model["database"]) + "/collections"
    status, raw = await client.call_raw("POST", path, body)
    if status != 200:
        raise BackupError(f"creating {label(model)}: {reason(status, raw)}")
    created: dict[str, Any] = orjson.loads(raw)
    if hnsw_settings(created) != hnsw_settings(model):
        raise BackupError(
            f"{label(model)} was created (empty) with HNSW settings {hnsw_settings(created)}, "
            f"not the snapshot's {hnsw_settings(model)}"
        )
    return created


def row_bytes(replica: ReplicaIndex, base64_vectors: bool) -> list[int]:
    """JSON bytes each row adds to an add request (an estimate: a vector as base64, or as
    floats of at most 25 characters each, plus separators)."""
    dim = int(replica.vectors.shape[1]) if replica.n else 0
    vector = 4 * -(-4 * dim // 3) + 3 if base64_vectors else 25 * dim
    r = replica.records
    return [
        vector + 8 + sum(len(orjson.dumps(value)) for value in row)
        for row in zip(r.ids, r.documents, r.uris, r.metadatas, strict=True)
    ]


def batches(sizes: Sequence[int], max_rows: int, max_bytes: int) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges of at most max_rows rows and about max_bytes each. A single row
    larger than max_bytes still goes alone: the primary then answers 413, which is reported."""
    start, total = 0, 0
    for row, size in enumerate(sizes):
        if row > start and (row - start >= max_rows or total + size > max_bytes):
            yield start, row
            start, total = row, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


def _or_none(values: list[Any]) -> list[Any] | None:
    return values if any(v is not None for v in values) else None


def add_payload(replica: ReplicaIndex, start: int, end: int, base64_vectors: bool) -> Any:
    """One add request. Base64 carries the exact float32 bits and is a third of the size of
    float lists (chroma-wire.md section 2.1)."""
    vectors = replica.embeddings(np.arange(start, end, dtype=np.int64)).astype("<f4")
    if base64_vectors:
        embeddings: list[Any] = [base64.b64encode(v.tobytes()).decode() for v in vectors]
    else:
        embeddings = vectors.tolist()
    r = replica.records
    return {
        "ids": r.ids[start:end],
        "embeddings": embeddings,
        "documents": _or_none(r.documents[start:end]),
        "uris": _or_none(r.uris[start:end]),
        "metadatas": _or_none(r.metadatas[start:end]),
    }


async def add_all(
    client: PrimaryClient, model: dict[str, Any], replica: ReplicaIndex, limits: WriteLimits
) -> None:
    """Add the rows in snapshot order, which is the original's storage order, so the restored
    collection's get() returns them in the same order."""
    path = collection_path(model) + "/add"
    sizes = await asyncio.to_thread(row_bytes, replica, limits.base64)
    log.info("restore %s: adding %d rows", label(model), replica.n)
    started = last = time.monotonic()
    for start, end in batches(sizes, limits.max_rows, limits.max_bytes):
        payload = await asyncio.to_thread(add_payload, replica, start, end, limits.base64)
        status, raw = await client.call_raw("POST", path, payload)
        if status != 201:
            raise BackupError(
                f"add of rows {start}-{end}: {reason(status, raw)}; the collection "
                f"holds {start} of {replica.n} rows: delete it before restoring again"
            )
        if time.monotonic() - last >= 5:
            last = time.monotonic()
            rate = end / (last - started)
            log.info("restore %s: %d/%d rows, %.0f rows/s", label(model), end, replica.n, rate)


def compare_records(got: Export, replica: ReplicaIndex) -> None:
    """The restored collection's get() against the snapshot: same rows in the same order,
    metadata with the same types (2 and 2.0 differ), vectors to float32 precision (cosine
    collections return up to 1 ulp off, chroma-wire.md section 4)."""
    want = replica.records
    for field in ("ids", "documents", "uris"):
        mine, theirs = getattr(want, field), getattr(got.records, field)
        if mine != theirs:
            raise BackupError(f"{field} differ from the snapshot{_first_difference(mine, theirs)}")
    canonical = [orjson.dumps(m, option=orjson.OPT_SORT_KEYS) for m in want.metadatas]
    restored = [orjson.dumps(m, option=orjson.OPT_SORT_KEYS) for m in got.records.metadatas]
    if canonical != restored:
        raise BackupError(
            f"metadatas differ from the snapshot{_first_difference(canonical, restored)}"
        )
    vectors: Vectors = np.asarray(replica.vectors, dtype=np.float32)
    if got.vectors.shape != vectors.shape or not np.allclose(
        got.vectors, vectors, rtol=1e-6, atol=0
    ):
        raise BackupError("embeddings differ from the snapshot")


def _first_difference(want: list[Any], got: list[Any]) -> str:
    if len(want) != len(got):
        return f" ({len(got)} rows, snapshot {len(want)})"
    row = next(i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b)
    return f", first at row {row}"


async def compare_queries(
    client: PrimaryClient, model: dict[str, Any], replica: ReplicaIndex, queries: int
) -> tuple[int, int]:
    """Stored vectors as queries: the primary's top 10 against exact search over the snapshot.
    Returns (identical, tolerated). A list may differ by one id (a near-tie that the primary's
    HNSW orders or cuts differently); anything more fails the restore."""
    rows = sample_rows(replica.n, queries)
    k = min(RECALL_K, replica.n)
    identical = tolerated = 0
    for start in range(0, len(rows), QUERIES_PER_REQUEST):
        vectors = replica.embeddings(rows[start : start + QUERIES_PER_REQUEST])
        body = {"query_embeddings": vectors.tolist(), "n_results": k, "include": ["distances"]}
        answer = await call(client, "POST", collection_path(model) + "/query", body)
        exact = replica._exact(vectors, k, np.arange(replica.n, dtype=np.int64))
        asked = rows[start : start + QUERIES_PER_REQUEST]
        for row, got, (want_rows, _) in zip(asked, answer["ids"], exact, strict=True):
            want = [replica.records.ids[r] for r in want_rows]
            if got == want:
                identical += 1
            elif len(got) == len(want) and len(set(want) - set(got)) <= 1:
                tolerated += 1
            else:
                raise BackupError(
                    f"query by the vector of {replica.records.ids[row]!r} answered {got}, "
                    f"exact search over the snapshot {want}"
                )
    return identical, tolerated


async def check_restored(
    client: PrimaryClient, target: Target, replica: ReplicaIndex, options: dict[str, Any]
) -> str:
    model = target.model
    path = f"{db_path(model['tenant'], model['database'])}/collections/{model['name']}"
    restored = await call(client, "GET", path)  # again: it knows its dimension now
    log.info("restore %s: checking records and queries against the snapshot", label(model))
    export = await export_collection(client, restored, options["page_rows"], options["concurrency"])
    compare_records(export, replica)
    identical, tolerated = await compare_queries(client, restored, replica, options["queries"])
    asked = identical + tolerated
    near = f", {tolerated} within one id (near-ties)" if tolerated else ""
    return (
        f"{replica.n} records identical, {identical}/{asked} queries identical to exact "
        f"search{near}; collection id {restored['id']}"
    )


async def restore_one(
    client: PrimaryClient, target: Target, limits: WriteLimits, options: dict[str, Any]
) -> str:
    started = time.monotonic()
    replica = await asyncio.to_thread(ReplicaIndex.open, target.directory)
    model = target.existing or await create_collection(client, target.model)
    try:
        await add_all(client, model, replica, limits)
    except BackupError as exc:
        raise BackupError(f"{label(target.model)}: {exc}") from exc
    try:
        report = await check_restored(client, target, replica, options)
    except (BackupError, ExportError) as exc:
        raise BackupError(f"{label(target.model)} restored but its check failed: {exc}") from exc
    return f"restored {label(target.model)} in {time.monotonic() - started:.1f}s: {report}"


async def restore(
    client: PrimaryClient, root: Path, names: Sequence[str], options: dict[str, Any]
) -> list[str]:
    snapshots = await asyncio.to_thread(select_snapshots, root, names)
    # Every target is checked before the first write, so a refusal leaves the primary as it was.
    targets = [await plan(client, d, m.collection) for d, m in snapshots]
    limits = await write_limits(client)
    return [await restore_one(client, t, limits, options) for t in targets]
