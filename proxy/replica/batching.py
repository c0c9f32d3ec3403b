"""SearchBatcher: concurrent local searches run in a few threads, and concurrent unfiltered
queries of one collection share one hnswlib call.

Requests put their search on a queue and await a future. At most ``threads`` drain loops run in
the search pool; each takes up to ``max_batch`` queued searches at a time, computes them and
hands the answers back to the event loop in one callback, then takes the next batch without
waiting for the loop. So at low load a search runs alone, at once; under load the queue fills
while the threads are busy and the next batch is as large as the backlog: batching adapts to
load and adds no waiting of its own. In a batch, plain top-k queries (no filter, no ids) on the
same replica with the same k are stacked into one ``knn_query`` (hnswlib answers each row
exactly as it would alone), which saves the per-call overhead and the GIL round trips.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from index.replica import ReplicaIndex
from proxy.replica import local

# Per search: (True, answer bytes) or (False, the exception to raise in the request).
Outcome = tuple[bool, "bytes | BaseException"]


@dataclass(slots=True)
class Search:
    replica: ReplicaIndex
    prepared: local.Prepared
    admitted_at: float
    future: asyncio.Future[bytes]


class SearchBatcher:
    def __init__(
        self,
        executor: Executor,
        threads: int,
        max_batch: int,
        exact_max_rows: int,
        check_deadline: Callable[[float], None],
    ) -> None:
        self._executor = executor
        self._threads = threads
        self._max_batch = max_batch
        self._exact_max_rows = exact_max_rows
        self._check_deadline = check_deadline
        self._queue: deque[Search] = deque()
        self._lock = threading.Lock()  # guards _queue's emptiness against _draining
        self._draining = 0
        self.batches = 0  # for tests and metrics: hnswlib calls that answered > 1 query
        self.batched = 0  # queries answered in those calls

    def submit(
        self, replica: ReplicaIndex, prepared: local.Prepared, admitted_at: float
    ) -> asyncio.Future[bytes]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        with self._lock:
            self._queue.append(Search(replica, prepared, admitted_at, future))
            start = self._draining < self._threads
            if start:
                self._draining += 1
        if start:
            self._executor.submit(self._drain, loop)
        return future

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """In a search thread: compute batches until the queue is empty."""
        while True:
            with self._lock:
                if not self._queue:
                    self._draining -= 1
                    return
                take = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(take)]
            try:
                outcomes = self._compute(batch)
            except Exception as exc:  # never lose the drain loop, nor leave a request waiting
                outcomes = [(False, exc)] * len(batch)
            loop.call_soon_threadsafe(_settle, batch, outcomes)

    def _compute(self, batch: list[Search]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(batch)
        stackable: dict[tuple[int, int], list[tuple[int, local.QueryPlan]]] = {}
        for i, search in enumerate(batch):
            search.replica = search.replica.latest()  # storage mode: the newest view
            try:
                self._check_deadline(search.admitted_at)
                plan = _stackable_plan(search)
                if plan is None:
                    body = local.answer(search.replica, search.prepared, self._exact_max_rows)
                    outcomes[i] = (True, body)
                else:
                    key = (id(search.replica), plan.k)
                    stackable.setdefault(key, []).append((i, plan))
            except Exception as exc:
                outcomes[i] = (False, exc)
        for group in stackable.values():
            replica = batch[group[0][0]].replica
            try:
                for i, outcome in self._stacked(replica, group):
                    outcomes[i] = outcome
            except Exception as exc:  # e.g. a storage-mode view superseded mid-batch
                for i, _ in group:
                    outcomes[i] = (False, exc)
        return [o if o is not None else (False, RuntimeError("not computed")) for o in outcomes]

    def _stacked(
        self, replica: ReplicaIndex, group: list[tuple[int, local.QueryPlan]]
    ) -> list[tuple[int, Outcome]]:
        """One hnswlib call for the group; each query alone if that call cannot answer."""
        k = group[0][1].k
        found = []
        if len(group) > 1:
            found = replica.search_hnsw(np.vstack([plan.queries for _, plan in group]), k)
        out: list[tuple[int, Outcome]] = []
        if not found:  # one query: nothing to share; or hnswlib could not return k rows
            for i, plan in group:
                results = replica.search(plan.queries, k, None, self._exact_max_rows)
                out.append((i, (True, local.encode_query(replica, plan, results))))
            return out
        self.batches += 1
        self.batched += len(group)
        start = 0
        for i, plan in group:
            rows = found[start : start + len(plan.queries)]
            start += len(plan.queries)
            out.append((i, (True, local.encode_query(replica, plan, rows))))
        return out


def _stackable_plan(search: Search) -> local.QueryPlan | None:
    """The query's plan if it is a plain unfiltered top-k search, else None."""
    prepared = search.prepared
    if prepared.op != "query" or prepared.body is None:
        return None
    body = prepared.body
    if body.get("where") is not None or body.get("where_document") is not None:
        return None
    if body.get("ids") is not None:
        return None
    plan = local.plan_query(search.replica, prepared)
    if plan.allowed is not None or plan.k == 0 or plan.k > search.replica.n:
        return None
    return plan


def _settle(batch: list[Search], outcomes: list[Outcome]) -> None:
    """On the event loop: hand each waiting request its answer (unless it went away)."""
    for search, (ok, value) in zip(batch, outcomes, strict=True):
        if search.future.done():
            continue
        if ok:
            assert isinstance(value, bytes)
            search.future.set_result(value)
        else:
            assert isinstance(value, BaseException)
            search.future.set_exception(value)
