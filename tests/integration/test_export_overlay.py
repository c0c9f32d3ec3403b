"""Export mode with the proxy's own writes applied to its replicas (proxy/replica/overlay.py),
against a real primary: every read after a write through the proxy is answered by the replica and
equals the primary's answer; where the order of writes is unknowable the proxy falls back
to forwarding, and still answers right.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import ChromaServer, ProxyProcess, wait_until
from tests.integration.test_storage_mode import (
    LOCAL,
    D,
    _a_graph_missed,
    _local,
    _reads,
    _same,
    _write_body,
    structured,
)


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    server = ChromaServer(tmp_path_factory.mktemp("overlay-primary") / "data").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(
    primary: ChromaServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """Export mode (no persist path), replicas on first read, a small overlay bound so that
    compaction (a rebuild adopted under writes) happens in the tests."""
    log_dir = tmp_path_factory.mktemp("overlay-proxy")
    proc = ProxyProcess(
        "--primary", primary.url, "--replicate", "", "--rebuild-debounce-s", "0.2",
        "--export-overlay-max-rows", "40", "--data-dir", str(log_dir / "data"),
        log_dir=log_dir, env={"REPLICA_PROXY_ADMIN_TOKEN": ADMIN},
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.logs()


def _collection(client: httpx.Client, proxy: ProxyProcess, rows: int = 30, dim: int = 8,
                name: str | None = None) -> str:  # fmt: skip
    """An l2 collection (its embeddings are answered locally too) with ``rows`` rows of
    structured data, served by a replica."""
    name = name or "ov-" + uuid.uuid4().hex[:8]
    body = {"name": name, "configuration": {"hnsw": {"space": "l2"}}}
    cid: str = client.post(f"{proxy.url}{D}/collections", json=body).json()["id"]
    vectors, _ = structured(rows, 1)
    add = {"ids": [f"b{i}" for i in range(rows)], "embeddings": vectors[:, :dim].tolist(),
           "metadatas": [{"k": i % 3} for i in range(rows)]}  # fmt: skip
    assert client.post(f"{proxy.url}{D}/collections/{cid}/add", json=add).status_code == 201
    wait_until(partial(_local, client, proxy.url, cid), 60, "replica")
    return cid


def _check_reads(client: httpx.Client, proxy: ProxyProcess, cid: str, seed: int,
                 local: bool = True) -> int:  # fmt: skip
    """Every read of _reads through the proxy equals the primary's. Returns how many
    queries differed only because one of the two graphs missed a true neighbour: a replica
    built from an export is another graph and cannot reproduce an approximate index's
    misses (issue 11; storage mode serves the primary's own graph). In the runs so far it
    was always the primary's graph that missed."""
    # A query of an empty collection is an edge case the replica leaves to the primary
    # (proxy/replica/local.py _check_vectors).
    empty = client.get(f"{proxy.primary_url}{D}/collections/{cid}/count").json() == 0
    misses = 0
    for method, path, body in _reads(cid, seed):
        via = client.request(method, proxy.url + path, json=body)
        want = client.request(method, proxy.primary_url + path, json=body)
        assert via.status_code == want.status_code, (path, via.text)
        if local and not (empty and path.endswith("/query")):
            assert via.headers["X-Proxy-Source"] in LOCAL, (path, body, via.text)
        if path.endswith("/query") and via.json()["ids"] != want.json()["ids"]:
            _a_graph_missed(client, proxy, cid, body, via.json(), want.json())
            misses += 1
            continue
        _same(via.json(), want.json())
    return misses


def _status(client: httpx.Client, proxy: ProxyProcess) -> dict[str, Any]:
    resp = client.get(f"{proxy.url}/admin/status", headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 200, resp.text
    found: dict[str, Any] = resp.json()
    return found


ADMIN = "overlay-test-admin-token"
WRITE = st.sampled_from(["add", "upsert", "update", "delete", "delete_where", "recreate"])


@st.composite
def write_steps(draw: st.DrawFn) -> list[tuple[str, list[str], int]]:
    steps = []
    for _ in range(draw(st.integers(3, 10))):
        ids = draw(st.lists(st.sampled_from([f"x{i}" for i in range(8)] + ["b1", "b2"]),
                            min_size=1, max_size=4, unique=True))  # fmt: skip
        steps.append((draw(WRITE), ids, draw(st.integers(0, 1 << 20))))
    return steps


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=write_steps())
def test_random_writes_through_the_proxy_are_read_back_locally(
    proxy: ProxyProcess, steps: list[tuple[str, list[str], int]]
) -> None:
    """Add, upsert, update (with and without embeddings), delete by ids and by filter, the
    collection deleted and made again: after each, session reads (get, count, query,
    filtered and not) are local and equal the primary's: ids and order exactly, distances
    within 1e-5."""
    name = "ov-" + uuid.uuid4().hex[:8]
    with httpx.Client(timeout=60) as client:
        cid = _collection(client, proxy, name=name)
        for op, ids, seed in steps:
            if op == "recreate":  # its replica goes at once; the new one is built on a read
                assert client.delete(f"{proxy.url}{D}/collections/{name}").status_code == 200
                gone = client.get(f"{proxy.url}{D}/collections/{cid}/count")
                assert gone.status_code == 404 and gone.headers["X-Proxy-Source"] == "primary"
                cid = _collection(client, proxy, name=name)
                continue
            path = "delete" if op.startswith("delete") else op
            body = _write_body(op, ids, seed)
            resp = client.post(f"{proxy.url}{D}/collections/{cid}/{path}", json=body)
            assert resp.status_code in (200, 201), resp.text
            _check_reads(client, proxy, cid, seed)


def test_concurrent_writes_to_other_rows_stay_local(proxy: ProxyProcess) -> None:
    """Writes in flight together commute when their ids differ and none adds a row (rows
    keep their places): the replica keeps applying."""
    with httpx.Client(timeout=60) as client:
        cid = _collection(client, proxy)
        # One add first, alone, so the follow (and its copy of the replica) is under way.
        first = _write_body("add", ["first"], 7)
        assert client.post(f"{proxy.url}{D}/collections/{cid}/add", json=first).status_code == 201

        def write(worker: int) -> None:
            with httpx.Client(timeout=60) as own:
                for i in range(6):
                    op = ("update", "upsert", "delete")[i % 3]
                    ids = [f"b{worker * 6 + i}"]  # existing rows, a different one each time
                    body = _write_body(op, ids, worker * 100 + i)
                    resp = own.post(f"{proxy.url}{D}/collections/{cid}/{op}", json=body)
                    assert resp.status_code == 200, resp.text

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(write, range(4)))
        _check_reads(client, proxy, cid, 1)
        assert cid in _status(client, proxy)["write_overlay"]["collections"]


