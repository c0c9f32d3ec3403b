"""Freshness under steady writes: the proxy in storage mode vs the primary, side by side.

    .venv/bin/python -m bench.fresh [--rows 100000] [--dim 384] [--seconds 30]
        [--rates 1,10,100] [--data-dir DIR] [--out bench/results/fresh] [--compare-export]

1. Starts a Chroma primary (`chroma run` from the venv) holding bench.replica's clustered
   collection (rows x dim, cosine, Chroma's default HNSW settings), loaded unless already there
   (`--data-dir DIR` keeps it between runs; DIR/primary is the layout of the proxy's embedded
   primary, so it is shared with bench.replica, bench.guards and bench.swap). Rows this script
   writes carry the metadata `writer: true` and are deleted before and after the run, so the
   collection keeps its N rows.
2. Starts the proxy in storage mode in front of it (`--primary`, `--primary-persist-path`):
   its replica is the primary's own HNSW files plus its log, polled every 0.1 s.
3. Pins the load generators (this process and its reader process) to CPU 0 and the servers
   (the primary and the proxy, every thread) to CPU 1 with taskset.
4. For each write rate R and each path (writes THROUGH the proxy, or DIRECTLY to the
   primary): S seconds of a writer issuing 1-row add/upsert/update/delete at R writes/s while
   16 readers send top-10 queries (half unfiltered, half `where topic = science`) through the
   proxy at its default (session) consistency; then a shorter phase with the same writes and
   the readers at the primary directly. Every write is checked:
   * through the proxy: an immediate `get` of the row through the proxy (read-your-writes);
   * directly, first half of the phase: eventual `get`s through the proxy every 10 ms until
     the write shows (visibility lag from the write's 2xx);
   * directly, second half: one `strong` `get` through the proxy (it must see the write).
   The halves are kept apart because a strong read wakes the proxy's tailer at once, which
   would make the lag of nearby writes look shorter than a poll.
   Writes follow a fixed schedule; when the primary answers slower than the rate, up to
   WRITES_IN_FLIGHT are outstanding (never two to one row) and the achieved rate is reported.
5. The primary's write latency with the proxy tailing it (no readers) and with the proxy
   stopped. With `--compare-export`: the 10 writes/s through-the-proxy phase again with
   `--replica-source export` (HTTP export and rebuilds after writes) for its local share.
6. Per phase: retakes, rebuilds and local fallbacks (/metrics), the log position, overlay
   rows and stuck-request gauges, the servers' CPU, the proxy's RSS; at the end the proxy's
   /admin/status "sync" section and the rows it exported (none expected in storage mode).
   Reads or checks without an answer within REQUEST_TIMEOUT_S are counted as failures and
   listed; every wait is bounded, so the run always ends.

The readers are a Python aiohttp client (per-request bookkeeping of X-Proxy-Source), a separate
process on CPU 0 shared with the writer: reader QPS is client-bound, a floor, not the proxy's
capacity (bench.replica and bench.guards measure that with wrk). Writes
bench/results/fresh/fresh.{json,md} and the proxies' logs (fresh-proxy-*.log), and prints the
tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt

from bench.common import D, Proxy, call, children, dataset, dataset_args, write_report
from bench.replica import NAME, TOPICS, _ensure_loaded
from tests.helpers import ChromaServer

CONCURRENCY = 16
WHERE = {"topic": "science"}
LOCAL = ("replica", "cache")
POLL_S = 0.01  # how often a direct write's visibility is polled
VISIBLE_TIMEOUT_S = 5.0  # a direct write not visible by then counts as never seen
POOL = 10  # writer rows kept alive before deletes start
# Writes sent before the previous ones are answered, when the primary falls behind the rate
# (a single row's writes are never concurrent). At 1 and 10 writes/s there is one at a time.
WRITES_IN_FLIGHT = 4
# The writer's ops, in turn: net zero rows per cycle once POOL rows exist.
CYCLE = ("add", "update", "upsert_new", "delete", "upsert_existing", "delete")
CLIENT_CPU, SERVER_CPU = 0, 1
CPUS_AT_START = frozenset(os.sched_getaffinity(0))  # before main() pins this process
JSON = {"Content-Type": "application/json"}
REQUEST_TIMEOUT_S = 10.0  # a request not answered by then counts as an error
TIMEOUT = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
EXPORT_RE = re.compile(r"export \S+: (\d+) rows in")
SAMPLE_RE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$")


# --- the writer's rows --------------------------------------------------------------------


@dataclass
class Model:
    """The writer's rows. Each write's resulting state (its version, or None for deleted) is
    recorded before it is sent, so a check can tell whether what it read is that write's
    result or a later write's (never an earlier one's). A row has at most one write in flight,
    so the primary applies a row's writes in the order they were planned."""

    token: str
    rng: random.Random
    live: list[str] = field(default_factory=list)
    busy: set[str] = field(default_factory=set)  # rows with a write in flight
    history: dict[str, list[tuple[int, int | None]]] = field(default_factory=dict)
    count: int = 0

    def plan(self) -> tuple[str, str, int]:
        """The next write: (op, id, version); its outcome is recorded at once."""
        k, self.count = self.count, self.count + 1
        op = CYCLE[k % len(CYCLE)]
        free = [row for row in self.live if row not in self.busy]
        if op != "upsert_new" and (not free or (op == "delete" and len(self.live) < POOL)):
            op = "add"
        if op in ("add", "upsert_new"):
            row = f"w-{self.token}-{k}"
            self.live.append(row)
        else:
            row = self.rng.choice(free)
            if op == "delete":
                self.live.remove(row)
        self.busy.add(row)
        self.history.setdefault(row, []).append((k, None if op == "delete" else k))
        return op, row, k

    def done(self, row: str) -> None:
        """The write to ``row`` has been answered."""
        self.busy.discard(row)

    def accepts(self, row: str, k: int, seen: int | None) -> bool:
        """Whether ``seen`` is the state left by write ``k`` to ``row`` or by a later one."""
        return any(state == seen for j, state in self.history.get(row, []) if j >= k)


