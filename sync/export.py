"""Export a collection from the primary by paginated `get`, the only full-read Chroma offers.

Pages are fetched a few at a time; each page's JSON is decoded in a worker thread and turned
into a float32 array at once, so the export never holds the embeddings as Python floats and the
event loop is not blocked by decoding (a 250-row page of 384-d vectors is about 1 MB of JSON).
An export is checked for consistency before use: the count before and after must agree with the
rows received and ids must be unique, otherwise the collection changed while it was being read
(offset paging can then skip or repeat rows) and the caller retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson

from index.replica import Records, Vectors

log = logging.getLogger(__name__)

INCLUDE = ["embeddings", "metadatas", "documents", "uris"]


class PrimaryClient(Protocol):
    """The one way sync/ talks to the primary (proxy.upstream.Upstream implements it)."""

    base_url: str

    async def call_raw(
        self, method: str, path: str, payload: Any = None, timeout_s: float | None = None
    ) -> tuple[int, bytes]: ...


class ExportError(Exception):
    """The primary refused or failed a request of the export."""


class ExportChanged(ExportError):
    """The collection changed during the export; the result would be inconsistent."""


@dataclass(slots=True)
class Export:
    model: dict[str, Any]
    vectors: Vectors
    records: Records
    started_at: float
    seconds: float


def collection_path(model: dict[str, Any]) -> str:
    return (
        f"/api/v2/tenants/{model['tenant']}/databases/{model['database']}/collections/{model['id']}"
    )


async def call(client: PrimaryClient, method: str, path: str, payload: Any = None) -> Any:
    status, raw = await client.call_raw(method, path, payload)
    if status != 200:
        raise ExportError(f"{method} {path} answered {status}: {raw[:200]!r}")
    return orjson.loads(raw)


async def export_collection(
    client: PrimaryClient, model: dict[str, Any], page_rows: int, concurrency: int
) -> Export:
    started = time.time()
    path = collection_path(model)
    count = int(await call(client, "GET", path + "/count"))
    progress = _Progress(model["name"], count)
    gate = asyncio.Semaphore(concurrency)

    async def page(offset: int) -> tuple[Vectors, Records]:
        async with gate:
            body = {"limit": page_rows, "offset": offset, "include": INCLUDE}
            status, raw = await client.call_raw("POST", path + "/get", body)
            if status != 200:
                raise ExportError(f"get page at {offset} answered {status}: {raw[:200]!r}")
            vectors, records = await asyncio.to_thread(_decode_page, raw, model.get("dimension"))
            progress.add(len(records.ids))
            return vectors, records

    pages = await asyncio.gather(*(page(o) for o in range(0, count, page_rows)))
    after = int(await call(client, "GET", path + "/count"))
    # Off the event loop: joining 150 MB of pages and hashing 100k ids held it for ~0.4 s.
    vectors, records, distinct = await asyncio.to_thread(
        _concatenate, pages, model.get("dimension")
    )
    if after != count or len(records.ids) != count or distinct != count:
        raise ExportChanged(
            f"{model['name']}: count {count} -> {after}, received {len(records.ids)} rows "
            f"({distinct} distinct) while exporting"
        )
    progress.done()
    return Export(model, vectors, records, started, time.time() - started)


def _decode_page(raw: bytes, dimension: int | None) -> tuple[Vectors, Records]:
    data = orjson.loads(raw)
    embeddings = data["embeddings"] or []
    vectors = np.asarray(embeddings, dtype=np.float32)
    if vectors.ndim != 2:  # an empty page
        vectors = vectors.reshape(0, dimension or 0)
    n = len(data["ids"])
    records = Records(
        ids=data["ids"],
        documents=data["documents"] if data["documents"] is not None else [None] * n,
        uris=data["uris"] if data["uris"] is not None else [None] * n,
        metadatas=data["metadatas"] if data["metadatas"] is not None else [None] * n,
    )
    return vectors, records


def _concatenate(
    pages: list[tuple[Vectors, Records]], dimension: int | None
) -> tuple[Vectors, Records, int]:
    """Blocking: all pages as one array and one Records, and the number of distinct ids.

    Copies page by page rather than with one np.concatenate, so the GIL passes back to the
    event loop between pages instead of being held for the whole join; and empties ``pages``
    as it goes, so the page arrays are freed here, not on the event loop."""
    records = Records([], [], [], [])
    for _, page in pages:
        records.ids += page.ids
        records.documents += page.documents
        records.uris += page.uris
        records.metadatas += page.metadatas
    width = pages[0][0].shape[1] if pages else dimension or 0  # _decode_page: always 2-d
    vectors = np.empty((len(records.ids), width), np.float32)
    row = 0
    pages.reverse()
    while pages:
        page_vectors, _ = pages.pop()
        vectors[row : row + len(page_vectors)] = page_vectors
        row += len(page_vectors)
    return vectors, records, len(set(records.ids))


class _Progress:
    """Logs rows, rows/s and ETA at most every 5 s, so long exports are visibly alive."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.rows = name, total, 0
        self.started = self.last = time.monotonic()

    def add(self, rows: int) -> None:
        self.rows += rows
        now = time.monotonic()
        if now - self.last >= 5:
            self.last = now
            rate = self.rows / (now - self.started)
            eta = (self.total - self.rows) / rate if rate else float("inf")
            log.info(
                "export %s: %d/%d rows, %.0f rows/s, ETA %.0fs",
                self.name,
                self.rows,
                self.total,
                rate,
                eta,
            )

    def done(self) -> None:
        seconds = time.monotonic() - self.started
        log.info(
            "export %s: %d rows in %.1fs (%.0f rows/s)",
            self.name,
            self.rows,
            seconds,
            self.rows / seconds if seconds else 0,
        )
