"""Readers of a running Chroma 1.5.9 primary's persist directory, read-only.

``sqlite``: collections, positions, the ``embeddings_queue`` and the records of a metadata
segment, through short autocommit statements on a ``mode=ro`` connection. ``hnsw_segment``: a
stable, validated copy of a vector segment's HNSW files, loadable by stock hnswlib.
"""

from __future__ import annotations

from .errors import LogGap, SchemaMismatch, SegmentCorrupt, SegmentUnstable, StorageError
from .hnsw_segment import (
    HnswHeader,
    LabelMap,
    SegmentCopy,
    copy_segment,
    deleted_labels,
    label_lengths,
    parse_header,
    read_label_map,
    validate,
)
from .sqlite import (
    ADD,
    DELETE,
    UPDATE,
    UPSERT,
    CollectionRow,
    LogRow,
    Record,
    check_schema,
    connect,
    decode_seq,
    list_collections,
    queue_bounds,
    queue_max,
    queue_tops,
    read_queue,
    read_queue_after,
    read_records,
    segment_seq,
    segment_seqs,
)

__all__ = [
    "ADD",
    "DELETE",
    "UPDATE",
    "UPSERT",
    "CollectionRow",
    "HnswHeader",
    "LabelMap",
    "LogGap",
    "LogRow",
    "Record",
    "SchemaMismatch",
    "SegmentCopy",
    "SegmentCorrupt",
    "SegmentUnstable",
    "StorageError",
    "check_schema",
    "connect",
    "copy_segment",
    "decode_seq",
    "deleted_labels",
    "label_lengths",
    "list_collections",
    "parse_header",
    "queue_bounds",
    "queue_max",
    "queue_tops",
    "read_label_map",
    "read_queue",
    "read_queue_after",
    "read_records",
    "segment_seq",
    "segment_seqs",
    "validate",
]
