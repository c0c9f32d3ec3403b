"""Snapshots: atomic publish, verification on load, and what a replica built from one answers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index.errors import SnapshotCorrupt, SnapshotFormatError
from index.holder import ReplicaSet
from index.replica import Records, ReplicaIndex
from index.snapshot import generations, prune, publish
from sync.build import build_and_publish
from sync.export import Export


def make_export(n: int = 500, dim: int = 8, space: str = "l2", seed: int = 0) -> Export:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, dim)) * 5
    vectors = (centres[np.arange(n) % 5] + rng.normal(size=(n, dim)) * 0.3).astype(np.float32)
    records = Records(
        ids=[f"id{i}" for i in range(n)],
        documents=[f"doc {i}" if i % 7 else None for i in range(n)],
        uris=[None] * n,
        metadatas=[{"group": i % 5, "even": i % 2 == 0} if i % 11 else None for i in range(n)],
    )
    model = {
        "id": f"00000000-0000-4000-8000-{seed:012d}",
        "name": f"c{seed}",
        "tenant": "default_tenant",
        "database": "default_database",
        "dimension": dim,
        "configuration_json": {"hnsw": {"space": space, "ef_construction": 100,
                                        "ef_search": 100, "max_neighbors": 16}},
    }  # fmt: skip
    return Export(model, vectors, records, started_at=time.time(), seconds=0.0)


def published(tmp_path: Path, **kw: Any) -> ReplicaIndex:
    return build_and_publish(make_export(**kw), tmp_path, "http://primary", 0, 1)


def test_round_trip_answers_the_same(tmp_path: Path) -> None:
    built = published(tmp_path)
    assert built.directory is not None
    opened = ReplicaIndex.open(built.directory)
    queries = np.asarray(built.vectors[:20]) + 0.01
    for (rows_a, d_a), (rows_b, d_b) in zip(
        built.search(queries, 10, None), opened.search(queries, 10, None), strict=True
    ):
        assert rows_a.tolist() == rows_b.tolist()
        np.testing.assert_allclose(d_a, d_b)
    assert opened.records.ids == built.records.ids
    assert opened.manifest == built.manifest
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize("space", ["l2", "cosine", "ip"])
def test_hnsw_and_exact_agree_on_clustered_data(tmp_path: Path, space: str) -> None:
    replica = published(tmp_path, space=space)
    queries = np.asarray(replica.vectors[::25]) + 0.05
    hnsw = replica.search(queries, 10, None)
    exact = replica.search(queries, 10, np.ones(replica.n, np.bool_), exact_max_rows=10**9)
    for (rows_h, d_h), (rows_e, d_e) in zip(hnsw, exact, strict=True):
        # Same rows; the order may differ only between near-ties (float32 resolution).
        assert set(rows_h.tolist()) == set(rows_e.tolist())
        np.testing.assert_allclose(d_h, d_e, rtol=1e-5, atol=1e-5)


def test_filtered_search_paths_agree(tmp_path: Path) -> None:
    """HNSW with over-fetch (most rows allowed) gives the exact answer on clustered data."""
    replica = published(tmp_path, n=3000)
    allowed = np.asarray([i % 3 != 0 for i in range(replica.n)])
    queries = np.asarray(replica.vectors[::100]) + 0.05
    overfetch = replica.search(queries, 10, allowed, exact_max_rows=10)
    exact = replica.search(queries, 10, allowed, exact_max_rows=10**9)
    for (rows_o, _), (rows_e, _) in zip(overfetch, exact, strict=True):
        assert rows_o.tolist() == rows_e.tolist()
        assert all(allowed[rows_o])


def _corrupt(directory: Path, name: str) -> None:
    path = directory / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda d: _corrupt(d, "vectors.npy"), SnapshotCorrupt),
        (lambda d: _corrupt(d, "records.json"), SnapshotCorrupt),
        (
            lambda d: (d / "index.hnsw").write_bytes((d / "index.hnsw").read_bytes()[:100]),
            SnapshotCorrupt,
        ),
        (lambda d: (d / "records.json").unlink(), SnapshotCorrupt),
        (lambda d: (d / "manifest.json").unlink(), SnapshotFormatError),
        (lambda d: (d / "manifest.json").write_text("{not json"), SnapshotFormatError),
        (
            lambda d: (d / "manifest.json").write_text(json.dumps({"format_version": 99})),
            SnapshotFormatError,
        ),
    ],
)
def test_damaged_snapshots_are_refused(tmp_path: Path, damage: Any, error: type) -> None:
    replica = published(tmp_path)
    assert replica.directory is not None
    damage(replica.directory)
    with pytest.raises(error):
        ReplicaIndex.open(replica.directory)


def test_failed_publish_leaves_nothing(tmp_path: Path) -> None:
    def broken(path: Path) -> None:
        raise OSError("disk full")

    fields = {"collection": {"id": "c"}, "generation": 1}
    writers = {"vectors.npy": broken, "index.hnsw": broken, "records.json": broken}
    with pytest.raises(OSError, match="disk full"):
        publish(tmp_path, fields, writers)
    assert list((tmp_path / "c").iterdir()) == []


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for _ in range(4):
        replica = published(tmp_path)
    assert replica.directory is not None
    prune(tmp_path, replica.collection_id, keep=2)
    left = generations(tmp_path, replica.collection_id)
    assert len(left) == 2 and left[0] == replica.directory


def test_an_older_generation_never_replaces_a_newer(tmp_path: Path) -> None:
    older, newer = published(tmp_path), published(tmp_path)
    replicas = ReplicaSet()
    replicas.swap(newer)
    assert replicas.swap(older) is None
    assert replicas.get(newer.collection_id) is newer


def test_empty_collection(tmp_path: Path) -> None:
    replica = published(tmp_path, n=0)
    assert replica.directory is not None
    opened = ReplicaIndex.open(replica.directory)
    assert opened.n == 0 and opened.index is None
    assert opened.select(None, 0, None).tolist() == []


# Publishes snapshots of 4 MB files in a loop until killed.
_PUBLISH_LOOP = """
import os, sys
from pathlib import Path
from index.snapshot import publish, new_generation
store = Path(sys.argv[1])
blob = os.urandom(4 << 20)
model = {"id": "00000000-0000-4000-8000-000000000099", "name": "k", "tenant": "t", "database": "d"}
print("ready", flush=True)
while True:
    fields = {"collection": model, "space": "l2", "hnsw": {}, "count": 0, "dimension": 1,
              "created_at": 0.0, "source": "", "covers_write_seq": 0,
              "generation": new_generation()}
    writer = lambda p: p.write_bytes(blob)
    publish(store, fields, {"vectors.npy": writer, "index.hnsw": writer, "records.json": writer})
"""


def test_kill_9_during_publish_leaves_no_torn_snapshot(tmp_path: Path) -> None:
    """SIGKILL at arbitrary moments of a publish loop: every published generation verifies,
    leftovers are only hidden temporary directories, which prune removes."""
    import subprocess
    import sys

    from index.snapshot import verify

    store = tmp_path / "store"
    cid = "00000000-0000-4000-8000-000000000099"
    rng = np.random.default_rng(0)
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", _PUBLISH_LOOP, str(store)], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(float(rng.uniform(0.05, 0.6)))  # where the kill lands, not a timing check
        proc.kill()
        proc.wait()
        proc.stdout.close()
    published = generations(store, cid)
    assert published, "nothing was published at all"
    for snapshot in published:
        verify(snapshot)  # raises on a torn snapshot
    names = {p.name for p in (store / cid).iterdir()}
    leftovers = {n for n in names if not n.isdigit()}
    assert all(n.startswith(".tmp-") for n in leftovers)
    prune(store, cid, keep=len(published))
    assert {p.name for p in (store / cid).iterdir()} == {p.name for p in published}