def write_body(op: str, row: str, k: int, vector: list[float]) -> dict[str, Any]:
    """One-row request body of ``op`` (add, update, upsert_*, delete)."""
    if op == "delete":
        return {"ids": [row]}
    if op == "update":
        return {"ids": [row], "embeddings": [vector], "metadatas": [{"v": k}]}
    meta = {"topic": TOPICS[k % 5], "n": -1, "writer": True, "v": k}
    return {
        "ids": [row],
        "embeddings": [vector],
        "metadatas": [meta],
        "documents": [f"writer row {k}"],
    }


# --- the writer and its checks ------------------------------------------------------------


@dataclass
class WriteStats:
    """What one phase's writer saw."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    checks: Counter[str] = field(default_factory=Counter)  # kind -> number
    violations: Counter[str] = field(default_factory=Counter)  # kind -> number
    check_latencies: dict[str, list[float]] = field(default_factory=dict)
    check_sources: dict[str, Counter[str]] = field(default_factory=dict)
    lags: list[float] = field(default_factory=list)
    invisible: int = 0
    elapsed: float = 0.0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def checked(self, kind: str, ok: bool, seconds: float, source: str) -> None:
        self.checks[kind] += 1
        self.violations[kind] += not ok
        self.check_latencies.setdefault(kind, []).append(seconds)
        self.check_sources.setdefault(kind, Counter())[source] += 1


class Writer:
    """Writes one row at a time at a fixed rate and checks each write through the proxy."""

    def __init__(self, proxy: str, cid: str, vectors: list[list[float]], model: Model) -> None:
        self.proxy, self.cid, self.vectors, self.model = proxy, cid, vectors, model
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self, base: str, rate: float, seconds: float, check: str | None) -> WriteStats:
        """Writes to ``base`` for ``seconds``; ``check``: "ryw" (writes go through the proxy),
        "direct" (lag, then strong reads) or None."""
        stats = WriteStats()
        slots = asyncio.Semaphore(WRITES_IN_FLIGHT)
        async with aiohttp.ClientSession(timeout=TIMEOUT) as self.session:
            started = time.monotonic()
            end = started + seconds
            for i in range(int(rate * seconds)):
                await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
                await slots.acquire()
                if time.monotonic() >= end:  # the primary could not keep up with the rate
                    slots.release()
                    break
                half = time.monotonic() - started < seconds / 2
                kind = {"ryw": "ryw", "direct": "lag" if half else "strong"}.get(check or "")
                self._spawn(self._one(base, self.model.plan(), slots, kind, stats))
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            stats.elapsed = time.monotonic() - started
            await self._settle()
        return stats

    async def _one(
        self,
        base: str,
        planned: tuple[str, str, int],
        slots: asyncio.Semaphore,
        check: str | None,
        stats: WriteStats,
    ) -> None:
        """One write, then (once it is answered, its slot free again) its check."""
        op, row, k = planned
        try:
            ok = await self._write(base, op, row, k, stats)
        finally:
            self.model.done(row)
            slots.release()
        if ok and check is not None:
            await self._check(check, row, k, time.monotonic(), stats)

    async def _settle(self) -> None:
        """Wait for the writes and checks still running (bounded), cancel any left."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=VISIBLE_TIMEOUT_S + 2 * REQUEST_TIMEOUT_S)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _write(self, base: str, op: str, row: str, k: int, stats: WriteStats) -> bool:
        body = write_body(op, row, k, self.vectors[k % len(self.vectors)])
        path = op.split("_")[0]
        t = time.perf_counter()
        assert self.session is not None
        try:
            url = f"{base}{D}/collections/{self.cid}/{path}"
            async with self.session.post(url, json=body) as resp:
                await resp.read()
                ok = resp.status < 300
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok:
            stats.latencies.append(time.perf_counter() - t)
        stats.errors += not ok
        return ok

    async def get(self, row: str, consistency: str | None) -> tuple[int | None, str]:
        """The row's version as the proxy answers (None: absent) and X-Proxy-Source."""
        headers = {} if consistency is None else {"X-Proxy-Consistency": consistency}
        url = f"{self.proxy}{D}/collections/{self.cid}/get"
        assert self.session is not None
        body = {"ids": [row], "include": ["metadatas"]}
        async with self.session.post(url, json=body, headers=headers) as resp:
            found = await resp.json()
            source = resp.headers.get("X-Proxy-Source", "?")
        if resp.status != 200:
            raise RuntimeError(f"get {row}: {resp.status} {found}")
        return (found["metadatas"][0]["v"] if found["ids"] else None), source

    async def _check(self, kind: str, row: str, k: int, acked: float, stats: WriteStats) -> None:
        try:
            if kind == "lag":
                await self._visibility(row, k, acked, stats)
                return
            t = time.perf_counter()
            seen, source = await self.get(row, "strong" if kind == "strong" else None)
            ok = self.model.accepts(row, k, seen)
            stats.checked(kind, ok, time.perf_counter() - t, source)
            if not ok and len(stats.examples) < 10:
                history = self.model.history[row]
                stats.examples.append(
                    {
                        "kind": kind,
                        "row": row,
                        "write": k,
                        "seen": seen,
                        "source": source,
                        "history": history,
                    }
                )
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
            stats.checks[kind + "_errors"] += 1
            if len(stats.examples) < 10:
                stats.examples.append({"kind": kind, "row": row, "error": str(exc)})

    async def _visibility(self, row: str, k: int, acked: float, stats: WriteStats) -> None:
        """Eventual gets every POLL_S until the write shows; the lag is to the answer that
        first shows it."""
        sources: Counter[str] = Counter()
        while time.monotonic() - acked < VISIBLE_TIMEOUT_S:
            seen, source = await self.get(row, "eventual")
            sources[source] += 1
            if self.model.accepts(row, k, seen):
                stats.lags.append(time.monotonic() - acked)
                stats.checks["lag"] += 1
                stats.check_sources.setdefault("lag", Counter()).update(sources)
                return
            await asyncio.sleep(POLL_S)
        stats.invisible += 1


