"""What forwarding through the proxy costs: the primary directly vs through the proxy.

One run, same data, same queries, same load generator (wrk, a separate process):

    .venv/bin/python bench/forwarding.py [--rows 20000] [--dim 128] [--seconds 10]

Reports QPS and p50/p95/p99 for a heartbeat and an unfiltered top-10 query at concurrency
1, 8 and 32, and the ratios proxy/direct. Everything runs on one 2-core machine, so the proxy,
the primary and wrk compete for the same cores: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import D, Proxy, clustered, load_collection, write_report, wrk

CONCURRENCY = (1, 8, 32)


def main() -> None:
    args = _args()
    vectors = clustered(args.rows, args.dim, clusters=50, seed=42)
    queries = clustered(200, args.dim, clusters=50, seed=42)[:200] + 0.01
    bodies = [
        json.dumps({"query_embeddings": [q.tolist()], "n_results": 10, "include": ["distances"]})
        for q in queries
    ]
    results: dict[str, Any] = {"rows": args.rows, "dim": args.dim, "seconds": args.seconds}
    with Proxy() as proxy:
        print(f"loading {args.rows} x {args.dim} into {proxy.primary_url} ...", flush=True)
        cid = load_collection(proxy.primary_url, "bench", vectors)
        targets = {
            "heartbeat": ("GET", "/api/v2/heartbeat", None),
            "query": ("POST", f"{D}/collections/{cid}/query", bodies),
        }
        for op, (method, path, op_bodies) in targets.items():
            for c in CONCURRENCY:
                for side, base in (("direct", proxy.primary_url), ("proxy", proxy.url)):
                    print(f"{op} c={c} {side} ...", flush=True)
                    run = wrk(base + path, connections=c, seconds=args.seconds, method=method,
                              bodies=op_bodies)  # fmt: skip
                    results.setdefault(op, {}).setdefault(str(c), {})[side] = run.as_dict()
    write_report(Path(args.out), "forwarding", results, _markdown(results))


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Forwarding overhead ({results['rows']} x {results['dim']}, "
        f"{results['seconds']} s per point)",
        "",
        "| op | c | direct QPS | proxy QPS | QPS ratio | direct p50/p95/p99 ms "
        "| proxy p50/p95/p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for op in ("heartbeat", "query"):
        for c, sides in results[op].items():
            d, p = sides["direct"], sides["proxy"]
            lines.append(
                f"| {op} | {c} | {d['qps']:.0f} | {p['qps']:.0f} | {p['qps'] / d['qps']:.2f} "
                f"| {d['p50_ms']:.2f} / {d['p95_ms']:.2f} / {d['p99_ms']:.2f} "
                f"| {p['p50_ms']:.2f} / {p['p95_ms']:.2f} / {p['p99_ms']:.2f} "
                f"| {d['errors'] + d['non_2xx']} / {p['errors'] + p['non_2xx']} |"
            )
    return "\n".join(lines) + "\n"


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--out", default="bench/results")
    return parser.parse_args()


if __name__ == "__main__":
    main()
