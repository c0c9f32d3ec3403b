"""Request limits (proxy/access/limits.py): each answered by the proxy itself, 400 for counts and
413 for sizes, in Chroma's error format naming the config key, on the local-read, forwarded
and write paths alike; requests just under a limit go through."""

from __future__ import annotations

import json
import socket
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


def _raw(proxy: ProxyProcess, head: bytes) -> tuple[int, bytes]:
    """Send a request as bytes (a client library might refuse to); the status and body."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


HEARTBEAT = b"GET /api/v2/heartbeat HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"


@pytest.mark.parametrize(
    ("extra", "status", "key"),
    [
        (b"Authorization: Bearer " + b"s3cret" * 3000 + b"\r\n", 431, "max_header_bytes"),
        (b"".join(b"X-Header-%d: v\r\n" % i for i in range(63)), 431, "max_headers"),
        (b"Content-Length: twelve\r\n", 400, "malformed HTTP request"),
    ],
    ids=["max_header_bytes", "max_headers", "malformed"],
)
def test_headers_past_a_limit_or_malformed_get_chromas_error_shape(
    proxy: ProxyProcess, extra: bytes, status: int, key: str
) -> None:
    got, body = _raw(proxy, HEARTBEAT + extra + b"\r\n")
    assert got == status, body
    error = json.loads(body)
    assert key in error["message"]
    assert error["error"] in ("ChromaError", "InvalidArgumentError")
    assert b"s3cret" not in body and "s3cret" not in proxy.logs()  # the line is never quoted


def test_headers_just_under_the_limits_go_through(proxy: ProxyProcess) -> None:
    # The primary itself takes far larger headers (a 500 kB one) and answers 431 past 100.
    # Forwarded, so the primary sees them with the headers the proxy adds.
    big = b"X-Big: " + b"a" * (16 * 1024 - len("X-Big") - 8) + b"\r\n"
    many = b"".join(b"X-Header-%d: v\r\n" % i for i in range(62))  # + Host, Connection
    for extra in (big, many):
        status, body = _raw(proxy, HEARTBEAT + extra + b"\r\n")
        assert status == 200, body
