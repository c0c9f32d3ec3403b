"""What access control and TLS cost, on the cache-hit and replica paths, in one run.

    .venv/bin/python -m bench.security [--rows 20000] [--dim 384] [--seconds 10]

One Chroma primary holds the benchmarks' clustered collection. The proxy runs three ways in
front of it: plain HTTP with no tokens; with a tokens file (wrk sends a Bearer token, so
every request is authenticated and authorized, cache hits included); and with tokens and an
HTTPS listener (a certificate from a throwaway CA, trustme). Each way twice: with the result
cache on, wrk repeating one query (the hit path), and with it off, wrk cycling through 200
queries (the replica path: parse, search, encode). wrk (c=32, one thread) runs on CPU 0, the
proxy and the primary on CPU 1 (taskset), so ratios are per core. The issue 12 target: auth
costs at most 5% of the hit path's QPS.

Writes bench/results/security/security.{json,md}.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
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
                               "connections": CONNECTIONS, "ways": {}}  # fmt: skip
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
        for name, (extra, headers) in ways.items():
            results["ways"][name] = {}
            for path, cache in (("hit", []), ("replica", ["--cache-max-bytes", "0"])):
                print(f"{name}: {path} path ...", flush=True)
                proc = ProxyProcess("--primary", primary.url, "--no-access-log",
                                    "--data-dir", str(work / f"{name}-{path}"),
                                    *extra, *cache, log_dir=work)  # fmt: skip
                try:
                    _pin(proc.pid)
                    verify = str(work / "ca.pem") if "tls" in name else True
                    ready = partial(_local, proc.url, cid, headers, verify)
                    wait_until(ready, 300, "replica")
                    url = f"{proc.url}{D}/collections/{cid}/query"
                    sent = bodies[:1] if path == "hit" else bodies
                    load = wrk(url, connections=CONNECTIONS, seconds=args.seconds,
                               method="POST", bodies=sent, headers=headers,
                               cpu=CLIENT_CPU)  # fmt: skip
                    results["ways"][name][path] = load.as_dict()
                finally:
                    proc.stop()
                time.sleep(1)
    finally:
        primary.stop()
        shutil.rmtree(work, ignore_errors=True)
    return results


def markdown(res: dict[str, Any]) -> str:
    ways = res["ways"]
    lines = [
        f"# Access control and TLS: {res['rows']} x {res['dim']}, wrk c={res['connections']} "
        f"on CPU {CLIENT_CPU}, proxy and primary on CPU {SERVER_CPU}, {res['seconds']} s each",
        "",
        "| way | hit QPS | hit p50 / p99 ms | vs plain | replica QPS | replica p50 / p99 ms "
        "| vs plain | errors / non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, paths in ways.items():
        hit, rep = paths["hit"], paths["replica"]
        base_hit, base_rep = ways["plain"]["hit"]["qps"], ways["plain"]["replica"]["qps"]
        lines.append(
            f"| {name} | {hit['qps']:,.0f} | {hit['p50_ms']:.2f} / {hit['p99_ms']:.2f} "
            f"| {hit['qps'] / base_hit:.3f} | {rep['qps']:,.0f} "
            f"| {rep['p50_ms']:.2f} / {rep['p99_ms']:.2f} | {rep['qps'] / base_rep:.3f} "
            f"| {hit['errors'] + rep['errors']} / {hit['non_2xx'] + rep['non_2xx']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = dataset_args(__doc__ or "")
    parser.set_defaults(rows=20_000, out="bench/results/security")
    args = parser.parse_args()
    results = run(args)
    write_report(Path(args.out), "security", results, markdown(results))
    print(json.dumps({k: v for k, v in results.items() if k != "ways"}))


if __name__ == "__main__":
    main()
