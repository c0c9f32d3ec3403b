"""Access control against a real primary (proxy/access/auth.py): tokens from a file, roles
and scopes on every route class, cache hits included; tenant A's token never sees tenant B's
data by any path; the file reloaded under load; the admin API behind the admin role; the
Python client."""

from __future__ import annotations

import gc
import hashlib
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ChromaServer, ProxyProcess, wait_until

DIM = 4


def _tokens(**roles: tuple[str, list[str]]) -> tuple[dict[str, str], str]:
    """Fresh tokens by name, and the tokens file that holds their hashes."""
    plain = {name: secrets.token_urlsafe(24) for name in roles}
    lines = []
    for name, (role, scopes) in roles.items():
        digest = hashlib.sha256(plain[name].encode()).hexdigest()
        lines += [f"[tokens.{name}]", f'sha256 = "{digest}"', f'role = "{role}"',
                  f"scopes = {scopes!r}".replace("'", '"'), ""]  # fmt: skip
    return plain, "\n".join(lines)


@pytest.fixture(scope="module")
def tenants(chroma: ChromaServer) -> dict[str, Any]:
    """Two tenants with a database and a collection each, made on the primary directly."""
    found: dict[str, Any] = {}
    with httpx.Client(base_url=chroma.url, timeout=60) as client:
        for key in ("a", "b"):
            tenant = f"t{key}-{uuid.uuid4().hex[:6]}"
            assert client.post("/api/v2/tenants", json={"name": tenant}).status_code == 200
            base = f"/api/v2/tenants/{tenant}/databases"
            assert client.post(base, json={"name": "prod"}).status_code == 200
            made = client.post(f"{base}/prod/collections", json={"name": "docs"})
            cid = made.json()["id"]
            rows = {"ids": [f"{key}{i}" for i in range(20)],
                    "embeddings": [[float(i), 1.0, 0.0, float(key == "b")] for i in range(20)],
                    "documents": [f"secret of {key} {i}" for i in range(20)]}  # fmt: skip
            assert client.post(f"{base}/prod/collections/{cid}/add", json=rows).status_code == 201
            found[key] = {"tenant": tenant, "cid": cid, "path": f"{base}/prod/collections/{cid}"}
    return found


@pytest.fixture(scope="module")
def secured(
    chroma: ChromaServer, tenants: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, dict[str, str], Path]]:
    a, b = tenants["a"]["tenant"], tenants["b"]["tenant"]
    plain, text = _tokens(
        reader_a=("read", [f"{a}/*"]),
        writer_a=("write", [f"{a}/prod"]),
        reader_b=("read", [f"{b}/prod"]),
        ops=("admin", ["*/*"]),
    )
    log_dir = tmp_path_factory.mktemp("auth")
    tokens_file = log_dir / "tokens.toml"
    tokens_file.write_text(text)
    proc = ProxyProcess(
        "--primary", chroma.url, "--tokens-file", str(tokens_file), "--replicate", "",
        "--data-dir", str(log_dir / "data"), log_dir=log_dir,
    )  # fmt: skip
    yield proc, plain, tokens_file
    assert proc.stop() == 0, proc.logs()


def _as(token: str | None, header: str = "Authorization") -> dict[str, str]:
    if token is None:
        return {}
    return {header: f"Bearer {token}" if header == "Authorization" else token}


def _query(client: httpx.Client, url: str, path: str, token: str | None) -> httpx.Response:
    body = {"query_embeddings": [[3.0, 1.0, 0.0, 0.0]], "n_results": 3, "include": ["documents"]}
    return client.post(f"{url}{path}/query", json=body, headers=_as(token))


def test_no_token_or_a_wrong_one_is_401(secured: Any, tenants: dict[str, Any]) -> None:
    proxy, plain, _ = secured
    path = tenants["a"]["path"]
    with httpx.Client(timeout=60) as client:
        for headers in ({}, _as("not-a-token"), {"Authorization": "Basic YTpi"}):
            resp = client.get(f"{proxy.url}{path}/count", headers=headers)
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"] == "AuthError"
        assert client.get(f"{proxy.url}/api/v2/heartbeat").status_code == 401
    # Neither the tokens nor their hashes appear in the log.
    logs = proxy.logs()
    assert "auth_failed" in logs
    assert not any(secret in logs for secret in plain.values())


