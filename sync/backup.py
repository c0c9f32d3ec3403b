"""Backups are snapshots: the same files a replica serves from (DESIGN.md), written elsewhere.

* ``backup`` exports collections from a primary (sync/export.py) and publishes each as a
  snapshot under DIR, in the snapshot store's layout ``DIR/<collection id>/<generation>/``, so
  a backup directory can also seed a proxy's ``snapshot_dir``.
* ``verify`` checks the newest snapshot of every collection offline: checksums, row counts, and
  HNSW search against exact search over the stored vectors (recall@10).
* ``restore`` loads snapshots into a primary where the collections are absent (or empty), then
  checks the primary's records and query answers against the snapshot. It never writes into a
  non-empty collection, and decides that for every snapshot before it writes anything.

``run`` is the command line's entry: results go to stdout (one line per collection), progress
to the log (stderr), one-line errors to stderr; exit 0 ok, 1 failed, 2 bad usage.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson

from index.errors import SnapshotCorrupt, SnapshotError
from index.replica import ReplicaIndex
from index.snapshot import MANIFEST, Manifest, generations

from .build import build_and_publish
from .export import (
    Export,
    ExportChanged,
    ExportError,
    PrimaryClient,
    call,
    export_collection,
)

log = logging.getLogger(__name__)

PROG = "replica-proxy"
DEFAULT_DATABASE = "default_tenant/default_database"
EXPORT_ATTEMPTS = 3
COVERS_NOTHING = -1  # a backup is not tied to any proxy's write counter
RECALL_K = 10
RECALL_FLOOR = 0.9
# Chroma's default max_payload_size_bytes is 40 MiB (chroma-wire.md section 10); batches aim
# below it because their size is estimated per row, not measured.
MAX_BODY_BYTES = 32 << 20
QUERIES_PER_REQUEST = 100


class BackupError(Exception):
    """A backup, verify or restore failed; the message is one line for the operator (exit 1)."""


class UsageError(BackupError):
    """The command line asks for something that cannot be done (exit 2)."""


class HttpPrimary:
    """A minimal PrimaryClient for one-shot commands. proxy.upstream.Upstream adds a breaker,
    metrics and pass-through framing a serving proxy needs; here a failure just ends the run."""

    def __init__(self, base_url: str, read_timeout_s: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(sock_connect=10, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpPrimary:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call_raw(
        self, method: str, path: str, payload: Any = None, timeout_s: float | None = None
    ) -> tuple[int, bytes]:
        assert self._session is not None, "HttpPrimary used outside its context"
        body = None if payload is None else orjson.dumps(payload)
        headers = {"Content-Type": "application/json"}  # Chroma refuses bodies without it
        try:
            async with (
                asyncio.timeout(timeout_s),
                self._session.request(
                    method, self.base_url + path, data=body, headers=headers
                ) as resp,
            ):
                return resp.status, await resp.read()
        except TimeoutError as exc:
            raise BackupError(f"primary {self.base_url}: {method} {path} timed out") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise BackupError(f"primary {self.base_url}: {exc or repr(exc)}") from exc


def reason(status: int, raw: bytes) -> str:
    """A primary's error answer in one line: Chroma's message, else the start of the body."""
    try:
        message = orjson.loads(raw)["message"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        message = raw[:200].decode(errors="replace")
    return f"{status} {message}".rstrip()


def label(model: dict[str, Any]) -> str:
    return f"{model['tenant']}/{model['database']}/{model['name']}"


def db_path(tenant: str, database: str) -> str:
    return f"/api/v2/tenants/{tenant}/databases/{database}"


# --- backup --------------------------------------------------------------------------------


@dataclass(slots=True)
class BackupSummary:
    collections: int = 0
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def line(self, out: Path) -> str:
        return (
            f"backup: {self.collections} collection(s), {self.rows} rows, "
            f"{self.bytes / 1e6:.1f} MB in {self.seconds:.1f}s -> {out}"
        )


def parse_database(spec: str) -> tuple[str, str]:
    tenant, sep, database = spec.partition("/")
    if not (sep and tenant and database) or "/" in database:
        raise UsageError(f"--database {spec!r}: expected TENANT/DATABASE")
    return tenant, database


async def list_collections(client: PrimaryClient, tenant: str, database: str) -> list[Any]:
    """Every collection of a database, paged like sync/scheduler.py. Listing a database that
    does not exist answers 200 [] (chroma-wire.md section 3), so existence is checked first."""
    status, raw = await client.call_raw("GET", db_path(tenant, database))
    if status != 200:
        raise BackupError(f"database {tenant}/{database}: {reason(status, raw)}")
    found: list[Any] = []
    while True:
        path = f"{db_path(tenant, database)}/collections?limit=100&offset={len(found)}"
        page = await call(client, "GET", path)
        found += page
        if len(page) < 100:
            return found


async def select_collections(
    client: PrimaryClient, databases: Sequence[tuple[str, str]], names: Sequence[str]
) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = []
    for tenant, database in databases:
        models += await list_collections(client, tenant, database)
    missing = sorted(set(names) - {m["name"] for m in models})
    if missing:
        where = ", ".join(f"{t}/{d}" for t, d in databases)
        raise BackupError(f"no collection named {', '.join(missing)} in {where}")
    return [m for m in models if not names or m["name"] in names]


async def export_with_retry(
    client: PrimaryClient, model: dict[str, Any], page_rows: int, concurrency: int
) -> Export:
    """Offset paging is only consistent while nobody writes; a changed collection is exported
    again rather than backed up with skipped or repeated rows."""
    for attempt in range(1, EXPORT_ATTEMPTS + 1):
        try:
            return await export_collection(client, model, page_rows, concurrency)
        except ExportChanged as exc:
            if attempt == EXPORT_ATTEMPTS:
                raise BackupError(f"{exc} (in each of {attempt} attempts)") from exc
            log.warning("%s; exporting again", exc)
    raise AssertionError("unreachable")


async def backup(
    client: PrimaryClient, out: Path, models: Sequence[dict[str, Any]], options: dict[str, Any]
) -> BackupSummary:
    summary = BackupSummary()
    started = time.monotonic()
    for model in models:
        export = await export_with_retry(
            client, model, options["page_rows"], options["concurrency"]
        )
        replica = await asyncio.to_thread(
            build_and_publish, export, out, client.base_url, COVERS_NOTHING, options["threads"]
        )
        log.info("backup %s: %d rows -> %s", label(model), replica.n, replica.directory)
        summary.collections += 1
        summary.rows += replica.n
        summary.bytes += sum(int(f["bytes"]) for f in replica.manifest.files.values())
    summary.seconds = time.monotonic() - started
    return summary


# --- verify --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    problem: str | None  # None: the snapshot is fine
    detail: str = ""

    def line(self) -> str:
        if self.problem is None:
            return f"ok   {self.name}: {self.detail}"
        return f"FAIL {self.name}: {self.problem}"


def newest_snapshots(root: Path) -> list[Path]:
    """The newest generation of every collection under ``root`` (or ``root`` itself when it
    is one snapshot directory)."""
    if (root / MANIFEST).is_file():
        return [root]
    newest = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            newest += generations(root, child.name)[:1]
    return newest


def read_manifest(directory: Path) -> Manifest | None:
    """The manifest without checking the files (for names and selection only)."""
    try:
        return Manifest.from_json((directory / MANIFEST).read_bytes())
    except (OSError, SnapshotError):
        return None


def describe(directory: Path) -> str:
    manifest = read_manifest(directory)
    if manifest is None:
        return str(directory)
    return f"{label(manifest.collection)} (generation {manifest.generation})"


def check_structure(replica: ReplicaIndex) -> None:
    """What checksums cannot tell: a snapshot filed under the wrong collection, duplicate ids,
    an index of another size than the vectors (ReplicaIndex.open has checked the counts of
    records and vectors against the manifest)."""
    manifest, directory = replica.manifest, replica.directory
    assert directory is not None
    if directory.parent.name != manifest.collection_id:
        raise SnapshotCorrupt(f"{directory}: manifest is of collection {manifest.collection_id}")
    if len(set(replica.records.ids)) != replica.n:
        raise SnapshotCorrupt(f"{directory}: duplicate ids in the records")
    if replica.index is not None and replica.index.get_current_count() != replica.n:
        raise SnapshotCorrupt(
            f"{directory}/index.hnsw: {replica.index.get_current_count()} vectors, "
            f"manifest says {replica.n}"
        )


def sample_rows(n: int, queries: int) -> npt.NDArray[np.int64]:
    """Fixed seed: repeated verifies of one snapshot ask the same questions."""
    rows: npt.NDArray[np.int64] = np.random.default_rng(0).choice(
        n, size=min(queries, n), replace=False
    )
    return rows


def sample_recall(replica: ReplicaIndex, queries: int) -> tuple[float, int]:
    """Recall@10 of the snapshot's HNSW index against exact search, with stored vectors as
    queries. A neighbour counts when its distance (recomputed from the stored vectors, not
    trusted from the index) is within the exact k-th distance: ties are not misses."""
    rows = sample_rows(replica.n, queries)
    if not len(rows):
        return 1.0, 0
    k = min(RECALL_K, replica.n)
    vectors = replica.embeddings(rows)
    approx = replica.search_hnsw(vectors, k)
    if not approx:  # hnswlib could not find k neighbours at all
        return 0.0, len(rows)
    everything = np.arange(replica.n, dtype=np.int64)
    hits = 0
    for query, (found, _) in zip(vectors, approx, strict=True):
        kth = replica._exact(query[None, :], k, everything)[0][1][-1]
        distances = replica._exact(query[None, :], k, found)[0][1]
        hits += int(np.count_nonzero(distances <= kth + 1e-6 * max(1.0, abs(float(kth)))))
    return hits / (k * len(rows)), len(rows)


def verify_snapshot(directory: Path, queries: int) -> Check:
    name = describe(directory)
    try:
        replica = ReplicaIndex.open(directory)  # checksums, then counts against the manifest
        check_structure(replica)
        recall, asked = sample_recall(replica, queries)
    # Anything that stops the snapshot from loading is a failed verify, not a crash.
    except Exception as exc:
        return Check(name, str(exc) or repr(exc))
    summary = f"recall@{RECALL_K} {recall:.3f} over {asked} queries" if asked else "no rows"
    if recall < RECALL_FLOOR:
        return Check(name, f"{summary}, below the floor {RECALL_FLOOR}")
    return Check(name, None, f"{replica.n} rows, checksums and counts ok, {summary}")


def verify_all(root: Path, queries: int) -> list[Check]:
    directories = newest_snapshots(root)
    if not directories:
        return [Check(str(root), "no snapshots found")]
    return [verify_snapshot(d, queries) for d in directories]


# --- command line --------------------------------------------------------------------------


async def _backup_command(options: dict[str, Any]) -> list[str]:
    databases = [parse_database(s) for s in options["database"] or [DEFAULT_DATABASE]]
    out = Path(options["out"])
    async with HttpPrimary(options["primary"]) as client:
        models = await select_collections(client, databases, options["collection"] or [])
        summary = await backup(client, out, models, options)
    return [summary.line(out)]


async def _restore_command(options: dict[str, Any]) -> list[str]:
    root = _existing_dir(options["dir"])
    async with HttpPrimary(options["primary"]) as client:
        from .restore import restore  # imported here: sync/restore.py imports this module

        return await restore(client, root, options["collection"] or [], options)


def _existing_dir(raw: str) -> Path:
    root = Path(raw)
    if not root.is_dir():
        raise UsageError(f"{raw}: not a directory")
    return root


def _verify_command(options: dict[str, Any]) -> int:
    checks = verify_all(_existing_dir(options["dir"]), options["queries"])
    for check in checks:
        print(check.line(), flush=True)
    failed = sum(check.problem is not None for check in checks)
    if failed:
        print(f"{PROG} verify: {failed} of {len(checks)} snapshots failed", file=sys.stderr)
    return 1 if failed else 0


def run(command: str, options: dict[str, Any]) -> int:
    """Run `backup`, `verify` or `restore` with the parsed options; return the exit code."""
    try:
        if options.get("queries", 0) < 0:
            raise UsageError("--queries must be >= 0")
        if command == "verify":
            return _verify_command(options)
        main = _backup_command if command == "backup" else _restore_command
        lines = asyncio.run(main(options))
    except UsageError as exc:
        print(f"{PROG} {command}: error: {exc}", file=sys.stderr)
        return 2
    except (BackupError, ExportError, SnapshotError) as exc:
        print(f"{PROG} {command}: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line, flush=True)
    return 0