# --- the readers (a separate process on the client CPU) -----------------------------------


def read_load(url: str, bodies: list[str], seconds: float, concurrency: int) -> dict[str, Any]:
    """Closed-loop top-10 queries at ``url`` (runs in the reader process)."""
    return asyncio.run(_read_load(url, bodies, seconds, concurrency))


async def _read_load(url: str, bodies: list[str], seconds: float, c: int) -> dict[str, Any]:
    latencies: list[float] = []
    sources: Counter[str] = Counter()
    errors = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:

        async def worker(i: int) -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                t = time.perf_counter()
                try:
                    async with session.post(url, data=bodies[i % len(bodies)], headers=JSON) as r:
                        await r.read()
                        ok, source = r.status == 200, r.headers.get("X-Proxy-Source", "direct")
                except (aiohttp.ClientError, TimeoutError):
                    ok, source = False, "error"
                i += c
                if not ok:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)
                sources[source] += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(c)))
        elapsed = time.monotonic() - started
    return {
        "qps": len(latencies) / elapsed,
        **percentiles(latencies),
        "requests": len(latencies),
        "errors": errors,
        "sources": dict(sources),
    }


def percentiles(seconds: list[float]) -> dict[str, float | None]:
    """p50/p99/max in milliseconds (None when nothing was measured)."""
    if not seconds:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


