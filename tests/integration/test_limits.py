"""Request limits (proxy/limits.py): each answered by the proxy itself, 400 for counts and
413 for sizes, in Chroma's error format naming the config key, on the local-read, forwarded
and write paths alike; requests just under a limit go through."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.helpers import ProxyProcess

D = "/api/v2/tenants/default_tenant/databases/default_database"


@pytest.fixture(scope="module")
def cid(proxy: ProxyProcess) -> str:
    with httpx.Client(timeout=60) as client:
        made = client.post(f"{proxy.url}{D}/collections", json={"name": "limits-test"})
        found: str = made.json()["id"]
        rows = {"ids": ["a", "b"], "embeddings": [[1.0, 0.0], [0.0, 1.0]]}
        assert client.post(f"{proxy.url}{D}/collections/{found}/add", json=rows).status_code == 201
    return found


def _nested(depth: int) -> dict[str, Any]:
    clause: dict[str, Any] = {"k": 1}
    for _ in range(depth):
        clause = {"$and": [clause, {"k": 1}]}
    return clause


CASES = [
    ("get", {"ids": [f"i{i}" for i in range(100_001)]}, 400, "max_ids_per_request"),
    ("query", {"query_embeddings": [[1.0, 0.0]], "n_results": 100_001}, 400, "max_n_results"),
    ("query", {"query_embeddings": [[1.0, 0.0]] * 10_001, "n_results": 1}, 400,
     "max_query_vectors"),
    ("get", {"where": _nested(40)}, 400, "max_where_depth"),
    ("delete", {"where": {"$or": [{"k": i} for i in range(5_001)]}}, 400, "max_where_nodes"),
    ("add", {"ids": ["big"], "embeddings": [[1.0, 1.0]], "documents": ["x" * (4 << 20 | 1)]},
     413, "max_document_bytes"),
    ("upsert", {"ids": ["big"], "embeddings": [[1.0, 1.0]],
                "metadatas": [{"blob": "y" * (1 << 20)}]}, 413, "max_metadata_bytes"),
]  # fmt: skip


@pytest.mark.parametrize(("op", "body", "status", "key"), CASES, ids=[c[3] for c in CASES])
def test_a_request_past_a_limit_is_refused_by_the_proxy(
    proxy: ProxyProcess, cid: str, op: str, body: dict[str, Any], status: int, key: str
) -> None:
    with httpx.Client(timeout=120) as client:
        resp = client.post(f"{proxy.url}{D}/collections/{cid}/{op}", json=body)
    assert resp.status_code == status, resp.text[:300]
    assert resp.headers["X-Proxy-Source"] == "proxy"  # never reached the primary
    error = resp.json()
    assert key in error["message"]
    assert error["error"] == ("InvalidArgumentError" if status == 400 else "ChromaError")


def test_just_under_the_limits_goes_through(proxy: ProxyProcess, cid: str) -> None:
    with httpx.Client(timeout=120) as client:
        path = f"{proxy.url}{D}/collections/{cid}"
        got = client.post(f"{path}/get", json={"where": _nested(30), "include": []})
        assert got.status_code == 200, got.text
        query = {"query_embeddings": [[1.0, 0.0]] * 100, "n_results": 2, "include": []}
        assert client.post(f"{path}/query", json=query).status_code == 200
