"""A 40 MiB add passes through, streamed: the proxy never holds the body in memory."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.helpers import ChromaServer, ProxyProcess, peak_rss_bytes

D = "/api/v2/tenants/default_tenant/databases/default_database"
MIB = 1 << 20


def add_body(rows: int, dim: int) -> bytes:
    """An add request as the clients send it (base64 little-endian float32 embeddings)."""
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(rows, dim)).astype("<f4")
    body = {
        "ids": [f"big-{i}" for i in range(rows)],
        "embeddings": [base64.b64encode(v.tobytes()).decode() for v in vecs],
        "documents": None,
        "metadatas": None,
        "uris": None,
    }
    return json.dumps(body).encode()


async def create(session: aiohttp.ClientSession, base: str, name: str) -> str:
    async with session.post(f"{base}{D}/collections", json={"name": name}) as resp:
        cid: str = (await resp.json())["id"]
    return cid


async def test_40_mib_add(chroma: ChromaServer, proxy: ProxyProcess, name: str) -> None:
    body = add_body(rows=1850, dim=4096)
    assert 38 * MIB < len(body) < 40 * MIB  # under Chroma's 40 MiB (41 943 040 B) limit
    before = peak_rss_bytes(proxy.pid)
    async with aiohttp.ClientSession() as session:
        cid = await create(session, chroma.url, name)
        headers = {"Content-Type": "application/json"}
        url = f"{proxy.url}{D}/collections/{cid}/add"
        async with session.post(url, data=io.BytesIO(body), headers=headers) as resp:
            assert resp.status == 201, await resp.text()
        async with session.get(f"{proxy.url}{D}/collections/{cid}/count") as resp:
            assert await resp.json() == 1850
    growth = peak_rss_bytes(proxy.pid) - before
    # Streaming keeps only a few chunks in flight; holding the body even once would add ~39 MiB.
    assert growth < 16 * MIB, f"proxy peak RSS grew by {growth / MIB:.1f} MiB"


async def test_over_chroma_limit_is_a_clean_413(
    chroma: ChromaServer, proxy: ProxyProcess, name: str
) -> None:
    """Chroma answers a body over its 40 MiB limit by cutting the upload (the client sees a
    broken pipe, or a plain-text 413 if it is lucky). The proxy refuses it up front, in
    Chroma's JSON error shape, and nothing reaches the primary."""
    body = add_body(rows=2200, dim=4096)
    assert len(body) > 41_943_040
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        cid = await create(session, chroma.url, name)
        url = f"{proxy.url}{D}/collections/{cid}/add"
        async with session.post(url, data=io.BytesIO(body), headers=headers) as resp:
            assert resp.status == 413
            assert resp.headers["X-Proxy-Source"] == "proxy"
            error = await resp.json()
        async with session.get(f"{chroma.url}{D}/collections/{cid}/count") as resp:
            assert await resp.json() == 0
    assert error["error"] == "ChromaError"
    assert "max_body_bytes=41943040" in error["message"]


async def _chunked(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 1 << 16):
        yield body[start : start + (1 << 16)]


def _padded(extra: dict[str, Any], rows: int = 600) -> bytes:
    """An add over 8 MiB (so it streams, unread whole), with ``extra`` merged in."""
    body = json.loads(add_body(rows=rows, dim=4096))
    body.update(extra)
    return json.dumps(body).encode()


STREAMED_CASES = [
    ({"documents": [""] * 599 + ["d" * ((4 << 20) + 1)]}, 413, "max_document_bytes"),
    ({"metadatas": [None] * 300 + [{"k": "m" * (1 << 20)}] + [None] * 299}, 413,
     "max_metadata_bytes"),
]  # fmt: skip


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("extra", "status", "key"), STREAMED_CASES, ids=["document", "metadata"])
async def test_a_streamed_write_past_a_limit_is_refused_and_nothing_written(
    chroma: ChromaServer,
    proxy: ProxyProcess,
    name: str,
    extra: dict[str, Any],
    status: int,
    key: str,
    chunked: bool,
) -> None:
    """A write too large to read whole is checked as it streams: the upload breaks off at the
    chunk past the limit, the client gets the limit's error, the primary writes nothing."""
    body = _padded(extra)
    assert len(body) > 8 * MIB
    async with aiohttp.ClientSession() as session:
        cid = await create(session, chroma.url, name)
        url = f"{proxy.url}{D}/collections/{cid}/add"
        data: Any = _chunked(body) if chunked else io.BytesIO(body)
        async with session.post(
            url, data=data, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == status, await resp.text()
            assert resp.headers["X-Proxy-Source"] == "proxy"
            error = await resp.json()
        async with session.get(f"{chroma.url}{D}/collections/{cid}/count") as resp:
            assert await resp.json() == 0
        assert key in error["message"]
        # The same rows within the limits go through (the check refuses only what it should).
        fine = _padded({})
        async with session.post(url, data=_chunked(fine) if chunked else io.BytesIO(fine),
                                headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
            assert resp.status == 201, await resp.text()


async def test_a_streamed_write_with_too_many_ids_is_refused(
    chroma: ChromaServer, proxy: ProxyProcess, name: str
) -> None:
    ids = [f"id-{i}" for i in range(100_001)]
    body = json.dumps({"ids": ids, "embeddings": ["AACAPwAAAAAAAAAA"] * len(ids)}).encode()
    async with aiohttp.ClientSession() as session:
        cid = await create(session, chroma.url, name)
        url = f"{proxy.url}{D}/collections/{cid}/upsert"
        async with session.post(url, data=_chunked(body)) as resp:  # no length: streamed
            assert resp.status == 400, await resp.text()
            assert "max_ids_per_request" in (await resp.json())["message"]
        async with session.get(f"{chroma.url}{D}/collections/{cid}/count") as resp:
            assert await resp.json() == 0