# --- processes: pinning, metrics, memory --------------------------------------------------


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += children(p)
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants (all their threads)."""
    total = 0
    for p in tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cpu: int) -> list[int]:
    """Pin ``pid``, every thread of it and its descendants to ``cpu`` (taskset -a)."""
    pids = tree(pid)
    for p in pids:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(cpu), str(p)], check=True, capture_output=True
        )
    return pids


def can_pin() -> bool:
    """taskset is there and this process may use both CPUs."""
    return shutil.which("taskset") is not None and {CLIENT_CPU, SERVER_CPU} <= CPUS_AT_START


def affinity(pid: int) -> list[int]:
    return sorted(os.sched_getaffinity(pid))


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) in MB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = round(int(value.split()[0]) / 1024, 1)
    return found


def scrape(url: str) -> dict[str, float]:
    """The proxy's /metrics samples of its replica_proxy_* families, keyed name{labels}."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        match = SAMPLE_RE.match(line)
        if match and match.group(1).startswith("replica_proxy_") and "_created" not in line:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def counters(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Increases of the retake, rebuild and local-fallback counters between two scrapes."""
    names = ("storage_retakes_total", "rebuilds_total", "local_fallbacks_total")
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if any(n in key for n in names) and after[key] != before.get(key, 0.0)
    }


def gauges(samples: dict[str, float]) -> dict[str, float]:
    """The log position and overlays, and what shows requests stuck in the proxy."""
    names = ("storage_log_position", "overlay_rows", "search_queue_depth", "requests_in_flight")
    return {k: v for k, v in samples.items() if any(n in k for n in names)}


def admin_status(url: str, token: str) -> Any:
    req = urllib.request.Request(url + "/admin/status")
    req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def admin_sync(url: str, token: str) -> Any:
    return admin_status(url, token).get("sync")


def exported_rows(log: str) -> int:
    return sum(int(m.group(1)) for m in EXPORT_RE.finditer(log))


def wait_local(url: str, cid: str, timeout_s: float) -> float:
    """Seconds until the proxy answers the collection's count itself."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            with urllib.request.urlopen(f"{url}{D}/collections/{cid}/count", timeout=30) as r:
                if r.headers.get("X-Proxy-Source") in LOCAL:
                    return round(time.monotonic() - started, 2)
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the proxy did not serve {cid} locally within {timeout_s}s")


# --- the run ------------------------------------------------------------------------------


@dataclass
class Bench:
    """Everything a phase needs."""

    args: argparse.Namespace
    primary: str
    primary_pid: int
    cid: str
    bodies: list[str]
    writer: Writer
    readers: ProcessPoolExecutor
    proxy: Proxy | None = None

    async def phase(
        self, read_url: str | None, write_url: str, rate: float, seconds: float, check: str | None
    ) -> dict[str, Any]:
        """Readers at ``read_url`` (none: no readers) and the writer at ``write_url``."""
        loop = asyncio.get_running_loop()
        reads = None
        if read_url is not None:
            query = f"{read_url}{D}/collections/{self.cid}/query"
            args = (query, self.bodies, seconds, CONCURRENCY)
            reads = loop.run_in_executor(self.readers, read_load, *args)
        cpu, started = self.cpu(), time.monotonic()
        writes = await self.writer.run(write_url, rate, seconds, check)
        read_stats = None if reads is None else await reads
        wall = time.monotonic() - started
        used = {k: round(100 * (v - cpu[k]) / wall) for k, v in self.cpu().items() if k in cpu}
        return {"reads": read_stats, "writes": summarize(writes), "cpu_pct": used}

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the servers."""
        found = {"primary": cpu_seconds(self.primary_pid)}
        if self.proxy is not None and self.proxy.process.proc.poll() is None:
            found["proxy"] = cpu_seconds(self.proxy.process.pid)
        return found


def summarize(s: WriteStats) -> dict[str, Any]:
    """One phase's write statistics."""
    return {
        "writes": len(s.latencies),
        "writes_per_s": round(len(s.latencies) / s.elapsed, 2),
        "errors": s.errors,
        "latency": percentiles(s.latencies),
        "checks": dict(s.checks),
        "violations": dict(s.violations),
        "check_latency": {k: percentiles(v) for k, v in s.check_latencies.items()},
        "check_sources": {k: dict(v) for k, v in s.check_sources.items()},
        "lag": {**percentiles(s.lags), "samples": len(s.lags), "invisible": s.invisible},
        "examples": s.examples,
    }


async def rate_phases(bench: Bench, rate: int) -> list[dict[str, Any]]:
    """Both paths at ``rate``: readers at the proxy for S seconds, then at the primary."""
    assert bench.proxy is not None
    proxy, primary, seconds = bench.proxy.url, bench.primary, bench.args.seconds
    short = max(3.0, seconds / 3)
    rows = []
    for path, write_url, check in (("proxy", proxy, "ryw"), ("direct", primary, "direct")):
        print(f"{rate} writes/s {path}: {seconds} s readers at the proxy ...", flush=True)
        before = scrape(proxy)
        main = await bench.phase(proxy, write_url, rate, seconds, check)
        after = scrape(proxy)
        print(f"{rate} writes/s {path}: {short:g} s readers at the primary ...", flush=True)
        direct = await bench.phase(primary, write_url, rate, short, None)
        rows.append(
            {
                "rate": rate,
                "path": path,
                **main,
                "primary_reads": direct["reads"],
                "primary_reads_cpu_pct": direct["cpu_pct"],
                "counters": counters(before, after),
                "gauges": gauges(after),
                "rss_mb": rss_mb(bench.proxy.process.pid),
            }
        )
        print(json.dumps(row_line(rows[-1])), flush=True)
    return rows


async def write_latency(bench: Bench, rates: list[int]) -> dict[str, Any]:
    """The primary's write latency, writes only, at each rate (the proxy as it is now)."""
    seconds = max(5.0, bench.args.seconds / 3)
    found = {}
    for rate in rates:
        stats = await bench.writer.run(bench.primary, rate, seconds, None)
        found[str(rate)] = percentiles(stats.latencies) | {"writes": len(stats.latencies)}
    return found


def query_body(query: npt.NDArray[np.float32], where: dict[str, Any] | None) -> str:
    body: dict[str, Any] = {
        "query_embeddings": [query.tolist()],
        "n_results": 10,
        "include": ["distances"],
    }
    if where is not None:
        body["where"] = where
    return json.dumps(body)


def write_vectors(vectors: npt.NDArray[np.float32], n: int = 512) -> list[list[float]]:
    """Vectors for the writer's rows: near random rows of the collection."""
    rng = np.random.default_rng(13)
    picks = rng.choice(len(vectors), size=min(n, len(vectors)), replace=False)
    near = vectors[picks] + rng.normal(scale=0.1, size=(len(picks), vectors.shape[1]))
    return [[float(x) for x in row] for row in near.astype(np.float32)]


@contextmanager
def primary_server(data_dir: str | None) -> Iterator[ChromaServer]:
    """`chroma run` on DATA_DIR/primary (the embedded primary's layout) or a temporary
    directory, pinned to the server CPU."""
    scratch = Path(tempfile.mkdtemp(prefix="fresh-bench-"))
    root = Path(data_dir) if data_dir else scratch
    server = ChromaServer(root / "primary")  # its log: root/chroma-PORT.log
    try:
        server.start()
        if can_pin():
            pin(server_pid(server), SERVER_CPU)
        yield server
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def prepare(base: str, vectors: npt.NDArray[np.float32]) -> str:
    """The loaded collection's id, without rows an earlier (interrupted) run wrote."""
    create = {"name": NAME, "configuration": {"hnsw": {"space": "cosine"}}, "get_or_create": True}
    cid: str = call(base, "POST", f"{D}/collections", create)["id"]
    cleanup_writer_rows(base, cid)
    loaded: str = _ensure_loaded(base, vectors)
    return loaded


def server_pid(server: ChromaServer) -> int:
    assert server.proc is not None
    return server.proc.pid


def cleanup_writer_rows(base: str, cid: str) -> None:
    call(base, "POST", f"{D}/collections/{cid}/delete", {"where": {"writer": True}})


def pinning(primary: ChromaServer, proxy: Proxy) -> dict[str, Any]:
    """Which CPUs each process may run on now."""
    if not can_pin():
        return {"pinned": False, "why": "taskset or CPUs 0 and 1 not available"}
    return {
        "pinned": True,
        "load_generators (this process, reader process)": affinity(os.getpid()),
        "primary": affinity(server_pid(primary)),
        "proxy": affinity(proxy.process.pid),
    }


@contextmanager
def kept_log(proxy: Proxy, out: str, name: str) -> Iterator[None]:
    """Copy the proxy's log to the results directory when it stops (its own directory is
    deleted)."""
    try:
        yield
    finally:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"fresh-proxy-{name}.log").write_text(proxy.logs())


