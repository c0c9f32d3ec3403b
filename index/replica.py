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
from .errors import NotLocal, SnapshotCorrupt, ValidationFailed
from .filters import Filter, plain_ascii
from .snapshot import Manifest, verify

Vectors = npt.NDArray[np.float32]
Rows = npt.NDArray[np.int64]

# Filtered search is exact over the allowed rows when at most EXACT_SHARE of the collection (or
# at most exact_max_rows rows) pass the filter: HNSW would have to over-fetch too much to find k
# allowed neighbours, while brute force over a few thousand rows is one matrix product.
EXACT_SHARE = 0.1
EXACT_MAX_ROWS = 4096


# Records are stored as JSON lines of at most RECORDS_CHUNK rows each, so that neither writing
# nor reading them holds the GIL for long: one orjson call over 100k rows takes ~70 ms, during
# which the event loop could not run (a swap must not stall it; see issue 5 and DESIGN.md 4).
RECORDS_CHUNK = 2048
_RECORD_FIELDS = ("ids", "documents", "uris", "metadatas")


@dataclass(slots=True)
class Records:
    ids: list[str]
    documents: list[str | None]
    uris: list[str | None]
    metadatas: list[dict[str, Any] | None]

    def to_json(self) -> bytes:
        """JSON lines, each {"ids": [...], "documents": [...], ...} for a slice of rows."""
        lines = [
            orjson.dumps(
                {f: getattr(self, f)[start : start + RECORDS_CHUNK] for f in _RECORD_FIELDS}
            )
            for start in range(0, max(len(self.ids), 1), RECORDS_CHUNK)
        ]
        return b"\n".join(lines)

    @classmethod
    def from_json(cls, raw: bytes) -> Records:
        """Reads to_json's output (format 1 wrote one line; it parses the same way)."""
        out = cls([], [], [], [])
        for line in raw.splitlines():
            chunk = orjson.loads(line)
            for f in _RECORD_FIELDS:
                getattr(out, f).extend(chunk[f])
        return out


@dataclass(eq=False)
class ReplicaIndex:
    manifest: Manifest
    vectors: Vectors  # usually a read-only memory map
    records: Records
    index: Any  # hnswlib.Index, or None for an empty collection
    directory: Path | None = None
    # This process' write counter for the collection when the export started (see
    # proxy/replica/consistency.py); -1 means "may miss writes", e.g. when loaded from an
    # older process.
    covers_write_seq: int = -1
    # Derived once at construction.
    collection_id: str = field(init=False)  # read on every request: not a property
    n: int = field(init=False)
    columns: Columns = field(init=False)
    row_of: dict[str, int] = field(init=False)
    documents_plain_ascii: bool = field(init=False)
    _inverse_norms_cache: npt.NDArray[np.float32] | None = field(init=False, default=None)
    # The manifest holds the collection model exactly as the primary returned it.
    has_collection_model = True
    # Set when an export-mode overlay reuses this replica's parts (index/live.py): the
    # reaper then leaves them whole.
    shares_parts = False

    def __post_init__(self) -> None:
        self.collection_id = self.manifest.collection_id
        self.n = len(self.records.ids)
        self.columns = Columns(self.records.metadatas)
        self.row_of = {rid: row for row, rid in enumerate(self.records.ids)}
        self.documents_plain_ascii = plain_ascii(self.records.documents)

    @property
    def documents(self) -> list[str | None]:
        return self.records.documents

    def latest(self) -> ReplicaIndex:
        """The replica a search should run on now: this one (a storage-mode view answers
        with its collection's newest view instead, index/live.py)."""
        return self

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
            return self.search_hnsw(queries, k) or self._exact(
                queries, k, np.arange(self.n, dtype=np.int64)
            )
        if candidates <= max(exact_max_rows, EXACT_SHARE * self.n):
            return self._exact(queries, k, np.flatnonzero(allowed))
        return self._filtered_hnsw(queries, k, allowed)

    def search_hnsw(self, queries: Vectors, k: int) -> list[tuple[Rows, npt.NDArray[np.float32]]]:
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
        return exact_top(self.manifest.space, sub, rows, queries, k, inverse_norms)

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

    def validate(self, queries: int, min_recall: float) -> float:
        """Recall@10 of HNSW against exact search, using ``queries`` stored vectors spread over
        the collection as queries; ValidationFailed below ``min_recall``. Catches an index
        that loads but is not the one its vectors describe (wrong file, wrong parameters,
        a bug) before it serves. Blocking: run it off the event loop."""
        if self.n == 0 or self.index is None or queries <= 0:
            return 1.0
        rows = np.unique(np.linspace(0, self.n - 1, min(queries, self.n)).astype(np.int64))
        sample = np.asarray(self.vectors[rows], dtype=np.float32)
        k = min(10, self.n)
        found = self.search_hnsw(sample, k)
        if not found:
            raise ValidationFailed(f"{self.directory}: HNSW cannot return {k} neighbours")
        exact = _brute_top(self.manifest.space, np.asarray(self.vectors), sample, k)
        hits = sum(len(set(a.tolist()) & set(b)) for (a, _), b in zip(found, exact, strict=True))
        recall = hits / (k * len(rows))
        if recall < min_recall:
            raise ValidationFailed(
                f"{self.directory}: recall@{k} {recall:.3f} below the floor {min_recall}"
            )
        return recall

    # --- shaping ----------------------------------------------------------------------------

    def embeddings(self, rows: Rows) -> Vectors:
        result: Vectors = np.asarray(self.vectors[rows], dtype=np.float32)
        return result


def exact_top(
    space: str,
    sub: Vectors,
    rows: Rows,
    queries: Vectors,
    k: int,
    inverse_norms: npt.NDArray[np.float32] | None,
) -> list[tuple[Rows, npt.NDArray[np.float32]]]:
    """Top-k of ``rows`` (whose vectors are ``sub``) per query, ascending by distance, ties
    by row."""
    out = []
    for query in queries:
        dists = _distances(space, sub, query, inverse_norms)
        top = np.argpartition(dists, k - 1)[:k] if k < len(dists) else np.arange(len(dists))
        top = top[np.lexsort((rows[top], dists[top]))]
        out.append((rows[top], dists[top].astype(np.float32)))
    return out


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


def _brute_top(space: str, vectors: Vectors, queries: Vectors, k: int) -> list[list[int]]:
    """Exact top-k rows per query by one matrix product over the whole collection (for
    validation: cheaper than _distances' per-query pass, and precise enough for recall)."""
    vectors = vectors.astype(np.float32, copy=False)
    dots = vectors @ queries.T  # rows x queries
    if space == "l2":
        scores = np.einsum("ij,ij->i", vectors, vectors)[:, None] - 2 * dots
    elif space == "cosine":
        norms = np.linalg.norm(vectors, axis=1)
        scores = -dots / np.where(norms > 0, norms, 1.0)[:, None]
    else:
        scores = -dots
    top = np.argpartition(scores, k - 1, axis=0)[:k] if k < len(vectors) else None
    if top is None:
        return [list(range(len(vectors))) for _ in range(len(queries))]
    return [top[:, j].tolist() for j in range(len(queries))]


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
