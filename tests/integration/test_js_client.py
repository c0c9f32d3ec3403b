"""The unmodified Chroma JS client (npm chromadb 3.5.0, tests/js) sees the same answers
through the proxy as directly: a full session, and reads answered by the proxy's replica."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ChromaServer, ProxyProcess, wait_until

JS = Path(__file__).parents[1] / "js"
D = "/api/v2/tenants/default_tenant/databases/default_database"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None, reason="Node.js is not installed (make test installs the client)"
)


def run_flow(base: str, name: str, *mode: str) -> list[Any]:
    assert (JS / "node_modules" / "chromadb").is_dir(), "run `make test` to install tests/js"
    done = subprocess.run(
        ["node", str(JS / "flow.mjs"), base, name, *mode],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    text = done.stdout.replace(base, "<base>").replace(name, "<name>")
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", text)
    steps: list[Any] = json.loads(text)
    return steps


def same(got: Any, want: Any) -> bool:
    """Equal, with floats compared to 1e-5 (replica distances may differ in the last bit)."""
    if isinstance(want, float) or isinstance(got, float):
        return math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5)
    if isinstance(want, list):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(same(got[k], want[k]) for k in want)
    return bool(got == want)


def assert_same_steps(got: list[Any], want: list[Any]) -> None:
    assert [s[0] for s in got] == [s[0] for s in want]
    for g, w in zip(got, want, strict=True):
        assert same(g, w), (g[0], g, w)


def test_js_session_is_identical(chroma: ChromaServer, proxy: ProxyProcess, name: str) -> None:
    want = run_flow(chroma.url, name + "-d")
    got = run_flow(proxy.url, name + "-p")
    assert_same_steps(got, want)
    assert any(step[1] == "error" for step in want)  # the errors were compared too


def test_js_reads_from_the_replica(chroma: ChromaServer, proxy: ProxyProcess, name: str) -> None:
    run_flow(chroma.url, name, "create-only")  # made and filled directly on the primary
    with httpx.Client(timeout=30) as client:
        cid = client.get(f"{chroma.url}{D}/collections/{name}").json()["id"]

        def local() -> bool:
            resp = client.get(f"{proxy.url}{D}/collections/{cid}/count")
            return resp.headers.get("X-Proxy-Source") in ("replica", "cache")

        wait_until(local, 60, "replica")
        before = _local_answers(client, proxy.url)
        got = run_flow(proxy.url, name, "reads")
        answered = _local_answers(client, proxy.url) - before
    assert_same_steps(got, run_flow(chroma.url, name, "reads"))
    assert answered >= 6  # count, peek, gets and queries came from the replica (or cache)


def _local_answers(client: httpx.Client, base: str) -> float:
    text = client.get(base + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("replica_proxy_requests_total{") and re.search(
            r'source="(replica|cache)"', line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total
