"""Cache, replica path and overload behaviour, each against its own ceiling, in one run.

    bash bench/setup.sh        # wrk, h2load, matplotlib (once)
    .venv/bin/python -m bench.guards [--rows 100000] [--dim 384] [--seconds 10] [--workers N]

A. Cache hits vs an aiohttp+uvloop server that returns the same bytes from a dict (the ceiling
   for any Python HTTP answer on this machine), wrk at c=32. With --workers N the proxy runs N
   worker processes and the dict server as many (SO_REUSEPORT), like for like.
B. Replica path with the cache off vs hnswlib called in-process on the same queries with as many
   threads as the proxy has search threads (the limit for the search itself).
C. Overload, open loop (h2load --rps): offered load from 0.5x to 3x the replica path's capacity,
   cache off, every request unique. The capacity is measured first with the same client
   closed loop (64 connections): wrk's Lua scripting costs more CPU than h2load, which on
   two shared cores made B's figure understate what the proxy serves to h2load. Reports
   goodput, p99 of admitted requests, how fast shed requests are answered, and the proxy's
   RSS. Writes bench/results/guards.png.

Writes bench/results/guards.{json,md} (guards-workersN.* with --workers N).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.common import (
    D,
    LoadResult,
    Proxy,
    call,
    children,
    dataset,
    dataset_args,
    query_bodies,
    write_report,
    wrk,
)
from bench.replica import _ensure_loaded
from proxy.primary.embedded import free_port

DICT_SERVER = """
import sys, asyncio, uvloop
from aiohttp import web
body = open(sys.argv[2], "rb").read()
async def answer(request):
    await request.read()
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_route("*", "/{tail:.*}", answer)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
            reuse_port=True)
