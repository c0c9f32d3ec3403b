"""Request handlers: forwarding to the primary, and the proxy's own ops endpoints.

Each handler is a short series of named steps; errors are raised, never answered here: the
``errors_and_metrics`` middleware in app.py turns them into responses in one place.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST

from .errors import RequestTooLarge, UpstreamError
from .state import CONFIG, METRICS, SOURCE, STATE, UPSTREAM, request_id
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


async def forward(request: web.Request) -> web.StreamResponse:
    """Pass the request to the primary and stream its answer back unchanged."""
    upstream = request.app[UPSTREAM]
    body = LimitedBody(request, request.app[CONFIG].max_body_bytes) if request.body_exists else None
    try:
        resp = await upstream.send(
            request.method, request.raw_path, _upstream_headers(request), body
        )
    except UpstreamError:
        if body is not None and body.error is not None:
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
    }
    if reason is not None:
        body["reason"] = reason
    return web.json_response(body, status=200 if reason is None else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
