"""Request handlers: forwarding to the primary, and the proxy's own ops endpoints.

Each handler is a short series of named steps; errors are raised, never answered here: the
``errors_and_metrics`` middleware in app.py turns them into responses in one place.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST

from index.errors import NotLocal
from index.replica import ReplicaIndex

from . import local
from .config import Config
from .consistency import Level
from .errors import RequestTooLarge, UpstreamError
from .routes import Route, RouteClass
from .state import CONFIG, METRICS, ROUTE, ROUTER, SOURCE, STATE, UPSTREAM, request_id
from .upstream import CHUNK_BYTES, request_headers, response_headers

log = logging.getLogger(__name__)


class LimitedBody:
    """The request body as a stream, refused once it passes ``limit`` bytes.

    A body with a Content-Length over the limit is refused before anything is sent; a chunked
    body is counted as it streams (``error`` then tells why the upload broke off).
    """

    def __init__(self, request: web.Request, limit: int) -> None:
        if request.content_length is not None and request.content_length > limit:
            raise RequestTooLarge(_too_large(request.content_length, limit))
        self._request = request
        self._limit = limit
        self.error: RequestTooLarge | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._request.content.iter_chunked(CHUNK_BYTES):
            seen += len(chunk)
            if seen > self._limit:
                self.error = RequestTooLarge(_too_large(seen, self._limit))
                raise self.error
            yield chunk


def _too_large(size: int, limit: int) -> str:
    return f"request body of {size} bytes or more exceeds max_body_bytes={limit}"


def _upstream_headers(request: web.Request) -> CIMultiDict[str]:
    headers = request_headers(request.headers)
    # Tell the primary who the client is and which request this is, for its logs.
    if request.remote:
        prior = headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {request.remote}" if prior else request.remote
    headers.setdefault("X-Forwarded-Proto", request.scheme)
    headers["X-Request-Id"] = request_id(request)
    return headers


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Every path but the ops endpoints: writes, reads a replica may answer, the rest."""
    route = request[ROUTE]
    if route.kind is RouteClass.WRITE:
        return await write(request)
    if route.kind is RouteClass.LOCAL_READ and request.app[CONFIG].replicas:
        return await read(request)
    return await forward(request)


async def write(request: web.Request) -> web.StreamResponse:
    """Forward a write, keeping the books the consistency gate reads (proxy/replicas.py)."""
    router = request.app[ROUTER]
    token = router.begin_write(request[ROUTE])
    try:
        return await forward(request)
    finally:
        router.end_write(token)


async def read(request: web.Request) -> web.StreamResponse:
    """Answer from the replica when it may (consistency gate) and can (exactly); otherwise
    forward. If the primary cannot be reached, a replica answers anyway, flagged stale."""
    router, route = request.app[ROUTER], request[ROUTE]
    replica = router.replica_for(route)
    if replica is None:
        if route.collection is not None:  # (lists and heartbeats are never local yet)
            request.app[METRICS].local_fallbacks.labels("no_replica").inc()
        return await forward(request)
    level = router.level(request)
    body = await _read_body(request) if request.body_exists else b""
    # With the primary unreachable nobody can tell how current the replica is: say so.
    stale = not request.app[STATE].primary_up
    if not router.fresh_enough(replica, level):
        request.app[METRICS].local_fallbacks.labels("consistency").inc()
        if level is Level.STRONG or request.app[STATE].primary_up:
            try:
                return await forward(request, body)
            except UpstreamError:
                if level is Level.STRONG:
                    raise
        stale = True  # the primary is down: an old answer beats no answer
    try:
        payload = await router.run(
            _answer, replica, route, body, request.rel_url.query, router.config
        )
    except NotLocal as exc:
        log.debug("forwarding %s: %s", route.op, exc)
        request.app[METRICS].local_fallbacks.labels("not_local").inc()
        return await forward(request, body)
    request[SOURCE] = "replica"
    headers = {
        "X-Proxy-Replica-Age": f"{replica.age_s():.3f}",
        "X-Proxy-Replica-Generation": str(replica.generation),
    }
    if stale:
        headers["X-Proxy-Stale"] = "true"
    return web.Response(body=payload, content_type="application/json", headers=headers)


def _answer(
    replica: ReplicaIndex, route: Route, body: bytes, query: Mapping[str, str], config: Config
) -> bytes:
    if route.op == "query":
        return local.answer_query(replica, body, config.exact_search_max_rows)
    if route.op == "get":
        return local.answer_get(replica, body)
    if route.op == "count":
        return local.answer_count(replica, query)
    if route.op in ("get_collection", "get_collection_by_id"):
        return local.answer_collection(replica, route.tenant, route.database)
    raise NotLocal(f"{route.op} is not answered locally")


async def _read_body(request: web.Request) -> bytes:
    limit = request.app[CONFIG].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(_too_large(request.content_length, limit))
    return await request.read()


async def forward(request: web.Request, read_body: bytes | None = None) -> web.StreamResponse:
    """Pass the request to the primary and stream its answer back unchanged. ``read_body`` is
    the body when a handler already read it (to try a local answer first)."""
    upstream = request.app[UPSTREAM]
    body: LimitedBody | bytes | None
    if read_body is not None:
        body = read_body if read_body or request.body_exists else None
    else:
        limit = request.app[CONFIG].max_body_bytes
        body = LimitedBody(request, limit) if request.body_exists else None
    try:
        resp = await upstream.send(
            request.method, request.raw_path, _upstream_headers(request), body
        )
    except UpstreamError:
        if isinstance(body, LimitedBody) and body.error is not None:
            raise body.error from None
        raise
    request[SOURCE] = "primary"
    try:
        out = web.StreamResponse(
            status=resp.status, reason=resp.reason, headers=response_headers(resp.headers)
        )
        if resp.content_length is not None:
            out.content_length = resp.content_length
        await out.prepare(request)
        try:
            async for chunk in upstream.iter_body(resp):
                await out.write(chunk)
        except UpstreamError as exc:
            # Headers are gone already; the only honest signal left is to cut the connection so
            # the client sees a broken response rather than a short one.
            log.warning("primary failed mid-response, aborting %s: %s", request_id(request), exc)
            if request.transport is not None:
                request.transport.abort()
            return out
        await out.write_eof()
        return out
    finally:
        resp.release()


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers. Says nothing about the primary."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: not draining and the primary answered its last heartbeat."""
    state = request.app[STATE]
    reason = state.not_ready_reason()
    body: dict[str, object] = {
        "ready": reason is None,
        "primary_up": state.primary_up,
        "draining": state.draining,
        "replicas": len(request.app[ROUTER].replicas),
    }
    if reason is not None:
        body["reason"] = reason
    return web.json_response(body, status=200 if reason is None else 503)


async def metrics(request: web.Request) -> web.Response:
    request.app[METRICS].replicas.set(len(request.app[ROUTER].replicas))
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
