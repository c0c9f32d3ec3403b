"""Errors of the storage readers (a running Chroma 1.5.9 primary's persist directory).

StorageError (root)
 ├── SchemaMismatch     chroma.sqlite3 is not a 1.5.9 database (migrations or tables differ)
 ├── SegmentUnstable    an HNSW segment kept changing while it was copied, after every retry
 ├── SegmentCorrupt     a copied HNSW segment fails validation (also a ValueError)
 └── LogGap             queue rows a follower needs were purged, or seq ids were reused

Every one of them means "this source cannot be followed from here as it is": the caller logs
the reason and starts a new generation from a fresh snapshot (STYLE.md section 7); none of them
is ever patched over.
"""

from __future__ import annotations


class StorageError(Exception):
    """Root of the storage readers' errors."""


class SchemaMismatch(StorageError):
    """The database is not the schema these readers were written against (Chroma 1.5.9): its
    migrations differ from the recorded list, or a table or column they read is missing."""


class SegmentUnstable(StorageError):
    """The vector segment's files or its ``max_seq_id`` changed during every copy attempt
    (the primary kept flushing); try again later."""


class SegmentCorrupt(StorageError, ValueError):
    """A copied vector segment is inconsistent or truncated (header, graph, labels or the
    pickled label map), so it must not be loaded."""


class LogGap(StorageError):
    """Rows of ``embeddings_queue`` a follower needed are gone (purged after a flush) or the
    queue's seq ids went backwards (rowids reused); continuity cannot be proved."""
