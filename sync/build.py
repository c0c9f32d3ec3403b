"""Turn an export into a published snapshot and a ready-to-serve replica."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index.replica import ReplicaIndex, build_index
from index.snapshot import new_generation, publish

from .export import Export


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
    export: Export, store: Path, source: str, covers_write_seq: int, threads: int
) -> ReplicaIndex:
    """Blocking (run it in a worker thread): build the index, publish the snapshot atomically,
    and return a replica serving from it, with the vectors memory-mapped from the snapshot."""
    model = export.model
    space, hnsw = hnsw_settings(model)
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
    }
    writers = {
        "vectors.npy": lambda p: np.save(p, export.vectors),
        "index.hnsw": lambda p: index.save_index(str(p)) if index is not None else p.touch(),
        "records.json": lambda p: p.write_bytes(export.records.to_json()),
    }
    directory, manifest = publish(store, fields, writers)
    vectors = np.load(directory / "vectors.npy", mmap_mode="r")
    replica = ReplicaIndex(manifest, vectors, export.records, index, directory)
    replica.covers_write_seq = covers_write_seq
    return replica
