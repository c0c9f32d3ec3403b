"""The read path: consistency gate -> cache -> single flight -> admission -> replica.

read(request)
  replica?     no  -> forwarded (cacheable lookups through the short-TTL forwarded cache)
  gate allows? no  -> forwarded; if the primary is unreachable, the replica anyway (stale)
  parse        not exactly answerable -> forwarded
  cache hit        -> answered (no admission: a hit costs almost nothing)
  identical request already computing -> wait for it (coalesced)
  search slot      -> compute in a worker thread, store, answer; or 503 when overloaded
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable

from aiohttp import web

from index.errors import NotLocal, Superseded
from index.live import LiveView
from index.replica import ReplicaIndex
from proxy.errors import Overloaded, UpstreamError
from proxy.primary.forward import LIMITED_OPS, check_limits, forward, forward_buffered, read_body
from proxy.primary.upstream import Breaker
from proxy.replica import local
from proxy.replica.cache import Cached
from proxy.replica.consistency import Level
from proxy.routes import Route
from proxy.state import GUARDS, METRICS, ROUTE, ROUTER, SOURCE, STATE, UPSTREAM

log = logging.getLogger(__name__)

# Forwarded reads whose answers can be reused for forwarded_cache_ttl_s.
FORWARDED_CACHEABLE = frozenset(
    {
        "list_collections",
        "count_collections",
        "get_collection",
        "get_collection_by_id",
        "get_tenant",
        "list_databases",
        "get_database",
        "version",
        "pre_flight_checks",
    }
)
# A search that finds its storage-mode view superseded starts again on the current one.
SUPERSEDED_RETRIES = 3
# Headers that could make the primary answer differently (auth, once a primary enforces it).
_KEYED_HEADERS = ("Authorization", "X-Chroma-Token")


async def read(request: web.Request) -> web.StreamResponse:
    app, route = request.app, request[ROUTE]
    router, metrics = app[ROUTER], app[METRICS]
    replica = router.replica_for(route)
    if replica is None:
        if route.collection is not None:
            metrics.local_fallbacks.labels("no_replica").inc()
        return await forwarded_read(request)
    level = router.level(request)
    raw = await read_body(request) if request.body_exists else b""
    if isinstance(replica, LiveView) and replica.follows_log:
        replica = await router.caught_up(replica, level)
        if replica is None:
            metrics.local_fallbacks.labels("catching_up").inc()
            return await _forward_checked(request, raw)
    primary_unreachable = not app[STATE].primary_up or app[UPSTREAM].breaker.state != Breaker.CLOSED
    stale = primary_unreachable  # nobody can tell how current the replica is: say so
    age_s = replica.age_s()
    if not router.fresh_enough(replica, level, age_s):
        metrics.local_fallbacks.labels("consistency").inc()
        if level is Level.STRONG or not primary_unreachable:
            try:
                return await _forward_checked(request, raw)
            except UpstreamError:
                if level is Level.STRONG:
                    raise
        stale = True  # the primary cannot be reached: an old answer beats no answer
    try:
        body, source = await _answer_current(request, replica, route, raw)
    except NotLocal as exc:
        log.debug("forwarding %s: %s", route.op, exc)
        metrics.local_fallbacks.labels("not_local").inc()
        return await _forward_checked(request, raw)
    request[SOURCE] = source
    headers = {
        "Content-Type": "application/json",
        "X-Proxy-Replica-Age": f"{age_s:.3f}",
        "X-Proxy-Replica-Generation": str(replica.generation),
    }
    if stale:
        headers["X-Proxy-Stale"] = "true"
    return web.Response(body=body, headers=headers)


async def _forward_checked(request: web.Request, raw: bytes) -> web.StreamResponse:
    check_limits(request, raw)
    return await forward(request, raw)


async def _answer_current(
    request: web.Request, replica: ReplicaIndex, route: Route, raw: bytes
) -> tuple[bytes, str]:
    """_answer, once more on the collection's current view if the log replay moved the graph
    on while the request waited for a search thread (index/live.py): the newer view includes
    everything the older one did."""
    for _ in range(SUPERSEDED_RETRIES):
        try:
            return await _answer(request, replica, route, raw)
        except Superseded:
            current = request.app[ROUTER].replicas.get(replica.collection_id)
            if current is None:
                break
            replica = current
    raise NotLocal("the replica kept moving on under the request")


async def _answer(
    request: web.Request, replica: ReplicaIndex, route: Route, raw: bytes
) -> tuple[bytes, str]:
    """The answer bytes and where they came from ("cache" or "replica").

    Two keys lead to a cached answer: one over the exact request bytes, checked before
    anything is parsed (a hit then costs a hash of a sample of them and one comparison), and
    one over the canonical request, so the same question with its keys in another order (the
    JS and Python clients differ) is still a hit. Both carry the replica generation and the
    collection's write counter."""
    guards, router = request.app[GUARDS], request.app[ROUTER]
    cid = replica.collection_id
    base = (cid, replica.generation, router.tracker.seq(cid), route.op)
    exact = (*base, request.rel_url.raw_query_string, route.tenant, route.database)
    cache = guards.cache
    if cache is not None and (hit := cache.get_exact(exact, raw)) is not None:
        guards.metrics.cache_hit.inc()
        return hit.body, "cache"
    try:
        guards.gate.refuse_if_full()  # before parsing: see SearchGate.refuse_if_full
    except Overloaded as exc:
        guards.metrics.admission.labels(exc.reason).inc()
        raise
    try:
        prepared = local.prepare(route.op, raw, request.rel_url.query, route.tenant, route.database)
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        # Malformed input the parser did not foresee (a dict where a string belongs, say):
        # the primary gives its own answer, never a 500 of ours.
        log.info("forwarding a %s the proxy could not parse: %r", route.op, exc)
        raise NotLocal("unparsed request") from exc
    guards.limits.check(prepared.body)  # a cached answer's request passed it when computed
    key = (*base, prepared.digest)
    if cache is not None and (hit := cache.get(key)) is not None:
        guards.metrics.cache_hit.inc()
        cache.put_exact(exact, raw, Cached(200, hit.body))
        return hit.body, "cache"

    async def compute() -> bytes:
        gate, admission = guards.gate, guards.metrics.admission
        try:
            queued = gate.enter()
        except Overloaded as exc:
            admission.labels(exc.reason).inc()
            raise
        admission.labels("queued" if queued else "admitted").inc()
        try:
            return await router.batcher.submit(replica, prepared, time.monotonic())
        except Overloaded as exc:
            admission.labels(exc.reason).inc()
            raise
        finally:
            gate.exit()

    body, coalesced = await guards.flights.run(key, compute)
    (guards.metrics.cache_coalesced if coalesced else guards.metrics.cache_miss).inc()
    if cache is not None and not coalesced:
        cache.put(key, Cached(200, body, key_bytes=len(prepared.digest)))
        cache.put_exact(exact, raw, Cached(200, body))
    return body, "replica"


