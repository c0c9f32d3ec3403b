"""The consistency gate: may this read be answered by the replica? Pure logic, no I/O.

Read-your-writes needs to know which writes a replica includes. The proxy numbers the writes
it forwards per collection (WriteTracker); a replica records the number reached when its export
started (writes acknowledged before that are in the export, since Chroma applies writes
synchronously). A write still in flight counts as not included.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Level(enum.Enum):
    STRONG = "strong"
    SESSION = "session"
    BOUNDED = "bounded"
    EVENTUAL = "eventual"


@dataclass(slots=True)
class WriteTracker:
    """Per collection: writes forwarded so far (completed), and writes in flight now."""

    _done: dict[str, int] = field(default_factory=dict)
    _in_flight: dict[str, int] = field(default_factory=dict)
    # Bumped by writes that touch every collection (reset, database deletion).
    _global: int = 0
    # Every write settled, to any collection or none (create database, create collection...).
    total: int = 0

    def begin(self, collection_id: str) -> None:
        self._in_flight[collection_id] = self._in_flight.get(collection_id, 0) + 1

    def end(self, collection_id: str | None) -> None:
        self.total += 1
        if collection_id is None:
            return
        left = self._in_flight.get(collection_id, 1) - 1
        if left:
            self._in_flight[collection_id] = left
        else:
            self._in_flight.pop(collection_id, None)
        self._done[collection_id] = self._done.get(collection_id, 0) + 1

    def bump_all(self) -> None:
        self._global += 1

    def seq(self, collection_id: str) -> int:
        return self._done.get(collection_id, 0) + self._global

    def busy(self, collection_id: str) -> bool:
        return collection_id in self._in_flight


def replica_may_answer(
    level: Level,
    *,
    covers_seq: int,
    tracker: WriteTracker,
    collection_id: str,
    age_s: float,
    max_staleness_s: float,
) -> bool:
    if level is Level.STRONG:
        return False  # needs a change signal from the primary; not available over HTTP
    if level is Level.EVENTUAL:
        return True
    if age_s > max_staleness_s:
        return False
    if level is Level.BOUNDED:
        return True
    return covers_seq >= tracker.seq(collection_id) and not tracker.busy(collection_id)
