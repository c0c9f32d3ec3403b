"""Limits on what one request may ask for (issue 12, hostile input): ids, results, query
vectors, filter depth and size, document and metadata sizes. A request past one is answered
400 (counts) or 413 (sizes) in Chroma's error format, naming the limit and its config key,
before it reaches a replica or the primary.

The defaults are well above what the Chroma clients send: the Python client splits writes
into batches of the primary's max_batch_size (5,461 rows, chroma-wire.md 1), and a query's
n_results and filters are whatever the application asks. The limits bound how much work one
request can make the proxy do (an n_results of ten million, a filter nested ten thousand
deep), not normal use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ijson
import orjson
from ijson.common import ObjectBuilder

from proxy.config import Config
from proxy.errors import BadRequest, RequestTooLarge


@dataclass(frozen=True, slots=True)
class Limits:
    ids: int
    n_results: int
    query_vectors: int
    where_depth: int
    where_nodes: int
    document_bytes: int
    metadata_bytes: int

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        return cls(
            config.max_ids_per_request,
            config.max_n_results,
            config.max_query_vectors,
            config.max_where_depth,
            config.max_where_nodes,
            config.max_document_bytes,
            config.max_metadata_bytes,
        )

    def check(self, body: object) -> None:
        """Raise BadRequest or RequestTooLarge if the (parsed JSON) body of a record
        request passes a limit; anything else is left to the primary's own checks."""
        if not isinstance(body, dict):
            return
        _count(body.get("ids"), self.ids, "ids", "max_ids_per_request")
        _count(body.get("query_embeddings"), self.query_vectors, "query vectors",
               "max_query_vectors")  # fmt: skip
        n = body.get("n_results")
        if isinstance(n, int) and n > self.n_results:
            raise BadRequest(f"n_results {n} is over max_n_results={self.n_results}")
        for key in ("where", "where_document"):
            if body.get(key) is not None:
                self._check_filter(key, body[key])
        documents = body.get("documents")
        if isinstance(documents, list):
            for doc in documents:
                self.check_document(doc)
        metadatas = body.get("metadatas")
        if isinstance(metadatas, list):
            for meta in metadatas:
                self.check_metadata(meta)

    def check_document(self, doc: object) -> None:
        if isinstance(doc, str) and len(doc) * 4 > self.document_bytes:
            size = len(doc.encode())
            if size > self.document_bytes:
                raise RequestTooLarge(
                    f"a document of {size} bytes is over max_document_bytes={self.document_bytes}"
                )

    def check_metadata(self, meta: object) -> None:
        if isinstance(meta, dict) and len(orjson.dumps(meta)) > self.metadata_bytes:
            raise RequestTooLarge(
                f"a metadata of over max_metadata_bytes={self.metadata_bytes} bytes"
            )

    def _check_filter(self, key: str, clause: Any) -> None:
        """Depth and number of nodes, walked without recursion (a deep filter must not
        exhaust the stack checking it)."""
        nodes, stack = 0, [(clause, 1)]
        while stack:
            value, depth = stack.pop()
            nodes += 1
            if depth > self.where_depth:
                raise BadRequest(f"{key} nested deeper than max_where_depth={self.where_depth}")
            if nodes > self.where_nodes:
                raise BadRequest(f"{key} has more than max_where_nodes={self.where_nodes} parts")
            if isinstance(value, dict):
                stack.extend((v, depth + 1) for v in value.values())
            elif isinstance(value, list):
                stack.extend((v, depth + 1) for v in value)


def _count(value: object, limit: int, what: str, key: str) -> None:
    if isinstance(value, list) and len(value) > limit:
        raise BadRequest(f"{len(value)} {what} in one request is over {key}={limit}")


class StreamedLimits:
    """The write limits (ids, documents, metadatas) checked on a body as it streams to the
    primary, for bodies too large to read whole (proxy/handlers.py). ``feed`` raises at the
    chunk that holds the offending item, before that chunk is sent on: the primary never gets
    a whole body, so it writes nothing. The push parser (ijson's C backend) keeps memory flat;
    it costs ~1 ms of the event loop per 64 KiB chunk of float arrays and next to nothing for
    the base64 embeddings the Chroma clients send.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._events: list[tuple[str, str, Any]] = ijson.sendable_list()
        self._parser = ijson.parse_coro(self._events, use_float=True)
        self._ids = 0
        self._metadata: ObjectBuilder | None = None
        self._off = False  # not JSON the parser can follow: the primary answers it

    def feed(self, chunk: bytes) -> None:
        if self._off or not chunk:  # (an empty chunk would tell the parser the body ended)
            return
        try:
            self._parser.send(chunk)
        except (ijson.JSONError, StopIteration):
            self._off = True
            return
        try:
            for prefix, event, value in self._events:
                self._event(prefix, event, value)
        finally:
            del self._events[:]

    def _event(self, prefix: str, event: str, value: Any) -> None:
        if self._metadata is not None:
            self._metadata.event(event, value)
            if prefix == "metadatas.item" and event == "end_map":
                self._limits.check_metadata(self._metadata.value)
                self._metadata = None
        elif prefix == "ids.item":
            self._ids += 1
            if self._ids > self._limits.ids:
                raise BadRequest(
                    f"over {self._limits.ids} ids in one request: over "
                    f"max_ids_per_request={self._limits.ids}"
                )
        elif prefix == "documents.item":
            self._limits.check_document(value)
        elif prefix == "metadatas.item" and event == "start_map":
            self._metadata = ObjectBuilder()
            self._metadata.event(event, value)