def final_metrics(samples: dict[str, float]) -> dict[str, float]:
    keep = ("storage_", "rebuilds_total", "local_fallbacks_total")
    return {k: v for k, v in samples.items() if any(n in k for n in keep)}


async def storage_run(bench: Bench, proxy: Proxy, token: str, rates: list[int]) -> dict[str, Any]:
    """Every rate and path through the storage-mode proxy, then the primary's write latency
    with the proxy tailing it."""
    found: dict[str, Any] = {"take_s": wait_local(proxy.url, bench.cid, 900)}
    found["phases"] = [row for rate in rates for row in await rate_phases(bench, rate)]
    print("primary write latency, proxy tailing ...", flush=True)
    found["write_latency_tailing"] = await write_latency(bench, rates)
    found["proxy_end"] = {
        "exported_rows": exported_rows(proxy.logs()),
        "metrics": final_metrics(scrape(proxy.url)),
        "rss_mb": rss_mb(proxy.process.pid),
        "sync": admin_sync(proxy.url, token),
    }
    return found


async def compare_export(bench: Bench, primary: ChromaServer, rates: list[int]) -> list[Any]:
    """The through-the-proxy phases with replicas exported over HTTP, the proxy's own writes
    applied to them (proxy/replica/overlay.py), one proxy for all rates."""
    token = secrets.token_hex(16)
    export = ("--primary", primary.url, "--replica-source", "export", "--admin-token", token)
    found = []
    with Proxy(*export) as proxy, kept_log(proxy, bench.args.out, "export"):
        if can_pin():
            pin(proxy.process.pid, SERVER_CPU)
        bench.proxy, bench.writer.proxy = proxy, proxy.url
        build_s = wait_local(proxy.url, bench.cid, 900)
        for rate in rates:
            print(f"export mode: replica built in {build_s} s; {rate} writes/s proxy ...",
                  flush=True)  # fmt: skip
            exported = exported_rows(proxy.logs())
            before = scrape(proxy.url)
            main = await bench.phase(proxy.url, proxy.url, rate, bench.args.seconds, "ryw")
            after = scrape(proxy.url)
            found.append({
                "rate": rate,
                "path": "proxy (export mode)",
                "build_s": build_s,
                **main,
                "primary_reads": None,
                "counters": counters(before, after),
                "gauges": gauges(after),
                "rss_mb": rss_mb(proxy.process.pid),
                "exported_rows": exported_rows(proxy.logs()) - exported,
                "overlay": admin_status(proxy.url, token).get("write_overlay"),
            })  # fmt: skip
    return found


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rates = [int(r) for r in args.rates.split(",")]
    vectors, queries = dataset(args.rows, args.dim, args.queries)
    bodies = [query_body(q, None if i % 2 == 0 else WHERE) for i, q in enumerate(queries)]
    results: dict[str, Any] = {
        "rows": args.rows,
        "dim": args.dim,
        "seconds": args.seconds,
        "rates": rates,
        "concurrency": CONCURRENCY,
    }
    with ExitStack() as stack:
        primary = stack.enter_context(primary_server(args.data_dir))
        cid = prepare(primary.url, vectors)
        readers = stack.enter_context(ProcessPoolExecutor(1, mp_context=get_context("spawn")))
        readers.submit(percentiles, []).result(timeout=120)  # the reader process is up
        model = Model(secrets.token_hex(3), random.Random(5))
        writer = Writer("", cid, write_vectors(vectors), model)
        bench = Bench(args, primary.url, server_pid(primary), cid, bodies, writer, readers)
        token = secrets.token_hex(16)
        storage_args = (
            "--primary-persist-path",
            str(primary.path),
            "--replica-source",
            "storage",
            "--admin-token",
            token,
        )
        if not args.export_only:
            with (
                Proxy("--primary", primary.url, *storage_args) as proxy,
                kept_log(proxy, args.out, "storage"),
            ):
                if can_pin():
                    pin(proxy.process.pid, SERVER_CPU)
                results["pinning"] = pinning(primary, proxy)
                bench.proxy, writer.proxy = proxy, proxy.url
                results |= await storage_run(bench, proxy, token, rates)
            print("primary write latency, proxy stopped ...", flush=True)
            results["write_latency_no_proxy"] = await write_latency(bench, rates)
        if args.compare_export or args.export_only:
            export_rates = [int(r) for r in args.export_rates.split(",")]
            results["export"] = await compare_export(bench, primary, export_rates)
        cleanup_writer_rows(primary.url, cid)
    return results


