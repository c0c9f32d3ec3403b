"""`workers = 2`: two processes on one port, against a real primary.

Connections are pinned to a worker (one keep-alive connection stays with the process that
accepted it; the X-Proxy-Worker header says which), so a write can be sent through one worker
and read back through the other.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers import ChromaServer, ProxyProcess, pids_running, wait_until

D = "/api/v2/tenants/default_tenant/databases/default_database"
ROWS, DIM = 600, 8
TOKEN = "workers-admin-token-0123"


@pytest.fixture
def collection(chroma: ChromaServer, name: str) -> str:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, DIM)) * 4
    vectors = centres[np.arange(ROWS) % 6] + rng.normal(size=(ROWS, DIM)) * 0.3
    with httpx.Client(base_url=chroma.url, timeout=60) as client:
        cid: str = client.post(f"{D}/collections", json={"name": name}).json()["id"]
        add = {"ids": [f"r{i}" for i in range(ROWS)], "embeddings": vectors.tolist()}
        assert client.post(f"{D}/collections/{cid}/add", json=add).status_code == 201
    return cid


@pytest.fixture
def proxy(chroma: ChromaServer, collection: str, log_dir: Path) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(
        "--primary", chroma.url, "--workers", "2", "--data-dir", str(log_dir / "data"),
        "--store-poll-interval-s", "0.2", "--rebuild-debounce-s", "0.2", "--replicate", "",
        "--admin-token", TOKEN, log_dir=log_dir,
    )  # fmt: skip
    try:
        wait_until(lambda: _workers_ready(proc.url) == 2, 60, "both workers ready")
        yield proc
    finally:
        proc.stop()


def _workers_ready(url: str) -> int:
    body = httpx.get(f"{url}/readyz").json()
    return int(body.get("workers", {}).get("ready", 0))


def _pinned(url: str, worker: str) -> httpx.Client:
    """A client whose one connection landed on ``worker``."""
    for _ in range(200):
        client = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=1))
        if client.get("/healthz").headers["X-Proxy-Worker"] == worker:
            return client
        client.close()
    raise AssertionError(f"no connection reached worker {worker} in 200 tries")


def _get(client: httpx.Client, cid: str, ids: list[str]) -> tuple[list[str], httpx.Response]:
    resp = client.post(f"{D}/collections/{cid}/get", json={"ids": ids, "include": []})
    assert resp.status_code == 200, resp.text
    found: list[str] = resp.json()["ids"]
    return found, resp


def test_writes_through_one_worker_are_read_back_through_the_other(
    proxy: ProxyProcess, collection: str
) -> None:
    cid = collection
    w0, w1 = _pinned(proxy.url, "0"), _pinned(proxy.url, "1")
    with closing(w0), closing(w1):
        # Nothing is replicated at start-up. A read on the second worker, which cannot
        # export, asks the first for a replica (through the store); then both serve it.
        for client in (w1, w0):

            def local(client: httpx.Client = client) -> bool:
                found, resp = _get(client, cid, ["r1", "r2"])
                assert sorted(found) == ["r1", "r2"]
                return resp.headers["X-Proxy-Source"] != "primary"

            wait_until(local, 60, "the replica built on demand, served")
        for step, (writer, reader) in enumerate([(w1, w0), (w0, w1), (w1, w0)]):
            new = f"new-{step}"
            add = {"ids": [new], "embeddings": [[float(step)] * DIM]}
            assert writer.post(f"{D}/collections/{cid}/add", json=add).status_code == 201
            # Read-your-writes on the other worker, at once: it must not answer from a
            # replica (or a cached answer) that predates the write.
            found, _ = _get(reader, cid, [new, "r1"])
            assert sorted(found) == [new, "r1"]
        # Worker 0 rebuilt after writes the other worker forwarded, and worker 1 loaded the
        # new generation: both answer the newest record from a replica again.
        for client in (w0, w1):

            def local_and_complete(client: httpx.Client = client) -> bool:
                found, resp = _get(client, cid, ["new-2"])
                return found == ["new-2"] and resp.headers["X-Proxy-Source"] != "primary"

            wait_until(local_and_complete, 60, "the new records served from a replica")
        deleted = w0.post(f"{D}/collections/{cid}/delete", json={"ids": ["new-0"]})
        assert deleted.status_code == 200
        assert _get(w1, cid, ["new-0", "r1"])[0] == ["r1"]


def test_metrics_on_any_worker_cover_all_workers(proxy: ProxyProcess, collection: str) -> None:
    w0, w1 = _pinned(proxy.url, "0"), _pinned(proxy.url, "1")
    with closing(w0), closing(w1):
        status = w1.get("/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert status["workers"] == {"this": 1, "states": ["ready", "ready"]}
        assert status["role"] == "replica"  # it follows the first worker's store
        for _ in range(3):
            w1.get(f"{D}/collections/{collection}/count")

        def counted_by_worker_1() -> bool:
            text = w0.get("/metrics").text
            return any(
                line.startswith("replica_proxy_requests_total{")
                and 'op="count"' in line
                and 'worker="1"' in line
                and line.endswith(" 3.0")
                for line in text.splitlines()
            )

        wait_until(counted_by_worker_1, 10, "worker 1's requests in worker 0's /metrics")
        text = w0.get("/metrics").text
        assert 'replica_proxy_requests_total{op="healthz"' in text
        assert text.count("# TYPE replica_proxy_requests_total counter") == 1


def test_a_worker_that_dies_is_started_again(proxy: ProxyProcess, collection: str) -> None:
    [pid] = _worker_pids(proxy)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _worker_pids(proxy) not in ([], [pid]), 30, "a new worker 1")
    wait_until(lambda: _workers_ready(proxy.url) == 2, 60, "both workers ready again")
    with closing(_pinned(proxy.url, "1")) as w1:
        assert _get(w1, collection, ["r7"])[0] == ["r7"]
    assert "worker 1 exited (-9); starting it again" in proxy.logs()


def test_workers_stop_with_the_first_process(proxy: ProxyProcess) -> None:
    """On SIGTERM they drain and exit with it; killed outright, it takes them along."""
    [pid] = _worker_pids(proxy)
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(60) == 0
    assert not _alive(pid)
    assert "stopped" in proxy.logs()


def test_workers_die_with_a_killed_first_process(proxy: ProxyProcess) -> None:
    [pid] = _worker_pids(proxy)
    run_dir = Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2].decode())
    assert run_dir.is_dir()
    proxy.signal(signal.SIGKILL)
    proxy.wait(30)
    wait_until(lambda: not _alive(pid), 30, "the orphaned worker to exit")
    assert not run_dir.exists()  # nothing left behind in /dev/shm
    assert "worker 0 (pid" in proxy.logs() and "is gone; shutting down" in proxy.logs()


def _worker_pids(proxy: ProxyProcess) -> list[int]:
    return [p for p in pids_running("-m proxy _worker 1 ") if _parent(p) == proxy.pid]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


__all__: list[Any] = []
