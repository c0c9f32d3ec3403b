"""Cache, coalescing and admission control on real proxy processes and a real primary."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from proxy.app import build_app
from proxy.config import load
from proxy.primary.embedded import free_port
from tests.helpers import ChromaServer, ProxyProcess, wait_until
from tests.integration.fake_primary import fake_primary_app

D = "/api/v2/tenants/default_tenant/databases/default_database"
LOCAL = ("replica", "cache")


def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(base + "/metrics").text
    match = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def make_collection(base: str, name: str, rows: int = 300, dim: int = 16) -> str:
    rng = np.random.default_rng(5)
    vectors = (rng.normal(size=(4, dim))[np.arange(rows) % 4] * 5
               + rng.normal(size=(rows, dim)) * 0.2)  # fmt: skip
    with httpx.Client(timeout=60) as client:
        cid: str = client.post(f"{base}{D}/collections", json={"name": name}).json()["id"]
        add = {"ids": [f"r{i}" for i in range(rows)], "embeddings": vectors.tolist(),
               "metadatas": [{"g": i % 4} for i in range(rows)]}  # fmt: skip
        assert client.post(f"{base}{D}/collections/{cid}/add", json=add).status_code == 201
    return cid


def served_locally(base: str, cid: str) -> bool:
    resp = httpx.get(f"{base}{D}/collections/{cid}/count")
    return resp.headers.get("X-Proxy-Source") in LOCAL


def test_cache_hit_is_byte_identical_and_writes_invalidate(proxy: ProxyProcess, name: str) -> None:
    cid = make_collection(proxy.url, name)
    wait_until(lambda: served_locally(proxy.url, cid), 60, "replica")
    url = f"{proxy.url}{D}/collections/{cid}/query"
    body = {"query_embeddings": [[0.5] * 16], "n_results": 5, "include": ["distances"]}
    with httpx.Client(timeout=60) as client:
        first = client.post(url, json=body)
        second = client.post(url, json=body)
        # Same request with its keys in another order: same canonical request, same entry.
        third = client.post(url, json=dict(reversed(list(body.items()))))
        assert first.headers["X-Proxy-Source"] == "replica"
        assert second.headers["X-Proxy-Source"] == third.headers["X-Proxy-Source"] == "cache"
        assert second.content == first.content == third.content
        add = {"ids": ["new"], "embeddings": [[0.5] * 16]}
        assert client.post(f"{proxy.url}{D}/collections/{cid}/add", json=add).status_code == 201
        after = client.post(url, json=body)
        # Never the cached pre-write answer: the replica, with the write applied to it.
        assert after.headers["X-Proxy-Source"] == "replica"
        assert "new" in after.json()["ids"][0]


async def test_identical_concurrent_misses_search_once(proxy: ProxyProcess, name: str) -> None:
    cid = await asyncio.to_thread(make_collection, proxy.url, name)
    await asyncio.to_thread(wait_until, lambda: served_locally(proxy.url, cid), 60, "replica")
    url = f"{proxy.url}{D}/collections/{cid}/query"
    body = {"query_embeddings": [[0.25] * 16] * 50, "n_results": 10, "where": {"g": 1}}
    misses = metric(proxy.url, "replica_proxy_cache_requests_total", '{result="miss"}')
    async with aiohttp.ClientSession() as session:

        async def one() -> tuple[str, bytes]:
            async with session.post(url, json=body) as resp:
                assert resp.status == 200
                return resp.headers["X-Proxy-Source"], await resp.read()

        answers = await asyncio.gather(*(one() for _ in range(20)))
    assert len({payload for _, payload in answers}) == 1
    # Exactly one of the twenty was computed; the rest waited for it or found it cached.
    now = metric(proxy.url, "replica_proxy_cache_requests_total", '{result="miss"}')
    assert now - misses == 1
    assert sum(source == "replica" for source, _ in answers) >= 1


async def test_overload_is_shed_with_503_and_retry_after(
    chroma: ChromaServer, tmp_path: Path, name: str
) -> None:
    """One search slot, no queue: concurrent heavy searches beyond the first are refused at
    once in Chroma's error shape; every admitted one is answered correctly."""
    cid = await asyncio.to_thread(make_collection, chroma.url, name, 3000, 32)
    proxy = await asyncio.to_thread(
        ProxyProcess, "--primary", chroma.url, "--replicate", "", "--cache-max-bytes", "0",
        "--max-concurrent-searches", "1", "--search-queue-max", "0",
        "--data-dir", str(tmp_path / "data"), log_dir=tmp_path,
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_until, lambda: served_locally(proxy.url, cid), 60, "replica")
        url = f"{proxy.url}{D}/collections/{cid}/query"
        rng = np.random.default_rng(1)
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> tuple[int, dict[str, str], Any]:
                # 200 query vectors, each exact over a third of the rows: tens of ms of work.
                body = {"query_embeddings": (rng.normal(size=(200, 32)) * 5).tolist(),
                        "n_results": 10, "where": {"g": {"$in": [i % 4]}}}  # fmt: skip
                async with session.post(url, json=body) as resp:
                    return resp.status, dict(resp.headers), await resp.json()

            results = await asyncio.gather(*(one(i) for i in range(12)))
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 503}
        assert statuses.count(503) >= 1 and statuses.count(200) >= 1
        for status, headers, body in results:
            if status == 503:
                assert headers["Retry-After"] == "1"
                assert body["error"] == "ChromaError" and "search queue full" in body["message"]
            else:
                assert len(body["ids"]) == 200
        shed = metric(proxy.url, "replica_proxy_admission_total", '{decision="queue_full"}')
        assert shed == statuses.count(503)
    finally:
        assert proxy.stop() == 0


