"""SearchBatcher: stacked queries answer byte for byte what each query answers alone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from index.errors import Superseded
from index.live import ADD, Op
from index.replica import ReplicaIndex
from proxy.access.admission import SearchGate
from proxy.errors import Overloaded
from proxy.replica import local
from proxy.replica.batching import SearchBatcher
from sync.build import build_and_publish
from tests.index.test_live import DIM, empty_replica
from tests.index.test_snapshot import make_export


class HeldExecutor(Executor):
    """Runs submitted work only when release() is called, so a backlog can build up the way
    it does while every search thread is busy."""

    def __init__(self) -> None:
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.held.append((fn, args))
        return Future()

    def release(self) -> None:
        held, self.held = self.held, []
        for fn, args in held:
            fn(*args)


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> ReplicaIndex:
    export = make_export(n=800, dim=8, seed=3)
    return build_and_publish(export, tmp_path_factory.mktemp("store"), "x", 0, 1)


def _requests(replica: ReplicaIndex) -> list[local.Prepared]:
    vectors = replica.vectors
    bodies: list[dict[str, Any]] = [
        {"query_embeddings": [vectors[i].tolist()], "n_results": 5} for i in range(0, 40, 4)
    ]
    bodies += [
        {"query_embeddings": [vectors[1].tolist(), vectors[2].tolist()], "n_results": 7,
         "include": ["distances"]},
        {"query_embeddings": [vectors[3].tolist()], "n_results": 5, "where": {"group": 1}},
        {"query_embeddings": [vectors[4].tolist()], "n_results": 3, "ids": ["id4", "id9"]},
        {"query_embeddings": [vectors[5].tolist()], "n_results": 5000},
        {"query_embeddings": [[1.0, 2.0]], "n_results": 5},  # wrong dimension: NotLocal
    ]  # fmt: skip
    return [local.prepare("query", orjson.dumps(b), {}, None, None) for b in bodies]


async def test_stacked_answers_equal_single_answers(replica: ReplicaIndex) -> None:
    executor = HeldExecutor()
    batcher = SearchBatcher(executor, 1, 16, 50, lambda admitted_at: None)
    prepared = _requests(replica)
    futures = [batcher.submit(replica, p, 0.0) for p in prepared]
    executor.release()  # one drain loop: takes 16, then the rest
    await asyncio.sleep(0)  # the answers are handed over by loop callbacks
    await asyncio.sleep(0)
    assert batcher.batches >= 1 and batcher.batched >= 10
    for p, future in zip(prepared, futures, strict=True):
        try:
            alone: bytes | type[BaseException] = local.answer(replica, p, 50)
        except Exception as exc:
            alone = type(exc)
        if isinstance(alone, bytes):
            assert future.result() == alone
        else:
            assert isinstance(future.exception(), alone)


async def test_searches_past_their_deadline_are_refused(replica: ReplicaIndex) -> None:
    executor = HeldExecutor()
    gate = SearchGate(1, 10, timeout_s=0.0, retry_after_s=1)
    batcher = SearchBatcher(executor, 1, 16, 50, gate.check_deadline)
    futures = [batcher.submit(replica, p, 0.0) for p in _requests(replica)[:3]]
    executor.release()
    await asyncio.sleep(0)
    assert all(isinstance(f.exception(), Overloaded) for f in futures)


async def test_an_abandoned_search_is_skipped(replica: ReplicaIndex, tmp_path: Path) -> None:
    executor = HeldExecutor()
    batcher = SearchBatcher(executor, 1, 16, 50, lambda admitted_at: None)
    prepared = _requests(replica)[:2]
    gone, kept = (batcher.submit(replica, p, 0.0) for p in prepared)
    gone.cancel()  # the client went away while its search was queued
    executor.release()
    await asyncio.sleep(0)
    assert gone.cancelled() and kept.result() == local.answer(replica, prepared[1], 50)


async def test_a_superseded_storage_view_searches_on_the_newest_one() -> None:
    """A storage-mode view whose graph the log replay moved on while its searches waited is
    not searched (it would raise Superseded): they run on the collection's newest view."""
    live = empty_replica()
    vector = np.zeros(DIM, np.float32)
    old = live.apply([Op(1, ADD, "a", vector + 1, {}), Op(2, ADD, "b", vector + 2, {})], 2)
    live.apply([Op(3, ADD, "c", vector, {})], 3)  # moves the graph past `old`
    body = orjson.dumps({"query_embeddings": [vector.tolist()], "n_results": 1})
    prepared = [local.prepare("query", body, {}, None, None) for _ in range(3)]
    executor = HeldExecutor()
    batcher = SearchBatcher(executor, 1, 16, 50, lambda admitted_at: None)
    futures = [batcher.submit(old, p, 0.0) for p in prepared]
    executor.release()
    await asyncio.sleep(0)
    assert [orjson.loads(f.result())["ids"] for f in futures] == [[["c"]]] * 3


async def test_an_error_in_a_stacked_search_fails_its_requests_and_the_drain_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It used to escape the drain thread: its requests waited forever and, once every drain
    thread had died this way, no local read was answered again."""
    live = empty_replica()
    vector = np.zeros(DIM, np.float32)
    view = live.apply([Op(1, ADD, "a", vector, {}), Op(2, ADD, "b", vector + 1, {})], 2)
    body = orjson.dumps({"query_embeddings": [vector.tolist()], "n_results": 1})
    prepared = [local.prepare("query", body, {}, None, None) for _ in range(3)]
    executor = HeldExecutor()
    batcher = SearchBatcher(executor, 1, 16, 50, lambda admitted_at: None)

    def broken(*args: Any) -> Any:
        raise Superseded("the log moved on")

    monkeypatch.setattr(view, "search_hnsw", broken)
    failing = [batcher.submit(view, p, 0.0) for p in prepared]
    executor.release()
    await asyncio.sleep(0)
    assert all(isinstance(f.exception(), Superseded) for f in failing)
    monkeypatch.undo()
    fresh = batcher.submit(view, prepared[0], 0.0)
    executor.release()  # a new drain loop starts: none was lost
    await asyncio.sleep(0)
    assert orjson.loads(fresh.result())["ids"] == [["a"]]