def test_roles_and_scopes_on_every_route_class(secured: Any, tenants: dict[str, Any]) -> None:
    proxy, plain, _ = secured
    a, b = tenants["a"], tenants["b"]
    base_a = f"/api/v2/tenants/{a['tenant']}/databases"
    with httpx.Client(timeout=60) as client:

        def status(method: str, path: str, token: str, body: Any = None) -> int:
            resp = client.request(method, proxy.url + path, json=body, headers=_as(plain[token]))
            return resp.status_code

        add = {"ids": ["new"], "embeddings": [[9.0, 9.0, 9.0, 9.0]]}
        # Local reads (query, get, count), forwarded reads, writes, listings, admin-only.
        assert status("GET", f"{a['path']}/count", "reader_a") == 200
        assert _query(client, proxy.url, a["path"], plain["reader_a"]).status_code == 200
        assert status("POST", f"{a['path']}/add", "reader_a", add) == 403
        assert status("POST", f"{a['path']}/add", "writer_a", add) == 201
        assert status("GET", f"{a['path']}/count", "writer_a") == 200
        assert status("GET", f"{base_a}/prod/collections", "reader_a") == 200
        assert status("GET", f"{base_a}", "reader_a") == 200  # holds the tenant whole
        assert status("GET", f"{base_a}", "writer_a") == 403  # one database only
        assert status("POST", f"{base_a}", "writer_a", {"name": "x"}) == 403
        assert (
            status("POST", f"{base_a}/prod/collections", "writer_a", {"name": "more-docs"}) == 200
        )
        assert status("POST", "/api/v2/reset", "writer_a") == 403
        assert status("POST", "/api/v2/tenants", "writer_a", {"name": "t-x"}) == 403
        assert status("GET", "/api/v2/collections/x:y:z", "reader_a") == 403  # unknown path
        assert status("GET", "/admin/status", "reader_a") == 403
        assert status("GET", "/admin/status", "ops") == 200
        # Tenant B's collection: refused by its own path, and invisible by A's.
        assert status("GET", f"{b['path']}/count", "reader_a") == 403
        smuggled = a["path"].replace(a["cid"], b["cid"])
        for token in ("reader_a", "writer_a"):
            assert status("GET", f"{smuggled}/count", token) == 404
            assert status("POST", f"{smuggled}/get", token, {}) == 404
        assert status("POST", f"{smuggled}/add", "writer_a", add) == 404
        assert status("GET", f"{b['path']}/count", "reader_b") == 200
        # X-Chroma-Token works as well as Bearer.
        via_header = client.get(f"{proxy.url}{b['path']}/count",
                                headers=_as(plain["reader_b"], "X-Chroma-Token"))  # fmt: skip
        assert via_header.status_code == 200 and via_header.json() == 20
    assert '"event": "forbidden"' in proxy.logs() or '"event":"forbidden"' in proxy.logs()


def test_a_cached_answer_never_reaches_a_token_that_could_not_ask(
    secured: Any, tenants: dict[str, Any]
) -> None:
    proxy, plain, _ = secured
    a = tenants["a"]
    with httpx.Client(timeout=60) as client:

        def local() -> bool:
            got = _query(client, proxy.url, a["path"], plain["reader_a"])
            return got.headers.get("X-Proxy-Source") in ("replica", "cache")

        wait_until(local, 60, "replica")
        hit = _query(client, proxy.url, a["path"], plain["reader_a"])
        assert hit.headers["X-Proxy-Source"] == "cache"
        refused = _query(client, proxy.url, a["path"], plain["reader_b"])
        assert refused.status_code == 403 and "secret" not in refused.text


def test_identity_is_the_tokens(secured: Any, tenants: dict[str, Any]) -> None:
    proxy, plain, _ = secured
    with httpx.Client(timeout=60) as client:
        got = client.get(f"{proxy.url}/api/v2/auth/identity", headers=_as(plain["reader_b"]))
    assert got.json() == {"user_id": "reader_b", "tenant": tenants["b"]["tenant"],
                          "databases": ["prod"]}  # fmt: skip


# A chromadb client whose constructor raises leaves its HTTP session to the garbage collector:
# collected here (below), not in whichever later test the collector happens to run in.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_python_client_with_a_token(secured: Any, tenants: dict[str, Any]) -> None:
    import chromadb
    from chromadb.config import Settings

    proxy, plain, _ = secured
    b = tenants["b"]

    def client(token: str) -> Any:
        settings = Settings(
            chroma_client_auth_provider="chromadb.auth.token_authn.TokenAuthClientProvider",
            chroma_client_auth_credentials=token,
            anonymized_telemetry=False,
        )
        return chromadb.HttpClient(host="127.0.0.1", port=proxy.port, settings=settings,
                                   tenant=b["tenant"], database="prod")  # fmt: skip

    assert client(plain["reader_b"]).get_collection("docs").count() == 20
    with pytest.raises(Exception, match=r"(?i)auth|401|unauthori"):
        client("wrong-token-" + secrets.token_hex(8)).get_collection("docs")
    gc.collect()


