"""`replica-proxy backup`, `verify` and `restore` against real Chroma servers.

Two clustered collections (l2 through `configuration`, cosine through legacy `hnsw:*` metadata,
one of them in its own tenant and database) are backed up from the session's primary, verified,
and restored into a second, fresh primary; both primaries must then give identical collection
models (but the id), identical get() of every record and identical query answers. A tampered
snapshot fails verify, and a restore never writes into a collection that holds records.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from index.snapshot import generations
from sync.restore import batches
from tests.helpers import BIN, ChromaServer

ROWS, DIM = 300, 16
D = "/api/v2/tenants/default_tenant/databases/default_database"
EVERYTHING = ["embeddings", "documents", "metadatas", "uris"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "replica-proxy"), *args], capture_output=True, text=True, timeout=120
    )


def clustered(seed: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Tight clusters: HNSW on both primaries and exact search agree (chroma-wire.md 8.3)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, DIM)) * 3
    noise = rng.normal(size=(ROWS, DIM)) * 0.35
    return (centres[np.arange(ROWS) % 10] + noise).astype(np.float32)


def metadata(i: int) -> dict[str, Any] | None:
    if i % 25 == 0:
        return None
    return {"n": i, "f": float(i % 7), "flag": i % 2 == 0, "cat": f"c{i % 4}", "tags": ["a", "b"]}


def records(prefix: str, vectors: np.ndarray[Any, Any]) -> dict[str, Any]:
    rows = range(len(vectors))
    return {
        "ids": [f"{prefix}{i}" for i in rows],
        "embeddings": vectors.tolist(),
        "metadatas": [metadata(i) for i in rows],
        "documents": [None if i % 9 == 0 else f"row {i} of {prefix}" for i in rows],
        "uris": [f"s3://b/{i}" if i % 3 == 0 else None for i in rows],
    }


def create(client: httpx.Client, db: str, body: dict[str, Any], add: dict[str, Any]) -> None:
    resp = client.post(f"{db}/collections", json=body)
    assert resp.status_code == 200, resp.text
    cid = resp.json()["id"]
    assert client.post(f"{db}/collections/{cid}/add", json=add).status_code == 201


@pytest.fixture(scope="module")
def source(chroma: ChromaServer) -> Iterator[dict[str, str]]:
    """Collection name -> its database path, on the session's primary."""
    suffix = uuid.uuid4().hex[:8]
    tenant_db = f"/api/v2/tenants/bk-{suffix}/databases/db-{suffix}"
    names = {f"bk-l2-{suffix}": D, f"bk-cos-{suffix}": tenant_db}
    l2, cos = names
    with httpx.Client(base_url=chroma.url, timeout=60) as client:
        assert client.post("/api/v2/tenants", json={"name": f"bk-{suffix}"}).is_success
        db_body = {"name": f"db-{suffix}"}
        assert client.post(f"/api/v2/tenants/bk-{suffix}/databases", json=db_body).is_success
        hnsw = {"space": "l2", "ef_construction": 200, "ef_search": 200, "max_neighbors": 24}
        body = {"name": l2, "configuration": {"hnsw": hnsw}, "metadata": {"owner": "me"}}
        create(client, D, body, records("l", clustered(1)))
        legacy = {"hnsw:space": "cosine", "hnsw:construction_ef": 200, "hnsw:search_ef": 200}
        create(client, tenant_db, {"name": cos, "metadata": legacy}, records("c", clustered(2)))
    yield names


