"""Replica answers equal the primary's, on clustered data, for every filter and include shape.

Three collections (l2, cosine, ip) are written straight to a real primary; a proxy builds
replicas of them on first read. Every request then goes both to the primary and to the proxy
and the answers are compared field by field: ids and order identical, distances within 1e-5
(relative for large l2 values), everything else equal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers import ChromaServer, ProxyProcess, wait_until

D = "/api/v2/tenants/default_tenant/databases/default_database"
LOCAL = ("replica", "cache")  # answered by the proxy from a replica, or from its result cache
ROWS, DIM = 2000, 24
TOPICS = ["alpha", "beta", "gamma", "delta", "omega"]


def rows_metadata(i: int) -> dict[str, Any] | None:
    if i % 50 == 0:
        return None
    meta: dict[str, Any] = {
        "cat": f"c{i % 5}",
        "n": i,
        "flag": i % 3 == 0,
        "tags": [f"t{i % 4}", f"u{i % 7}"],
        "nums": [i % 10, 100 + i % 13],
    }
    if i % 9:
        meta["score"] = (i % 100) / 10
    return meta


def load(
    client: httpx.Client, base: str, name: str, space: str
) -> tuple[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng({"l2": 1, "cosine": 2, "ip": 3}[space])
    centres = rng.normal(size=(20, DIM)) * 3
    vectors = (centres[np.arange(ROWS) % 20] + rng.normal(size=(ROWS, DIM)) * 0.35).astype(
        np.float32
    )
    if space == "ip":
        # Inner product is used with normalised embeddings. On raw clustered points the top
        # inner products are far from the query, HNSW (which assumes a metric) is approximate
        # on the primary itself, and an exact replica would "disagree" by being right.
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # ef 200: two independently built HNSW graphs agree only where both are (near) exact.
    # Chroma builds with several threads, so its graph differs run to run; at ef 100 its own
    # filtered searches occasionally miss a neighbour the replica finds (about one query in
    # a few hundred here), which would make the comparison flaky rather than wrong.
    hnsw = {"space": space, "ef_construction": 200, "ef_search": 200}
    body = {"name": name, "configuration": {"hnsw": hnsw}}
    cid: str = client.post(f"{base}{D}/collections", json=body).json()["id"]
    for start in range(0, ROWS, 500):
        rows = range(start, start + 500)
        add = {
            "ids": [f"r{i}" for i in rows],
            "embeddings": vectors[start : start + 500].tolist(),
            "metadatas": [rows_metadata(i) for i in rows],
            "documents": [
                None if i % 40 == 0 else f"row {i} about {TOPICS[i % 5]} and {TOPICS[i % 3]}"
                for i in rows
            ],
            "uris": [f"s3://bucket/{i}" for i in rows],
        }
        assert client.post(f"{base}{D}/collections/{cid}/add", json=add).status_code == 201
    return cid, vectors


@pytest.fixture(scope="module")
def collections(chroma: ChromaServer) -> Iterator[dict[str, tuple[str, np.ndarray[Any, Any]]]]:
    suffix = str(time.monotonic_ns())
    with httpx.Client(timeout=60) as client:
        yield {space: load(client, chroma.url, f"parity-{space}-{suffix}", space) for space in
               ("l2", "cosine", "ip")}  # fmt: skip


@pytest.fixture(scope="module")
def replica_proxy(
    chroma: ChromaServer,
    collections: dict[str, tuple[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyProcess]:
    """Replicas built on first read; exact search only for tiny filters, so that filtered
    queries also take the HNSW over-fetch path."""
    log_dir = tmp_path_factory.mktemp("replica-proxy")
    proxy = ProxyProcess(
        "--primary", chroma.url, "--replicate", "", "--exact-search-max-rows", "50",
        "--rebuild-debounce-s", "0.2", "--data-dir", str(log_dir / "data"), log_dir=log_dir,
    )  # fmt: skip
    with httpx.Client(timeout=60) as client:
        for cid, _ in collections.values():
            wait_until(partial(_served_locally, client, proxy.url, cid), 120, "replica")
    yield proxy
    assert proxy.stop() == 0, proxy.logs()


def _served_locally(client: httpx.Client, base: str, cid: str) -> bool:
    resp = client.get(f"{base}{D}/collections/{cid}/count")
    return resp.headers.get("X-Proxy-Source") in LOCAL


def assert_same_query(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["ids"] == want["ids"]
    assert got["include"] == want["include"]
    for field in ("documents", "uris", "metadatas", "embeddings"):
        assert got[field] == want[field], field
    if want["distances"] is None:
        assert got["distances"] is None
    for g, w in zip(got["distances"] or [], want["distances"] or [], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert list(got) == list(want)  # key order too


WHERE: list[tuple[Any, Any]] = [
    (None, None),
    ({"cat": "c1"}, None),
    ({"cat": {"$ne": "c1"}}, None),
    ({"n": {"$lt": 100}}, None),
    ({"n": {"$gte": 1000}}, None),
    ({"score": {"$gt": 5.5}}, None),
    ({"score": {"$lte": 3.3}}, None),
    ({"cat": {"$eq": "c4"}}, None),
    ({"score": {"$ne": 2.0}}, None),
    ({"flag": True}, None),
    ({"tags": {"$contains": "t1"}}, None),
    ({"tags": {"$not_contains": "u3"}}, None),
    ({"nums": {"$contains": 107}}, None),
    ({"cat": {"$in": ["c1", "c2"]}}, None),
    ({"cat": {"$nin": ["c1", "c2"]}}, None),
    ({"$and": [{"cat": "c3"}, {"n": {"$gt": 500}}]}, None),
    ({"$or": [{"flag": True}, {"score": {"$lt": 1}}]}, None),
    ({"n": {"$in": [1, 2, 3, 500, 1999]}}, None),
    ({"#document": {"$contains": "beta"}}, None),
    ({"missing_key": "x"}, None),
    (None, {"$contains": "gamma"}),
    (None, {"$not_contains": "gamma"}),
    (None, {"$regex": "row 1[0-9]+ about"}),
    (None, {"$or": [{"$contains": "omega"}, {"$not_regex": "[0-9]{3}"}]}),
    ({"flag": False}, {"$contains": "delta"}),
    # Evaluated with RE2, which agrees with Rust here (Python's re did not: forwarded before).
    (None, {"$regex": "alpha$"}),
    (None, {"$regex": "[[:digit:]]{4}"}),
    (None, {"$regex": "(r+o+)+w 1"}),
    # Unicode in Rust, ASCII in RE2: local because every document is plain ASCII.
    (None, {"$regex": "(?i)^ROW 1\\d{2} ABOUT"}),
    (None, {"$regex": "\\bom\\w+a\\b"}),
    (None, {"$not_regex": "^row \\d+ about (alpha|gamma)"}),
    (None, {"$regex": "(?m)beta$"}),
    (None, {"$regex": "[^a-z ]{3} about"}),
    (None, {"$regex": "\\w{50}|a{1000}"}),  # within Rust's compiled size limit
]
# Filters the replica does not evaluate itself (Rust-only regex syntax, or syntax RE2 reads
# otherwise): forwarded, and the answer must still be the primary's.
FORWARDED = [
    (None, {"$regex": "\\p{Lu}"}),
    (None, {"$regex": "[0-9&&[^5]]{3}"}),
    (None, {"$regex": "[a[lp]]ha"}),  # a nested class in Rust; RE2 would want "]ha"
    (None, {"$regex": "row 1{01}0"}),  # a repetition in Rust; RE2 would want "{01}"
    (None, {"$regex": "\\b{start}gamma"}),  # a word-start assertion in Rust
]


def _query_body(vectors: np.ndarray[Any, Any], where: Any, where_document: Any) -> dict[str, Any]:
    picks = vectors[[3, 250, 777, 1234, 1999]] + 0.02
    body: dict[str, Any] = {
        "query_embeddings": picks.tolist(),
        "n_results": 10,
        "include": ["metadatas", "documents", "distances", "embeddings", "uris"],
    }
    if where is not None:
        body["where"] = where
    if where_document is not None:
        body["where_document"] = where_document
    return body


@pytest.mark.parametrize("space", ["l2", "cosine", "ip"])
@pytest.mark.parametrize(("where", "where_document"), WHERE + FORWARDED, ids=repr)
def test_query_parity(
    chroma: ChromaServer,
    replica_proxy: ProxyProcess,
    collections: dict[str, tuple[str, Any]],
    space: str,
    where: Any,
    where_document: Any,
) -> None:
    cid, vectors = collections[space]
    body = _query_body(vectors, where, where_document)
    path = f"{D}/collections/{cid}/query"
    want = httpx.post(chroma.url + path, json=body, timeout=60)
    got = httpx.post(replica_proxy.url + path, json=body, timeout=60)
    assert want.status_code == got.status_code == 200
    expected = ("primary",) if (where, where_document) in FORWARDED else LOCAL
    assert got.headers["X-Proxy-Source"] in expected
    assert_same_query(got.json(), want.json())


GET_SHAPES: list[dict[str, Any]] = [
    {},
    {"include": ["embeddings", "uris", "metadatas", "documents"]},
    {"include": []},
    {"include": ["distances"]},
    {"limit": 7, "offset": 3},
    {"limit": 0},
    {"offset": 100000},
    {"ids": ["r5", "r3", "r3", "nope", "r1999"], "include": ["metadatas"]},
    {"ids": []},
]


@pytest.mark.parametrize("shape", GET_SHAPES, ids=repr)
@pytest.mark.parametrize(("where", "where_document"), WHERE[:8] + WHERE[16:20], ids=repr)
def test_get_parity(
    chroma: ChromaServer,
    replica_proxy: ProxyProcess,
    collections: dict[str, tuple[str, Any]],
    shape: dict[str, Any],
    where: Any,
    where_document: Any,
) -> None:
    cid, _ = collections["cosine"]  # cosine: returned embeddings differ from inputs by 1 ulp
    body = {**shape, "where": where, "where_document": where_document}
    path = f"{D}/collections/{cid}/get"
    want = httpx.post(chroma.url + path, json=body, timeout=60)
    got = httpx.post(replica_proxy.url + path, json=body, timeout=60)
    assert want.status_code == got.status_code == 200
    assert got.headers["X-Proxy-Source"] in LOCAL
    assert got.json() == want.json()
    assert list(got.json()) == list(want.json())


def test_lookups_and_count(
    chroma: ChromaServer, replica_proxy: ProxyProcess, collections: dict[str, tuple[str, Any]]
) -> None:
    cid, _ = collections["ip"]
    with httpx.Client(timeout=60) as client:
        name = client.get(f"{chroma.url}{D}/collections/by-id/{cid}").json()["name"]
        for path in (
            f"{D}/collections/{cid}/count",
            f"{D}/collections/{cid}/count?read_level=index_and_wal",
            f"{D}/collections/{name}",
            f"{D}/collections/by-id/{cid}",
        ):
            want, got = client.get(chroma.url + path), client.get(replica_proxy.url + path)
            assert got.status_code == want.status_code == 200
            assert got.headers["X-Proxy-Source"] in LOCAL, path
            assert got.json() == want.json()
            assert float(got.headers["X-Proxy-Replica-Age"]) >= 0
        # The same collection asked for under another database is not answered locally.
        other = f"/api/v2/tenants/default_tenant/databases/nope/collections/by-id/{cid}"
        want, got = client.get(chroma.url + other), client.get(replica_proxy.url + other)
        assert (got.status_code, got.content) == (want.status_code, want.content)


def test_invalid_requests_get_the_primarys_errors(
    chroma: ChromaServer, replica_proxy: ProxyProcess, collections: dict[str, tuple[str, Any]]
) -> None:
    cid, _ = collections["l2"]
    bad = [
        ("query", {"query_embeddings": [[1.0, 2.0]], "n_results": 3}),  # wrong dimension
        ("query", {"query_embeddings": [[0.0] * DIM], "n_results": -1}),
        ("get", {"where": {"cat": {"$gt": "x"}}}),
        ("get", {"where": {"a": 1, "b": 2}}),
        ("get", {"include": ["data"]}),
        ("get", {"where_document": {"$regex": "("}}),
        # Regexes Rust refuses and RE2 takes: the primary's error, not a local answer.
        ("get", {"where_document": {"$regex": "\\w{300}"}}),  # Rust's size limit: a 500
        ("get", {"where_document": {"$regex": "a{4294967295}"}}),
        ("get", {"where_document": {"$regex": "[^\\s\\S]"}}),  # empty class: 400
        ("get", {"where_document": {"$regex": "(?ii)row"}}),
        ("get", {"where_document": {"$regex": "row(?i)*"}}),
        # Found by fuzzing: unhashable values where strings belong were a 500 of the proxy.
        ("query", {"query_embeddings": [[0.0] * DIM], "include": [{}]}),
        ("get", {"include": [[]]}),
        ("get", {"where": {"cat": {"$in": [{}]}}}),
        ("get", {"where": {"cat": {"$nin": [[1]]}}}),
        ("get", {"where_document": {"$contains": {}}}),
    ]
    for op, body in bad:
        path = f"{D}/collections/{cid}/{op}"
        want = httpx.post(chroma.url + path, content=json.dumps(body), timeout=60,
                          headers={"Content-Type": "application/json"})  # fmt: skip
        got = httpx.post(replica_proxy.url + path, content=json.dumps(body), timeout=60,
                         headers={"Content-Type": "application/json"})  # fmt: skip
        assert got.status_code == want.status_code >= 400, body
        assert got.content == want.content


def test_read_your_writes(chroma: ChromaServer, replica_proxy: ProxyProcess, name: str) -> None:
    """Through the proxy, a read right after a write sees it, answered by the replica: the
    write was applied to it (proxy/replica/overlay.py). A write it cannot replay (a delete with a
    limit) sends reads to the primary until a rebuild covers it."""
    p = replica_proxy.url
    with httpx.Client(timeout=60) as client:
        cid = client.post(f"{p}{D}/collections", json={"name": name}).json()["id"]
        c = f"{D}/collections/{cid}"
        vecs = [[float(i), float(i % 3), 1.0] for i in range(20)]
        add = {"ids": [f"a{i}" for i in range(20)], "embeddings": vecs,
               "metadatas": [{"i": i} for i in range(20)]}  # fmt: skip
        assert client.post(f"{p}{c}/add", json=add).status_code == 201
        wait_until(lambda: _served_locally(client, p, cid), 60, "first replica")

        def both(op: str, body: Any = None) -> tuple[httpx.Response, Any]:
            method = "GET" if op == "count" else "POST"
            got = client.request(method, f"{p}{c}/{op}", json=body)
            want = client.request(method, f"{chroma.url}{c}/{op}", json=body)
            assert got.json() == want.json(), (op, got.headers.get("X-Proxy-Source"))
            return got, got.json()

        query = {"query_embeddings": [[50.0, 0.0, 1.0]], "n_results": 1, "include": []}
        writes: list[tuple[str, dict[str, Any]]] = [
            ("add", {"ids": ["new"], "embeddings": [[50.0, 0.0, 1.0]], "metadatas": [{"i": 99}]}),
            ("update", {"ids": ["a1"], "metadatas": [{"i": -1}]}),
            ("upsert", {"ids": ["a2"], "embeddings": [[60.0, 0.0, 1.0]], "metadatas": [{"i": 7}]}),
            ("delete", {"ids": ["new"]}),
        ]
        reads = (("count", None), ("query", query), ("get", {"where": {"i": {"$lt": 0}}}),
                 ("get", {"include": ["metadatas", "embeddings", "documents"]}))  # fmt: skip
        for op, body in writes:
            assert client.post(f"{p}{c}/{op}", json=body).status_code in (200, 201)
            for read, read_body in reads:
                got, _ = both(read, read_body)
                assert got.headers["X-Proxy-Source"] in LOCAL, (op, read)
        # Written through another spelling of the id (the primary takes them all): the same
        # collection to the proxy, so the next read still sees the write.
        other = f"{D}/collections/{cid.replace('-', '').upper()}"
        again = {"ids": ["other"], "embeddings": [[70.0, 0.0, 1.0]], "metadatas": [{"i": 8}]}
        assert client.post(f"{p}{other}/add", json=again).status_code == 201
        for read, read_body in reads:
            both(read, read_body)
        limited = {"where": {"i": {"$gte": 10}}, "limit": 1}
        assert client.post(f"{p}{c}/delete", json=limited).status_code == 200
        for read, read_body in reads:
            got, _ = both(read, read_body)
            assert got.headers["X-Proxy-Source"] == "primary", read
        wait_until(lambda: _served_locally(client, p, cid), 60, "replica after the delete")
        for read, read_body in reads:
            both(read, read_body)
        # Deleting the collection: its replica stops answering at once.
        assert client.delete(f"{p}{D}/collections/{name}").status_code == 200
        gone = client.post(f"{p}{c}/get", json={})
        assert gone.status_code == 404 and gone.headers["X-Proxy-Source"] == "primary"


def test_consistency_header(
    replica_proxy: ProxyProcess, collections: dict[str, tuple[str, Any]]
) -> None:
    cid, _ = collections["l2"]
    url = f"{replica_proxy.url}{D}/collections/{cid}/count"
    with httpx.Client(timeout=60) as client:
        for level, sources in (("strong", ("primary",)), ("eventual", LOCAL),
                               ("bounded", LOCAL), ("SESSION", LOCAL)):  # fmt: skip
            resp = client.get(url, headers={"X-Proxy-Consistency": level})
            assert resp.status_code == 200 and resp.headers["X-Proxy-Source"] in sources, level
        resp = client.get(url, headers={"X-Proxy-Consistency": "linearizable"})
        assert resp.status_code == 400
        assert resp.json()["error"] == "InvalidArgumentError"


def test_replica_serves_when_primary_is_down(tmp_path: Path) -> None:
    """Reads keep answering from the replica, flagged stale; writes get a clean 502."""
    own = ChromaServer(tmp_path / "chroma").start()
    proxy = ProxyProcess("--primary", own.url, "--heartbeat-interval-s", "0.2",
                         "--data-dir", str(tmp_path / "proxy"), log_dir=tmp_path)  # fmt: skip
    try:
        with httpx.Client(timeout=30) as client:
            cid, vectors = load(client, own.url, "down-test", "l2")
            c = f"{D}/collections/{cid}"
            wait_until(lambda: _served_locally(client, proxy.url, cid), 60, "replica")
            body = _query_body(vectors, {"cat": "c2"}, None)
            before = client.post(f"{proxy.url}{c}/query", json=body).json()
            own.stop()
            # Degraded, not unready: the replica still serves reads.
            wait_until(lambda: client.get(proxy.url + "/readyz").json()["status"] == "degraded",
                       30, "degraded")  # fmt: skip
            resp = client.post(f"{proxy.url}{c}/query", json=body)
            assert resp.status_code == 200
            assert resp.headers["X-Proxy-Source"] in LOCAL
            assert resp.headers["X-Proxy-Stale"] == "true"
            assert resp.json() == before
            write = client.post(
                f"{proxy.url}{c}/add", json={"ids": ["x"], "embeddings": [[0.0] * DIM]}
            )
            assert write.status_code == 502
            assert write.json()["error"] == "ChromaError"
            # Strong reads need the primary, so they fail cleanly instead.
            strong = client.post(f"{proxy.url}{c}/query", json=body,
                                 headers={"X-Proxy-Consistency": "strong"})  # fmt: skip
            assert strong.status_code == 502
    finally:
        own.stop()
        assert proxy.stop() == 0


def test_corrupted_snapshot_is_refused(tmp_path: Path) -> None:
    own = ChromaServer(tmp_path / "chroma").start()
    data = tmp_path / "proxy"
    args = ("--primary", own.url, "--data-dir", str(data))
    try:
        with httpx.Client(timeout=30) as client:
            cid, vectors = load(client, own.url, "corrupt-test", "cosine")
            proxy = ProxyProcess(*args, log_dir=tmp_path)
            wait_until(lambda: _served_locally(client, proxy.url, cid), 60, "replica")
            assert proxy.stop() == 0
            (snapshot,) = (data / "snapshots" / cid).iterdir()
            raw = bytearray((snapshot / "vectors.npy").read_bytes())
            raw[-10] ^= 0xFF  # one flipped bit in a vector
            (snapshot / "vectors.npy").write_bytes(bytes(raw))
            proxy = ProxyProcess(*args, log_dir=tmp_path)
            try:
                body = _query_body(vectors, None, None)
                path = f"{D}/collections/{cid}/query"
                want = client.post(own.url + path, json=body).json()
                # Until the rebuild the proxy forwards; afterwards the new replica answers.
                assert_same_query(client.post(proxy.url + path, json=body).json(), want)
                wait_until(lambda: _served_locally(client, proxy.url, cid), 60, "rebuilt")
                assert_same_query(client.post(proxy.url + path, json=body).json(), want)
                assert "refusing snapshot" in proxy.logs() and "sha256 mismatch" in proxy.logs()
            finally:
                assert proxy.stop() == 0
    finally:
        own.stop()


def test_a_refused_reset_or_delete_keeps_the_replicas(
    chroma: ChromaServer, replica_proxy: ProxyProcess, name: str
) -> None:
    """The primary runs without allow_reset: its refusal passes through, and the replicas
    stay (they used to be dropped before the reset was sent, whatever the answer). A delete
    the primary takes still drops its replica at once."""
    p = replica_proxy.url
    with httpx.Client(timeout=60) as client:
        cid = client.post(f"{p}{D}/collections", json={"name": name}).json()["id"]
        rows = {"ids": ["a", "b"], "embeddings": [[1.0, 0.0], [0.0, 1.0]]}
        assert client.post(f"{p}{D}/collections/{cid}/add", json=rows).status_code == 201
        wait_until(lambda: _served_locally(client, p, cid), 60, "a replica")
        refused = client.post(f"{p}/api/v2/reset")
        direct = client.post(f"{chroma.url}/api/v2/reset")
        assert (refused.status_code, refused.content) == (direct.status_code, direct.content)
        assert refused.status_code >= 400
        missing = client.delete(f"{p}/api/v2/tenants/default_tenant/databases/nothing-{name}")
        assert missing.status_code >= 400
        assert _served_locally(client, p, cid)
        assert client.delete(f"{p}{D}/collections/{name}").status_code == 200
        gone = client.get(f"{p}{D}/collections/{cid}/count")
        assert gone.status_code == 404 and gone.headers["X-Proxy-Source"] == "primary"