# --- the report ---------------------------------------------------------------------------


def _ms(p: dict[str, Any] | None, *keys: str) -> str:
    if not p or p.get(keys[0]) is None:
        return "-"
    return " / ".join(f"{p[k]:.1f}" for k in keys)


def local_share(reads: dict[str, Any]) -> float | None:
    sources = reads["sources"]
    total = sum(sources.values())
    return None if total == 0 else sum(sources.get(s, 0) for s in LOCAL) / total


def _latency_cell(p: dict[str, Any]) -> str:
    return f"{_ms(p, 'p50_ms', 'p99_ms', 'max_ms')} (n={p['writes']})"


def _violations(w: dict[str, Any], kind: str) -> str:
    errors = w["checks"].get(kind + "_errors", 0)
    if kind not in w["checks"] and not errors:
        return "-"
    text = f"{w['violations'].get(kind, 0)} / {w['checks'].get(kind, 0)}"
    return text + (f" (+{errors} failed)" if errors else "")


def _counters(c: dict[str, float], exported: int | None, sign: str = "+") -> str:
    parts = [f"{re.sub(r'replica_proxy_|_total', '', k)} {sign}{v:g}" for k, v in sorted(c.items())]
    if exported is not None:
        parts.append(f"exported rows {exported}")
    return ", ".join(parts) or "none"