def test_the_tokens_file_is_reloaded_under_load(secured: Any, tenants: dict[str, Any]) -> None:
    """Requests keep succeeding while the file is rewritten; a token added works and one
    removed stops working, without a restart (on change, and on SIGHUP)."""
    proxy, plain, tokens_file = secured
    path = f"{proxy.url}{tenants['a']['path']}/count"
    failures: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                resp = client.get(path, headers=_as(plain["reader_a"]))
                if resp.status_code != 200:
                    failures.append(resp.status_code)

    original = tokens_file.read_text()
    newcomer, extra = _tokens(late=("read", [f"{tenants['a']['tenant']}/prod"]))
    thread = threading.Thread(target=load)
    thread.start()
    try:
        with httpx.Client(timeout=30) as client:
            late = _as(newcomer["late"])
            assert client.get(path, headers=late).status_code == 401
            tokens_file.write_text(original + "\n" + extra)
            wait_until(lambda: client.get(path, headers=late).status_code == 200, 20, "reload")
            tokens_file.write_text(original)  # and by SIGHUP this time, at once
            import signal

            time.sleep(0.05)
            proxy.signal(signal.SIGHUP)
            wait_until(lambda: client.get(path, headers=late).status_code == 401, 20, "removal")
            # A broken file is refused; the tokens in force stay.
            tokens_file.write_text("[tokens.bad]\nrole = 'root'\n")
            proxy.signal(signal.SIGHUP)
            time.sleep(1.5)
            assert client.get(path, headers=_as(plain["reader_a"])).status_code == 200
    finally:
        stop.set()
        thread.join(30)
        tokens_file.write_text(original)
    assert failures == []
    assert "tokens file not reloaded" in proxy.logs()


def test_the_audit_log_file(chroma: ChromaServer, tenants: dict[str, Any], tmp_path: Path) -> None:
    """audit_log_file: JSON lines there and not in the main log, never a token, and a new
    file after logrotate moves the old one away."""
    plain, text = _tokens(ops=("admin", ["*/*"]))
    (tmp_path / "tokens.toml").write_text(text)
    audit_file = tmp_path / "audit.jsonl"
    proc = ProxyProcess(
        "--primary", chroma.url, "--tokens-file", str(tmp_path / "tokens.toml"),
        "--audit-log-file", str(audit_file), "--replicate", "",
        "--data-dir", str(tmp_path / "data"), log_dir=tmp_path,
    )  # fmt: skip
    try:
        path = f"{proc.url}{tenants['a']['path']}/count"
        with httpx.Client(timeout=60) as client:
            assert client.get(path, headers=_as("wrong-" + plain["ops"])).status_code == 401
            assert client.post(f"{proc.url}/api/v2/reset", headers=_as(plain["ops"])).is_error
            wait_until(
                lambda: audit_file.exists() and len(audit_file.read_text().splitlines()) >= 2,
                10,
                "audit",
            )
            records = [json.loads(line) for line in audit_file.read_text().splitlines()]
            assert [r["event"] for r in records] == ["auth_failed", "reset"]
            assert records[1]["token"] == "ops" and records[1]["status"] is not None
            assert all("time" in r and "request_id" in r and "peer" in r for r in records)
            audit_file.rename(tmp_path / "audit.jsonl.1")  # as logrotate does
            assert client.get(path, headers={}).status_code == 401
            wait_until(audit_file.exists, 10, "a new audit file")
            assert json.loads(audit_file.read_text())["event"] == "auth_failed"
    finally:
        assert proc.stop() == 0, proc.logs()
    written = audit_file.read_text() + (tmp_path / "audit.jsonl.1").read_text()
    assert plain["ops"] not in written and plain["ops"] not in proc.logs()
    assert "auth_failed" not in proc.logs()  # the main log is kept free of it


def test_a_path_the_primary_refuses_gets_its_refusal_not_a_502(
    secured: Any, tenants: dict[str, Any], chroma: ChromaServer
) -> None:
    """The owner lookup for a collection id under a database name the primary rejects is
    refused by the primary (400); that refusal is the answer, as the primary would give it to
    the request itself (it was the proxy's own 502; found by the fuzz with tokens on)."""
    proxy, plain, _ = secured
    path = f"/api/v2/tenants/{tenants['a']['tenant']}/databases/0/collections/{uuid.uuid4()}"
    body = {"query_embeddings": [[1.0, 0.0, 0.0, 0.0]], "n_results": 1}
    with httpx.Client(timeout=60) as client:  # reader_a holds tenant A's every database
        got = client.post(f"{proxy.url}{path}/query", json=body, headers=_as(plain["reader_a"]))
        want = client.post(f"{chroma.url}{path}/query", json=body)
    assert want.status_code == 400
    assert got.status_code == 400, got.text
    assert got.json()["error"] == want.json()["error"]
