"""Raw HTTP through the proxy: status, headers and body exactly as the primary sends them."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from tests.helpers import ChromaServer, ProxyProcess

D = "/api/v2/tenants/default_tenant/databases/default_database"
MISSING = "00000000-0000-4000-8000-000000000000"


async def exchange(
    session: aiohttp.ClientSession, base: str, method: str, path: str, **kw: Any
) -> tuple[int, CIMultiDict[str], bytes]:
    # encoded=True: send the path exactly as written, percent-escapes included.
    async with session.request(method, URL(base + path, encoded=True), **kw) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def make_collection(session: aiohttp.ClientSession, base: str, name: str) -> str:
    async with session.post(f"{base}{D}/collections", json={"name": name}) as resp:
        assert resp.status == 200
        cid: str = (await resp.json())["id"]
    add = {"ids": ["a", "b"], "embeddings": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]}
    async with session.post(f"{base}{D}/collections/{cid}/add", json=add) as resp:
        assert resp.status == 201
    return cid


CASES: list[tuple[str, str, str, Any, int]] = [
    ("missing by name", "GET", f"{D}/collections/does-not-exist", None, 404),
    ("missing record op", "POST", f"{D}/collections/{MISSING}/get", {}, 404),
    ("malformed uuid", "GET", f"{D}/collections/not-a-uuid/count", None, 400),
    ("bad where", "POST", "{C}/get", {"where": {"a": 1, "b": 2}}, 400),
    ("bad where_document", "POST", "{C}/get", {"where_document": {"$eq": "x"}}, 400),
    ("bad regex", "POST", "{C}/get", {"where_document": {"$regex": "("}}, 400),
    (
        "wrong dimension",
        "POST",
        "{C}/query",
        {"query_embeddings": [[1.0, 2.0]], "n_results": 1},
        400,
    ),
    ("schema mismatch 422", "POST", "{C}/get", {"include": ["bogus"]}, 422),
    ("not json", "POST", "{C}/get", b"{nope", 400),
    ("bad read_level", "GET", "{C}/count?read_level=bogus", None, 400),
    ("unknown path, empty 404", "GET", "/no/such/path", None, 404),
    ("v1 is gone (410)", "GET", "/api/v1/heartbeat", None, 410),
    ("method not allowed", "OPTIONS", "/api/v2/heartbeat", None, 405),
    ("not implemented 501", "POST", "{C}/fork", {"new_name": "forked-{NAME}"}, 501),
    ("internal error 500", "GET", "{C}/indexing_status", None, 500),
    ("reset disabled 403", "POST", "/api/v2/reset", None, 403),
    ("name rules 400", "POST", f"{D}/collections", {"name": "x"}, 400),
    ("duplicate 409", "POST", f"{D}/collections", {"name": "{NAME}"}, 409),
    ("query ok", "POST", "{C}/query", {"query_embeddings": [[1.0, 0.1, 0.0]], "n_results": 2}, 200),
    ("count ok", "GET", "{C}/count?read_level=index_and_wal", None, 200),
    ("version", "GET", "/api/v2/version", None, 200),
    ("pre-flight", "GET", "/api/v2/pre-flight-checks", None, 200),
    ("openapi", "GET", "/openapi.json", None, 200),
    ("encoded name", "GET", f"{D}/collections/{{ENCNAME}}", None, 200),
    # Found by fuzzing: a decoded newline in the path matched none of the proxy's routes and
    # got aiohttp's plain-text 404 instead of the primary's JSON one.
    ("encoded newline", "GET", f"{D}/collections/a%0Ab", None, 404),
    ("encoded newline last", "DELETE", "/api/v2/tenants/default_tenant/databases/a%0A", None, 404),
]


def same_payload(got: bytes, want: bytes, status: int) -> bool:
    """Errors must be byte-identical. Successful JSON is compared parsed: Chroma itself
    serialises maps (metadata, the collection schema) in a different order on every call;
    distances computed by a replica may differ in the last float32 bit."""
    if status >= 400 or not want:
        return got == want
    g, w = json.loads(got), json.loads(want)
    if isinstance(w, dict) and w.get("distances") is not None:
        close = all(
            math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)
            for ga, wa in zip(g.pop("distances"), w.pop("distances"), strict=True)
            for a, b in zip(ga, wa, strict=True)
        )
        return close and bool(g == w)
    return bool(g == w)


def _request(case: tuple[str, str, str, Any, int], cid: str, name: str) -> tuple[str, str, Any]:
    _, method, path, body, _ = case
    path = path.replace("{C}", f"{D}/collections/{cid}")
    # The name percent-encoded ("-" as %2D): the proxy must pass the path on as it came.
    path = path.replace("{ENCNAME}", name.replace("-", "%2D"))
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).replace("{NAME}", name).encode()
    return method, path, body


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_response_identical(
    chroma: ChromaServer,
    forwarding_proxy: ProxyProcess,
    name: str,
    case: tuple[str, str, str, Any, int],
) -> None:
    proxy = forwarding_proxy
    async with aiohttp.ClientSession() as session:
        cid = await make_collection(session, chroma.url, name)
        method, path, body = _request(case, cid, name)
        kw: dict[str, Any] = {}
        if body is not None:
            kw = {"data": body, "headers": {"Content-Type": "application/json"}}
        want = await exchange(session, chroma.url, method, path, **kw)
        got = await exchange(session, proxy.url, method, path, **kw)
    want_status, want_headers, want_body = want
    got_status, got_headers, got_body = got
    assert got_status == want_status == case[4]
    assert same_payload(got_body, want_body, want_status)
    assert got_headers.get("Content-Type") == want_headers.get("Content-Type")
    assert got_headers.get("chroma-trace-id") == want_headers.get("chroma-trace-id")
    assert got_headers["X-Proxy-Source"] == "primary"
    assert got_headers["X-Request-Id"]


async def test_head_and_trace_header(forwarding_proxy: ProxyProcess, chroma: ChromaServer) -> None:
    proxy = forwarding_proxy
    async with aiohttp.ClientSession() as session:
        want = await exchange(session, chroma.url, "GET", f"{D}/collections/nope")
        got = await exchange(session, proxy.url, "GET", f"{D}/collections/nope")
        assert got[1]["chroma-trace-id"] == want[1]["chroma-trace-id"]
        status, _, body = await exchange(session, proxy.url, "HEAD", "/api/v2/heartbeat")
        assert status in (200, 405) and body == b""


async def test_request_id_is_kept_or_made(proxy: ProxyProcess) -> None:
    async with aiohttp.ClientSession() as session:
        headers = {"X-Request-Id": "client-chosen-id.1"}
        async with session.get(proxy.url + "/api/v2/heartbeat", headers=headers) as resp:
            assert resp.headers["X-Request-Id"] == "client-chosen-id.1"
        # Something that is not a sane id (here, too long) is replaced rather than echoed.
        headers = {"X-Request-Id": "x" * 300}
        async with session.get(proxy.url + "/api/v2/heartbeat", headers=headers) as resp:
            assert re.fullmatch(r"[0-9a-f]{16,}", resp.headers["X-Request-Id"])


async def test_two_hundred_concurrent_requests(
    chroma: ChromaServer, proxy: ProxyProcess, name: str
) -> None:
    """200 requests at once (queries, gets, counts, lookups): all answered, all correct."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        cid = await make_collection(session, chroma.url, name)
        c = f"{D}/collections/{cid}"
        kinds: list[tuple[str, str, Any]] = [
            ("POST", f"{c}/query", {"query_embeddings": [[1.0, 0.2, 0.0]], "n_results": 2}),
            ("POST", f"{c}/get", {"where": {"$and": []}}),
            ("GET", f"{c}/count", None),
            ("GET", f"{D}/collections/{name}", None),
            ("GET", "/api/v2/heartbeat", None),
        ]
        expected = [(await exchange(session, chroma.url, m, p, json=b))[::2] for m, p, b in kinds]
        jobs = [kinds[i % len(kinds)] for i in range(200)]
        results = await asyncio.gather(
            *(exchange(session, proxy.url, m, p, json=b) for m, p, b in jobs)
        )
    for i, (status, _, body) in enumerate(results):
        want_status, want_body = expected[i % len(kinds)]
        assert status == want_status == 200
        if jobs[i][1] != "/api/v2/heartbeat":  # the heartbeat is a clock
            assert same_payload(body, want_body, status)
