"""Swap under load: query latency, event-loop stalls and RSS while replicas are rebuilt and
swapped, in one run on the same data.

    bash bench/setup.sh        # wrk, matplotlib (once)
    .venv/bin/python -m bench.swap [--rows 100000] [--dim 384] [--swaps 3] [--data-dir DIR]

1. Loads the clustered collection of bench.replica (rows x dim, cosine, metadata and
   documents) into the proxy's embedded primary unless it is already there (`--data-dir`
   keeps it between runs and is shared with bench.replica and bench.guards), starts the proxy
   with the result cache off (every query is a real HNSW search) and an admin token, and waits
   for the first replica to serve.
2. Drives a steady, moderate closed-loop load with wrk: `--connections` connections (one wrk
   thread each), each sending a top-10 query, waiting for the answer, then thinking
   `--think-ms`. A LuaJIT script records every request: start (CLOCK_MONOTONIC, the clock of
   Python's time.monotonic), latency, status, X-Proxy-Replica-Generation and X-Proxy-Source.
3. Phase 1: steady state for `--steady` seconds. Phase 2: `--swaps` times, POST
   /admin/rebuild, wait until /admin/status shows a new generation, then let it settle for
   `--settle` seconds (longer than the proxy's 10 s lag window, so each rebuild's stalls are
   attributable) before the next.
4. Throughout, every 0.5 s: the proxy's VmRSS/RssAnon/RssFile (/proc), CPU of the proxy, the
   primary and wrk, /admin/status (event_loop_lag_max_s, generation) and the lag histogram
   from /metrics.

Writes bench/results/swap.{json,md,png} and swap-requests.npz (every request: start, latency,
status, generation; swap and rebuild times), all relative to the start of the load.
Everything shares one machine (2 cores here): the
rebuild's export makes the primary busy and its build runs in proxy threads, so during a
rebuild the searches compete for the cores; the report therefore separates the whole rebuild
window from a narrow window around the swap itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.common import (
    D,
    Proxy,
    children,
    dataset,
    dataset_args,
    query_bodies,
    write_report,
)
from bench.replica import _ensure_loaded

SAMPLE_S = 0.5
LAG_WINDOW_S = 10  # proxy/ops/metrics.py: event_loop_lag_max_s covers the last 10 s
LAG_METRIC = "replica_proxy_event_loop_lag_seconds"
Floats = npt.NDArray[np.float64]

STEADY = "steady"
REBUILD = "rebuild: request to swap + 1 s"
EXPORT = "export: request to export done"
BUILD = "build, validate, publish: export done to swap"
AROUND = "swap +-1 s"
AFTER_SWAP = "swap to swap + 1 s"
SETTLED = "settled: swap + 1 s to next request"

# wrk runs this, one connection per thread so that request() and response() alternate and a
# thread-local start time pairs them. Each thread appends one TSV line per answered request:
# start (s, CLOCK_MONOTONIC), latency (s), status, generation header, source header. The files
# are flushed when wrk exits (after SIGINT).
_LUA = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local bodies = {@BODIES@}
local think_ms = @THINK@
local threads = 0
local out, started
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  out = io.open(args[1] .. "/requests-" .. tid .. ".tsv", "w")
  i = tid * 7919
end

function request()
  i = i + 1
  started = now()
  return wrk.format(nil, nil, nil, bodies[(i % #bodies) + 1])
end

function response(status, headers, body)
  local finished = now()
  out:write(string.format("%.6f\t%.6f\t%d\t%s\t%s\n", started, finished - started, status,
    headers["X-Proxy-Replica-Generation"] or "-", headers["X-Proxy-Source"] or "-"))
end

if think_ms > 0 then
  function delay()
    return think_ms
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"timeout":%d,"non_2xx":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.timeout, e.status))
end
"""


# --- the load generator -------------------------------------------------------------------


@dataclass
class Requests:
    """Every answered request, sorted by start time (seconds on the monotonic clock)."""

    start: Floats
    latency: Floats
    status: npt.NDArray[np.int64]
    generation: npt.NDArray[np.int64]  # -1 when the answer carried none
    replica: npt.NDArray[np.bool_]  # X-Proxy-Source: replica

    @property
    def end(self) -> Floats:
        return self.start + self.latency

    def started_in(self, a: float, b: float) -> npt.NDArray[np.bool_]:
        return (self.start >= a) & (self.start < b)


