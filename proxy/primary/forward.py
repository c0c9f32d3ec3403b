"""Forwarding to the primary: bodies streamed both ways, status and headers passed through.

The only module that sends client requests on; proxy/primary/upstream.py owns the connection pool.
Forwarded requests are capped in number (InFlightLimit) so a slow primary cannot pile up
unbounded work in the proxy.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.access.limits import StreamedLimits
from proxy.errors import ProxyError, RequestTooLarge, UpstreamError
from proxy.primary.upstream import CHUNK_BYTES, request_headers, response_headers
from proxy.state import CONFIG, GUARDS, METRICS, ROUTE, SOURCE, UPSTREAM, request_id, stamp

log = logging.getLogger(__name__)


class LimitedBody:
    """The request body as a stream, refused once it passes ``limit`` bytes or, with
    ``checks``, once it holds an item past a write limit (proxy/access/limits.py).

    A body with a Content-Length over the limit is refused before anything is sent; otherwise
    the upload to the primary breaks off before the chunk that passed a limit (``error`` then
    tells why), so the primary never has a whole body to write.
    """

    def __init__(
        self, request: web.Request, limit: int, checks: StreamedLimits | None = None
    ) -> None:
        if request.content_length is not None and request.content_length > limit:
            raise RequestTooLarge(_too_large(request.content_length, limit))
        self._request = request
        self._limit = limit
        self._checks = checks
        self.error: ProxyError | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._request.content.iter_chunked(CHUNK_BYTES):
            seen += len(chunk)
            try:
                if seen > self._limit:
                    raise RequestTooLarge(_too_large(seen, self._limit))
                if self._checks is not None:
                    self._checks.feed(chunk)
            except ProxyError as exc:
                self.error = exc
                raise
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


async def read_body(request: web.Request) -> bytes:
    limit = request.app[CONFIG].max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLarge(_too_large(length, limit))
    content = request.content
    if content.is_eof():
        # The whole body came in with the headers (as a query's does): take it as it is
        # rather than through request.read(), which copies it twice and suspends once.
        body = content.read_nowait()
        if len(body) > limit:
            raise RequestTooLarge(_too_large(len(body), limit))
        return body
    return await request.read()


# Record requests whose JSON bodies the limits look at (proxy/access/limits.py).
LIMITED_OPS = frozenset({"get", "query", "add", "upsert", "update", "delete"})


def check_limits(request: web.Request, raw: bytes) -> object:
    """Refuse a record request's body past a limit (400/413); returns the parsed body (None
    if there is none, or it is not JSON: the primary gives its own error)."""
    if request[ROUTE].op not in LIMITED_OPS or not raw:
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    request.app[GUARDS].limits.check(body)
    return body


async def forward(request: web.Request, body_bytes: bytes | None = None) -> web.StreamResponse:
    """Pass the request to the primary and stream its answer back unchanged. ``body_bytes``
    is the body when a handler already read it (to try a local answer first, or to check
    its limits); a record request's body streamed unread has its limits checked on the way."""
    body: LimitedBody | bytes | None
    if body_bytes is not None:
        body = body_bytes if body_bytes or request.body_exists else None
    elif request.body_exists:
        limit = request.app[CONFIG].max_body_bytes
        checks = None
        route = request.get(ROUTE)
        if route is not None and route.op in LIMITED_OPS:
            checks = StreamedLimits(request.app[GUARDS].limits)
        body = LimitedBody(request, limit, checks)
    else:
        body = None
    _enter(request)
    try:
        resp = await _send(request, body)
        try:
            return await _stream_back(request, resp)
        finally:
            resp.release()
    finally:
        request.app[GUARDS].forward_limit.exit()


def _enter(request: web.Request) -> None:
    try:
        request.app[GUARDS].forward_limit.enter()
    except Exception:
        request.app[METRICS].admission.labels("forward_limit").inc()
        raise


async def _send(request: web.Request, body: LimitedBody | bytes | None) -> aiohttp.ClientResponse:
    try:
        resp = await request.app[UPSTREAM].send(
            request.method, request.raw_path, _upstream_headers(request), body
        )
    except UpstreamError as exc:
        if isinstance(body, LimitedBody) and body.error is not None:
            raise body.error from None
        if getattr(exc, "reason", "") == "breaker":
            request.app[METRICS].admission.labels("breaker").inc()
        raise
    request[SOURCE] = "primary"
    return resp


async def _stream_back(request: web.Request, resp: aiohttp.ClientResponse) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    out = web.StreamResponse(
        status=resp.status, reason=resp.reason, headers=response_headers(resp.headers)
    )
    if resp.content_length is not None:
        out.content_length = resp.content_length
    stamp(request, out.headers)
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


async def forward_buffered(
    request: web.Request, body_bytes: bytes | None = None
) -> tuple[web.Response, bytes | None]:
    """Forward a request and return the primary's response whole: a small bodiless read
    (for the forwarded cache), or a write whose answer waits until it is applied locally
    (proxy/replica/overlay.py)."""
    _enter(request)
    try:
        resp = await _send(request, body_bytes)
        try:
            body = await resp.read()
        except aiohttp.ClientError as exc:
            raise request.app[UPSTREAM].translate(exc, request_id(request)) from exc
        finally:
            resp.release()
    finally:
        request.app[GUARDS].forward_limit.exit()
    out = web.Response(status=resp.status, reason=resp.reason, body=body,
                       headers=response_headers(resp.headers))  # fmt: skip
    return out, body
