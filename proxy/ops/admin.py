"""The admin API under /admin/, behind admin_token (``Authorization: Bearer TOKEN``).

    GET  /admin/status     role, readiness, every served replica (generation, age, rows,
                           bytes, HNSW parameters), the builder's queue, loop stalls, RSS
    POST /admin/rebuild    {"collection": ID or NAME, "tenant"?, "database"?, "hnsw"?: {"M",
                           "ef_construction", "ef_search"}}: rebuild now, optionally with new
                           HNSW parameters (kept for later rebuilds); 202. The new replica
                           serves only after it validated (sync/build.py).
    GET  /admin/snapshots  the snapshot store: every generation of every collection

Errors use Chroma's JSON error shape like every other proxy error (proxy/errors.py).
"""

from __future__ import annotations

import asyncio
import hmac
import resource
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from index.live import LiveView
from index.reaper import REAPER
from index.snapshot import MANIFEST, Manifest
from proxy.access.auth import AUTH, audit_event
from proxy.errors import BadRequest, Conflict, Forbidden, Gone, NotFound, Unauthorized
from proxy.ops.ledger import LISTENING, READY, STARTING
from proxy.state import CONFIG, METRICS, ROUTER, STATE, UPSTREAM, WORKER
from sync.published import encode_ops
from sync.scheduler import RebuildScheduler, Wanted, newest_snapshots
from sync.tailer import StorageTailer

# Accepted HNSW overrides and their sane ranges.
_HNSW_LIMITS = {"M": (2, 128), "ef_construction": (1, 10_000), "ef_search": (1, 10_000)}


def _authorize(request: web.Request) -> None:
    guard = request.app.get(AUTH)
    if guard is not None:  # tokens_file: the admin role (admin_token is one such token)
        found = guard.token(request)
        if found.role != "admin":
            audit_event(request, "forbidden", token=found.name, reason="admin API")
            raise Forbidden(f"token {found.name}: the admin API needs the admin role")
        return
    token = request.app[CONFIG].admin_token
    if token is None:
        raise Forbidden("the admin API is off: set admin_token to use it")
    sent = request.headers.get("Authorization", "")
    scheme, _, value = sent.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), token):
        raise Unauthorized("admin API: missing or wrong bearer token")


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data, option=orjson.OPT_INDENT_2),
        content_type="application/json",
    )  # fmt: skip


async def unknown(request: web.Request) -> web.Response:
    _authorize(request)
    raise NotFound(f"no admin endpoint {request.method} {request.path}")


async def status(request: web.Request) -> web.Response:
    _authorize(request)
    app = request.app
    router, config = app[ROUTER], app[CONFIG]
    replicas = [_replica_status(r) for r in router.replicas]
    worker = app.get(WORKER)
    workers = None
    if worker is not None:  # this answer is one worker's: say which, and how the others are
        names = {STARTING: "starting", LISTENING: "listening", READY: "ready"}
        states = [names.get(s, "unknown") for s in worker.ledger.states(worker.count)]
        workers = {"this": worker.index, "states": states}
    return _json(
        {
            "role": config.role,
            "workers": workers,
            "ready": router.scheduler.ready,
            "primary_up": app[STATE].primary_up,
            "draining": app[STATE].draining,
            "replicas": sorted(replicas, key=lambda r: (r["name"], r["collection_id"])),
            "swaps": router.replicas.swaps,
            "retired": REAPER.pending,
            "sync": router.scheduler.status(),
            "write_overlay": None if router.overlay is None else router.overlay.status(),
            "event_loop_lag_max_s": app[METRICS].recent_max_lag(),
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_bytes": _rss_bytes(),
        }
    )


def _replica_status(replica: Any) -> dict[str, Any]:
    manifest: Manifest = replica.manifest
    return {
        "collection_id": replica.collection_id,
        "name": manifest.collection["name"],
        "tenant": manifest.collection["tenant"],
        "database": manifest.collection["database"],
        "generation": replica.generation,
        "age_s": round(replica.age_s(), 3),
        "rows": replica.n,
        "bytes": sum(f["bytes"] for f in manifest.files.values()),
        "space": manifest.space,
        "hnsw": manifest.hnsw,
        "directory": str(replica.directory),
        **_overlay(replica),
    }


def _overlay(replica: Any) -> dict[str, Any]:
    """Where a replica's rows come from. Storage mode (index/live.py): the log position
    served, rows changed since the take. Export mode with writes applied (proxy/replica/overlay.py):
    the proxy's write counter it covers, rows those writes changed since the snapshot."""
    if not isinstance(replica, LiveView):
        return {"source": "snapshot"}
    if replica.follows_log:
        return {"source": "storage", "log_position": replica.position,
                "overlay_rows": replica.owner.overlay_rows}  # fmt: skip
    return {"source": "snapshot+writes", "covers_write_seq": replica.covers_write_seq,
            "overlay_rows": replica.owner.overlay_rows}  # fmt: skip


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux
        return 0