class WrkLoad:
    """wrk in the background for as long as needed (stopped with SIGINT, which makes it print
    its summary), recording every request to per-thread TSV files."""

    def __init__(self, url: str, bodies: list[str], connections: int, think_ms: int) -> None:
        if shutil.which("wrk") is None:
            raise SystemExit("wrk not found: run `bash bench/setup.sh` (Debian's wrk package)")
        self.dir = Path(tempfile.mkdtemp(prefix="swap-wrk-"))
        script = self.dir / "swap.lua"
        quoted = ",".join(json.dumps(b) for b in bodies)
        script.write_text(_LUA.replace("@BODIES@", quoted).replace("@THINK@", str(think_ms)))
        argv = ["wrk", f"-t{connections}", f"-c{connections}", "-d3600s", "--timeout", "30s",
                "-s", str(script), url, "--", str(self.dir)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.started = time.monotonic()
        self.summary: dict[str, Any] = {}
        self.cpu_s = 0.0
        self.wall_s = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.cpu_s = cpu_seconds(self.proc.pid) or 0.0
            self.wall_s = time.monotonic() - self.started
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=120)
        line = next((x for x in out.decode().splitlines() if x.startswith("WRKJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk failed ({self.proc.returncode}): {out!r} {err!r}")
        self.summary = json.loads(line.removeprefix("WRKJSON "))

    def requests(self) -> Requests:
        rows: list[tuple[float, float, int, int, bool]] = []
        for path in sorted(self.dir.glob("requests-*.tsv")):
            for line in path.read_text().splitlines():
                start, latency, status, generation, source = line.split("\t")
                gen = int(generation) if generation.isdigit() else -1
                rows.append((float(start), float(latency), int(status), gen, source == "replica"))
        rows.sort()
        return Requests(
            start=np.array([r[0] for r in rows], np.float64),
            latency=np.array([r[1] for r in rows], np.float64),
            status=np.array([r[2] for r in rows], np.int64),
            generation=np.array([r[3] for r in rows], np.int64),
            replica=np.array([r[4] for r in rows], np.bool_),
        )

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the proxy's side: admin API, /metrics and /proc --------------------------------------


class Admin:
    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("GET", "/admin/status")
        return answer

    def rebuild(self, collection: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._call("POST", "/admin/rebuild", {"collection": collection})
        return answer

    def replica(self, collection_id: str) -> dict[str, Any] | None:
        for replica in self.status()["replicas"]:
            if replica["collection_id"] == collection_id:
                found: dict[str, Any] = replica
                return found
        return None


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of a process, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_BUCKET = re.compile(LAG_METRIC + r'_bucket\{le="([^"]+)"\} ([0-9.e+]+)')


def lag_histogram(base: str) -> list[float]:
    """Cumulative counts of the proxy's event-loop lag histogram, in bucket order."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return [float(count) for _, count in _BUCKET.findall(text)]


def lag_bounds(base: str) -> list[float]:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return [float(le) for le, _ in _BUCKET.findall(text)]  # the last one is +Inf


@dataclass
class Sample:
    t: float  # monotonic, when the sample was complete
    rss: dict[str, int]
    cpu: dict[str, float | None]
    lag_max_s: float | None
    lag_buckets: list[float]
    generation: int | None
    building: bool
    swaps: int | None
    admin_ms: float | None  # how long /admin/status took to answer (a stall delays it too)


@dataclass
class Sampler:
    """Samples the proxy every SAMPLE_S seconds in a thread of its own."""

    admin: Admin
    base: str
    collection_id: str
    pids: dict[str, int]
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.samples.append(self._sample())
            next_at += SAMPLE_S
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _sample(self) -> Sample:
        rss = proc_status(self.pids["proxy"])
        cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        lag = generation = swaps = admin_ms = None
        building, buckets = False, []
        try:
            asked = time.monotonic()
            status = self.admin.status()
            admin_ms = (time.monotonic() - asked) * 1000
            lag, swaps = float(status["event_loop_lag_max_s"]), int(status["swaps"])
            building = status["sync"]["building"] is not None
            for replica in status["replicas"]:
                if replica["collection_id"] == self.collection_id:
                    generation = int(replica["generation"])
            buckets = lag_histogram(self.base)
        except (OSError, ValueError, KeyError) as exc:  # keep sampling; report it
            self.errors.append(f"{time.monotonic():.1f}: {exc}")
        return Sample(time.monotonic(), rss, cpu, lag, buckets, generation, building, swaps,
                      admin_ms)  # fmt: skip


# --- the run ------------------------------------------------------------------------------


@dataclass
class Swap:
    before: int  # generation
    after: int
    requested_at: float  # POST /admin/rebuild sent (monotonic)
    seen_at: float  # /admin/status first showed the new generation (polled every 0.1 s)
    first_new_answer: float = float("nan")  # first answer from the new generation (its end)
    first_new_start: float = float("nan")  # earliest start of a request answered by it
    last_old_answer: float = float("nan")  # last answer from the old generation (its end)
    export_done: float = float("nan")  # from the proxy's log ("export NAME: N rows in Xs")

    @property
    def at(self) -> float:
        """The swap moment used for windows: the first answer the new generation gave."""
        return self.first_new_answer if np.isfinite(self.first_new_answer) else self.seen_at


def main() -> None:
    args = _args()
    vectors, queries = dataset(args.rows, args.dim, args.queries)
    bodies = query_bodies(queries)
    token = secrets.token_hex(16)
    data_dir = Path(args.data_dir) if args.data_dir else None
    # Cache off (every request a real search); no periodic refresh (only our rebuilds swap).
    proxy_args = ("--replicate", "", "--build-threads", str(args.build_threads),
                  "--max-staleness-s", "86400", "--refresh-interval-s", "86400",
                  "--cache-max-bytes", "0", "--admin-token", token)  # fmt: skip
    out = Path(args.out)
    with Proxy(*proxy_args, data_dir=data_dir) as proxy:
        cid = _ensure_loaded(proxy.primary_url, vectors)
        rss_empty = proc_status(proxy.process.pid)["VmRSS"]
        memory = {"empty": smaps(proxy.process.pid)}
        url = f"{proxy.url}{D}/collections/{cid}/query"
        build_s = _wait_serving(url, bodies[0])
        print(f"first replica serving after {build_s:.1f} s", flush=True)
        admin = Admin(proxy.url, token)
        replica = admin.replica(cid)
        assert replica is not None
        pids = {"proxy": proxy.process.pid}
        for i, child in enumerate(children(proxy.process.pid)):
            pids["primary" if i == 0 else f"primary-{i}"] = child
        sampler = Sampler(admin, proxy.url, cid, pids)
        bounds = lag_bounds(proxy.url)
        sampler.start()
        time.sleep(2 * SAMPLE_S)
        load = WrkLoad(url, bodies, args.connections, args.think_ms)
        pids["wrk"] = load.pid
        swaps: list[Swap] = []
        try:
            print(f"phase 1: steady load for {args.steady} s", flush=True)
            time.sleep(args.steady)
            memory["before"] = smaps(proxy.process.pid)
            for k in range(args.swaps):
                swaps.append(_swap(admin, cid, k, args))
                time.sleep(args.settle)
            memory["after"] = smaps(proxy.process.pid)
            load.stop()
        finally:
            sampler.stop()
            if not load.summary:
                load.cleanup()
        requests = load.requests()
        load.cleanup()
        final = admin.replica(cid)
        log = proxy.logs()
    wall_minus_mono = time.time() - time.monotonic()
    _export_times(log, swaps, wall_minus_mono)
    for s in swaps:
        _locate_swap(s, requests)
    results = _analyse(args, requests, sampler, swaps, load, bounds)
    results.update(
        rows=args.rows, dim=args.dim, first_build_s=round(build_s, 1),
        replica_rows=replica["rows"], replica_file_mb=_mb(replica["bytes"]),
        final_generation=None if final is None else final["generation"],
        rss_mb_empty_proxy=_mb(rss_empty), sampler_errors=sampler.errors[:20],
        memory_mb=memory,
        proxy_warnings=[x for x in log.splitlines() if " WARNING " in x or " ERROR " in x][:20],
    )  # fmt: skip
    t0 = load.started
    _plot(requests, sampler.samples, swaps, t0, bounds, out / "swap.png")
    results["plot"] = str(out / "swap.png")
    raw = out / "swap-requests.npz"
    np.savez_compressed(raw, start_s=requests.start - t0, latency_s=requests.latency,
                        status=requests.status, generation=requests.generation,
                        replica=requests.replica,
                        swaps_at_s=np.array([s.at - t0 for s in swaps]),
                        rebuilds_at_s=np.array([s.requested_at - t0 for s in swaps]))  # fmt: skip
    results["raw_requests"] = str(raw)
    write_report(out, "swap", results, _markdown(results))


def _wait_serving(url: str, body: str, timeout_s: float = 900.0) -> float:
    """The first query triggers the on-demand build; time until a replica answers."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        req = urllib.request.Request(url, data=body.encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=60) as resp:
            if resp.headers.get("X-Proxy-Source") == "replica":
                return time.monotonic() - started
        time.sleep(0.2)
    raise TimeoutError("the replica did not start serving")


def _swap(admin: Admin, cid: str, k: int, args: argparse.Namespace) -> Swap:
    current = admin.replica(cid)
    assert current is not None
    before = int(current["generation"])
    requested = time.monotonic()
    admin.rebuild(cid)
    print(f"phase 2: swap {k + 1}/{args.swaps}: rebuild requested", flush=True)
    deadline = requested + args.swap_timeout
    while time.monotonic() < deadline:
        now = admin.replica(cid)
        if now is not None and int(now["generation"]) != before:
            seen = time.monotonic()
            print(f"  generation {before} -> {now['generation']} after "
                  f"{seen - requested:.1f} s; settling {args.settle} s", flush=True)  # fmt: skip
            return Swap(before, int(now["generation"]), requested, seen)
        time.sleep(0.1)
    raise TimeoutError(f"no new generation {args.swap_timeout} s after rebuild {k + 1}")


def _locate_swap(swap: Swap, r: Requests) -> None:
    """Bracket the swap with the answers: the first answer of the new generation ends after
    it, and the earliest request answered by the new generation started before it."""
    new, old = r.generation == swap.after, r.generation == swap.before
    if new.any():
        swap.first_new_answer = float(r.end[new].min())
        swap.first_new_start = float(r.start[new].min())
    if old.any():
        swap.last_old_answer = float(r.end[old].max())


_LOG_TIME = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
_EXPORT_DONE = re.compile(_LOG_TIME + r".*: export \S+: \d+ rows in ", re.M)


def _export_times(log: str, swaps: list[Swap], wall_minus_mono: float) -> None:
    """The end of each rebuild's export, from the proxy's log (wall clock, millisecond
    resolution, converted to the monotonic clock): the last export that ended before the swap."""
    ends = []
    for match in _EXPORT_DONE.finditer(log):
        wall = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        ends.append(wall - wall_minus_mono)
    for s in swaps:
        inside = [t for t in ends if s.requested_at - 0.01 <= t <= s.at]
        if inside:
            s.export_done = max(inside)


def smaps(pid: int) -> dict[str, Any]:
    """Where the proxy's resident memory is (MiB): the glibc main heap, glibc thread arenas
    (anonymous mappings aligned to their 64 MiB reservation), other anonymous mappings
    (pymalloc arenas, large blocks, numpy arrays, stacks), and mapped snapshot files (a
    replaced generation still mapped would show here, "(deleted)" once pruned)."""
    out: dict[str, float] = {"heap": 0.0, "thread_arenas": 0.0, "other_anon": 0.0, "files": 0.0}
    snapshot_files: dict[str, float] = {}
    category, name = "files", ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            start = int(head[0].split("-")[0], 16)
            name = head[5] if len(head) > 5 else ""
            if name == "[heap]":
                category = "heap"
            elif name == "" and start % (64 << 20) == 0:
                category = "thread_arenas"
            elif name == "" or name.startswith("[stack"):
                category = "other_anon"
            else:
                category = "files"
        elif head[0] == "Rss:":
            mb = int(head[1]) / 1024
            out[category] += mb
            if "/snapshots/" in name:
                snapshot_files[name] = snapshot_files.get(name, 0.0) + mb
    return {**{k: round(v, 1) for k, v in out.items()},
            "snapshot_files": {k: round(v, 1) for k, v in snapshot_files.items()}}  # fmt: skip


# --- analysis -----------------------------------------------------------------------------


def _latency(r: Requests, mask: npt.NDArray[np.bool_], seconds: float) -> dict[str, Any]:
    ms = r.latency[mask] * 1000
    ok = int((r.status[mask] == 200).sum())
    n = int(mask.sum())
    out: dict[str, Any] = {
        "requests": n,
        "non_200": n - ok,
        "not_replica": int((~r.replica[mask]).sum()),
        "qps": round(n / seconds, 1) if seconds > 0 else None,
    }
    for q in (50, 99, 99.9):
        out[f"p{q}_ms"] = round(float(np.percentile(ms, q)), 2) if len(ms) else None
    out["max_ms"] = round(float(ms.max()), 2) if len(ms) else None
    return out


def _lag_in(samples: list[Sample], bounds: list[float], a: float, b: float) -> dict[str, Any]:
    """Longest event-loop stall in the window [a, b], from the proxy's own measurements.

    Two sources, both sampled every 0.5 s. (1) The gauge event_loop_lag_max_s (max over the last
    10 s): whenever it rises between two samples, a stall of exactly the new value ended between
    them. A stall shorter than one in the 10 s before it does not raise the gauge, so (2) the
    histogram's per-interval increments bound the longest stall of the window to a bucket.
    An interval belongs to the window where its longest stall began at the latest
    (max(interval start, interval end - stall)): a 400 ms stall that ended just after a phase
    boundary is counted in the phase it happened in. Still approximate at the edges."""
    counts = np.zeros(len(bounds))
    rises: list[float] = []
    for prev, cur in itertools.pairwise(samples):
        if not len(cur.lag_buckets) == len(bounds) == len(prev.lag_buckets):
            continue
        inc = np.array(cur.lag_buckets) - np.array(prev.lag_buckets)
        per = np.diff(np.concatenate([[0.0], inc]))
        top = int(np.flatnonzero(per > 0).max()) if (per > 0).any() else -1
        longest = bounds[top - 1] if top > 0 else 0.0  # at least this long
        rise = cur.lag_max_s if (cur.lag_max_s or 0.0) > (prev.lag_max_s or 0.0) else None
        if rise is not None:
            longest = max(longest, rise)
        began = max(prev.t, cur.t - longest)
        if not a < began <= b:
            continue
        if rise is not None:
            rises.append(rise)
        counts += inc
    per_bucket = np.diff(np.concatenate([[0.0], counts]))
    top = int(np.flatnonzero(per_bucket > 0).max()) if (per_bucket > 0).any() else -1
    lo = 0.0 if top <= 0 else bounds[top - 1]
    hi = bounds[top] if top >= 0 else 0.0
    gauge = max(rises, default=0.0)
    exact = top >= 0 and lo < gauge <= hi
    over = {f"stalls_over_{int(x * 1000)}ms": int(counts[-1] - counts[bounds.index(x)])
            for x in (0.01, 0.05, 0.1) if x in bounds}  # fmt: skip
    return {
        "longest_ms": round((gauge if exact else hi) * 1000, 1),
        "exact": exact,  # False: only the histogram bucket (lo, hi] is known
        "bucket_ms": [round(lo * 1000, 1), round(hi * 1000, 1)],
        "gauge_rise_ms": round(gauge * 1000, 1),
        "ticks": int(counts[-1]),
        **over,
    }


def _analyse(
    args: argparse.Namespace,
    r: Requests,
    sampler: Sampler,
    swaps: list[Swap],
    load: WrkLoad,
    bounds: list[float],
) -> dict[str, Any]:
    t0 = load.started
    samples = sampler.samples
    end = t0 + load.wall_s
    steady_a, steady_b = t0 + 1.0, swaps[0].requested_at if swaps else end
    nexts = [s.requested_at for s in swaps[1:]] + [end]
    # Without the log line the export's end is unknown: those spans are left out.
    split = [s for s in swaps if np.isfinite(s.export_done)]
    windows: dict[str, list[tuple[float, float]]] = {
        STEADY: [(steady_a, steady_b)],
        REBUILD: [(s.requested_at, s.at + 1.0) for s in swaps],
        EXPORT: [(s.requested_at, s.export_done) for s in split],
        BUILD: [(s.export_done, s.at) for s in split],
        AROUND: [(s.at - 1.0, s.at + 1.0) for s in swaps],
        AFTER_SWAP: [(s.at, s.at + 1.0) for s in swaps],
        SETTLED: [(s.at + 1.0, nxt) for s, nxt in zip(swaps, nexts, strict=True)],
    }
    out: dict[str, Any] = {"windows": {}}
    for name, spans in windows.items():
        mask = np.zeros(len(r.start), np.bool_)
        for a, b in spans:
            mask |= r.started_in(a, b)
        entry = _latency(r, mask, sum(b - a for a, b in spans))
        entry["per_swap"] = [_latency(r, r.started_in(a, b), b - a) for a, b in spans]
        lags = [_lag_in(samples, bounds, a, b) for a, b in spans]
        entry["lag_per_span"] = lags
        worst = max(lags, key=lambda x: x["longest_ms"]) if lags else None
        entry["lag"] = worst
        entry["spans_s"] = [[round(a - t0, 2), round(b - t0, 2)] for a, b in spans]
        out["windows"][name] = entry
    steady = out["windows"][STEADY]
    for name in windows:
        w = out["windows"][name]
        w["p99_ratio_to_steady"] = (
            round(w["p99_ms"] / steady["p99_ms"], 2) if w["p99_ms"] and steady["p99_ms"] else None
        )
    # The gauge directly, over the steady phase: samples at least 10 s into the load cover
    # only the load's own stalls.
    steady_gauge = [s.lag_max_s for s in samples if steady_a + LAG_WINDOW_S <= s.t <= steady_b
                    and s.lag_max_s is not None]  # fmt: skip
    out["steady_gauge_max_ms"] = round(max(steady_gauge) * 1000, 1) if steady_gauge else None
    out["rss_mb"] = _rss(samples, swaps, steady_a, steady_b, end)
    out["swaps"] = [
        {"before": s.before, "after": s.after, "rebuild_s": round(s.at - s.requested_at, 2),
         "export_s": round(s.export_done - s.requested_at, 2),
         "at_s": round(s.at - t0, 3), "seen_by_admin_s": round(s.seen_at - t0, 2),
         "bracket_ms": round((s.first_new_answer - s.first_new_start) * 1000, 2),
         "old_answers_until_ms_after": round((s.last_old_answer - s.at) * 1000, 1)}
        for s in swaps
    ]  # fmt: skip
    total = _latency(r, np.ones(len(r.start), np.bool_), load.wall_s)
    summ = load.summary
    socket_errors = sum(int(summ.get(k, 0)) for k in ("connect", "read", "write", "timeout"))
    out["totals"] = {
        **total, "socket_errors": socket_errors, "wrk_non_2xx": int(summ.get("non_2xx", 0)),
        "wrk_requests": int(summ.get("requests", 0)),
        "wrk_p99_ms": round(summ.get("p99_us", 0) / 1000, 2),
        "wrk_max_ms": round(summ.get("max_us", 0) / 1000, 2),
        "recorded_p99_ms": total["p99_ms"],
        "errors": total["non_200"] + socket_errors,
    }  # fmt: skip
    cpu = _cpu(samples, t0, steady_b)
    out["load"] = {
        "connections": args.connections, "think_ms": args.think_ms,
        "build_threads": args.build_threads,
        "wrk_cpu_share_of_one_core": round(load.cpu_s / load.wall_s, 3) if load.wall_s else None,
        "steady_cpu_cores": cpu,
        "cores": os.cpu_count(),
    }  # fmt: skip
    return out


def _cpu(samples: list[Sample], a: float, b: float) -> dict[str, float]:
    inside = [s for s in samples if a <= s.t <= b]
    if len(inside) < 2:
        return {}
    first, last = inside[0], inside[-1]
    out = {}
    for name, end in last.cpu.items():
        begin = first.cpu.get(name)
        if end is not None and begin is not None:
            out[name] = round((end - begin) / (last.t - first.t), 2)
    return out


def _rss(
    samples: list[Sample], swaps: list[Swap], steady_a: float, steady_b: float, end: float
) -> dict[str, Any]:
    def mb(key: str, a: float, b: float, how: str) -> float | None:
        values = [s.rss[key] for s in samples if a <= s.t <= b and key in s.rss]
        if not values:
            return None
        return _mb(float(np.median(values)) if how == "median" else float(max(values)))

    after_a = max(end - 3.0, swaps[-1].at + 1.0) if swaps else end - 3.0
    out: dict[str, Any] = {}
    for key in ("VmRSS", "RssAnon", "RssFile"):
        out[key] = {
            "before": mb(key, steady_a, steady_b, "median"),
            "peak": mb(key, steady_b, end, "max"),
            "after": mb(key, after_a, end, "median"),
            "peak_per_swap": [
                mb(key, s.requested_at, nxt.requested_at if nxt else end, "max")
                for s, nxt in zip(swaps, [*swaps[1:], None], strict=True)
            ],
            "after_per_swap": [
                mb(key, (nxt.requested_at if nxt else end) - 3.0,
                   nxt.requested_at if nxt else end, "median")
                for nxt in [*swaps[1:], None]
            ],
        }  # fmt: skip
    return out


def _mb(n: float) -> float:
    return round(n / 2**20, 1)


# --- the picture --------------------------------------------------------------------------


def _plot(
    r: Requests, samples: list[Sample], swaps: list[Swap], t0: float, bounds: list[float],
    path: Path,
) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(12, 13), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.4, 1.4, 1.4]})  # fmt: skip
    lat, mem, lag, cpu = axes
    x = r.start - t0
    lat.scatter(x, r.latency * 1000, s=1, c="lightsteelblue", rasterized=True, label="request")
    bad = r.status != 200
    if bad.any():
        lat.scatter(x[bad], r.latency[bad] * 1000, s=8, c="red", label="non-200")
    bins = np.floor(x / 0.1).astype(np.int64)
    if len(bins):
        starts, p50, p99 = [], [], []
        order = np.argsort(bins, kind="stable")
        edges = np.flatnonzero(np.diff(bins[order])) + 1
        for group in np.split(order, edges):
            starts.append(bins[group[0]] * 0.1 + 0.05)
            ms = r.latency[group] * 1000
            p50.append(float(np.percentile(ms, 50)))
            p99.append(float(np.percentile(ms, 99)))
        lat.plot(starts, p50, lw=0.8, c="tab:blue", label="p50 per 100 ms")
        lat.plot(starts, p99, lw=0.8, c="tab:orange", label="p99 per 100 ms")
    lat.set(ylabel="latency (ms)", yscale="log",
            title="Query latency (by start time), cache off; swaps (first answer of the new "
            "generation) red, export done grey dashed, rebuilds shaded")  # fmt: skip
    ts = [s.t - t0 for s in samples]
    for key, style in (("VmRSS", "-"), ("RssAnon", "--"), ("RssFile", ":")):
        mem.plot(ts, [s.rss.get(key, 0) / 2**20 for s in samples], style, label=key)
    mem.set(ylabel="proxy RSS (MiB)")
    lag.step(ts, [(s.lag_max_s or 0) * 1000 for s in samples], where="post",
             label="event_loop_lag_max_s (max of last 10 s)")  # fmt: skip
    tops_t, tops = [], []
    for prev, cur in itertools.pairwise(samples):
        if len(cur.lag_buckets) == len(bounds) == len(prev.lag_buckets):
            per = np.diff(np.concatenate([[0.0], np.array(cur.lag_buckets)
                                          - np.array(prev.lag_buckets)]))  # fmt: skip
            if (per > 0).any():
                top = int(np.flatnonzero(per > 0).max())
                tops_t.append(cur.t - t0)
                tops.append(min(bounds[top], 2.0) * 1000)
    lag.scatter(tops_t, tops, s=6, c="tab:red", label="largest histogram bucket in 0.5 s (upper)")
    lag.set(ylabel="loop stall (ms)", yscale="log")
    names = list(samples[-1].cpu) if samples else []
    for name in names:
        pts = [(b.t - t0, ((b.cpu[name] or 0) - (a.cpu[name] or 0)) / (b.t - a.t) * 100)
               for a, b in itertools.pairwise(samples)
               if a.cpu.get(name) is not None and b.cpu.get(name) is not None]  # fmt: skip
        if pts:
            cpu.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, label=f"{name} CPU %")
    cpu.set(ylabel="CPU % (100 = 1 core)", xlabel="seconds since the load started")
    for ax in axes:
        for s in swaps:
            ax.axvspan(s.requested_at - t0, s.at - t0, color="gold", alpha=0.15)
            if np.isfinite(s.export_done):
                ax.axvline(s.export_done - t0, color="grey", lw=0.8, ls="--")
            ax.axvline(s.at - t0, color="red", lw=0.8)
        ax.legend(loc="upper left", fontsize=7, markerscale=3)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the report ---------------------------------------------------------------------------


