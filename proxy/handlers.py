"""Request handlers: dispatch by route class, writes, and the proxy's own ops endpoints.

Each handler is a short series of named steps; errors are raised, never answered here: the
``observed`` wrapper in app.py (around every route) turns them into responses in one place.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.access.auth import AUTH, TOKEN, audit_event
from proxy.errors import Overloaded
from proxy.ops.ledger import READY
from proxy.ops.workers import render_all
from proxy.primary.forward import LIMITED_OPS, check_limits, forward, forward_buffered, read_body
from proxy.replica import reads
from proxy.routes import RouteClass
from proxy.state import CONFIG, GUARDS, METRICS, PRIMARY_DOWN, ROUTE, ROUTER, STATE, WORKER

LOADING = "loading replicas from the snapshot store"


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Every path but the ops endpoints: writes, reads a replica may answer, the rest."""
    route, guards = request[ROUTE], request.app[GUARDS]
    try:
        guards.request_limit.enter()  # before the body is read: refusing costs next to nothing
    except Overloaded:
        request.app[METRICS].admission.labels("request_limit").inc()
        raise
    try:
        # Access control before anything can answer: a cache hit, a coalesced search and a
        # forwarded request all come after it.
        guard = request.app.get(AUTH)
        token = None if guard is None else await guard.check(request, route)
        if token is not None:
            request[TOKEN] = token
            if route.op == "identity":
                return web.json_response(token.identity())
            guards.buckets.take(f"token:{token.name}")  # per-token rate limit
        elif route.tenant is not None:
            guards.buckets.take(route.tenant)
        if route.kind is RouteClass.WRITE:
            return await write(request)
        if route.kind is RouteClass.LOCAL_READ and request.app[CONFIG].replicas:
            return await reads.read(request)
        return await reads.forwarded_read(request)
    finally:
        guards.request_limit.exit()


# Writes that remove replicas when the primary takes them (ReplicaRouter.end_write). Their
# answers are small and held until then, so the client's next read cannot find one.
REMOVES = frozenset({"reset", "delete_database", "delete_collection"})
# Writes the audit log records (with add, upsert... they would drown it).
AUDITED = frozenset({"reset", "delete_collection", "delete_database", "create_tenant"})


# Write bodies up to this size are read whole: to check their limits and, in export mode,
# to apply them to the replica. Larger ones (and chunked uploads of unknown length) stream
# through, so a 40 MiB add costs the proxy a few chunks of memory, not the body and its parse
# (~3x); their limits are checked as they stream (proxy/access/limits.py StreamedLimits), and they
# send their collection to a rebuild.
READ_WHOLE_MAX_BYTES = 8 * 1024 * 1024


async def write(request: web.Request) -> web.StreamResponse:
    """Forward a write, keeping the books the consistency gate reads (proxy/replica/router.py)."""
    router, route = request.app[ROUTER], request[ROUTE]
    length = request.content_length
    small = length is not None and length <= READ_WHOLE_MAX_BYTES
    if small and router.applies_writes(route):
        return await write_applied(request)
    raw = None
    if small and route.op in LIMITED_OPS:  # whole, to check its limits before it is sent
        raw = await read_body(request)
        check_limits(request, raw)
    books = router.begin_write(route)
    status: int | None = None
    try:
        response: web.StreamResponse
        if route.op in REMOVES:  # answered only after end_write dropped what it removed
            response, _ = await forward_buffered(request)  # (these requests carry no body)
        else:
            response = await forward(request, raw)
        status = response.status
        return response
    finally:
        router.end_write(books, status)
        if route.op in AUDITED:
            token = request.get(TOKEN)
            audit_event(request, route.op, token=None if token is None else token.name,
                        tenant=route.tenant, database=route.database,
                        collection=route.collection, status=status)  # fmt: skip


async def write_applied(request: web.Request) -> web.StreamResponse:
    """Export mode: the write is applied to the replica (proxy/replica/overlay.py) before its answer
    goes back, so the client's next read finds it there."""
    router = request.app[ROUTER]
    body = await read_body(request)
    parsed = check_limits(request, body)
    token = router.begin_write(request[ROUTE], parsed, applies=True)
    try:
        response, _ = await forward_buffered(request, body)
        await router.settle(token, response.status)
    finally:
        router.end_write(token)
    return response


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers. Says nothing about the primary."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: not draining, the snapshot store's replicas are loaded, and the
    primary answers or replicas can serve reads without it ("degraded": a load balancer
    should keep sending reads here)."""
    state, router = request.app[STATE], request.app[ROUTER]
    replicas = len(router.replicas)
    reason = state.not_ready_reason()
    if reason is None and request.app[CONFIG].replicas and not router.scheduler.ready:
        reason = LOADING  # a rolling update must not send traffic before the replicas serve
    degraded = reason == PRIMARY_DOWN and replicas > 0 and router.scheduler.ready
    ready = reason is None or degraded
    body: dict[str, object] = {
        "ready": ready,
        "status": "ok" if reason is None else ("degraded" if degraded else "unavailable"),
        "primary_up": state.primary_up,
        "draining": state.draining,
        "replicas": replicas,
    }
    if reason is not None:
        body["reason"] = reason
    worker = request.app.get(WORKER)
    if worker is not None:  # this answer is one worker's; here is how the others are doing
        states = worker.ledger.states(worker.count)
        body["workers"] = {"total": len(states), "ready": states.count(READY)}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    metrics, guards = request.app[METRICS], request.app[GUARDS]
    metrics.replicas.set(len(request.app[ROUTER].replicas))
    if guards.cache is not None:
        metrics.cache_bytes.set(guards.cache.bytes_used)
        metrics.cache_entries.set(len(guards.cache))
    worker = request.app.get(WORKER)
    body = metrics.render() if worker is None else render_all(metrics, worker)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
