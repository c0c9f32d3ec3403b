"""Hot swaps, the builder/replica roles, refused snapshots and the admin API, on real processes.

A real primary holds one clustered collection. A standalone proxy is rebuilt ten times under a
continuous query loop; a builder publishes to a store that a replica process follows; broken
snapshots dropped into that store are refused while the old generation keeps serving.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from index.snapshot import generations
from tests.helpers import ChromaServer, ProxyProcess, wait_until

D = "/api/v2/tenants/default_tenant/databases/default_database"
TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROWS, DIM = 1500, 16


@pytest.fixture(scope="module")
def collection(chroma: ChromaServer) -> Iterator[tuple[str, str, np.ndarray[Any, Any]]]:
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(15, DIM)) * 4
    vectors = (centres[np.arange(ROWS) % 15] + rng.normal(size=(ROWS, DIM)) * 0.3).astype(
        np.float32
    )
    name = f"roles-{rng.integers(1 << 30)}"
    with httpx.Client(base_url=chroma.url, timeout=60) as client:
        body = {"name": name, "configuration": {"hnsw": {"ef_construction": 200, "ef_search": 200}}}
        cid = client.post(f"{D}/collections", json=body).json()["id"]
        for start in range(0, ROWS, 500):
            add = {
                "ids": [f"r{i}" for i in range(start, start + 500)],
                "embeddings": vectors[start : start + 500].tolist(),
                "documents": [f"doc {i}" for i in range(start, start + 500)],
            }
            assert client.post(f"{D}/collections/{cid}/add", json=add).status_code == 201
    yield cid, name, vectors


def _query(vectors: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {"query_embeddings": vectors[[3, 500, 1201]].tolist(), "n_results": 5,
            "include": ["distances", "documents"]}  # fmt: skip


def _status(client: httpx.Client) -> dict[str, Any]:
    resp = client.get("/admin/status", headers=AUTH)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def _generation(client: httpx.Client, cid: str) -> int | None:
    for replica in _status(client)["replicas"]:
        if replica["collection_id"] == cid:
            return int(replica["generation"])
    return None


def test_ten_hot_swaps_under_load_lose_nothing(
    chroma: ChromaServer, collection: tuple[str, str, Any], log_dir: Path
) -> None:
    cid, name, vectors = collection
    query = _query(vectors)
    with httpx.Client(base_url=chroma.url, timeout=30) as client:
        expected = client.post(f"{D}/collections/{cid}/query", json=query).json()
    proxy = ProxyProcess(
        "--primary", chroma.url, "--data-dir", str(log_dir / "data"), "--admin-token", TOKEN,
        "--cache-max-bytes", "0", log_dir=log_dir,
    )  # fmt: skip
    stop = threading.Event()
    seen: list[tuple[int, str, str]] = []  # (status, source, generation) per answer
    wrong: list[str] = []

    def reader() -> None:
        with httpx.Client(base_url=proxy.url, timeout=30) as client:
            while not stop.is_set():
                resp = client.post(f"{D}/collections/{cid}/query", json=query)
                seen.append(
                    (
                        resp.status_code,
                        resp.headers.get("X-Proxy-Source", ""),
                        resp.headers.get("X-Proxy-Replica-Generation", ""),
                    )
                )
                if resp.status_code != 200 or resp.json()["ids"] != expected["ids"]:
                    wrong.append(resp.text[:300])

    try:
        with httpx.Client(base_url=proxy.url, timeout=30) as admin:
            wait_until(lambda: _generation(admin, cid) is not None, 60, "first replica")
            threads = [threading.Thread(target=reader) for _ in range(2)]
            for t in threads:
                t.start()
            generations_seen = [_generation(admin, cid)]
            for _ in range(10):
                before = generations_seen[-1]
                resp = admin.post("/admin/rebuild", json={"collection": name}, headers=AUTH)
                assert resp.status_code == 202, resp.text
                wait_until(lambda b=before: _generation(admin, cid) != b, 60, "swap")  # type: ignore[misc]
                generations_seen.append(_generation(admin, cid))
            stop.set()
            for t in threads:
                t.join(30)
            # Every replaced replica is freed once no request holds it: none leaks.
            wait_until(lambda: _status(admin)["retired"] == 0, 30, "old replicas freed")
            status = _status(admin)
    finally:
        stop.set()
        assert proxy.stop() == 0, proxy.logs()
    assert len(set(generations_seen)) == 11
    assert not wrong, wrong[:3]
    assert all(s == 200 for s, _, _ in seen)
    replica_answers = [g for _, src, g in seen if src == "replica"]
    assert len(set(replica_answers)) >= 5, "the load did not span the swaps"
    assert status["swaps"] >= 11


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def test_builder_publishes_and_replica_follows_refusing_broken_snapshots(
    chroma: ChromaServer, collection: tuple[str, str, Any], store: Path, log_dir: Path
) -> None:
    cid, name, vectors = collection
    common = ("--primary", chroma.url, "--snapshot-dir", str(store), "--admin-token", TOKEN)
    builder = ProxyProcess(
        *common, "--role", "builder", "--data-dir", str(log_dir / "b"), log_dir=log_dir
    )
    try:
        wait_until(lambda: bool(generations(store, cid)), 60, "first snapshot")
        replica = ProxyProcess(
            *common, "--role", "replica", "--store-poll-interval-s", "0.2",
            "--data-dir", str(log_dir / "r"), log_dir=log_dir,
        )  # fmt: skip
        try:
            _replica_checks(builder, replica, cid, name, vectors, store)
        finally:
            assert replica.stop() == 0, replica.logs()
    finally:
        assert builder.stop() == 0, builder.logs()


def _replica_checks(
    builder: ProxyProcess,
    replica: ProxyProcess,
    cid: str,
    name: str,
    vectors: np.ndarray[Any, Any],
    store: Path,
) -> None:
    query = _query(vectors)
    with (
        httpx.Client(base_url=builder.url, timeout=30) as b,
        httpx.Client(base_url=replica.url, timeout=30) as r,
    ):
        # The server listens at once and is ready once the store's replica is loaded.
        assert r.get("/healthz").status_code == 200
        wait_until(lambda: r.get("/readyz").status_code == 200, 30, "replica ready")
        first = _generation(r, cid)
        assert first == int(generations(store, cid)[0].name)
        # The builder serves nothing itself: its reads go to the primary.
        direct = b.post(f"{D}/collections/{cid}/query", json=query)
        assert direct.headers["X-Proxy-Source"] == "primary"
        local = r.post(f"{D}/collections/{cid}/query", json=query)
        assert local.headers["X-Proxy-Source"] == "replica"
        mine, theirs = local.json(), direct.json()
        assert mine["ids"] == theirs["ids"] and mine["documents"] == theirs["documents"]
        # float32 sums in another order: the last digit may differ (as in the parity tests).
        assert np.allclose(mine["distances"], theirs["distances"], rtol=1e-5, atol=1e-5)
        # A replica cannot rebuild: it passes the request (new HNSW parameters included) to
        # the builder through the store.
        hnsw = {"ef_search": 300, "M": 24}
        resp = r.post("/admin/rebuild", json={"collection": name, "hnsw": hnsw}, headers=AUTH)
        assert resp.status_code == 202, resp.text
        assert resp.json()["by"] == "the builder, through the snapshot store"
        wait_until(lambda: (_generation(r, cid) or 0) > (first or 0), 60, "replica follows")
        served = next(x for x in _status(r)["replicas"] if x["collection_id"] == cid)
        assert served["hnsw"]["ef_search"] == 300 and served["hnsw"]["M"] == 24
        good = served["generation"]
        # Broken snapshots with newer generation numbers: each is refused, the good one serves.
        for breakage in (_flip_byte, _truncate):
            newest = generations(store, cid)[0]
            broken = newest.parent / str(int(newest.name) + 1000)
            shutil.copytree(newest, broken)
            breakage(broken)
            wait_until(lambda p=broken: str(p) in _status(r)["sync"]["refused"], 30, "refusal")  # type: ignore[misc]
            assert _generation(r, cid) == good
            after = r.post(f"{D}/collections/{cid}/query", json=query)
            assert after.status_code == 200 and after.json()["ids"] == direct.json()["ids"]
            assert after.headers["X-Proxy-Replica-Generation"] == str(good)
            shutil.rmtree(broken)
        assert "refusing snapshot" in replica.logs()
        # A write through the replica: read back at once (from the primary), and local again
        # once the builder, asked through the store, has published a cut that includes it
        # (its own refresh is two minutes away).
        new = {"ids": ["via-replica"], "embeddings": [[50.0] * DIM], "documents": ["new"]}
        assert r.post(f"{D}/collections/{cid}/add", json=new).status_code == 201

        def read_back() -> httpx.Response:
            resp = r.post(f"{D}/collections/{cid}/get", json={"ids": ["via-replica"]})
            assert resp.json()["ids"] == ["via-replica"]
            return resp

        assert read_back().headers["X-Proxy-Source"] == "primary"
        wait_until(
            lambda: read_back().headers["X-Proxy-Source"] == "replica", 30, "a cut with the write"
        )


def _flip_byte(snapshot: Path) -> None:
    path = snapshot / "index.hnsw"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(snapshot: Path) -> None:
    path = snapshot / "vectors.npy"
    path.write_bytes(path.read_bytes()[:-100])


def test_admin_api_guards(proxy: ProxyProcess, chroma: ChromaServer, log_dir: Path) -> None:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        off = client.get("/admin/status")  # the session proxy has no admin token
        assert off.status_code == 403 and off.json()["error"] == "AuthError"
    admin = ProxyProcess(
        "--primary", chroma.url, "--data-dir", str(log_dir), "--admin-token", TOKEN,
        log_dir=log_dir,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=admin.url, timeout=10) as client:
            wrong = client.get("/admin/status", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and "message" in wrong.json()
            for path in ("/admin/nothing-here", "/admin/a%0Ab"):  # an encoded newline too
                unknown = client.get(path, headers=AUTH)
                assert unknown.status_code == 404  # answered by the proxy, not forwarded
                assert unknown.headers["X-Proxy-Source"] == "proxy"
            for body, status in (
                (b"{not json", 400),
                (b'{"collection": ""}', 400),
                (b'{"collection": "x", "hnsw": {"M": 1}}', 400),
                (b'{"collection": "x", "hnsw": {"space": "ip"}}', 400),
                (b'{"collection": "no-such-collection"}', 404),
            ):
                resp = client.post("/admin/rebuild", content=body, headers=AUTH)
                assert resp.status_code == status, (body, resp.text)
                assert resp.json()["error"] and resp.json()["message"]
            snaps = client.get("/admin/snapshots", headers=AUTH)
            assert snaps.status_code == 200 and "collections" in snaps.json()
    finally:
        assert admin.stop() == 0, admin.logs()
