"""Errors the proxy itself answers with, and the one place they become HTTP responses.

    ProxyError
     ├── UpstreamError                 502  the primary could not be used
     │    ├── UpstreamUnavailable      502  connection refused / reset / closed
     │    └── UpstreamTimeout          504  connect or read timed out (also an asyncio.TimeoutError)
     │    └── UpstreamCircuitOpen      503  the primary failed repeatedly; not tried for a while
     ├── Overloaded                    503  shed by admission control (with Retry-After)
     ├── RateLimited                   429  over the tenant's request rate (with Retry-After)
     ├── RequestTooLarge               413  body over max_body_bytes
     ├── BadRequest                    400  a proxy-specific header or admin request is invalid
     ├── PrimaryRefused                4xx  the primary refused a lookup made for the request
     ├── HeadersTooLarge               431  a header or the request line over max_header_bytes,
     │                                      or more than max_headers headers
     ├── Unauthorized                  401  admin API without the right token
     ├── Forbidden                     403  admin API switched off (no admin_token)
     ├── NotFound                      404  an admin request names an unknown collection
     └── Conflict                      409  an admin request this role cannot carry out

The body is always Chroma's error shape, ``{"error": NAME, "message": TEXT}``, so unmodified
clients raise a typed exception (the Python client maps ``error`` names it knows, e.g.
``ChromaError``, to classes; the JS client maps the status code). Errors the *primary* answers
are not ProxyErrors: they pass through byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
import math

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

log = logging.getLogger(__name__)


class ProxyError(Exception):
    """Root of the errors the proxy answers itself."""

    status = 500
    # A name the Python client knows (chromadb/errors.py error_types), so it raises ChromaError.
    error_name = "ChromaError"

    def headers(self) -> dict[str, str]:
        return {}


class UpstreamError(ProxyError):
    status = 502


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError, asyncio.TimeoutError):
    status = 504


class _RetryLater(ProxyError):
    def __init__(self, message: str, retry_after_s: float, reason: str = "") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class UpstreamCircuitOpen(_RetryLater, UpstreamError):
    status = 503


class Overloaded(_RetryLater):
    status = 503


class RateLimited(_RetryLater):
    status = 429
    error_name = "RateLimitError"  # the Python client raises chromadb.errors.RateLimitError


class RequestTooLarge(ProxyError):
    status = 413


class BadRequest(ProxyError):
    status = 400
    error_name = "InvalidArgumentError"


class HeadersTooLarge(ProxyError):
    status = 431


class PrimaryRefused(ProxyError):
    """The primary refused (4xx) a lookup the proxy made on a request's behalf, because of
    something the request's path names (a database name it rejects, say): the request itself
    would be refused alike, so that refusal is the answer."""

    def __init__(self, status: int, body: bytes) -> None:
        try:
            found = orjson.loads(body)
        except orjson.JSONDecodeError:
            found = None
        if not isinstance(found, dict):
            found = {}
        self.status = status
        self.error_name = str(found.get("error") or "ChromaError")
        super().__init__(str(found.get("message") or f"the primary answered {status}"))


class Unauthorized(ProxyError):
    status = 401
    error_name = "AuthError"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="replica-proxy admin"'}


class Forbidden(ProxyError):
    status = 403
    error_name = "AuthError"


class NotFound(ProxyError):
    status = 404
    error_name = "NotFoundError"


class Conflict(ProxyError):
    status = 409


class Gone(ProxyError):
    """What was asked for existed and is no longer kept (a builder's older take)."""

    status = 410


def error_body(name: str, message: str) -> bytes:
    return orjson.dumps({"error": name, "message": message})


def error_response(status: int, name: str, message: str) -> web.Response:
    return web.Response(
        status=status, body=error_body(name, message), content_type="application/json"
    )


def to_response(exc: BaseException, rid: str = "") -> web.Response:
    """Map any exception raised by a handler to a response; unexpected ones become a 500
    without leaking a stack trace to the client (it goes to the log instead). A 5xx names the
    request id ``rid``: its cause (say, the primary's address and error) is in the log only."""
    see_log = f" (request id {rid})" if rid else ""
    if isinstance(exc, ProxyError):
        message = f"replica-proxy: {exc}{see_log if exc.status >= 500 else ''}"
        resp = error_response(exc.status, exc.error_name, message)
        resp.headers.update(exc.headers())
        return resp
    log.error("unhandled error, request id %s", rid or "-", exc_info=exc)
    return error_response(
        500, "InternalError", f"replica-proxy: internal error (see proxy log){see_log}"
    )


def malformed_request_response(
    exc: BaseException, max_header_bytes: int, max_headers: int
) -> web.Response:
    """What a request aiohttp could not parse as HTTP gets (instead of its plain-text 400):
    Chroma's error shape, and 431 for the size limits. The message never quotes the request:
    the offending line may be a token."""
    if isinstance(exc, LineTooLong):
        error: ProxyError = HeadersTooLarge(
            f"a header or the request line is longer than max_header_bytes={max_header_bytes}"
        )
    elif isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message:
        error = HeadersTooLarge(f"more than max_headers={max_headers} headers")
    else:
        error = BadRequest(f"malformed HTTP request ({type(exc).__name__})")
    resp = to_response(error)
    resp.force_close()  # the parser cannot find where the next request starts
    return resp
