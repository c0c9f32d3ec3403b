"""A rolling restart of replica processes behind a real haproxy loses no request.

One builder publishes a snapshot of a clustered collection to a shared store; three
``--role replica`` processes serve it behind haproxy (round robin, health check ``GET /readyz``).
While client threads send queries through haproxy on keep-alive connections, each replica in
turn gets SIGTERM (readiness off -> haproxy takes it out -> drain -> exit 0) and a new process
takes its port. Every response must be 200 with the answer the primary gave before the restart.

haproxy does not retry (tests/haproxy.py says why): any request lost in a drain is a failure.
Skipped only when haproxy is not installed (``make haproxy`` installs Debian's package).
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from index.snapshot import generations
from tests.haproxy import SERVER_HEADER, HAProxy, haproxy_executable
from tests.helpers import ChromaServer, ProxyProcess, http_status, wait_until

pytestmark = pytest.mark.skipif(
    haproxy_executable() is None,
    reason="haproxy not found: `make haproxy` installs Debian's package (needs apt-get and root)",
)

ROWS, DIM, CLUSTERS = 3000, 32, 24
REPLICAS = 3
CLIENTS = 3
QUERIES = 12
LOCAL = ("replica", "cache")
ADMIN_TOKEN = "rolling-restart-admin-token"


@dataclass(slots=True)
class Outcome:
    at: float  # time.monotonic() when the response (or error) came back
    server: str  # haproxy's server name, "" when unknown
    source: str  # X-Proxy-Source
    generation: str  # X-Proxy-Replica-Generation, "" when not a replica's answer
    error: str | None  # None: 200 with the expected answer


@dataclass
class Load:
    """Client threads querying through haproxy until stopped, each on its own keep-alive
    connection, cycling through fixed queries whose expected answers are known."""

    url: str
    bodies: list[bytes]
    expected: list[dict[str, Any]]
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, clients: int) -> None:
        for n in range(clients):
            thread = threading.Thread(target=self._run, args=(n,), name=f"load-{n}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads), "a load thread hung"

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def snapshot(self) -> list[Outcome]:
        with self.lock:
            return list(self.outcomes)

    def served(self, server: str, since: float) -> int:
        """Responses from ``server`` that came back after ``since`` (time.monotonic())."""
        with self.lock:
            return sum(1 for o in self.outcomes if o.at > since and o.server == server)

    def _run(self, n: int) -> None:
        headers = {"Content-Type": "application/json"}
        deadline = time.monotonic() + 120  # bounded even if the test body never stops us
        with httpx.Client(timeout=10) as client:
            i = n
            while not self.stop.is_set() and time.monotonic() < deadline:
                k = i % len(self.bodies)
                i += 1
                try:
                    resp = client.post(self.url, content=self.bodies[k], headers=headers)
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    self._record(Outcome(time.monotonic(), "", "", "", error))
                    continue
                self._record(
                    Outcome(
                        time.monotonic(),
                        resp.headers.get(SERVER_HEADER, ""),
                        resp.headers.get("X-Proxy-Source", ""),
                        resp.headers.get("X-Proxy-Replica-Generation", ""),
                        _check(resp, self.expected[k]),
                    )
                )

    def _record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def _check(resp: httpx.Response, want: dict[str, Any]) -> str | None:
    """None when the answer is the primary's, else what is wrong with it."""
    if resp.status_code != 200:
        return f"status {resp.status_code}: {resp.text[:300]}"
    try:
        got = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return f"not JSON: {resp.content[:300]!r}"
    if got.get("ids") != want["ids"]:
        return f"ids {got.get('ids')} != {want['ids']}"
    if not np.allclose(got["distances"], want["distances"], rtol=1e-5, atol=1e-5):
        return f"distances {got['distances']} != {want['distances']}"
    return None


def _load_collection(client: httpx.Client, base: str, db: str) -> tuple[str, np.ndarray[Any, Any]]:
    """A new database holding one clustered collection (the builder replicates only it)."""
    tenant = f"{base}/api/v2/tenants/default_tenant"
    assert client.post(f"{tenant}/databases", json={"name": db}).status_code == 200
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(CLUSTERS, DIM)) * 3
    vectors = (centres[np.arange(ROWS) % CLUSTERS] + rng.normal(size=(ROWS, DIM)) * 0.35).astype(
        np.float32
    )
    # ef 200 on both sides: the primary's and the replica's graphs then agree (near) exactly,
    # so an answer that differs is a real failure (see test_replica_parity).
    hnsw = {"space": "l2", "ef_construction": 200, "ef_search": 200}
    body = {"name": "rolling", "configuration": {"hnsw": hnsw}}
    resp = client.post(f"{tenant}/databases/{db}/collections", json=body)
    assert resp.status_code == 200, resp.text
    cid: str = resp.json()["id"]
    for start in range(0, ROWS, 1000):
        rows = range(start, min(start + 1000, ROWS))
        add = {
            "ids": [f"r{i}" for i in rows],
            "embeddings": vectors[rows.start : rows.stop].tolist(),
            "metadatas": [{"cluster": i % CLUSTERS} for i in rows],
        }
        resp = client.post(f"{tenant}/databases/{db}/collections/{cid}/add", json=add)
        assert resp.status_code == 201, resp.text
    return cid, vectors


def _ready(proc: ProxyProcess) -> bool:
    return http_status(proc.url + "/readyz") == 200


def _serving(proc: ProxyProcess) -> dict[str, int]:
    """Collection id -> generation, as the process' /admin/status lists its replicas."""
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    resp = httpx.get(proc.url + "/admin/status", headers=auth, timeout=10)
    assert resp.status_code == 200, resp.text
    return {r["collection_id"]: r["generation"] for r in resp.json()["replicas"]}