async def forwarded_read(request: web.Request) -> web.StreamResponse:
    """Forward a read; cacheable lookups are reused for forwarded_cache_ttl_s."""
    guards, route = request.app[GUARDS], request[ROUTE]
    if route.op in LIMITED_OPS:
        return await _forward_checked(request, await read_body(request))
    cache = guards.forwarded
    if cache is None or route.op not in FORWARDED_CACHEABLE or request.method != "GET":
        return await forward(request)
    key = _forwarded_key(request, route)
    hit = cache.get(key)
    if hit is not None:
        guards.metrics.cache_hit.inc()
        request[SOURCE] = "cache"
        return web.Response(status=hit.status, body=hit.body, content_type=hit.content_type)
    guards.metrics.cache_miss.inc()
    resp, body = await forward_buffered(request)
    if resp.status == 200 and body is not None:
        cache.put(key, Cached(200, body, resp.content_type))
    return resp


def _forwarded_key(request: web.Request, route: Route) -> Hashable:
    # Any write through the proxy (to any collection or database) makes older entries
    # unreachable: a create or delete changes lists and lookups everywhere.
    writes = request.app[ROUTER].tracker.total
    auth = tuple(request.headers.get(h, "") for h in _KEYED_HEADERS)
    return ("forwarded", writes, request.raw_path, auth)
