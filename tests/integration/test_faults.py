"""What clients see when the primary times out, resets, dies mid-response or is gone."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.app import build_app
from proxy.config import load
from tests.helpers import ChromaServer, ProxyProcess
from tests.integration.fake_primary import HEARTBEATS, start_fake_primary


@dataclass
class Rig:
    proxy: TestServer
    primary: TestServer
    session: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return str(self.proxy.make_url(path))

    @property
    def address(self) -> str:
        return f"{self.primary.host}:{self.primary.port}"


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    """The proxy in-process, in front of the fault-injecting fake primary."""
    primary = await start_fake_primary()
    config = load({"read_timeout_s": "0.5", "max_body_bytes": "1MiB"}, environ={})
    proxy = TestServer(build_app(config, str(primary.make_url(""))), host="127.0.0.1")
    await proxy.start_server()
    async with aiohttp.ClientSession() as session:
        yield Rig(proxy, primary, session)
    await proxy.close()
    await primary.close()


async def json_error(resp: aiohttp.ClientResponse) -> dict[str, str]:
    """The body must be Chroma's error shape, with no stack trace."""
    assert resp.content_type == "application/json"
    body: dict[str, str] = await resp.json()
    assert set(body) == {"error", "message"}
    assert "Traceback" not in body["message"]
    assert resp.headers["X-Proxy-Source"] == "proxy"
    return body


async def upstream_error(resp: aiohttp.ClientResponse, address: str) -> str:
    """A 502/503/504 of the proxy's own: Chroma's error shape, naming the request id (the
    log has the cause under it) and never the primary's host:port. Returns the message."""
    body = await json_error(resp)
    assert body["error"] == "ChromaError"
    assert address not in body["message"], body
    assert f"(request id {resp.headers['X-Request-Id']})" in body["message"], body
    return body["message"]


