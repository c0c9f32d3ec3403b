"""Shared pieces of the benchmarks: processes, reproducible data, and the wrk load generator.

The load generator is wrk (Debian's package; `bench/setup.sh` installs it), a separate C
process, so the numbers measure the server under test rather than a Python client.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

BIN = Path(sys.executable).parent
D = "/api/v2/tenants/default_tenant/databases/default_database"

# wrk runs this script: it cycles through the request bodies in `bodies` and prints the latency
# percentiles as one JSON line when done.
_LUA = """
local bodies = {%s}
local i = 0
wrk.method = "%s"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  if #bodies == 0 then return wrk.format(nil, nil) end
  return wrk.format(nil, nil, nil, bodies[(i %% #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p95_us":%%d,"p99_us":%%d,' ..
    '"max_us":%%d,"errors":%%d,"non_2xx":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass
class LoadResult:
    """One wrk run: throughput and latency percentiles in milliseconds."""

    qps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    non_2xx: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def wrk(
    url: str,
    *,
    connections: int,
    seconds: int,
    method: str = "GET",
    bodies: list[str] | None = None,
) -> LoadResult:
    """Offer closed-loop load with ``connections`` concurrent connections (one wrk thread)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: run `bash bench/setup.sh` (Debian's wrk package)")
    quoted = ",".join(json.dumps(b) for b in (bodies or []))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_LUA % (quoted, method))
    try:
        run = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script.name, url],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            raise RuntimeError(f"wrk failed: {run.stdout} {run.stderr}")
        out = run.stdout
    finally:
        os.unlink(script.name)
    line = next(line for line in out.splitlines() if line.startswith("WRKJSON "))
    raw = json.loads(line.removeprefix("WRKJSON "))
    return LoadResult(
        qps=raw["requests"] / (raw["duration_us"] / 1e6),
        p50_ms=raw["p50_us"] / 1000,
        p95_ms=raw["p95_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        requests=raw["requests"],
        errors=raw["errors"],
        non_2xx=raw["non_2xx"],
    )


def clustered(
    n: int, dim: int, clusters: int, seed: int, spread: float = 0.35
) -> npt.NDArray[np.float32]:
    """Gaussian clusters (as in chroma-wire.md section 8.3): realistic, so HNSW is exact."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, size=n)
    noise = rng.normal(scale=spread, size=(n, dim)).astype(np.float32)
    out: npt.NDArray[np.float32] = centres[labels] + noise
    return out


_BANNER = re.compile(rb"serving on http://([\d.]+):(\d+) -> \w+ primary (\S+)")


class Proxy:
    """`replica-proxy serve` with an embedded primary, both torn down on exit."""

    def __init__(self, *args: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="replica-bench-"))
        self.log = open(self.dir / "proxy.log", "wb")  # noqa: SIM115
        argv = [str(BIN / "replica-proxy"), "serve", "--listen", "127.0.0.1:0"]
        argv += ["--data-dir", str(self.dir), "--no-access-log", *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log)
        banner = self._banner()
        match = _BANNER.search(banner)
        assert match is not None, banner
        self.url = f"http://127.0.0.1:{int(match.group(2))}"
        self.primary_url = match.group(3).decode()

    def _banner(self) -> bytes:
        assert self.proc.stdout is not None
        fd, out, deadline = self.proc.stdout.fileno(), b"", time.monotonic() + 120
        while b"Stop: Ctrl-C" not in out:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            chunk = os.read(fd, 4096) if ready else b""
            if not chunk:
                raise RuntimeError(f"proxy did not start; see {self.dir / 'proxy.log'}")
            out += chunk
        return out

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def call(base: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=600) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def load_collection(
    base: str,
    name: str,
    vectors: npt.NDArray[np.float32],
    space: str = "l2",
    batch: int = 2000,
) -> str:
    """Create ``name`` and add the vectors with metadata and documents; returns its id."""
    body = {"name": name, "configuration": {"hnsw": {"space": space}}, "get_or_create": True}
    cid: str = call(base, "POST", f"{D}/collections", body)["id"]
    topics = ["news", "sports", "science", "art", "travel"]
    for start in range(0, len(vectors), batch):
        rows = range(start, min(start + batch, len(vectors)))
        call(
            base,
            "POST",
            f"{D}/collections/{cid}/add",
            {
                "ids": [f"r{i}" for i in rows],
                "embeddings": vectors[start : start + len(rows)].tolist(),
                "metadatas": [{"topic": topics[i % 5], "n": i} for i in rows],
                "documents": [f"row {i} about {topics[i % 5]}" for i in rows],
            },
        )
    return cid


def write_report(directory: Path, name: str, data: dict[str, Any], markdown: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (directory / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"written: {directory / (name + '.json')} and .md")
