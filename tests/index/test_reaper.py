"""The reaper frees replaced replicas off the event loop, and never one still in use."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from pathlib import Path

from index.holder import ReplicaSet
from index.reaper import POLL_S, REAPER
from index.replica import ReplicaIndex
from tests.index.test_snapshot import published


def _eventually(condition: Callable[[], bool], within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(POLL_S)
    return condition()


def test_a_replica_in_use_is_left_whole_and_freed_after(tmp_path: Path) -> None:
    replicas = ReplicaSet()
    old: ReplicaIndex | None = published(tmp_path / "a", seed=1)
    assert old is not None
    replicas.swap(old)
    gone = weakref.ref(old)
    replicas.swap(published(tmp_path / "b", seed=1))  # old is retired, but "a request" holds it
    time.sleep(POLL_S * 6)
    assert old.index is not None and len(old.records.ids) == 500 and len(old.row_of) == 500
    assert old.search(old.vectors[:1], 3, None)[0][0][0] == 0
    del old  # the request ends
    assert _eventually(lambda: gone() is None), "the reaper never freed the replaced replica"
    assert _eventually(lambda: REAPER.pending == 0)


def test_parts_held_elsewhere_are_not_taken_apart(tmp_path: Path) -> None:
    replicas = ReplicaSet()
    first = published(tmp_path / "a", seed=2)
    records = first.records  # e.g. still referenced by an export
    replicas.swap(first)
    gone = weakref.ref(first)
    del first
    replicas.drop(gone().collection_id)  # type: ignore[union-attr]
    assert _eventually(lambda: gone() is None)
    assert len(records.ids) == 500 and records.ids[7] == "id7"
    assert len(records.metadatas) == 500