async def breaker_metrics(session: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    """The breaker's state and trip count, as /metrics has them."""
    async with session.get(url) as resp:
        lines = (await resp.text()).splitlines()
    state, trips = (
        next(line.split()[1] for line in lines if line.startswith(name + " "))
        for name in ("replica_proxy_breaker_state", "replica_proxy_breaker_trips_total")
    )
    return state, trips


async def test_read_timeout_is_504(rig: Rig) -> None:
    async with rig.session.get(rig.url("/slow?s=3")) as resp:
        assert resp.status == 504
        assert "timed out" in await upstream_error(resp, rig.address)


async def test_connection_reset_is_502(rig: Rig) -> None:
    async with rig.session.get(rig.url("/reset")) as resp:
        assert resp.status == 502
        assert "dropped the connection" in await upstream_error(resp, rig.address)


async def test_dropped_requests_do_not_open_the_breaker_for_everyone(rig: Rig) -> None:
    """One client's request that the primary drops (Chroma panics on some paths and stays
    up) gets a clean 502 each time; the heartbeat still answers, so the breaker stays closed
    and everybody else's requests go on, in a row and at the same time."""

    async def dropped() -> None:
        async with rig.session.get(rig.url("/drop")) as resp:
            assert resp.status == 502
            assert "dropped the connection" in await upstream_error(resp, rig.address)

    async def served(path: str) -> None:
        async with rig.session.get(rig.url(path)) as resp:
            assert resp.status == 200, path
            assert resp.headers["X-Proxy-Source"] == "primary"

    for _ in range(12):  # in a row, well past breaker_failures (5), no success in between
        await dropped()
    assert await breaker_metrics(rig.session, rig.url("/metrics")) == ("0.0", "0.0")
    before = len(rig.primary.app[HEARTBEATS])
    others = [served(p) for p in ("/api/v2/heartbeat", "/echo-headers") for _ in range(10)]
    await asyncio.gather(*(dropped() for _ in range(20)), *others)
    assert await breaker_metrics(rig.session, rig.url("/metrics")) == ("0.0", "0.0")
    # One heartbeat judges the whole burst, not one per dropped request.
    assert len(rig.primary.app[HEARTBEATS]) - before - 10 < 20


async def test_slow_answers_do_not_open_the_breaker_while_the_heartbeat_answers(
    rig: Rig,
) -> None:
    """A request slower than read_timeout_s (0.5 s here) may be that request's doing (a huge
    query): each gets its 504, and the others are still served. They run at once, so that
    no background heartbeat lands between them."""

    async def slow() -> None:
        async with rig.session.get(rig.url("/slow?s=3")) as resp:
            assert resp.status == 504
            assert "timed out" in await upstream_error(resp, rig.address)

    await asyncio.gather(*(slow() for _ in range(6)))  # more than breaker_failures (5)
    assert await breaker_metrics(rig.session, rig.url("/metrics")) == ("0.0", "0.0")
    async with rig.session.get(rig.url("/echo-headers")) as resp:
        assert resp.status == 200


async def test_a_primary_that_is_gone_opens_the_breaker() -> None:
    """Nothing listens: connect failures count at once (no heartbeat asked), so after
    breaker_failures of them clients get 503 with Retry-After without the primary being
    tried. No error names the primary's address."""
    primary = await start_fake_primary()
    address = f"{primary.host}:{primary.port}"
    # No background heartbeats or replica discovery: only these requests reach the primary.
    settings = {"breaker_failures": "3", "heartbeat_interval_s": "60", "replicas": "false"}
    proxy = TestServer(build_app(load(settings, environ={}), str(primary.make_url(""))),
                       host="127.0.0.1")  # fmt: skip
    await proxy.start_server()  # its first heartbeat finds the primary up
    await primary.close()  # the port is closed from now on
    try:
        async with aiohttp.ClientSession() as session:
            statuses = []
            for _ in range(5):
                async with session.get(str(proxy.make_url("/api/v2/version"))) as resp:
                    statuses.append(resp.status)
                    message = await upstream_error(resp, address)
                    if resp.status == 502:
                        assert "unreachable" in message
                    else:
                        assert "not tried" in message and int(resp.headers["Retry-After"]) >= 1
            assert statuses == [502, 502, 502, 503, 503]
            metrics = str(proxy.make_url("/metrics"))
            assert await breaker_metrics(session, metrics) == ("1.0", "1.0")
    finally:
        await proxy.close()


async def test_a_primary_that_drops_everything_opens_the_breaker() -> None:
    """Every connection is taken and closed unanswered, the heartbeat's too (a primary that
    crashes on every request): a dropped request then counts, as its heartbeat failed as well,
    and after breaker_failures failures clients get 503."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    primary = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    address = f"127.0.0.1:{primary.sockets[0].getsockname()[1]}"
    settings = {"breaker_failures": "3", "heartbeat_interval_s": "60", "replicas": "false"}
    proxy = TestServer(build_app(load(settings, environ={}), f"http://{address}"),
                       host="127.0.0.1")  # fmt: skip
    await proxy.start_server()  # its first heartbeat fails: the first failure
    try:
        async with aiohttp.ClientSession() as session:
            statuses = []
            for _ in range(4):
                async with session.get(str(proxy.make_url("/api/v2/version"))) as resp:
                    statuses.append(resp.status)
                    await upstream_error(resp, address)
            assert statuses == [502, 502, 503, 503]
            assert resp.headers["Retry-After"]
    finally:
        await proxy.close()
        primary.close()
        await primary.wait_closed()


async def test_death_mid_response_breaks_the_connection(rig: Rig) -> None:
    """After the headers went out, a short body must not look complete to the client."""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with rig.session.get(rig.url("/partial")) as resp:
            assert resp.status == 200
            await resp.read()
    # The proxy itself is fine afterwards.
    async with rig.session.get(rig.url("/api/v2/heartbeat")) as resp:
        assert resp.status == 200


async def test_primary_5xx_passes_through(rig: Rig) -> None:
    for code in (500, 503):
        async with rig.session.get(rig.url(f"/status/{code}")) as resp:
            assert resp.status == code
            assert await resp.read() == b'{"error":"InternalError","message":"injected"}'
            assert resp.headers["X-Proxy-Source"] == "primary"


async def test_hop_by_hop_headers_are_not_forwarded(rig: Rig) -> None:
    headers = {
        "Connection": "keep-alive, X-Private-Hop",
        "X-Private-Hop": "secret",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "x-chroma-token": "tok",
        "User-Agent": "Chroma Python Client v1.5.9",
    }
    async with rig.session.get(rig.url("/echo-headers"), headers=headers) as resp:
        seen = {k.lower(): v for k, v in await resp.json()}
    assert seen["x-chroma-token"] == "tok"
    assert seen["user-agent"] == "Chroma Python Client v1.5.9"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-request-id"]
    for hop in ("x-private-hop", "keep-alive", "te"):
        assert hop not in seen
    async with rig.session.get(rig.url("/hop-response")) as resp:
        assert resp.headers["X-End-To-End"] == "kept"
        assert "X-Hop" not in resp.headers and "Keep-Alive" not in resp.headers


async def test_body_streams_with_its_length(rig: Rig) -> None:
    payload = os.urandom(900_000)
    async with rig.session.post(rig.url("/echo-body"), data=payload) as resp:
        got = await resp.json()
    assert got == {
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "framing": "length",
    }


async def test_chunked_body_streams(rig: Rig) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 50_000

    async with rig.session.post(rig.url("/echo-body"), data=chunks()) as resp:
        got = await resp.json()
    assert got["size"] == 500_000 and got["framing"] == "chunked"


async def test_body_over_limit_is_413(rig: Rig) -> None:
    async with rig.session.post(rig.url("/echo-body"), data=io.BytesIO(b"x" * (2 << 20))) as resp:
        assert resp.status == 413
        assert "max_body_bytes" in (await json_error(resp))["message"]


async def test_chunked_body_over_limit_is_413(rig: Rig) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"y" * 65_536

    async with rig.session.post(rig.url("/echo-body"), data=chunks()) as resp:
        assert resp.status == 413
        await json_error(resp)


async def test_metrics_count_requests_and_errors(rig: Rig) -> None:
    async with rig.session.get(rig.url("/reset")) as resp:
        assert resp.status == 502
    async with rig.session.get(rig.url("/api/v2/heartbeat")) as resp:
        assert resp.status == 200
    async with rig.session.get(rig.url("/metrics")) as resp:
        text = await resp.text()
    assert 'replica_proxy_upstream_errors_total{reason="disconnect"} 1.0' in text
    assert (
        'replica_proxy_requests_total{op="heartbeat",route_class="local_read",'
        'source="primary",status="200"} 1.0'
    ) in text
    assert 'replica_proxy_requests_total{op="unknown",route_class="forward",' in text
    assert "replica_proxy_request_duration_seconds_bucket" in text
    assert "replica_proxy_primary_up 1.0" in text


async def test_primary_stopped_then_back(tmp_path: Path) -> None:
    """A real primary goes away: clean 502 JSON and /readyz 503; it returns: both recover."""
    own = ChromaServer(tmp_path / "data").start()
    proxy = ProxyProcess("--primary", own.url, "--heartbeat-interval-s", "0.2", log_dir=tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            heartbeat = proxy.url + "/api/v2/heartbeat"
            async with session.get(heartbeat) as resp:
                assert resp.status == 200
            own.stop()
            async with session.get(heartbeat) as resp:
                assert resp.status == 502
                body = await json_error(resp)
                assert "unreachable" in body["message"]
                assert own.url.split("//")[1] not in body["message"]
            await wait_for_status(session, proxy.url + "/readyz", 503)
            own.start()  # same port, same data
            await wait_for_status(session, proxy.url + "/readyz", 200)
            async with session.get(heartbeat) as resp:
                assert resp.status == 200
    finally:
        own.stop()
        assert proxy.stop() == 0


async def wait_for_status(session: aiohttp.ClientSession, url: str, status: int) -> None:
    async def current() -> int:
        async with session.get(url) as resp:
            body = await resp.read()
            if resp.status == 503:
                assert "reason" in json.loads(body)
            return resp.status

    for _ in range(200):
        if await current() == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered {status}")


async def test_requests_over_the_in_flight_cap_get_503_at_once() -> None:
    """Like uvicorn's limit_concurrency: beyond max_requests_in_flight a request is refused
    before its body is read; the ops endpoints still answer."""
    primary = await start_fake_primary()
    config = load({"max_requests_in_flight": "2", "replicas": "false"}, environ={})
    proxy = TestServer(build_app(config, str(primary.make_url(""))), host="127.0.0.1")
    await proxy.start_server()
    try:
        async with aiohttp.ClientSession() as session:

            async def slow() -> int:
                async with session.get(str(proxy.make_url("/slow?s=2"))) as resp:
                    await resp.read()
                    return resp.status

            held = [asyncio.create_task(slow()) for _ in range(2)]
            metrics_url = str(proxy.make_url("/metrics"))
            for _ in range(200):
                async with session.get(metrics_url) as resp:
                    # both slow requests, plus this scrape (ops endpoints are not capped)
                    if "replica_proxy_requests_in_flight 3.0" in await resp.text():
                        break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the two slow requests never were in flight together")
            async with session.post(str(proxy.make_url("/echo-body")), data=b"x" * 1000) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                assert "2 requests in flight" in (await json_error(resp))["message"]
            async with session.get(str(proxy.make_url("/healthz"))) as resp:
                assert resp.status == 200
            assert await asyncio.gather(*held) == [200, 200]
    finally:
        await proxy.close()
        await primary.close()


def test_requests_a_real_primary_panics_on_leave_everyone_else_served(
    proxy: ProxyProcess,
) -> None:
    """Chroma 1.5.9 drops the connection of GET /api/v2/collections/{crn} (a handler panic,
    chroma-wire.md 14.9). Many of them through the proxy, in a row: each a clean 502, and
    heartbeat, pre-flight and tenant lookups keep answering 200 (they got 503 when each drop
    counted against the primary)."""
    import httpx

    address = proxy.primary_url.split("//")[1].rstrip("/")
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        for name in ("nope", "foo") * 5:  # twice breaker_failures (5)
            dropped = client.get(f"/api/v2/collections/default_tenant:default_database:{name}")
            assert dropped.status_code == 502, dropped.text
            body = dropped.json()
            assert body["error"] == "ChromaError", body
            assert "dropped the connection" in body["message"], body
            assert dropped.headers["X-Request-Id"] in body["message"], body
            assert address not in dropped.text
        for path in ("/api/v2/heartbeat", "/api/v2/pre-flight-checks",
                     "/api/v2/tenants/default_tenant"):  # fmt: skip
            assert client.get(path).status_code == 200, path
