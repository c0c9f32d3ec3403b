"""The consistency gate: may this read be answered by the replica? Pure logic, no I/O.

Read-your-writes needs to know which writes a replica includes. The proxy numbers the writes
it forwards per collection (WriteTracker); a replica records the number reached when its export
started (writes acknowledged before that are in the export, since Chroma applies writes
synchronously). A write still in flight counts as not included.

A replica cut by another process (a builder, or an earlier run of this one) knows nothing of
this process' counter; it includes a write if its export started after the write was
acknowledged, give or take CLOCK_MARGIN_S of clock difference between the two hosts.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

# How far apart the clocks of a builder and a replica may be (NTP keeps them far closer).
CLOCK_MARGIN_S = 1.0


class Level(enum.Enum):
    STRONG = "strong"
    SESSION = "session"
    BOUNDED = "bounded"
    EVENTUAL = "eventual"


class Writes(Protocol):
    """What the gate needs to know of forwarded writes: WriteTracker in one process,
    ledger.Ledger across worker processes."""

    @property
    def total(self) -> int: ...

    def begin(self, collection_id: str) -> None: ...

    def end(self, collection_id: str | None) -> None: ...

    def bump_all(self) -> None: ...

    def seq(self, collection_id: str) -> int: ...

    def busy(self, collection_id: str) -> bool: ...

    def in_flight(self, collection_id: str) -> int: ...

    def last_write_at(self, collection_id: str) -> float: ...


@dataclass(slots=True)
class WriteTracker:
    """Per collection: writes forwarded so far (completed), and writes in flight now."""

    _done: dict[str, int] = field(default_factory=dict)
    _in_flight: dict[str, int] = field(default_factory=dict)
    _ended_at: dict[str, float] = field(default_factory=dict)  # wall time of the last one
    # Bumped by writes that touch every collection (reset, database deletion).
    _global: int = 0
    _global_at: float = float("-inf")
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
        self._ended_at[collection_id] = time.time()

    def bump_all(self) -> None:
        self._global += 1
        self._global_at = time.time()

    def last_write_at(self, collection_id: str) -> float:
        return max(self._ended_at.get(collection_id, float("-inf")), self._global_at)

    def seq(self, collection_id: str) -> int:
        return self._done.get(collection_id, 0) + self._global

    def busy(self, collection_id: str) -> bool:
        return collection_id in self._in_flight

    def in_flight(self, collection_id: str) -> int:
        return self._in_flight.get(collection_id, 0)


def replica_may_answer(
    level: Level,
    *,
    covers_seq: int,
    cut_at: float,
    tracker: Writes,
    collection_id: str,
    age_s: float,
    max_staleness_s: float,
    withheld: int = 0,
) -> bool:
    """``withheld``: writes in flight whose answers wait until the replica includes them
    (proxy/replica/overlay.py): no client has seen them, so they need not hold reads back."""
    if level is Level.STRONG:
        return False  # needs a change signal from the primary; not available over HTTP
    if level is Level.EVENTUAL:
        return True
    if age_s > max_staleness_s:
        return False
    if level is Level.BOUNDED:
        return True
    if tracker.in_flight(collection_id) > withheld:
        return False
    if covers_seq >= tracker.seq(collection_id):
        return True
    return cut_at > tracker.last_write_at(collection_id) + CLOCK_MARGIN_S


# A collection written through this proxy whose covering log position is being looked up.
PENDING = -1


@dataclass(slots=True)
class LogMarks:
    """Storage mode: per collection, a position in the primary's log that covers every write
    this proxy forwarded to it, so that a session read compares it with its replica's
    position instead of reading the log itself.

    After each write's answer the proxy reads the log's newest seq (learned). A look-up that
    started after a write ended covers it; while any is under way the mark is PENDING."""

    _pending: dict[str, int] = field(default_factory=dict)
    _found: dict[str, tuple[int, float]] = field(default_factory=dict)  # in this round
    _marks: dict[str, tuple[int, float]] = field(default_factory=dict)

    def wrote(self, collection_id: str) -> None:
        self._pending[collection_id] = self._pending.get(collection_id, 0) + 1

    def learned(self, collection_id: str, position: int | None, started_at: float) -> None:
        """A look-up begun at ``started_at`` found ``position`` (None: it failed)."""
        left = self._pending.get(collection_id, 1) - 1
        if position is not None:
            pos, at = self._found.get(collection_id, (0, 0.0))
            self._found[collection_id] = (max(pos, position), max(at, started_at))
        if left:
            self._pending[collection_id] = left
            return
        self._pending.pop(collection_id, None)
        found = self._found.pop(collection_id, None)
        if found is None:
            self._marks.pop(collection_id, None)  # unknown: reads look the log up themselves
        else:
            self._marks[collection_id] = found

    def mark(self, collection_id: str) -> tuple[int, float] | int | None:
        """(position, when its look-up began), PENDING, or None (nothing known)."""
        if collection_id in self._pending:
            return PENDING
        return self._marks.get(collection_id)