"""


def main() -> None:
    args = _args()
    vectors, queries = dataset(args.rows, args.dim, 200)
    bodies = query_bodies(queries)
    out = Path(args.out)
    results: dict[str, Any] = {"rows": args.rows, "dim": args.dim, "seconds": args.seconds,
                               "workers": args.workers}  # fmt: skip
    data_dir = Path(args.data_dir) if args.data_dir else None
    name = "guards" if args.workers == 1 else f"guards-workers{args.workers}"
    common = ("--replicate", "", "--build-threads", "2", "--max-staleness-s", "86400",
              "--refresh-interval-s", "86400", "--workers", str(args.workers))  # fmt: skip
    with Proxy(*common, data_dir=data_dir) as proxy:
        cid = _ready(proxy, vectors)
        results["cache"] = _cache_vs_ceiling(proxy, cid, bodies[0], args.seconds, args.workers)
    # A short search queue and a cap on requests in flight bound the latency of admitted
    # requests: the 256 connections of the overload runs exceed the cap of 128.
    with Proxy(*common, "--cache-max-bytes", "0", "--search-queue-max", "64",
               "--max-requests-in-flight", "128", data_dir=data_dir) as proxy:  # fmt: skip
        cid = _ready(proxy, vectors)
        results["replica"] = _replica_vs_hnswlib(proxy, cid, vectors, queries, bodies, args)
        plot = out / f"{name}.png"
        capacity, points = _overload(proxy, cid, bodies[:16], args.seconds, plot)
        results["overload_capacity"], results["overload"] = capacity, points
    write_report(out, name, results, _markdown(results))


def _ready(proxy: Proxy, vectors: npt.NDArray[np.float32]) -> str:
    """Once the replica serves, in every worker process."""
    cid = _ensure_loaded(proxy.primary_url, vectors)
    url = f"{proxy.url}{D}/collections/{cid}/count"
    while True:
        with urllib.request.urlopen(url, timeout=60) as resp:
            local = resp.headers.get("X-Proxy-Source") in ("replica", "cache")
        with urllib.request.urlopen(f"{proxy.url}/readyz", timeout=60) as resp:
            workers = json.loads(resp.read()).get("workers", {"total": 1, "ready": 1})
        if local and workers["ready"] == workers["total"]:
            return cid
        time.sleep(0.2)


def _cache_vs_ceiling(
    proxy: Proxy, cid: str, body: str, seconds: int, processes: int
) -> dict[str, Any]:
    url = f"{proxy.url}{D}/collections/{cid}/query"
    answer = call(proxy.url, "POST", f"{D}/collections/{cid}/query", json.loads(body))
    raw = json.dumps(answer, separators=(",", ":")).encode()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        fh.write(raw)
    port = free_port()
    servers = [
        subprocess.Popen([sys.executable, "-c", DICT_SERVER, str(port), fh.name])
        for _ in range(processes)
    ]
    try:
        _wait_listening(port)
        time.sleep(1)  # the other processes bind too
        print(f"A: cache hits vs dict server ({processes} processes) ...", flush=True)
        # The same path as the proxy's: aiohttp's router walks it segment by segment, which
        # cost the dict server 7% against a one-segment path.
        ceiling = _steady(f"http://127.0.0.1:{port}{D}/collections/{cid}/query", seconds, [body])
        hits = _steady(url, seconds, [body])
    finally:
        for server in servers:
            server.terminate()
            server.wait()
        os.unlink(fh.name)
    return {"ceiling": ceiling.as_dict(), "cache_hits": hits.as_dict(),
            "ratio": round(hits.qps / ceiling.qps, 3)}  # fmt: skip


def _steady(url: str, seconds: int, bodies: list[str]) -> LoadResult:
    """wrk at c=32 after 3 s of the same load, unmeasured: a worker process that has just
    loaded its replica, or pages of vectors not yet read, showed as a tail in the first
    seconds (p99 71 ms instead of 12 with two workers)."""
    wrk(url, connections=32, seconds=3, method="POST", bodies=bodies)
    return wrk(url, connections=32, seconds=seconds, method="POST", bodies=bodies)


def _wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("dict server did not start")


def _replica_vs_hnswlib(
    proxy: Proxy,
    cid: str,
    vectors: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    bodies: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    print("B: replica path (cache off) ...", flush=True)
    url = f"{proxy.url}{D}/collections/{cid}/query"
    run = _steady(url, args.seconds, bodies)
    print("B: hnswlib in-process ...", flush=True)
    limit = _hnswlib_qps(vectors, queries, threads=os.cpu_count() or 2, seconds=args.seconds)
    return {"proxy": run.as_dict(), "proxy_qps": run.qps, "hnswlib_qps": limit,
            "ratio": round(run.qps / limit, 3)}  # fmt: skip


def _hnswlib_qps(
    vectors: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], threads: int, seconds: int
) -> float:
    """Single-query knn_query calls from ``threads`` threads, like the proxy's search pool."""
    import hnswlib

    index = hnswlib.Index(space="cosine", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), ef_construction=100, M=16)
    index.set_num_threads(threads)
    index.add_items(vectors, np.arange(len(vectors)))
    index.set_ef(100)
    index.set_num_threads(1)
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(slot: int) -> None:
        i = slot
        while time.monotonic() < stop:
            index.knn_query(queries[i % len(queries)][None, :], k=10)
            counts[slot] += 1
            i += threads

    pool = [threading.Thread(target=work, args=(s,)) for s in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / seconds


def _overload(
    proxy: Proxy, cid: str, bodies: list[str], seconds: int, plot: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Open-loop load with h2load (one process per query vector, since h2load sends one body;
    several vectors keep the searches from all walking the same cached path). Every request
    has its own query string, so neither the cache nor coalescing can absorb the load (the
    proxy keys on the query string too)."""
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: run `bash bench/setup.sh` (nghttp2-client)")
    work = Path(tempfile.mkdtemp(prefix="overload-"))
    for i, body in enumerate(bodies):
        (work / f"body-{i}.json").write_text(body)
    path = f"{D}/collections/{cid}/query"
    (work / "uris.txt").write_text("".join(f"{proxy.url}{path}?u={i}\n" for i in range(200_000)))
    print("C: capacity, h2load closed loop ...", flush=True)
    closed = _h2load_point(proxy, work, None, seconds, 0.0, clients=4)
    capacity = float(closed["goodput_qps"])
    points = []
    for factor in (0.5, 1.0, 1.5, 2.0, 3.0):
        duration = seconds * 3 if factor == 3.0 else seconds
        print(f"C: offered {factor}x capacity for {duration}s ...", flush=True)
        points.append(_h2load_point(proxy, work, capacity * factor, duration, factor))
    shutil.rmtree(work, ignore_errors=True)
    _plot(points, capacity, plot)
    return closed, points


def _h2load_point(
    proxy: Proxy, work: Path, rate: float | None, duration: int, factor: float, clients: int = 16
) -> dict[str, Any]:
    """``rate`` None: closed loop. Open loop, 16 clients per body make 256 connections,
    enough to offer 3x capacity."""
    bodies = sorted(work.glob("body-*.json"))
    rss_before = _rss(proxy.process.pid)
    pace = [] if rate is None else ["--rps", f"{rate / clients / len(bodies):.3f}"]
    procs = [
        subprocess.Popen(
            [
                "h2load",
                "--h1",
                "-c",
                str(clients),
                *pace,
                "-D",
                str(duration),
                "--warm-up-time",
                "1",
                "-d",
                str(body),
                "-H",
                "Content-Type: application/json",
                "-i",
                str(work / "uris.txt"),
                "--log-file",
                str(work / f"log-{factor}-{i}.tsv"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, body in enumerate(bodies)
    ]
    for proc in procs:
        proc.wait()
    rows = np.concatenate(
        [np.loadtxt(log, dtype=np.int64, ndmin=2) for log in work.glob(f"log-{factor}-*.tsv")]
    )
    status, micros = rows[:, 1], rows[:, 2]
    ok, shed = micros[status == 200] / 1000, micros[status == 503] / 1000
    return {
        "factor": factor,
        "offered_qps": None if rate is None else round(rate),
        "sent_qps": round(len(status) / duration),
        "goodput_qps": round(len(ok) / duration),
        "shed_qps": round(len(shed) / duration),
        "other_status": int(((status != 200) & (status != 503)).sum()),
        "admitted_p50_ms": _pct(ok, 50),
        "admitted_p99_ms": _pct(ok, 99),
        "shed_p50_ms": _pct(shed, 50),
        "shed_p99_ms": _pct(shed, 99),
        "rss_mb_before": rss_before,
        "rss_mb_after": _rss(proxy.process.pid),
    }


def _pct(values: npt.NDArray[np.float64], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def _rss(pid: int) -> float:
    """MiB resident in the proxy: worker 0 and the other workers it started."""
    total = 0
    for proc in [pid, *_workers_of(pid)]:
        for line in Path(f"/proc/{proc}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return round(total / 1024, 1)


def _workers_of(pid: int) -> list[int]:
    workers = []
    for child in children(pid):
        try:
            if b"\0_worker\0" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
        except OSError:
            continue
    return workers


def _plot(points: list[dict[str, Any]], capacity: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offered = [p["offered_qps"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(offered, [p["goodput_qps"] for p in points], "o-", label="goodput (200)")
    left.plot(offered, [p["shed_qps"] for p in points], "s-", label="shed (503)")
    left.axhline(capacity, ls="--", c="grey", label="capacity (closed loop)")
    left.set(xlabel="offered load (req/s)", ylabel="req/s", title="Throughput")
    left.legend()
    right.plot(offered, [p["admitted_p99_ms"] for p in points], "o-", label="admitted p99")
    right.plot(offered, [p["shed_p99_ms"] or 0 for p in points], "s-", label="shed p99")
    right.set(xlabel="offered load (req/s)", ylabel="ms", title="Latency", yscale="log")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _markdown(results: dict[str, Any]) -> str:
    cache, replica = results["cache"], results["replica"]
    lines = [
        f"# Cache, replica path and overload ({results['rows']} x {results['dim']}, "
        f"{results['workers']} worker process(es))",
        "",
        "| path | QPS | p50 / p99 ms | ceiling QPS | ratio |",
        "|---|---|---|---|---|",
        f"| cache hits (c=32) | {cache['cache_hits']['qps']:.0f} | "
        f"{cache['cache_hits']['p50_ms']:.2f} / {cache['cache_hits']['p99_ms']:.2f} | "
        f"{cache['ceiling']['qps']:.0f} (aiohttp dict server, {results['workers']} "
        f"process(es)) | {cache['ratio']} |",
        f"| replica path, cache off (c=32) | {replica['proxy']['qps']:.0f} | "
        f"{replica['proxy']['p50_ms']:.2f} / {replica['proxy']['p99_ms']:.2f} | "
        f"{replica['hnswlib_qps']:.0f} (hnswlib in-process) | {replica['ratio']} |",
        "",
        f"Overload capacity (h2load closed loop, 64 connections): "
        f"{results['overload_capacity']['goodput_qps']} QPS, p99 "
        f"{results['overload_capacity']['admitted_p99_ms']} ms, "
        f"{results['overload_capacity']['shed_qps']} shed/s.",
        "",
        "| offered x | offered QPS | sent QPS | goodput | shed/s | admitted p50/p99 ms "
        "| shed p50/p99 ms | other | RSS MB before/after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["overload"]:
        lines.append(
            f"| {p['factor']} | {p['offered_qps']} | {p['sent_qps']} | {p['goodput_qps']} "
            f"| {p['shed_qps']} "
            f"| {p['admitted_p50_ms']} / {p['admitted_p99_ms']} "
            f"| {p['shed_p50_ms']} / {p['shed_p99_ms']} | {p['other_status']} "
            f"| {p['rss_mb_before']} / {p['rss_mb_after']} |"
        )
    return "\n".join(lines) + "\n"


def _args() -> argparse.Namespace:
    parser = dataset_args(__doc__ or "")
    parser.add_argument("--workers", type=int, default=1, help="proxy worker processes")
    return parser.parse_args()


if __name__ == "__main__":
    main()
