"""What access control and TLS cost, on the cache-hit and replica paths, in one run.

    .venv/bin/python -m bench.security [--rows 20000] [--dim 384] [--seconds 4] [--rounds 5]

One Chroma primary holds the benchmarks' clustered collection. The proxy runs three ways in
front of it: plain HTTP with no tokens; with a tokens file (wrk sends a Bearer token, so
every request is authenticated and authorized, cache hits included); and with tokens and an
HTTPS listener (a certificate from a throwaway CA, trustme). Each way twice: with the result
cache on, wrk repeating one query (the hit path), and with it off, wrk cycling through 200
queries (the replica path: parse, search, encode). wrk (c=32, one thread) runs on CPU 0, the
proxy and the primary on CPU 1 (taskset), so ratios are per core. The issue 12 target: auth
costs at most 5% of the hit path's QPS.

This machine's speed drifts by more than 5% within minutes (other tenants on the host), so
one run per way cannot show a 5% difference. The three proxies of a path run side by side
(idle but for the one under load) and are measured in interleaved rounds, each in another
order (plain, auth, auth+tls; auth, auth+tls, plain; ...); the table gives each way's
median round and the median of its per-round ratios to plain, with their spread. The
access-control stage is also timed alone, in process, which the noise cannot hide.

Writes bench/results/security/security.{json,md}.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trustme

from bench.common import D, dataset, dataset_args, load_collection, query_bodies, write_report, wrk
from tests.helpers import ChromaServer, ProxyProcess, wait_until

CLIENT_CPU, SERVER_CPU = 0, 1
CONNECTIONS = 32


def _pin(pid: int) -> None:
    if shutil.which("taskset") and os.cpu_count() and os.cpu_count() >= 2:  # type: ignore[operator]
        subprocess.run(["taskset", "-a", "-p", "-c", str(SERVER_CPU), str(pid)],
                       check=True, capture_output=True)  # fmt: skip


def _local(url: str, cid: str, headers: dict[str, str], verify: Any) -> bool:
    import httpx

    resp = httpx.get(f"{url}{D}/collections/{cid}/count", headers=headers, verify=verify)
    return resp.headers.get("X-Proxy-Source") in ("replica", "cache")


def run(args: Any) -> dict[str, Any]:
    vectors, queries = dataset(args.rows, args.dim, 200)
    bodies = query_bodies(queries)
    work = Path(tempfile.mkdtemp(prefix="bench-security-"))
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    tokens = work / "tokens.toml"
    tokens.write_text(f'[tokens.bench]\nsha256 = "{digest}"\nrole = "read"\nscopes = ["*/*"]\n')
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(work / "server.pem"))
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    primary = ChromaServer(work / "primary").start()
    results: dict[str, Any] = {"rows": args.rows, "dim": args.dim, "seconds": args.seconds,
                               "rounds": args.rounds, "connections": CONNECTIONS,
                               "ways": {}}  # fmt: skip
    try:
        _pin(primary.proc.pid if primary.proc else 0)
        cid = load_collection(primary.url, "bench", vectors)
        auth = {"Authorization": f"Bearer {token}"}
        ways = {
            "plain": ([], {}),
            "auth": (["--tokens-file", str(tokens)], auth),
            "auth+tls": (
                ["--tokens-file", str(tokens), "--tls-cert-file", str(work / "server.pem")],
                auth,
            ),
        }
        for path, cache in (("hit", []), ("replica", ["--cache-max-bytes", "0"])):
            procs = {}
            try:
                for name, (extra, headers) in ways.items():
                    print(f"{name}: {path} path, starting ...", flush=True)
                    proc = ProxyProcess("--primary", primary.url, "--no-access-log",
                                        "--data-dir", str(work / f"{name}-{path}"),
                                        *extra, *cache, log_dir=work)  # fmt: skip
                    procs[name] = proc
                    _pin(proc.pid)
                    verify = str(work / "ca.pem") if "tls" in name else True
                    wait_until(partial(_local, proc.url, cid, headers, verify), 300, "replica")
                rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in ways}
                names = list(ways)
                for n in range(args.rounds):
                    # Each round in another order: no way always follows the same one.
                    for name in names[n % 3 :] + names[: n % 3]:
                        headers = ways[name][1]
                        print(f"{path} path, round {n + 1}/{args.rounds}: {name}", flush=True)
                        url = f"{procs[name].url}{D}/collections/{cid}/query"
                        sent = bodies[:1] if path == "hit" else bodies
                        load = wrk(url, connections=CONNECTIONS, seconds=args.seconds,
                                   method="POST", bodies=sent, headers=headers,
                                   cpu=CLIENT_CPU)  # fmt: skip
                        rounds[name].append(load.as_dict())
                for name in ways:
                    results["ways"].setdefault(name, {})[path] = _summary(
                        rounds[name], rounds["plain"]
                    )
            finally:
                for proc in procs.values():
                    proc.stop()
        results["auth_stage_us"] = auth_stage_us(tokens, token)
    finally:
        primary.stop()
        shutil.rmtree(work, ignore_errors=True)
    return results


def auth_stage_us(tokens: Path, token: str) -> float:
    """The access-control stage alone, in this process: the same query's token check again
    and again (after the first, a remembered yes: the header, a hash, one lookup) and its
    per-token rate-limit bucket, in microseconds; the best of five batches (the machine's
    noise only ever adds)."""
    import asyncio

    from aiohttp.test_utils import make_mocked_request

    from proxy.access.admission import TokenBuckets
    from proxy.access.auth import Guard
    from proxy.routes import classify

    async def owner(cid: str, tenant: str, database: str) -> tuple[str, str]:
        return tenant, database

    async def measure() -> float:
        guard = Guard(tokens, None, owner)
        buckets = TokenBuckets(rate_per_s=0, burst=1)
        path = f"{D}/collections/4e5edbcc-8705-45cb-bcaf-0bfa2898ec6b/query"
        request = make_mocked_request("POST", path, headers={"Authorization": f"Bearer {token}"})
        route = classify("POST", path)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(20_000):
                found = await guard.check(request, route)
                buckets.take(f"token:{found.name}")
            best = min(best, (time.perf_counter() - start) / 20_000 * 1e6)
        return best

    return asyncio.run(measure())


def _summary(mine: list[dict[str, Any]], plain: list[dict[str, Any]]) -> dict[str, Any]:
    """The median round (by QPS) and the per-round ratios to plain's round next to it."""
    ratios = sorted(m["qps"] / p["qps"] for m, p in zip(mine, plain, strict=True))
    middle = sorted(mine, key=lambda r: r["qps"])[len(mine) // 2]
    return {**middle, "ratio": statistics.median(ratios), "ratio_min": ratios[0],
            "ratio_max": ratios[-1], "rounds": mine}  # fmt: skip


def markdown(res: dict[str, Any]) -> str:
    ways = res["ways"]
    lines = [
        f"# Access control and TLS: {res['rows']} x {res['dim']}, wrk c={res['connections']} "
        f"on CPU {CLIENT_CPU}, proxy and primary on CPU {SERVER_CPU}, {res['rounds']} "
        f"interleaved rounds of {res['seconds']} s",
        "",
        "| way | hit QPS | hit p50 / p99 ms | vs plain (min-max) | replica QPS "
        "| replica p50 / p99 ms | vs plain (min-max) | errors / non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, paths in ways.items():
        hit, rep = paths["hit"], paths["replica"]
        errors = sum(r["errors"] for p in (hit, rep) for r in p["rounds"])
        non_2xx = sum(r["non_2xx"] for p in (hit, rep) for r in p["rounds"])
        lines.append(
            f"| {name} | {hit['qps']:,.0f} | {hit['p50_ms']:.2f} / {hit['p99_ms']:.2f} "
            f"| {hit['ratio']:.3f} ({hit['ratio_min']:.3f}-{hit['ratio_max']:.3f}) "
            f"| {rep['qps']:,.0f} | {rep['p50_ms']:.2f} / {rep['p99_ms']:.2f} "
            f"| {rep['ratio']:.3f} ({rep['ratio_min']:.3f}-{rep['ratio_max']:.3f}) "
            f"| {errors} / {non_2xx} |"
        )
    us, per_request = res["auth_stage_us"], 1e6 / ways["plain"]["hit"]["qps"]
    lines += ["", f"Access control alone, in process: {us:.1f} us per request, "
              f"{us / per_request:.1%} of the plain hit path's {per_request:.0f} us per "
              "request on its core."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = dataset_args(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per way")
    parser.set_defaults(rows=20_000, seconds=4, out="bench/results/security")
    args = parser.parse_args()
    results = run(args)
    write_report(Path(args.out), "security", results, markdown(results))
    print(json.dumps({k: v for k, v in results.items() if k != "ways"}))


if __name__ == "__main__":
    main()