def test_concurrent_writes_adding_rows_fall_back(proxy: ProxyProcess) -> None:
    """New rows go at the end in the order the primary took them, which concurrent writes
    leave unknown (get's order showed it: a clean-clone CI run saw the replica's order
    differ): the follow ends, reads are right wherever answered, and a rebuild serves again."""
    with httpx.Client(timeout=60) as client:
        cid = _collection(client, proxy)

        def write(worker: int) -> None:
            with httpx.Client(timeout=60) as own:
                for i in range(6):
                    body = _write_body("upsert", [f"w{worker}-{i}"], worker * 100 + i)
                    resp = own.post(f"{proxy.url}{D}/collections/{cid}/upsert", json=body)
                    assert resp.status_code == 200, resp.text

        ended = _status(client, proxy)["write_overlay"]["ended"].get("concurrent_write", 0)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(write, range(4)))
        # (Four writers of six writes each have overlapped in every run so far.)
        assert _status(client, proxy)["write_overlay"]["ended"]["concurrent_write"] > ended
        _check_reads(client, proxy, cid, 2, local=False)  # right, wherever answered
        wait_until(partial(_local, client, proxy.url, cid), 60, "rebuilt replica")
        _check_reads(client, proxy, cid, 3)


def test_concurrent_writes_to_the_same_rows_fall_back(proxy: ProxyProcess) -> None:
    """Two writes of one id in flight together: the primary's order is unknowable, so the
    replica stops applying, reads are forwarded (and right) until a rebuild covers them, and
    the replica then answers again."""
    with httpx.Client(timeout=60) as client:
        cid = _collection(client, proxy)

        def write(worker: int) -> None:
            with httpx.Client(timeout=60) as own:
                for i in range(8):
                    body = _write_body("upsert", ["same", f"v{worker}"], worker * 100 + i)
                    resp = own.post(f"{proxy.url}{D}/collections/{cid}/upsert", json=body)
                    assert resp.status_code == 200, resp.text

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(write, range(4)))
        _check_reads(client, proxy, cid, 2, local=False)  # right, wherever answered
        wait_until(partial(_local, client, proxy.url, cid), 60, "rebuilt replica")
        _check_reads(client, proxy, cid, 3)


def test_a_failed_write_falls_back(proxy: ProxyProcess) -> None:
    """A write the primary refuses (wrong dimension) is not applied, and the replica does not
    claim to cover it: reads are forwarded until a rebuild."""
    with httpx.Client(timeout=60) as client:
        cid = _collection(client, proxy)
        bad = {"ids": ["z"], "embeddings": [[1.0, 2.0]]}
        resp = client.post(f"{proxy.url}{D}/collections/{cid}/add", json=bad)
        assert resp.status_code == 400, resp.text
        via = client.get(f"{proxy.url}{D}/collections/{cid}/count")
        assert via.json() == 30 and via.headers["X-Proxy-Source"] == "primary"
        assert cid not in _status(client, proxy)["write_overlay"]["collections"]
        wait_until(partial(_local, client, proxy.url, cid), 60, "rebuilt replica")


def test_past_its_bound_the_overlay_is_rebuilt_and_keeps_later_writes(
    proxy: ProxyProcess,
) -> None:
    """Past export_overlay_max_rows (40 here) the replica is rebuilt from an export while
    writes go on; the rebuild is adopted with the rows written since its export began taken
    from the replica, so no write is lost or doubled and reads stay local throughout."""
    with httpx.Client(timeout=60) as client:
        cid = _collection(client, proxy, rows=200)
        first = _status(client, proxy)["write_overlay"]["collections"]
        rng = np.random.default_rng(5)
        misses = 0
        for step in range(120):
            ids = [f"b{int(i)}" for i in rng.choice(260, size=3, replace=False)]
            op = ["upsert", "update", "delete"][step % 3]
            resp = client.post(f"{proxy.url}{D}/collections/{cid}/{op}",
                               json=_write_body(op, ids, step))  # fmt: skip
            assert resp.status_code == 200, resp.text
            if step % 20 == 19:
                misses += _check_reads(client, proxy, cid, step)
        misses += _check_reads(client, proxy, cid, 999)
        print(f"queries where one graph missed a neighbour: {misses} of 14")
        assert cid not in first
        follow = _status(client, proxy)["write_overlay"]["collections"][cid]
        assert "rebuild adopted" in proxy.logs()
        # Fewer writes than were made remain in the journal: an adopted rebuild trimmed it.
        assert follow["writes_since_rebuild"] < 120, follow