def row_line(r: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one phase (printed as it ends)."""
    reads, w = r["reads"], r["writes"]
    return {
        "rate": r["rate"],
        "path": r["path"],
        "writes/s": w["writes_per_s"],
        "local_share": local_share(reads),
        "sources": reads["sources"],
        "qps": round(reads["qps"]),
        "violations": w["violations"],
        "lag": w["lag"],
    }


def _lag_cell(w: dict[str, Any]) -> str:
    lag, failed = w["lag"], w["checks"].get("lag_errors", 0)
    if not lag["samples"] and not lag["invisible"] and not failed:
        return "-"
    text = f"{_ms(lag, 'p50_ms', 'p99_ms', 'max_ms')} (n={lag['samples']}"
    text += f", unseen {lag['invisible']}" if lag["invisible"] else ""
    return text + (f", {failed} failed)" if failed else ")")


def _share_cell(reads: dict[str, Any]) -> str:
    share, src = local_share(reads), reads["sources"]
    mix = "/".join(str(src.get(s, 0)) for s in ("replica", "cache", "primary"))
    return f"{'-' if share is None else f'{share:.3f}'} ({mix})"


def _failures(phases: list[dict[str, Any]]) -> list[str]:
    """A line per phase whose reads or checks got no answer, with the proxy's gauges at its
    end (a growing search queue with nothing in flight upstream means requests are stuck)."""
    lines = []
    for r in phases:
        failed = sum(v for k, v in r["writes"]["checks"].items() if k.endswith("_errors"))
        if r["reads"]["errors"] or failed:
            stuck = {re.sub(r"replica_proxy_|\{.*", "", k): v for k, v in r["gauges"].items()}
            lines.append(
                f"- {r['rate']} writes/s via {r['path']}: {r['reads']['errors']} reads and "
                f"{failed} checks failed; proxy gauges at the end {stuck}"
            )
    return ["", "**Failures:**", *lines] if lines else []


def _fell_behind(r: dict[str, Any]) -> bool:
    return bool(r["writes"]["writes_per_s"] < 0.9 * r["rate"])


def _cpu_cell(cpu: dict[str, int]) -> str:
    return f"{cpu.get('proxy', '-')} + {cpu.get('primary', '-')}"


def _phase_row(r: dict[str, Any]) -> str:
    reads, w, direct = r["reads"], r["writes"], r["primary_reads"]
    primary = "-" if direct is None else f"{direct['qps']:.0f}"
    return (
        f"| {r['rate']} | {r['path']} | {w['writes_per_s']:.1f} | {_share_cell(reads)} "
        f"| {reads['qps']:.0f} | {_ms(reads, 'p50_ms', 'p99_ms')} | {reads['errors']} "
        f"| {primary} | {_ms(direct, 'p50_ms', 'p99_ms')} "
        f"| {_violations(w, 'ryw')} | {_violations(w, 'strong')} | {_lag_cell(w)} "
        f"| {_ms(w['latency'], 'p99_ms')} | {_cpu_cell(r['cpu_pct'])} "
        f"| {_counters(r['counters'], r.get('exported_rows'))} | {r['rss_mb'].get('VmRSS')} |"
    )


def markdown(res: dict[str, Any]) -> str:
    pinning = res.get("pinning", {"pinned": can_pin(), "why": "no taskset"})
    pin_text = (
        f"load generators on CPU {CLIENT_CPU}, primary and proxy on CPU {SERVER_CPU} (taskset)"
        if pinning.get("pinned")
        else f"not pinned ({pinning.get('why')})"
    )
    storage = (
        f"Proxy in storage mode (poll 0.1 s), replica taken in {res['take_s']} s"
        if "take_s" in res
        else "Export mode only (--export-only)"
    )
    exported = res.get("export", [])
    lines = [
        f"# Freshness under steady writes: {res['rows']} x {res['dim']} clustered, cosine, "
        f"default HNSW; {res['seconds']} s per phase",
        "",
        f"{storage}. {pin_text}. "
        f"Readers: {res['concurrency']} concurrent top-10 queries (half `where topic=science`), "
        "session consistency, from one Python aiohttp process: **reader QPS is client-bound** "
        "(a floor, not the proxy's capacity). Writes: 1 row each, add/update/upsert/delete.",
        "",
        "Local share: proxy reads answered by the replica or cache (replica/cache/primary "
        "counts). RYW: violations / checks of a session `get` through the proxy right after "
        "each write through it. Strong: of a `strong` `get` through the proxy right after a "
        "direct write (second half of the phase). Lag: direct write's 2xx to the first "
        "eventual `get` through the proxy that sees it, polled every 10 ms (first half). "
        f"Errors and failed checks: no answer within {REQUEST_TIMEOUT_S:g} s, or not 2xx. "
        "Primary QPS: the same readers at the primary directly, same writes, shorter phase. "
        "Server CPU: % of one core over the phase; pinned, both servers share one core, so a "
        "sum near 100 means the servers, not the client, set the reader QPS. Export-mode "
        "rows: the proxy's own writes applied to its exported replica (proxy/replica/overlay.py).",
        "",
        "| writes/s | writes via | achieved w/s | local share (replica/cache/primary) "
        "| proxy QPS | proxy p50 / p99 ms | proxy read errors | primary QPS "
        "| primary p50 / p99 ms | RYW viol. | strong viol. | lag p50 / p99 / max ms "
        "| write p99 ms | server CPU % (proxy + primary) | proxy counters | proxy RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    phases = res.get("phases", [])
    lines += [_phase_row(r) for r in phases + exported]
    lines += _failures(phases + exported)
    short = sorted({str(r["rate"]) for r in phases + exported if _fell_behind(r)})
    if short:
        lines += [
            "",
            f"At {', '.join(short)} writes/s the primary did not take the offered "
            f"rate (achieved w/s), with up to {WRITES_IN_FLIGHT} writes in flight.",
        ]
    for r in exported:
        lines += ["", f"Export mode at {r['rate']} writes/s: write overlay {r.get('overlay')}."]
    if "write_latency_tailing" not in res:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Primary write latency (writes only, no readers), p50 / p99 / max ms:",
        "",
        "| writes/s | proxy tailing | proxy stopped |",
        "|---|---|---|",
    ]
    tail, alone = res["write_latency_tailing"], res["write_latency_no_proxy"]
    for rate in map(str, res["rates"]):
        with_proxy, without = _latency_cell(tail[rate]), _latency_cell(alone[rate])
        lines.append(f"| {rate} | {with_proxy} | {without} |")
    end = res["proxy_end"]
    lines += [
        "",
        f"Storage proxy at the end: exported rows {end['exported_rows']}, "
        f"RSS {end['rss_mb'].get('VmRSS')} MB (peak {end['rss_mb'].get('VmHWM')} MB); "
        f"counters {_counters(end['metrics'], None, sign='')}.",
    ]
    return "\n".join(lines) + "\n"


def _args() -> argparse.Namespace:
    parser = dataset_args(__doc__ or "")
    parser.set_defaults(seconds=30, out="bench/results/fresh")
    parser.add_argument("--rates", default="1,10,100", help="writes/s, comma-separated")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--compare-export",
        action="store_true",
        help="also the through-the-proxy phases with --replica-source export",
    )
    parser.add_argument(
        "--export-rates", default="1,10,100", help="writes/s of the export-mode phases"
    )
    parser.add_argument("--export-only", action="store_true", help="only the export-mode phases")
    return parser.parse_args()


def main() -> None:
    args = _args()
    if can_pin():
        pin(os.getpid(), CLIENT_CPU)  # the reader process and the servers start from here
    results = asyncio.run(run(args))
    write_report(Path(args.out), "fresh", results, markdown(results))


if __name__ == "__main__":
    main()
