"""Takes of the primary's storage as snapshots, for replicas on other hosts (issue 11 part 4).

A builder in storage mode publishes each take (sync/take.py: the primary's own graph, its
records, the log replayed up to a position) to the snapshot store, and serves the log rows
after it (proxy/ops/admin.py /admin/log). A `replica` process loads the take and applies the
rows, so it holds the same graph and the same overlay as the builder, and can answer session
and strong reads itself (sync/follower.py).

The graph is written with hnswlib's own save_index (the primary's segment files are a
variant of that format, sync/storage/hnsw_segment.py; saving normalises them) and read back
with load_index; labels, lengths and replayed labels are numpy arrays; the manifest carries
the log position and the next label.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import numpy as np

from index.errors import SnapshotError
from index.live import Base, Graph, LiveReplica, Op
from index.replica import Records, load_index
from index.snapshot import MANIFEST, Manifest, new_generation, publish, verify


def publish_take(store: Path, live: LiveReplica) -> tuple[Path, Manifest]:
    """Blocking: ``live`` (a take, before anything else is applied) as a snapshot."""
    graph, base = live.graph, live.base
    index = graph.index
    fields: dict[str, Any] = {
        "collection": live.model,
        "space": graph.space,
        "hnsw": dict(graph.params),
        "count": len(base.ids),
        "dimension": graph.dim or None,
        "created_at": live.confirmed_at,
        "source": "storage",
        "covers_write_seq": -1,
        "generation": new_generation(),
        "log_position": live.position,
        "next_label": graph.next_label,
    }
    records = Records(base.ids, base.documents, base.uris, base.metadatas)
    writers = {
        "index.hnsw": lambda p: index.save_index(str(p)) if index is not None else p.touch(),
        "records.json": lambda p: p.write_bytes(records.to_json()),
        "labels.npy": lambda p: np.save(p, live.base_labels),
        "lengths.npy": lambda p: np.save(p, graph.lengths),
        "replayed.npy": lambda p: np.save(p, np.array(sorted(graph.replayed), np.int64)),
    }
    return publish(store, fields, writers)


def is_take(directory: Path) -> bool:
    """Blocking: whether a published snapshot is a take (False if unreadable: the export
    path then refuses it with the reason)."""
    try:
        return Manifest.from_json((directory / MANIFEST).read_bytes()).log_position is not None
    except (OSError, SnapshotError):
        return False


def open_take(directory: Path) -> LiveReplica:
    """Blocking: verify and load a published take."""
    manifest = verify(directory)
    if manifest.log_position is None or manifest.next_label is None:
        raise ValueError(f"{directory} is not a take of the primary's storage")
    records = Records.from_json((directory / "records.json").read_bytes())
    labels = np.load(directory / "labels.npy")
    index = None
    if (directory / "index.hnsw").stat().st_size:
        index = load_index(directory / "index.hnsw", manifest.space, int(manifest.dimension or 0),
                           manifest.next_label, manifest.hnsw["ef_search"])  # fmt: skip
    id_to_label = dict(zip(records.ids, labels.tolist(), strict=True))
    graph = Graph(index, manifest.space, int(manifest.dimension or 0), id_to_label,
                  manifest.next_label, dict(manifest.hnsw))  # fmt: skip
    graph.lengths = np.load(directory / "lengths.npy")
    graph.replayed = set(np.load(directory / "replayed.npy").tolist())
    base = Base(records.ids, records.documents, records.uris, records.metadatas)
    return LiveReplica(manifest.collection, dict(manifest.hnsw), graph, base,
                       manifest.log_position, manifest.created_at)  # fmt: skip


def encode_ops(ops: list[Op]) -> list[list[Any]]:
    """Log rows for the wire (JSON): [seq, kind, id, vector as base64 of little-endian
    float32 or null, metadata with the chroma: keys]."""
    return [[op.seq, op.kind, op.id, _b64(op.vector), op.metadata] for op in ops]


def _b64(vector: Any) -> str | None:
    return None if vector is None else base64.b64encode(vector.astype("<f4")).decode()


def decode_ops(rows: list[list[Any]]) -> list[Op]:
    """encode_ops' rows back (ValueError if they are not)."""
    try:
        return [_op(*row) for row in rows]
    except (TypeError, ValueError, binascii.Error) as exc:
        raise ValueError(f"malformed log rows: {exc}") from None


def _op(seq: int, kind: int, rid: str, vector: str | None, metadata: dict[str, Any]) -> Op:
    found = None if vector is None else np.frombuffer(base64.b64decode(vector), "<f4").copy()
    return Op(int(seq), int(kind), str(rid), found, dict(metadata))
