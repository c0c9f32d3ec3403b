"""A tiny aiohttp "primary" that misbehaves on request, for fault injection only.

Everything that tests Chroma's behaviour uses a real `chroma run`; this stands in only where a
real server cannot be made to time out, reset or die mid-response on cue.
"""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import web
from aiohttp.test_utils import TestServer

SLOW_STARTED = web.AppKey("slow_started", asyncio.Event)
HEARTBEATS = web.AppKey("heartbeats", list[float])  # when each heartbeat came in


async def heartbeat(request: web.Request) -> web.Response:
    request.app[HEARTBEATS].append(asyncio.get_running_loop().time())
    return web.json_response({"nanosecond heartbeat": 1})


async def slow(request: web.Request) -> web.Response:
    """Answers after ?s= seconds; sets SLOW_STARTED once the request is in."""
    request.app[SLOW_STARTED].set()
    await asyncio.sleep(float(request.query.get("s", "2")))
    return web.json_response({"slow": "done", "pad": "x" * 10_000})


async def reset(request: web.Request) -> web.Response:
    assert request.transport is not None
    request.transport.abort()
    await asyncio.sleep(1)
    raise AssertionError("unreachable")


async def drop(request: web.Request) -> web.Response:
    """Closes the connection without an answer, as Chroma 1.5.9 does on a request its handler
    panics on (GET /api/v2/collections/{crn}, chroma-wire.md 14.9); the server stays up."""
    assert request.transport is not None
    request.transport.close()
    await asyncio.sleep(1)
    raise AssertionError("unreachable")


async def partial(request: web.Request) -> web.StreamResponse:
    """Promises 100 000 bytes, sends 10, then dies."""
    resp = web.StreamResponse()
    resp.content_length = 100_000
    await resp.prepare(request)
    await resp.write(b"0123456789")
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()
    return resp


async def echo_headers(request: web.Request) -> web.Response:
    return web.json_response([[k, v] for k, v in request.headers.items()])


async def echo_body(request: web.Request) -> web.Response:
    """Streams the body in and reports its size and digest, and how it was framed."""
    digest, size = hashlib.sha256(), 0
    async for chunk in request.content.iter_chunked(1 << 16):
        digest.update(chunk)
        size += len(chunk)
    framing = "chunked" if request.headers.get("Transfer-Encoding") == "chunked" else "length"
    return web.json_response({"size": size, "sha256": digest.hexdigest(), "framing": framing})


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    body = b'{"error":"InternalError","message":"injected"}'
    return web.Response(status=code, body=body, content_type="application/json")


async def hop_response(request: web.Request) -> web.Response:
    """A response carrying hop-by-hop headers the proxy must not pass on."""
    headers = {"Connection": "keep-alive, X-Hop", "X-Hop": "1", "Keep-Alive": "timeout=5"}
    headers["X-End-To-End"] = "kept"
    return web.Response(body=b"{}", headers=headers, content_type="application/json")


def fake_primary_app() -> web.Application:
    app = web.Application()
    app[SLOW_STARTED] = asyncio.Event()
    app[HEARTBEATS] = []
    app.router.add_get("/api/v2/heartbeat", heartbeat)
    app.router.add_get("/slow", slow)
    app.router.add_get("/reset", reset)
    app.router.add_get("/drop", drop)
    app.router.add_get("/partial", partial)
    app.router.add_get("/echo-headers", echo_headers)
    app.router.add_post("/echo-body", echo_body)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/hop-response", hop_response)
    return app


async def start_fake_primary() -> TestServer:
    server = TestServer(fake_primary_app(), host="127.0.0.1")
    await server.start_server()
    return server