def test_rolling_restart_under_load(chroma: ChromaServer, tmp_path: Path) -> None:
    db = "rolling_" + uuid.uuid4().hex[:8]
    store = tmp_path / "store"
    logs = tmp_path / "logs"
    logs.mkdir()
    with httpx.Client(timeout=60) as client:
        cid, vectors = _load_collection(client, chroma.url, db)
        path = f"/api/v2/tenants/default_tenant/databases/{db}/collections/{cid}/query"
        picks = np.linspace(0, ROWS - 1, QUERIES).astype(int)
        bodies = [
            orjson.dumps(
                {
                    "query_embeddings": [(vectors[i] + 0.01).tolist()],
                    "n_results": 10,
                    "include": ["distances"],
                }
            )
            for i in picks
        ]
        expected = []
        for body in bodies:
            resp = client.post(chroma.url + path, content=body)
            assert resp.status_code == 200, resp.text
            expected.append(resp.json())

    def replica(n: int, *extra: str) -> ProxyProcess:
        # shutdown_delay_s 1: five health-check intervals for haproxy to take the process out
        # before it stops accepting. Result cache off: every request is a search in a worker
        # thread, the slowest thing a drain waits for.
        return ProxyProcess(
            "--role", "replica", "--primary", chroma.url, "--snapshot-dir", str(store),
            "--data-dir", str(tmp_path / f"replica-{n}"), "--shutdown-delay-s", "1",
            "--drain-timeout-s", "10", "--cache-max-bytes", "0", "--admin-token", ADMIN_TOKEN,
            *extra, log_dir=logs,
        )  # fmt: skip

    started: list[ProxyProcess] = []
    lb: HAProxy | None = None
    load: Load | None = None
    try:
        # 1. The builder publishes the collection's first generation to the store.
        builder = ProxyProcess(
            "--role", "builder", "--primary", chroma.url, "--snapshot-dir", str(store),
            "--replicate", f"default_tenant/{db}", "--refresh-interval-s", "300",
            "--data-dir", str(tmp_path / "builder"), log_dir=logs,
        )  # fmt: skip
        started.append(builder)
        wait_until(lambda: bool(generations(store, cid)), 60, "the builder's first snapshot")
        (published,) = generations(store, cid)

        # 2. Three replicas of the store, each ready and answering as the primary does.
        replicas = []
        for n in range(REPLICAS):
            replicas.append(replica(n))
            started.append(replicas[-1])
        with httpx.Client(timeout=30) as client:
            for proc in replicas:
                wait_until(partial(_ready, proc), 30, f"{proc.url}/readyz")
                assert _serving(proc) == {cid: int(published.name)}
                for body, want in zip(bodies, expected, strict=True):
                    resp = client.post(proc.url + path, content=body)
                    assert resp.headers.get("X-Proxy-Source") in LOCAL, resp.headers
                    assert _check(resp, want) is None, _check(resp, want)

        # 3. haproxy in front of them.
        names = [f"r{n}" for n in range(REPLICAS)]
        lb = HAProxy(dict(zip(names, (p.port for p in replicas), strict=True)), tmp_path).start()
        for name in names:
            lb.wait_state(name, "UP")

        # 4. Load through haproxy, and a rolling restart meanwhile.
        load = running = Load(lb.url + path, bodies, expected)
        running.start(CLIENTS)
        wait_until(lambda: running.count() >= 100, 30, "load to get going")
        exits: list[int] = []
        windows: list[tuple[float, float]] = []  # (SIGTERM sent, new process up in haproxy)
        for n, name in enumerate(names):
            old = replicas[n]
            sent = time.monotonic()
            old.signal(signal.SIGTERM)
            lb.wait_state(name, "DOWN")
            exits.append(old.wait(30))
            new = replica(n, "--listen", f"127.0.0.1:{old.port}")  # the old listener is closed
            started.append(new)
            replicas[n] = new
            wait_until(partial(_ready, new), 30, f"{new.url}/readyz")
            assert _serving(new) == {cid: int(published.name)}
            lb.wait_state(name, "UP")
            windows.append((sent, time.monotonic()))
        # The new processes take traffic too.
        restarted = windows[-1][1]
        wait_until(
            lambda: all(running.served(name, since=restarted) >= 10 for name in names),
            30,
            "every new replica process to serve through haproxy",
        )
        running.finish()

        # 5. Nothing was lost, and the replicas answered.
        outcomes = running.snapshot()
        failures = [o for o in outcomes if o.error is not None]
        assert not failures, (
            f"{len(failures)} of {len(outcomes)} requests failed, e.g. {failures[:5]}\n"
            f"haproxy log tail:\n{lb.logs()[-4000:]}"
        )
        assert exits == [0] * REPLICAS, [p.logs()[-2000:] for p in started]
        during = [sum(1 for o in outcomes if a <= o.at <= b) for a, b in windows]
        assert sum(during) > 50 and min(during) > 10, during
        sources = Counter(o.source for o in outcomes)
        assert sum(sources[s] for s in LOCAL) >= 0.95 * len(outcomes), sources
        assert {o.generation for o in outcomes if o.source in LOCAL} == {published.name}
        assert {o.server for o in outcomes} == set(names)

        # The new processes shut down cleanly too (all at once: the load has stopped).
        for proc in replicas:
            proc.signal(signal.SIGTERM)
        assert [proc.wait(30) for proc in replicas] == [0] * REPLICAS
        assert builder.stop() == 0, builder.logs()[-2000:]
    finally:
        if load is not None:
            load.stop.set()
        if lb is not None:
            lb.stop()
        for proc in started:
            proc.stop()
