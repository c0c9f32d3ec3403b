"""Turn an export into a published snapshot and a ready-to-serve replica."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from index.replica import ReplicaIndex, build_index
from index.snapshot import FORMAT_VERSION, Manifest, new_generation, publish

from .export import Export

# A replica loaded from the store (cut by another process, or an earlier run of this one) knows
# nothing of this process' write counter: proxy/replica/consistency.py falls back to its cut time.
COVERS_NOTHING = -1


def hnsw_settings(model: dict[str, object]) -> tuple[str, dict[str, int]]:
    """Space and HNSW parameters from the collection's configuration_json, which is
    authoritative (metadata hnsw:* keys can be stale: chroma-wire.md section 8.2)."""
    config = model.get("configuration_json") or {}
    hnsw = (config.get("hnsw") if isinstance(config, dict) else None) or {}
    space = str(hnsw.get("space", "l2"))
    return space, {
        "M": int(hnsw.get("max_neighbors", 16)),
        "ef_construction": int(hnsw.get("ef_construction", 100)),
        "ef_search": int(hnsw.get("ef_search", 100)),
    }


def build_and_publish(
    export: Export,
    store: Path,
    source: str,
    covers_write_seq: int,
    threads: int,
    hnsw_overrides: dict[str, int] | None = None,
    validate: tuple[int, float] = (0, 0.0),
    write_ledger: str | None = None,
) -> ReplicaIndex:
    """Blocking (run it in a worker thread): build the index, check it against exact search
    (``validate`` = (sample queries, recall floor)), publish the snapshot atomically, and
    return a replica serving from it, with the vectors memory-mapped from the snapshot.
    ``hnsw_overrides`` replaces the collection's own M / ef_construction / ef_search."""
    model = export.model
    space, hnsw = hnsw_settings(model)
    hnsw.update(hnsw_overrides or {})
    index = build_index(export.vectors, space, hnsw, threads)
    dimension = int(export.vectors.shape[1]) if export.vectors.size else model.get("dimension")
    fields = {
        "collection": model,
        "space": space,
        "hnsw": hnsw,
        "count": len(export.records.ids),
        "dimension": dimension,
        "created_at": export.started_at,
        "source": source,
        "covers_write_seq": covers_write_seq,
        "generation": new_generation(),
        "write_ledger": write_ledger,
    }
    writers = {
        "vectors.npy": lambda p: np.save(p, export.vectors),
        "index.hnsw": lambda p: index.save_index(str(p)) if index is not None else p.touch(),
        "records.json": lambda p: p.write_bytes(export.records.to_json()),
    }
    # Validate before publishing: a replica (role) loads whatever lands in the store.
    replica = ReplicaIndex(_draft(fields), export.vectors, export.records, index)
    replica.validate(*validate)
    directory, manifest = publish(store, fields, writers)
    # Serve the vectors memory-mapped from the snapshot rather than from this process' heap.
    replica.vectors = np.load(directory / "vectors.npy", mmap_mode="r")
    replica.manifest, replica.directory = manifest, directory
    replica.covers_write_seq = covers_write_seq
    return replica


def _draft(fields: dict[str, Any]) -> Manifest:
    return Manifest(format_version=FORMAT_VERSION, files={}, **fields)


def open_snapshot(
    directory: Path, validate: tuple[int, float] = (0, 0.0), write_ledger: str | None = None
) -> ReplicaIndex:
    """Blocking: verify checksums, load and validate a published snapshot. With the patched
    hnswlib (vendor/hnswlib) no step holds the GIL for long, so a worker thread can do this
    while the event loop serves. The snapshot's covers_write_seq counts for this process
    only if it was counted in the same write ledger (another worker of this proxy built it)."""
    replica = ReplicaIndex.open(directory)
    replica.validate(*validate)
    same = write_ledger is not None and replica.manifest.write_ledger == write_ledger
    replica.covers_write_seq = replica.manifest.covers_write_seq if same else COVERS_NOTHING
    return replica
