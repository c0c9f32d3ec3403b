"""ReplicaIndex: an immutable, searchable copy of one collection.

Built once (from an export, or loaded from a verified snapshot) and never mutated: hnswlib is not
safe for concurrent insert and search, and an immutable object needs no locks. A newer copy is
built aside and swapped in by the holder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
import numpy.typing as npt
import orjson

from .columns import Columns, Mask
from .errors import NotLocal, SnapshotCorrupt
from .filters import Filter, plain_ascii
from .snapshot import Manifest, verify

Vectors = npt.NDArray[np.float32]
Rows = npt.NDArray[np.int64]

# Filtered search is exact over the allowed rows when at most EXACT_SHARE of the collection (or
# at most exact_max_rows rows) pass the filter: HNSW would have to over-fetch too much to find k
# allowed neighbours, while brute force over a few thousand rows is one matrix product.
EXACT_SHARE = 0.1
EXACT_MAX_ROWS = 4096


@dataclass(slots=True)
class Records:
    ids: list[str]
    documents: list[str | None]
    uris: list[str | None]
    metadatas: list[dict[str, Any] | None]

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "ids": self.ids,
                "documents": self.documents,
                "uris": self.uris,
                "metadatas": self.metadatas,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Records:
        data = orjson.loads(raw)
        return cls(data["ids"], data["documents"], data["uris"], data["metadatas"])


@dataclass(eq=False)
class ReplicaIndex:
    manifest: Manifest
    vectors: Vectors  # usually a read-only memory map
    records: Records
    index: Any  # hnswlib.Index, or None for an empty collection
    directory: Path | None = None
    # This process' write counter for the collection when the export started (see
    # proxy/consistency.py); -1 means "may miss writes", e.g. when loaded from an older process.
    covers_write_seq: int = -1
    # Derived once at construction.
    n: int = field(init=False)
    columns: Columns = field(init=False)
    row_of: dict[str, int] = field(init=False)
    documents_plain_ascii: bool = field(init=False)
    _inverse_norms_cache: npt.NDArray[np.float32] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.n = len(self.records.ids)
        self.columns = Columns(self.records.metadatas)
        self.row_of = {rid: row for row, rid in enumerate(self.records.ids)}
        self.documents_plain_ascii = plain_ascii(self.records.documents)

    @property
    def documents(self) -> list[str | None]:
        return self.records.documents

    @property
    def collection_id(self) -> str:
        return self.manifest.collection_id

    @property
    def generation(self) -> int:
        return self.manifest.generation

    def age_s(self, now: float | None = None) -> float:
        return (now or time.time()) - self.manifest.created_at

    # --- selection ------------------------------------------------------------------------

    def mask(self, ids: list[str] | None, filters: list[Filter]) -> Mask | None:
        """Rows allowed by ``ids`` and the filters; None means every row."""
        out: Mask | None = None
        if ids is not None:
            out = np.zeros(self.n, np.bool_)
            rows = [self.row_of[i] for i in ids if i in self.row_of]
            out[rows] = True
        for f in filters:
            m = f(self)
            out = m if out is None else out & m
        return out

    def select(self, allowed: Mask | None, offset: int, limit: int | None) -> Rows:
        """Rows in storage order (the order the primary's get returns), after offset/limit."""
        rows = np.arange(self.n, dtype=np.int64) if allowed is None else np.flatnonzero(allowed)
        end = None if limit is None else offset + limit
        result: Rows = rows[offset:end]
        return result

    # --- search ---------------------------------------------------------------------------

    def search(
        self,
        queries: Vectors,
        k: int,
        allowed: Mask | None,
        exact_max_rows: int = EXACT_MAX_ROWS,
    ) -> list[tuple[Rows, npt.NDArray[np.float32]]]:
        """Top-k rows and distances per query, ascending by distance."""
        candidates = self.n if allowed is None else int(allowed.sum())
        k = min(k, candidates)
        if k == 0:
            return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in queries]
        if allowed is None:
            return self._hnsw(queries, k) or self._exact(
                queries, k, np.arange(self.n, dtype=np.int64)
            )
        if candidates <= max(exact_max_rows, EXACT_SHARE * self.n):
            return self._exact(queries, k, np.flatnonzero(allowed))
        return self._filtered_hnsw(queries, k, allowed)

    def _hnsw(self, queries: Vectors, k: int) -> list[tuple[Rows, npt.NDArray[np.float32]]]:
        """HNSW search; [] when hnswlib cannot find k neighbours (k close to the row count
        on a sparse graph), so the caller falls back to exact search."""
        try:
            labels, dists = self.index.knn_query(queries, k=k)
        except RuntimeError:
            return []
        return [
            (labels[i].astype(np.int64), dists[i].astype(np.float32)) for i in range(len(queries))
        ]

    def _filtered_hnsw(
        self, queries: Vectors, k: int, allowed: Mask
    ) -> list[tuple[Rows, npt.NDArray[np.float32]]]:
        """HNSW that skips disallowed rows while it walks the graph (hnswlib's filter), the
        way Chroma searches with a filter; exact search if the graph cannot yield k rows.
        (Over-fetching unfiltered neighbours and filtering afterwards was tried first: when
        the allowed rows lie away from the query's neighbourhood it misses some of them.)"""
        allowed_bytes = allowed.tobytes()  # a C-level lookup for hnswlib's per-node callback
        try:
            labels, dists = self.index.knn_query(queries, k=k, filter=allowed_bytes.__getitem__)
        except RuntimeError:
            return self._exact(queries, k, np.flatnonzero(allowed))
        return [
            (labels[i].astype(np.int64), dists[i].astype(np.float32)) for i in range(len(queries))
        ]

    def _exact(
        self, queries: Vectors, k: int, rows: Rows
    ) -> list[tuple[Rows, npt.NDArray[np.float32]]]:
        """Brute force over ``rows``, in float32 like hnswlib, with each space's distance."""
        sub = np.asarray(self.vectors[rows], dtype=np.float32)
        inverse_norms = self._inverse_norms()[rows] if self.manifest.space == "cosine" else None
        out = []
        for query in queries:
            dists = _distances(self.manifest.space, sub, query, inverse_norms)
            top = np.argpartition(dists, k - 1)[:k] if k < len(dists) else np.arange(len(dists))
            top = top[np.lexsort((rows[top], dists[top]))]
            out.append((rows[top], dists[top].astype(np.float32)))
        return out

    def _inverse_norms(self) -> npt.NDArray[np.float32]:
        """1/|x| per row for cosine, computed on first use (a benign race between threads:
        both compute the same array)."""
        if self._inverse_norms_cache is None:
            norms = np.linalg.norm(np.asarray(self.vectors, dtype=np.float32), axis=1)
            with np.errstate(divide="ignore"):
                self._inverse_norms_cache = np.where(norms > 0, 1.0 / norms, 0.0).astype(np.float32)
        return self._inverse_norms_cache

    @classmethod
    def open(cls, directory: Path) -> ReplicaIndex:
        """Verify and load a published snapshot. Blocking, and hnswlib's load holds the GIL."""
        manifest = verify(directory)
        records = Records.from_json((directory / "records.json").read_bytes())
        vectors = np.load(directory / "vectors.npy", mmap_mode="r")
        if len(records.ids) != manifest.count or len(vectors) != manifest.count:
            raise SnapshotCorrupt(f"{directory}: row counts disagree with the manifest")
        index = None
        if manifest.count:
            index = load_index(
                directory / "index.hnsw",
                manifest.space,
                int(manifest.dimension or 0),
                manifest.count,
                manifest.hnsw["ef_search"],
            )
        return cls(manifest, vectors, records, index, directory)

    # --- shaping ----------------------------------------------------------------------------

    def embeddings(self, rows: Rows) -> Vectors:
        result: Vectors = np.asarray(self.vectors[rows], dtype=np.float32)
        return result


