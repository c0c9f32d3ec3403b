"""Top-10 parity with the primary: storage mode vs export mode, on real embeddings at Chroma's
default HNSW settings.

One primary holds the real sentence embeddings of tests/data (all-MiniLM-L6-v2, cosine, no HNSW
overrides), loaded so that its last flush leaves ``--tail`` rows only in its log. Two proxies
front it: one following its storage (the primary's own graph plus the log tail replayed), one
exporting and building its own graph. The same 400 real queries, a quarter unfiltered and a
quarter each with three `where` filters, go to the primary and to both proxies; for each proxy
the share of queries whose top-10 ids equal the primary's (ids and order), and recall@10 of all
three against exact search.

    .venv/bin/python -m bench.parity [--rows 9600] [--tail 600] [--out bench/results/parity]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.helpers import ChromaServer, ProxyProcess, wait_until

D = "/api/v2/tenants/default_tenant/databases/default_database"
FIXTURE = Path(__file__).parents[1] / "tests" / "data" / "gcide_minilm.npz"
BATCH = 200
WHERE: list[Any] = [
    None,
    {"letter": {"$in": list("abcdefgh")}},
    {"letter": "s"},
    {"n": {"$lt": 2000}},
]


def load(client: httpx.Client, url: str, vectors: Any, letters: Any) -> str:
    body = {"name": "parity", "configuration": {"hnsw": {"space": "cosine"}}}
    cid: str = client.post(f"{url}{D}/collections", json=body).raise_for_status().json()["id"]
    for lo in range(0, len(vectors), BATCH):
        rows = range(lo, min(lo + BATCH, len(vectors)))
        add = {
            "ids": [f"g{i}" for i in rows],
            "embeddings": vectors[lo : lo + BATCH].tolist(),
            "metadatas": [{"letter": str(letters[i]), "n": i} for i in rows],
        }
        client.post(f"{url}{D}/collections/{cid}/add", json=add).raise_for_status()
    return cid


def exact_top(vectors: Any, letters: Any, query: Any, where: Any) -> list[str]:
    allowed = np.ones(len(vectors), bool)
    if where is not None:
        key, cond = next(iter(where.items()))
        column = letters if key == "letter" else np.arange(len(vectors))
        if isinstance(cond, dict) and "$in" in cond:
            allowed = np.isin(column, cond["$in"])
        elif isinstance(cond, dict) and "$lt" in cond:
            allowed = column < cond["$lt"]
        else:
            allowed = column == cond
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = np.where(allowed, unit @ (query / np.linalg.norm(query)), -np.inf)
    return [f"g{i}" for i in np.argsort(-scores)[:10]]


def run(rows: int, tail: int, out: Path) -> dict[str, Any]:
    data = np.load(FIXTURE)
    vectors = np.asarray(data["embeddings"][:rows], np.float32)
    letters, queries = data["first_letter"][:rows], np.asarray(data["queries"], np.float32)
    work = Path(tempfile.mkdtemp(prefix="parity-"))
    primary = ChromaServer(work / "primary").start()
    proxies: dict[str, ProxyProcess] = {}
    try:
        with httpx.Client(timeout=120) as client:
            started = time.monotonic()
            cid = load(client, primary.url, vectors, letters)
            print(
                f"loaded {rows} rows ({tail} only in the log) in {time.monotonic() - started:.0f}s"
            )
            for mode in ("storage", "export"):
                extra = ["--primary-persist-path", str(primary.path)] if mode == "storage" else []
                proxies[mode] = ProxyProcess(
                    "--primary", primary.url, *extra, "--replica-source", mode,
                    "--cache-max-bytes", "0", "--data-dir", str(work / mode), log_dir=work,
                )  # fmt: skip
            for proxy in proxies.values():
                wait_until(partial(_local, client, proxy.url, cid), 300, "replica")
            return _measure(
                client, primary.url, proxies, cid, vectors, letters, queries, rows, tail, out
            )
    finally:
        for proxy in proxies.values():
            proxy.stop()
        primary.stop()


def _local(client: httpx.Client, url: str, cid: str) -> bool:
    resp = client.get(f"{url}{D}/collections/{cid}/count")
    return bool(resp.headers.get("X-Proxy-Source") == "replica")


def _measure(
    client: httpx.Client,
    primary: str,
    proxies: dict[str, ProxyProcess],
    cid: str,
    vectors: Any,
    letters: Any,
    queries: Any,
    rows: int,
    tail: int,
    out: Path,
) -> dict[str, Any]:
    same = {mode: 0 for mode in proxies}
    local = {mode: 0 for mode in proxies}
    hits = {mode: 0 for mode in [*proxies, "primary"]}
    for i, query in enumerate(queries):
        where = WHERE[i % len(WHERE)]
        body = {
            "query_embeddings": [query.tolist()],
            "n_results": 10,
            "where": where,
            "include": [],
        }
        want = client.post(f"{primary}{D}/collections/{cid}/query", json=body).json()["ids"][0]
        exact = set(exact_top(vectors, letters, query, where))
        hits["primary"] += len(exact & set(want))
        for mode, proxy in proxies.items():
            resp = client.post(f"{proxy.url}{D}/collections/{cid}/query", json=body)
            got = resp.json()["ids"][0]
            same[mode] += got == want
            local[mode] += resp.headers.get("X-Proxy-Source") == "replica"
            hits[mode] += len(exact & set(got))
    n = len(queries)
    result = {
        "rows": rows,
        "tail_rows": tail,
        "queries": n,
        "parity": {mode: same[mode] / n for mode in proxies},
        "answered_locally": {mode: local[mode] / n for mode in proxies},
        "recall_at_10": {who: hits[who] / (10 * n) for who in hits},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").write_text(json.dumps(result, indent=2))
    lines = [
        "| | top-10 equal to the primary's | answered locally | recall@10 |",
        "|---|---|---|---|",
        *(
            f"| {mode} mode | {same[mode]}/{n} = {same[mode] / n:.2%} | {local[mode] / n:.0%} "
            f"| {hits[mode] / (10 * n):.4f} |"
            for mode in proxies
        ),
        f"| primary | | | {hits['primary'] / (10 * n):.4f} |",
    ]
    (out / "parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=9600)
    parser.add_argument("--tail", type=int, default=600, help="rows after the last flush")
    parser.add_argument("--out", type=Path, default=Path("bench/results/parity"))
    args = parser.parse_args()
    if args.rows % 1000 != args.tail % 1000:
        parser.error("the primary flushes every 1,000 rows: rows must end in tail (mod 1000)")
    run(args.rows, args.tail, args.out)


if __name__ == "__main__":
    main()