def test_tenant_rate_limit_is_429(chroma: ChromaServer, tmp_path: Path) -> None:
    proxy = ProxyProcess(
        "--primary", chroma.url, "--tenant-rate-per-s", "0.001", "--tenant-burst", "2",
        "--data-dir", str(tmp_path / "data"), log_dir=tmp_path,
    )  # fmt: skip
    try:
        with httpx.Client(timeout=30) as client:
            url = f"{proxy.url}{D}/collections"
            assert [client.get(url).status_code for _ in range(2)] == [200, 200]
            limited = client.get(url)
            assert limited.status_code == 429
            assert limited.json()["error"] == "RateLimitError"
            assert int(limited.headers["Retry-After"]) >= 1
            # No tenant in the path, no bucket: the heartbeat is not limited.
            assert client.get(proxy.url + "/api/v2/heartbeat").status_code == 200
    finally:
        assert proxy.stop() == 0


def test_forwarded_lookups_are_cached_until_a_write(proxy: ProxyProcess, name: str) -> None:
    with httpx.Client(timeout=30) as client:
        url = f"{proxy.url}{D}/collections"
        client.get(url)
        cached = client.get(url)
        assert cached.headers["X-Proxy-Source"] == "cache"
        assert client.post(url, json={"name": name}).status_code == 200
        fresh = client.get(url)
        assert fresh.headers["X-Proxy-Source"] == "primary"
        assert name in [c["name"] for c in fresh.json()]


@pytest.fixture
async def breaker_rig() -> AsyncIterator[tuple[TestServer, int]]:
    """An in-process proxy whose primary's port has nothing listening (yet)."""
    port = free_port()
    config = load(
        {"breaker_failures": "3", "breaker_open_s": "0.2", "heartbeat_interval_s": "0.1",
         "replicas": "false", "forwarded_cache_ttl_s": "0"},
        environ={},
    )  # fmt: skip
    proxy = TestServer(build_app(config, f"http://127.0.0.1:{port}"), host="127.0.0.1")
    await proxy.start_server()
    yield proxy, port
    await proxy.close()


async def test_breaker_opens_then_closes_when_the_primary_returns(
    breaker_rig: tuple[TestServer, int],
) -> None:
    proxy, port = breaker_rig
    url = str(proxy.make_url("/api/v2/version"))
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(6):
            async with session.get(url) as resp:
                statuses.append(resp.status)
                body = await resp.json()
        # Real attempts fail with 502 until three failures (heartbeats count too) open the
        # breaker; from then on it answers 503 without trying.
        assert statuses[0] == 502 and statuses[-1] == 503
        assert statuses == sorted(statuses)
        assert body["error"] == "ChromaError" and "not tried" in body["message"]
        primary = TestServer(fake_primary_app(), host="127.0.0.1", port=port)
        await primary.start_server()
        try:
            for _ in range(200):  # heartbeats (which bypass the breaker) close it
                async with session.get(str(proxy.make_url("/api/v2/heartbeat"))) as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)
            async with session.get(str(proxy.make_url("/metrics"))) as resp:
                text = await resp.text()
            assert "replica_proxy_breaker_state 0.0" in text
            assert "replica_proxy_breaker_trips_total 1.0" in text
        finally:
            await primary.close()