def _distances(
    space: str,
    sub: Vectors,
    query: Vectors,
    inverse_norms: npt.NDArray[np.float32] | None,
) -> npt.NDArray[np.float32]:
    """Chroma's distances (chroma-wire.md 8.1): squared L2, 1 - cosine, 1 - dot. L2 sums
    squared differences (not |x|^2 - 2x.q + |q|^2, which cancels badly near the query)."""
    if space == "l2":
        diff = sub - query
        result: npt.NDArray[np.float32] = np.einsum("ij,ij->i", diff, diff)
        return result
    if space == "ip":
        return np.float32(1.0) - sub @ query
    if space == "cosine":
        assert inverse_norms is not None
        q_norm = np.linalg.norm(query)
        scale = np.float32(1.0 / q_norm) if q_norm > 0 else np.float32(0.0)
        return np.float32(1.0) - (sub @ query) * inverse_norms * scale
    raise NotLocal(f"space {space!r} is not replicated")


def build_index(vectors: Vectors, space: str, hnsw: dict[str, int], threads: int) -> Any:
    """An hnswlib index with the collection's own parameters (labels = row numbers).
    add_items releases the GIL, so a build in a worker thread barely touches the event loop."""
    if len(vectors) == 0:
        return None
    index = hnswlib.Index(space=space, dim=vectors.shape[1])
    index.init_index(
        max_elements=len(vectors), ef_construction=hnsw["ef_construction"], M=hnsw["M"]
    )
    index.set_num_threads(threads)
    index.add_items(vectors, np.arange(len(vectors)))
    index.set_ef(hnsw["ef_search"])
    return index


def load_index(path: Path, space: str, dim: int, count: int, ef_search: int) -> Any:
    index = hnswlib.Index(space=space, dim=dim)
    index.load_index(str(path), max_elements=count)
    index.set_ef(ef_search)
    return index