def _fmt_lag(lag: dict[str, Any] | None) -> str:
    if lag is None:
        return "-"
    if lag["exact"]:
        return f"{lag['longest_ms']}"
    lo, hi = lag["bucket_ms"]
    return f"{lo}-{hi} (bucket)"


def _markdown(res: dict[str, Any]) -> str:
    w, rss, load, tot = res["windows"], res["rss_mb"], res["load"], res["totals"]
    steady, rb, around = w[STEADY], w[REBUILD], w[AROUND]
    lines = [
        f"# Swap under load: {res['rows']} x {res['dim']} clustered, cosine, top-10, cache off",
        "",
        f"Load: wrk closed loop, {load['connections']} connections, {load['think_ms']} ms think "
        f"time; {tot['requests']} requests in total ({tot['qps']} req/s). Build threads: "
        f"{load['build_threads']}. First replica built in {res['first_build_s']} s; replica "
        f"{res['replica_rows']} rows, {res['replica_file_mb']} MiB of snapshot files. CPU in "
        f"steady state (cores): {load['steady_cpu_cores']}; wrk used "
        f"{load['wrk_cpu_share_of_one_core']} of one core over the run. Plot: {res['plot']}.",
        "",
        "| swap | generation before -> after | export s | rebuild s (request to first new "
        "answer) | at s | last old-generation answer (ms after) |",
        "|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(res["swaps"], 1):
        lines.append(f"| {i} | {s['before']} -> {s['after']} | {s['export_s']} "
                     f"| {s['rebuild_s']} | {s['at_s']} "
                     f"| {s['old_answers_until_ms_after']} |")  # fmt: skip
    lines += [
        "",
        "| window (requests by start time; swaps pooled) | requests | req/s | p50 ms | p99 ms "
        "| p99.9 ms | max ms | p99 / steady | errors | longest loop stall ms "
        "| loop stalls > 50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in w.items():
        ratio = "-" if name == STEADY else e["p99_ratio_to_steady"]
        lines.append(
            f"| {name} | {e['requests']} | {e['qps']} | {e['p50_ms']} | {e['p99_ms']} "
            f"| {e['p99.9_ms']} | {e['max_ms']} | {ratio} | {e['non_200']} "
            f"| {_fmt_lag(e['lag'])}{'*' if name in (AROUND, AFTER_SWAP) else ''} "
            f"| {sum(x.get('stalls_over_50ms', 0) for x in e['lag_per_span'])} |"
        )
    lines += ["", "\\* 1-2 s windows: the 0.5 s lag samples cannot place a stall within them "
              "reliably; their max latency is the better evidence (see below)."]  # fmt: skip
    split = [n for n in (EXPORT, BUILD) if len(w[n]["per_swap"]) == len(res["swaps"])]
    lines += ["", "Per swap, p99 ms (longest loop stall ms):", ""]
    names = [REBUILD, *split, AROUND, AFTER_SWAP, SETTLED]
    lines += ["| swap | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i in range(len(res["swaps"])):
        cells = [f"{w[n]['per_swap'][i]['p99_ms']} ({_fmt_lag(w[n]['lag_per_span'][i])})"
                 for n in names]  # fmt: skip
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    vm = rss["VmRSS"]
    lines += [
        "",
        "| RSS MiB | empty proxy | before (steady median) | peak (during swaps) "
        "| after (last 3 s, median) | peak per swap | after per swap (3 s median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ("VmRSS", "RssAnon", "RssFile"):
        e = rss[key]
        empty = res["rss_mb_empty_proxy"] if key == "VmRSS" else "-"
        lines.append(f"| {key} | {empty} | {e['before']} | {e['peak']} | {e['after']} "
                     f"| {e['peak_per_swap']} | {e['after_per_swap']} |")  # fmt: skip
    mem = res["memory_mb"]
    lines += ["", "| resident MiB (smaps) | heap | thread arenas | other anon | files "
              "| snapshot files mapped |", "|---|---|---|---|---|---|"]  # fmt: skip
    for when in ("empty", "before", "after"):
        m = mem.get(when)
        if m:
            snaps = "; ".join(f"{Path(k).parent.name}/{Path(k).name}: {v}"
                              for k, v in m["snapshot_files"].items()) or "-"  # fmt: skip
            lines.append(f"| {when} | {m['heap']} | {m['thread_arenas']} | {m['other_anon']} "
                         f"| {m['files']} | {snaps} |")  # fmt: skip
    grown = None if vm["after"] is None or vm["before"] is None else vm["after"] - vm["before"]
    one = None if vm["before"] is None else vm["before"] - res["rss_mb_empty_proxy"]
    lines += [
        "",
        "## Summary against the targets",
        "",
        f"* Longest event-loop stall (the proxy's lag metric): steady {_fmt_lag(steady['lag'])} ms "
        f"(gauge max over the steady phase: {res['steady_gauge_max_ms']} ms); within the "
        f"rebuild windows {_fmt_lag(rb['lag'])} ms; within swap +-1 s {_fmt_lag(around['lag'])} "
        "ms.",
        f"* p99: steady {steady['p99_ms']} ms; whole rebuild windows {rb['p99_ms']} ms "
        f"(**{rb['p99_ratio_to_steady']}x**); swap +-1 s {around['p99_ms']} ms "
        f"(**{around['p99_ratio_to_steady']}x**); target <= 1.5x.",
        f"* Errors: {tot['errors']} (non-200 {tot['non_200']}, socket errors "
        f"{tot['socket_errors']}); answers not from the replica: {tot['not_replica']}; "
        "target 0.",
        f"* RSS: empty proxy {res['rss_mb_empty_proxy']} MiB, with one replica {vm['before']} "
        f"MiB (so one replica ~ {None if one is None else round(one, 1)} MiB), peak "
        f"{vm['peak']} MiB, after the swaps {vm['after']} MiB (after - before = "
        f"{None if grown is None else round(grown, 1)} MiB).",
        f"* Load generator: {tot['requests']} requests recorded, {tot['wrk_requests']} counted "
        f"by wrk; max latency recorded {tot['max_ms']} ms, wrk's own {tot['wrk_max_ms']} ms. "
        f"(wrk's p99, {tot['wrk_p99_ms']} ms vs {tot['recorded_p99_ms']} ms recorded, is "
        "not comparable: wrk adds synthetic samples to correct for coordinated omission.)",
    ]
    if res.get("proxy_warnings"):
        lines += ["", "Proxy warnings/errors in its log:", ""]
        lines += [f"    {x}" for x in res["proxy_warnings"]]
    lines += [
        "",
        "## What the numbers measure",
        "",
        "* Latency: client-side, wrk (C, with a LuaJIT script timing each request on "
        "CLOCK_MONOTONIC), from just before the request is written to the full response. "
        "Requests are put in windows by start time; p99 pools all swaps, per swap below it.",
        "* Rebuild window: from POST /admin/rebuild to 1 s after the first answer of the new "
        "generation. It includes the export (the primary serves 250-row pages on the same "
        "cores; the proxy decodes them), the HNSW build, validation and publishing in proxy "
        "threads: its p99 measures CPU and GIL competition with the searches as much as the "
        "swap. The export/build split uses the proxy's log line at the export's end "
        "(millisecond wall clock). The swap +-1 s window holds the last second of the "
        "build/publish and the first second on the new replica; swap to swap + 1 s isolates "
        "the swap itself (rebinding, freeing the old replica, pruning).",
        "* The swap moment is the end of the first answer carrying the new generation; the "
        "real swap lies between that request's start and end.",
        "* Loop stalls: the proxy's own lag metric (how late a 5 ms timer fires), sampled every "
        "0.5 s: exact where the 10 s max gauge rose in the window, otherwise a histogram bucket "
        "(range); each 0.5 s interval goes to the window where its longest stall began at the "
        "latest. Window edges are fuzzy by one 0.5 s sample, coarse for the 1-2 s windows; "
        "there the client's max latency is the sharper evidence: at this load a request is "
        "sent every couple of milliseconds, so a stall of X ms shows as a latency of about X "
        "ms in the window where it happened.",
        "* RSS: VmRSS of the proxy process (/proc), split into anonymous and file-backed pages "
        "(the vectors are memory-mapped from the snapshot). The empty-proxy figure is before "
        "the first replica was built. smaps classifies resident memory by mapping.",
    ]
    return "\n".join(lines) + "\n"


def _args() -> argparse.Namespace:
    parser = dataset_args(__doc__ or "")
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--steady", type=float, default=20.0, help="phase 1 seconds")
    parser.add_argument("--settle", type=float, default=12.0,
                        help="seconds after each swap before the next rebuild")  # fmt: skip
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--think-ms", type=int, default=5)
    parser.add_argument("--build-threads", type=int, default=1)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--swap-timeout", type=float, default=600.0)
    return parser.parse_args()


if __name__ == "__main__":
    main()