async def rebuild(request: web.Request) -> web.Response:
    _authorize(request)
    if not request.app[CONFIG].replicas:
        raise Conflict("replicas are off: there is nothing to rebuild")
    body = await _body(request)
    collection = body.get("collection")
    if not isinstance(collection, str) or not collection:
        raise BadRequest('"collection" (a collection id or name) is required')
    tenant = str(body.get("tenant", "default_tenant"))
    database = str(body.get("database", "default_database"))
    hnsw = _hnsw(body.get("hnsw"))
    model = await _lookup(request, tenant, database, collection)
    scheduler = request.app[ROUTER].scheduler
    where = (model["id"], model["tenant"], model["database"])
    if isinstance(scheduler, StorageTailer):
        if hnsw:
            raise Conflict("storage mode serves the primary's own graph: no HNSW overrides")
        if not scheduler.retake(model["id"]):
            scheduler.request(*where)
        by = "this process, from the primary's storage"
    elif isinstance(scheduler, RebuildScheduler):
        scheduler.request(*where, hnsw=hnsw, even_if_building=True)
        by = "this process"
    else:  # role replica, or a worker after the first: the builder takes it from the store
        await scheduler.ask_builder(Wanted(*where, rebuild=True, hnsw=hnsw or None))
        by = "the builder, through the snapshot store"
    body = {"queued": model["id"], "name": model["name"], "hnsw": hnsw or None, "by": by}
    audit_event(request, "admin_rebuild", collection=model["id"], hnsw=hnsw or None)
    return _json(body, status=202)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _hnsw(value: object) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not set(value) <= set(_HNSW_LIMITS):
        raise BadRequest(f'"hnsw" may only set {", ".join(_HNSW_LIMITS)}')
    for key, v in value.items():
        low, high = _HNSW_LIMITS[key]
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise BadRequest(f'"hnsw.{key}" must be an integer in [{low}, {high}]')
    return dict(value)


async def _lookup(
    request: web.Request, tenant: str, database: str, collection: str
) -> dict[str, Any]:
    """The collection's model from the primary, by id or by name."""
    base = f"/api/v2/tenants/{tenant}/databases/{database}/collections"
    upstream = request.app[UPSTREAM]
    for path in (f"{base}/by-id/{collection}", f"{base}/{collection}"):
        status, raw = await upstream.call_raw("GET", path)
        if status == 200:
            model: dict[str, Any] = orjson.loads(raw)
            return model
    raise NotFound(f"no collection {collection!r} in {tenant}/{database}")


async def snapshots(request: web.Request) -> web.Response:
    _authorize(request)
    store = request.app[CONFIG].snapshot_path
    serving = {r.collection_id: r.generation for r in request.app[ROUTER].replicas}
    listing = await asyncio.to_thread(_list_store, store, serving)
    return _json({"store": str(store), "collections": listing})


def _list_store(store: Path, serving: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for snaps in newest_snapshots(store):
        for snap in snaps:
            out.setdefault(snap.parent.name, []).append(_snapshot_entry(snap, serving))
    for cid in serving:
        out.setdefault(cid, [])
    return out


def _snapshot_entry(snap: Path, serving: dict[str, int]) -> dict[str, Any]:
    entry: dict[str, Any] = {"generation": int(snap.name), "path": str(snap)}
    try:
        manifest = Manifest.from_json((snap / MANIFEST).read_bytes())
    except (OSError, ValueError) as exc:  # listing must not fail on one bad snapshot
        entry["error"] = str(exc)
        return entry
    entry.update(
        name=manifest.collection["name"],
        created_at=manifest.created_at,
        rows=manifest.count,
        bytes=sum(f["bytes"] for f in manifest.files.values()),
        hnsw=manifest.hnsw,
        serving=serving.get(manifest.collection_id) == manifest.generation,
    )
    return entry


async def log_position(request: web.Request) -> web.Response:
    """A builder in storage mode: the primary's newest log seq, for replicas' strong and
    session reads (sync/logstream.py). Its tailer looks at the log now too."""
    _authorize(request)
    tailer = _log_source(request)
    position = await tailer.position_now()
    tailer.notify_write("")
    return _json({"position": position})


async def log_since(request: web.Request) -> web.Response:
    """A builder in storage mode: the log rows applied to a collection's published take
    after an offset, long-polled (sync/tailer.py ops_since; sync/logstream.py reads it)."""
    _authorize(request)
    tailer = _log_source(request)
    query = request.rel_url.query
    try:
        generation, offset = int(query["generation"]), int(query["offset"])
        position = int(query.get("position", "0"))
        wait_s = min(max(float(query.get("wait_s", "0")), 0.0), 30.0)
    except (KeyError, ValueError):
        raise BadRequest("generation and offset (integers) are required") from None
    cid = request.match_info["cid"]
    found = await tailer.ops_since(cid, generation, offset, position, wait_s)
    if found is None:
        raise Gone(f"collection {cid}: take {generation} is not followed any more")
    at, ops, confirmed_at = found
    body = {"position": at, "ops": encode_ops(ops), "confirmed_at": confirmed_at}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _log_source(request: web.Request) -> StorageTailer:
    scheduler = request.app[ROUTER].scheduler
    if not isinstance(scheduler, StorageTailer) or request.app[CONFIG].role != "builder":
        raise NotFound("only a builder in storage mode serves the log stream")
    return scheduler


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/admin/status", status),
    ("GET", "/admin/log/position", log_position),
    ("GET", "/admin/log/{cid}", log_since),
    ("POST", "/admin/rebuild", rebuild),
    ("GET", "/admin/snapshots", snapshots),
    # Anything else under /admin/ is ours too: never forward it to the primary.
    ("*", "/admin/{tail:[\\s\\S]*}", unknown),  # not ".*": it stops at an encoded newline
]
