"""Replica path vs the primary, side by side on the same data, in one run.

    bash bench/setup.sh                      # wrk, once
    .venv/bin/python -m bench.replica [--rows 100000] [--dim 384] [--seconds 10]

1. Generates a reproducible clustered collection (rows x dim, metadata and documents) and loads
   it into a Chroma primary started by the proxy (embedded mode), unless it is already there
   (`--data-dir` keeps it between runs).
2. For each replica source (`--modes`, default storage then export: the primary's own HNSW
   files and log, or an export and an independent build), measures the time from the first
   read until the replica serves, then for unfiltered and filtered top-10 queries at
   concurrency 1, 8 and 32 drives the same query bodies with wrk at the proxy (replica path
   with the result cache off, so every request is a real search), and once at the primary
   directly; reports QPS and p50/p95/p99.
4. Computes recall@10 of both against exact search (numpy, float64) on the same queries.

Writes bench/results/replica.{json,md} and prints the ratios. All processes share one 2-core
machine: the primary is idle while the proxy is measured, but wrk runs on the same cores.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.common import D, Proxy, call, dataset, dataset_args, write_report, wrk

CONCURRENCY = (1, 8, 32)
TOPICS = ["news", "sports", "science", "art", "travel"]
NAME = "bench"
FILTERS: dict[str, dict[str, Any] | None] = {
    "unfiltered": None,
    "filtered 20% (topic)": {"topic": "science"},
    "filtered 5% (n < 5000)": {"n": {"$lt": 5000}},
}


def main() -> None:
    args = _args()
    vectors, queries = dataset(args.rows, args.dim, args.queries)
    data_dir = Path(args.data_dir) if args.data_dir else None
    results: dict[str, Any] = {"rows": args.rows, "dim": args.dim, "seconds": args.seconds}
    primary: dict[str, Any] = {}  # measured once, with the first mode's proxy running idle
    for mode in args.modes.split(","):
        results[mode] = _run_mode(mode, args, vectors, queries, data_dir, primary)
    results["primary"] = primary
    write_report(Path(args.out), "replica", results, _markdown(results))


def _run_mode(
    mode: str,
    args: argparse.Namespace,
    vectors: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    data_dir: Path | None,
    primary: dict[str, Any],
) -> dict[str, Any]:
    """One proxy with replicas from ``mode`` (storage: the primary's own files and log;
    export: paginated export and an independent build)."""
    # No periodic refresh during the run (a rebuild would compete with what is measured), and
    # no result cache: the 200 query bodies repeat, and every request must be a real search.
    proxy_args = ("--replicate", "", "--build-threads", "2", "--max-staleness-s", "86400",
                  "--refresh-interval-s", "86400", "--cache-max-bytes", "0",
                  "--replica-source", mode)  # fmt: skip
    out: dict[str, Any] = {}
    with Proxy(*proxy_args, data_dir=data_dir) as proxy:
        cid = _ensure_loaded(proxy.primary_url, vectors)
        out["build"] = _measure_build(proxy, cid, args.rows)
        print(f"{mode}: replica serving: {out['build']}", flush=True)
        for label, where in FILTERS.items():
            bodies = [_body(q, where) for q in queries]
            path = f"{D}/collections/{cid}/query"
            sides = [("replica", proxy.url)]
            if label not in primary:
                sides.insert(0, ("primary", proxy.primary_url))
            for side, base in sides:
                entry: dict[str, Any] = {
                    "recall@10": _recall(base + path, bodies, vectors, queries, where)
                }
                for c in CONCURRENCY:
                    print(f"{mode}: {label} c={c} {side} ...", flush=True)
                    run = wrk(base + path, connections=c, seconds=args.seconds, method="POST",
                              bodies=bodies)  # fmt: skip
                    entry[str(c)] = run.as_dict()
                (primary if side == "primary" else out)[label] = entry
    return out


def _body(query: npt.NDArray[np.float32], where: dict[str, Any] | None) -> str:
    body: dict[str, Any] = {"query_embeddings": [query.tolist()], "n_results": 10,
                            "include": ["distances"]}  # fmt: skip
    if where is not None:
        body["where"] = where
    return json.dumps(body)


def _ensure_loaded(base: str, vectors: npt.NDArray[np.float32]) -> str:
    create = {"name": NAME, "configuration": {"hnsw": {"space": "cosine"}}, "get_or_create": True}
    cid: str = call(base, "POST", f"{D}/collections", create)["id"]
    have = int(call(base, "GET", f"{D}/collections/{cid}/count"))
    if have == len(vectors):
        print(f"primary already holds {have} rows", flush=True)
        return cid
    assert have == 0, f"collection holds {have} rows; use a fresh --data-dir"
    started, batch = time.monotonic(), 2000
    for start in range(0, len(vectors), batch):
        rows = range(start, min(start + batch, len(vectors)))
        call(base, "POST", f"{D}/collections/{cid}/add", {
            "ids": [f"r{i}" for i in rows],
            # base64 little-endian float32, as the clients send it (chroma-wire.md 2.1)
            "embeddings": [base64.b64encode(vectors[i].astype("<f4").tobytes()).decode()
                           for i in rows],
            "metadatas": [{"topic": TOPICS[i % 5], "n": i, "score": (i % 1000) / 10}
                          for i in rows],
            "documents": [f"row {i} about {TOPICS[i % 5]}" for i in rows],
        })  # fmt: skip
        done = rows.stop
        rate = done / (time.monotonic() - started)
        print(f"loaded {done}/{len(vectors)} rows ({rate:.0f} rows/s)", flush=True)
    return cid


def _measure_build(proxy: Proxy, cid: str, rows: int) -> dict[str, float]:
    """First read triggers the on-demand build; time until the replica answers."""
    started = time.monotonic()
    url = f"{proxy.url}{D}/collections/{cid}/count"
    while True:
        with urllib.request.urlopen(url, timeout=60) as resp:
            if resp.headers.get("X-Proxy-Source") == "replica":
                break
        time.sleep(0.2)
    seconds = time.monotonic() - started
    log = proxy.logs()
    export = re.search(r"export \S+: \d+ rows in ([\d.]+)s", log)
    export_s = float(export.group(1)) if export else float("nan")
    return {
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "export_seconds": export_s,
        "export_rows_per_s": round(rows / export_s) if export_s > 0 else 0,  # NaN: no export
        "build_and_publish_seconds": round(seconds - export_s, 2),
    }


def _recall(
    url: str,
    bodies: list[str],
    vectors: npt.NDArray[np.float32],
    queries: npt.NDArray[np.float32],
    where: dict[str, Any] | None,
) -> float:
    """recall@10 against exact cosine search over the rows the filter allows."""
    rows = np.arange(len(vectors))
    if where is not None:
        rows = rows[_allowed(where, len(vectors))]
    unit = vectors[rows].astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    hits = 0
    for body, query in zip(bodies, queries, strict=True):
        req = urllib.request.Request(url, data=body.encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=60) as resp:
            got = {int(i[1:]) for i in json.load(resp)["ids"][0]}
        q = query.astype(np.float64) / np.linalg.norm(query)
        exact = set(rows[np.argsort(-(unit @ q))[:10]].tolist())
        hits += len(got & exact)
    return round(hits / (10 * len(bodies)), 4)


def _allowed(where: dict[str, Any], n: int) -> npt.NDArray[np.bool_]:
    i = np.arange(n)
    if "topic" in where:
        return np.asarray([TOPICS[j % 5] == where["topic"] for j in range(n)])
    return np.asarray(i < where["n"]["$lt"])


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Replica path vs primary: {results['rows']} x {results['dim']} clustered, cosine, "
        f"top-10, {results['seconds']} s per point",
    ]
    modes = [m for m in ("storage", "export") if m in results]
    for mode in modes:
        b = results[mode]["build"]
        lines += [
            "",
            f"## {mode} mode",
            "",
            f"First read until the replica serves: {b['seconds']} s = **{b['rows_per_s']} "
            f"rows/s** (export {b['export_seconds']} s; the rest is build or take).",
            "",
            "| query | c | primary QPS | replica QPS | QPS x | primary p50/p95/p99 ms "
            "| replica p50/p95/p99 ms | p99 ratio | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label in FILTERS:
            for c in map(str, CONCURRENCY):
                p, r = results["primary"][label][c], results[mode][label][c]
                lines.append(
                    f"| {label} | {c} | {p['qps']:.0f} | {r['qps']:.0f} "
                    f"| {r['qps'] / p['qps']:.1f} "
                    f"| {p['p50_ms']:.1f} / {p['p95_ms']:.1f} / {p['p99_ms']:.1f} "
                    f"| {r['p50_ms']:.2f} / {r['p95_ms']:.2f} / {r['p99_ms']:.2f} "
                    f"| {r['p99_ms'] / p['p99_ms']:.2f} "
                    f"| {p['errors'] + p['non_2xx']} / {r['errors'] + r['non_2xx']} |"
                )
    header = " | ".join(f"{m} replica" for m in modes)
    lines += ["", f"| query | primary recall@10 | {header} |", "|---|---|" + "---|" * len(modes)]
    for label in FILTERS:
        cells = " | ".join(str(results[m][label]["recall@10"]) for m in modes)
        lines.append(f"| {label} | {results['primary'][label]['recall@10']} | {cells} |")
    return "\n".join(lines) + "\n"


def _args() -> argparse.Namespace:
    parser = dataset_args(__doc__ or "")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--modes", default="storage,export", help="replica sources to measure, in this order"
    )
    return parser.parse_args()


if __name__ == "__main__":
    main()