@pytest.fixture(scope="module")
def backup_dir(
    chroma: ChromaServer, source: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("backup")
    l2, cos = source
    tenant_db = source[cos].removeprefix("/api/v2/tenants/").replace("/databases/", "/")
    result = cli(
        "backup", "--primary", chroma.url, "--out", str(out),
        "--database", "default_tenant/default_database", "--database", tenant_db,
        "--collection", l2, "--collection", cos,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"2 collection(s), {2 * ROWS} rows" in result.stdout
    assert "export" in result.stderr  # progress goes to stderr
    return out


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    """A second, empty primary to restore into."""
    server = ChromaServer(tmp_path_factory.mktemp("restore-target") / "data").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def restored(backup_dir: Path, target: ChromaServer) -> ChromaServer:
    result = cli("restore", str(backup_dir), "--primary", target.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("restored ") for line in lines), lines
    assert all(f"{ROWS} records identical, 20/20 queries" in line for line in lines), lines
    return target


def test_verify_passes(backup_dir: Path) -> None:
    result = cli("verify", str(backup_dir), "--queries", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("ok ") for line in lines), lines
    assert all("recall@10 1.000 over 30 queries" in line for line in lines), lines


def test_tampered_snapshot_fails_verify(backup_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(backup_dir, tmp_path / "copy")
    collection = sorted(p for p in copy.iterdir() if p.is_dir())[0]
    index = generations(copy, collection.name)[0] / "index.hnsw"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index.write_bytes(data)
    result = cli("verify", str(copy))
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and "index.hnsw" in failed[0], result.stdout
    assert "1 of 2 snapshots failed" in result.stderr


def get_all(client: httpx.Client, db: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    model = client.get(f"{db}/collections/{name}").json()
    body = {"include": EVERYTHING}
    return model, client.post(f"{db}/collections/{model['id']}/get", json=body).json()


def canonical(metadatas: list[Any]) -> list[str]:
    """JSON text tells 2 from 2.0, which == on Python numbers does not."""
    return [json.dumps(m, sort_keys=True) for m in metadatas]


def test_restored_records_are_identical(
    chroma: ChromaServer, restored: ChromaServer, source: dict[str, str]
) -> None:
    with httpx.Client(base_url=chroma.url) as a, httpx.Client(base_url=restored.url) as b:
        for name, db in source.items():
            (model_a, got_a), (model_b, got_b) = get_all(a, db, name), get_all(b, db, name)
            assert {**model_a, "id": None} == {**model_b, "id": None}
            assert got_a["ids"] == got_b["ids"] and len(got_a["ids"]) == ROWS
            assert got_a["documents"] == got_b["documents"]
            assert got_a["uris"] == got_b["uris"]
            assert canonical(got_a["metadatas"]) == canonical(got_b["metadatas"])
            # Cosine collections return vectors up to 1 ulp off (chroma-wire.md section 4).
            np.testing.assert_allclose(got_a["embeddings"], got_b["embeddings"], rtol=1e-6)


def test_restored_query_answers_are_identical(
    chroma: ChromaServer, restored: ChromaServer, source: dict[str, str]
) -> None:
    queries = (clustered(3)[:20] + 0.05).tolist()
    body = {"query_embeddings": queries, "n_results": 10, "include": [*EVERYTHING, "distances"]}
    with httpx.Client(base_url=chroma.url) as a, httpx.Client(base_url=restored.url) as b:
        for name, db in source.items():
            answers = []
            for client in (a, b):
                cid = client.get(f"{db}/collections/{name}").json()["id"]
                answers.append(client.post(f"{db}/collections/{cid}/query", json=body).json())
            want, got = answers
            assert got["ids"] == want["ids"]
            assert got["documents"] == want["documents"] and got["uris"] == want["uris"]
            assert [canonical(m) for m in got["metadatas"]] == [
                canonical(m) for m in want["metadatas"]
            ]
            np.testing.assert_allclose(got["distances"], want["distances"], rtol=1e-5, atol=1e-5)


def test_restore_refuses_a_non_empty_collection(
    chroma: ChromaServer, target: ChromaServer, tmp_path: Path
) -> None:
    """Nothing is written when one collection exists with records, not even the others."""
    suffix = uuid.uuid4().hex[:8]
    taken, fresh = f"bk-taken-{suffix}", f"bk-aaa-{suffix}"  # fresh sorts first
    with httpx.Client(base_url=chroma.url, timeout=60) as client:
        for name in (taken, fresh):
            create(client, D, {"name": name}, records(name, clustered(4)[:20]))
    args = ("--collection", taken, "--collection", fresh)
    assert cli("backup", "--primary", chroma.url, "--out", str(tmp_path), *args).returncode == 0
    occupant = records("other", clustered(5)[:3])
    with httpx.Client(base_url=target.url, timeout=60) as client:
        create(client, D, {"name": taken}, occupant)
        before = get_all(client, D, taken)
        result = cli("restore", str(tmp_path), "--primary", target.url)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1, result.stderr
        assert taken in result.stderr and "already exists" in result.stderr
        assert get_all(client, D, taken) == before
        assert before[1]["ids"] == occupant["ids"]
        assert client.get(f"{D}/collections/{fresh}").status_code == 404


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cli("verify", str(tmp_path / "missing")).returncode == 2
    bad_db = cli("backup", "--primary", "http://127.0.0.1:9", "--out", "x", "--database", "a")
    assert bad_db.returncode == 2 and bad_db.stderr.count("\n") == 1
    assert cli("restore", str(tmp_path), "--primary", "ftp://x").returncode == 2


def test_batches_respect_rows_and_bytes() -> None:
    assert list(batches([10] * 7, max_rows=3, max_bytes=1000)) == [(0, 3), (3, 6), (6, 7)]
    assert list(batches([10, 10, 30, 10], max_rows=10, max_bytes=25)) == [(0, 2), (2, 3), (3, 4)]
    assert list(batches([], max_rows=3, max_bytes=10)) == []
