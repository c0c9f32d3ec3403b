"""Shared pieces of the benchmarks: processes, reproducible data, and the wrk load generator.

The load generator is wrk (Debian's package; `bench/setup.sh` installs it), a separate C
process, so the numbers measure the server under test rather than a Python client.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.helpers import ProxyProcess

D = "/api/v2/tenants/default_tenant/databases/default_database"

# wrk runs this script: it cycles through the request bodies in `bodies` and prints the latency
# percentiles as one JSON line when done.
_LUA = """
local bodies = {%s}
local i = 0
wrk.method = "%s"
wrk.headers["Content-Type"] = "application/json"
%s
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
    headers: dict[str, str] | None = None,
    cpu: int | None = None,
) -> LoadResult:
    """Offer closed-loop load with ``connections`` concurrent connections (one wrk thread);
    ``cpu``: pinned to that CPU with taskset."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: run `bash bench/setup.sh` (Debian's wrk package)")
    quoted = ",".join(json.dumps(b) for b in (bodies or []))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        extra = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}"
                          for k, v in (headers or {}).items())  # fmt: skip
        script.write(_LUA % (quoted, method, extra))
    try:
        run = subprocess.run(
            [
                *([] if cpu is None else ["taskset", "-c", str(cpu)]),
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "-s",
                script.name,
                url,
            ],
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


def dataset(
    rows: int, dim: int, queries: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The benchmarks' collection (200 clusters) and query vectors near random rows of it,
    the same in every script for the same sizes."""
    vectors = clustered(rows, dim, clusters=200, seed=7)
    rng = np.random.default_rng(11)
    picks = rng.choice(rows, size=queries, replace=False)
    noise = rng.normal(scale=0.1, size=(queries, dim))
    return vectors, (vectors[picks] + noise).astype(np.float32)


def query_bodies(queries: npt.NDArray[np.float32]) -> list[str]:
    """Top-10 query bodies, distances only (what the throughput benchmarks send)."""
    return [
        json.dumps({"query_embeddings": [q.tolist()], "n_results": 10, "include": ["distances"]})
        for q in queries
    ]


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


class Proxy:
    """`replica-proxy serve` with an embedded primary (the tests' ProxyProcess), torn down on
    exit together with its temporary directory."""

    def __init__(self, *args: str, data_dir: Path | None = None) -> None:
        """``data_dir`` keeps the embedded primary's data between runs; snapshots always go
        to a fresh temporary directory, so every run measures a full export and build."""
        self.dir = Path(tempfile.mkdtemp(prefix="replica-bench-"))
        self.process = ProxyProcess(
            "--data-dir", str(data_dir or self.dir), "--no-access-log",
            "--snapshot-dir", str(self.dir / "snapshots"), *args, log_dir=self.dir,
        )  # fmt: skip
        self.url = self.process.url
        self.primary_url = self.process.primary_url

    def logs(self) -> str:
        return self.process.logs()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stop()
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


def dataset_args(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark on the 100k-row dataset takes."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--data-dir", help="keep the primary's data here between runs")
    parser.add_argument("--out", default="bench/results")
    return parser


def write_report(directory: Path, name: str, data: dict[str, Any], markdown: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (directory / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"written: {directory / (name + '.json')} and .md")


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found
