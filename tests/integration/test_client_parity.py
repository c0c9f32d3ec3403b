"""The unmodified chromadb.HttpClient sees the same results through the proxy as directly.

One scenario (every collection and record operation the client has) runs twice against the same
real primary: once directly, once through the proxy, on two fresh collections. Every observation
is compared, with the collection's own id and name normalised.
"""

from __future__ import annotations

from typing import Any

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings

from tests.helpers import ChromaServer, ProxyProcess


def client_for(url: str) -> Any:
    host, port = url.removeprefix("http://").split(":")
    return chromadb.HttpClient(
        host=host, port=int(port), settings=Settings(anonymized_telemetry=False)
    )


def clustered(n: int, dim: int, seed: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Points around a few well separated centres, so nearest neighbours are unambiguous."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, dim)) * 10
    return (centres[np.arange(n) % 4] + rng.normal(size=(n, dim)) * 0.3).astype(np.float32)


def outcome(fn: Any) -> Any:
    """A call's result, or its error as (type name, message) so errors compare too."""
    try:
        return fn()
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


def scenario(client: Any, name: str) -> list[Any]:
    vecs = clustered(40, 8, seed=7).tolist()
    ids = [f"id{i}" for i in range(40)]
    docs = [f"doc {i} about {['cats', 'dogs', 'fish', 'birds'][i % 4]}" for i in range(40)]
    metas: list[Any] = [
        {"group": i % 4, "score": i / 10, "even": i % 2 == 0, "tag": f"t{i % 5}"} for i in range(40)
    ]
    metas[3] = None  # a row without metadata exercises the negated-operator quirks
    seen: list[Any] = []
    col = client.create_collection(name, metadata={"hnsw:space": "cosine", "owner": "tests"})
    seen.append(("create", col.metadata, col.configuration_json["hnsw"]))
    seen.append(("get_collection", client.get_collection(name).metadata))
    seen.append(("create again", outcome(lambda: client.create_collection(name))))
    seen.append(("get_or_create", client.get_or_create_collection(name).metadata))
    listed = [c for c in client.list_collections() if c.name == name]
    seen.append(("listed", [c.metadata for c in listed]))
    seen.append(("count empty", col.count()))
    col.add(ids=ids[:30], embeddings=vecs[:30], documents=docs[:30], metadatas=metas[:30])
    col.upsert(ids=ids[25:], embeddings=vecs[25:], documents=docs[25:], metadatas=metas[25:])
    col.update(ids=["id1"], metadatas=[{"group": 9, "score": None}])
    col.delete(ids=["id2"])
    col.delete(where={"tag": "t4"})
    seen.append(("count", col.count()))
    seen.append(("peek", col.peek(5)))
    seen.append(("get all", col.get()))
    seen.append(("get ids", col.get(ids=["id5", "id0", "missing"], include=["embeddings"])))
    seen.append(("get where", col.get(where={"group": {"$in": [0, 1]}}, limit=5, offset=2)))
    seen.append(("get ne", col.get(where={"group": {"$ne": 0}}, include=[])))
    seen.append(("get doc", col.get(where_document={"$contains": "fish"})))
    seen.append(
        (
            "query",
            col.query(
                query_embeddings=vecs[:3],
                n_results=5,
                where={"$and": [{"even": True}, {"score": {"$gte": 0.5}}]},
                include=["metadatas", "documents", "distances", "embeddings"],
            ),
        )
    )
    seen.append(
        ("query doc", col.query(query_embeddings=[vecs[4]], where_document={"$regex": "d.g"}))
    )
    seen.append(("query big n", col.query(query_embeddings=[vecs[0]], n_results=500)))
    seen.append(("bad where", outcome(lambda: col.get(where={"group": {"$gt": "x"}}))))
    seen.append(("bad dim", outcome(lambda: col.query(query_embeddings=[[1.0, 2.0]]))))
    seen.append(("bad add dim", outcome(lambda: col.add(ids=["z"], embeddings=[[1.0]]))))
    col.modify(metadata={"owner": "someone else"})
    seen.append(("modified", client.get_collection(name).metadata))
    col.modify(name=name + "-renamed")
    seen.append(("renamed", outcome(lambda: client.get_collection(name))))
    client.delete_collection(name + "-renamed")
    seen.append(("deleted", outcome(lambda: client.get_collection(name + "-renamed"))))
    return normalise(seen, col.id, name)


def normalise(seen: list[Any], collection_id: Any, name: str) -> list[Any]:
    """Plain data (dicts compare regardless of key order, which Chroma does not keep stable),
    with this run's collection id and name replaced."""

    def plain(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, str):
            return value.replace(str(collection_id), "<id>").replace(name, "<name>")
        return value

    return [plain(step) for step in seen]


def test_client_flow_is_identical(chroma: ChromaServer, proxy: ProxyProcess, name: str) -> None:
    direct = scenario(client_for(chroma.url), name + "-d")
    through = scenario(client_for(proxy.url), name + "-p")
    assert len(through) == len(direct)
    for got, want in zip(through, direct, strict=True):
        assert got == want


@pytest.mark.parametrize("space", ["l2", "ip"])
def test_query_distances_identical(
    chroma: ChromaServer, proxy: ProxyProcess, name: str, space: str
) -> None:
    vecs = clustered(200, 16, seed=3)
    col = client_for(chroma.url).create_collection(name, metadata={"hnsw:space": space})
    col.add(ids=[str(i) for i in range(200)], embeddings=vecs.tolist())
    queries = (vecs[:10] + 0.01).tolist()
    direct = col.query(query_embeddings=queries, n_results=7, include=["distances"])
    through = (
        client_for(proxy.url)
        .get_collection(name)
        .query(query_embeddings=queries, n_results=7, include=["distances"])
    )
    assert through == direct
