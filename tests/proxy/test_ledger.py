"""What worker processes share (the ledger: two maps of one file stand for two processes),
and how worker 0 restarts them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.ops.ledger import LISTENING, READY, SIZE, STARTING, Ledger
from proxy.ops.workers import RESTART_MAX_S, YOUNG_S, restart_delay
from proxy.replica.consistency import Level, Writes, WriteTracker, replica_may_answer

A = "5f0c1a2e-0000-4000-8000-00000000000a"
B = "5f0c1a2e-0000-4000-8000-00000000000b"


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Ledger, Ledger]]:
    first = Ledger.create(tmp_path)
    # As a worker process opens the descriptor it was handed: its own open file description.
    second = Ledger.open(Path(f"/proc/self/fd/{first.fd}"))
    yield first, second
    second.close()
    first.close()


def test_a_write_through_one_worker_is_seen_by_the_other(pair: tuple[Ledger, Ledger]) -> None:
    one, other = pair
    assert other.seq(A) == 0 and not other.busy(A) and other.total == 0
    one.begin(A)
    assert other.busy(A)  # in flight: no replica may answer reads of A anywhere
    one.end(A)
    assert not other.busy(A) and other.seq(A) == 1 and other.total == 1
    assert other.last_write_at(A) > 0
    assert other.seq(B) == 0  # another collection is untouched (unless it shares A's slot)
    other.bump_all()  # reset or database deletion through the other worker
    assert one.seq(A) == 2 and one.seq(B) == 1
    assert one.last_write_at(B) >= one.last_write_at(A)


def test_the_gate_refuses_a_replica_cut_before_another_workers_write(
    pair: tuple[Ledger, Ledger],
) -> None:
    """The rule a follower worker applies (its replicas come from the store, so only the
    export time says what they include)."""
    one, other = pair

    def fresh(tracker: Writes, cut_at: float) -> bool:
        return replica_may_answer(
            Level.SESSION,
            covers_seq=-1,
            cut_at=cut_at,
            tracker=tracker,
            collection_id=A,
            age_s=1.0,
            max_staleness_s=300.0,
        )

    cut_at = 1_000.0  # long ago
    assert fresh(other, cut_at)
    one.begin(A)
    one.end(A)
    assert not fresh(other, cut_at)
    # What the same worker would conclude with only its own bookkeeping: the bug this fixes.
    assert fresh(WriteTracker(), cut_at)


def test_worker_states(pair: tuple[Ledger, Ledger]) -> None:
    one, other = pair
    assert one.states(3) == [STARTING] * 3
    one.set_state(0, READY)
    other.set_state(2, LISTENING)
    assert other.states(3) == [READY, STARTING, LISTENING]


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other"
    path.write_bytes(b"\1" * 4096)
    with pytest.raises(ValueError, match="not a replica-proxy ledger"):
        Ledger.open(path)
    path.write_bytes(b"\1" * SIZE)  # the right size, but not ours
    with pytest.raises(ValueError, match="not a replica-proxy ledger"):
        Ledger.open(path)


def test_a_new_ledger_leaves_no_file_behind(tmp_path: Path) -> None:
    ledger = Ledger.create(tmp_path)
    assert list(tmp_path.iterdir()) == []
    ledger.close()


def test_a_worker_that_keeps_dying_young_is_restarted_ever_more_slowly() -> None:
    delays = [0.0]
    for _ in range(8):
        delays.append(restart_delay(delays[-1], lived_s=0.5))
    assert delays[1:5] == [1.0, 2.0, 4.0, 8.0]
    assert delays[-1] == RESTART_MAX_S
    assert restart_delay(delays[-1], lived_s=YOUNG_S + 1) == 0.0  # it ran a while: at once


def test_writes_whose_answers_are_withheld_do_not_hold_reads_back(
    pair: tuple[Ledger, Ledger],
) -> None:
    """Export mode's overlay withholds a write's answer until its replica includes it: while
    such writes are in flight (in any worker's count) the replica may answer; one more in
    flight, whose answer may already be out, sends reads to the primary."""
    one, other = pair

    def fresh(withheld: int) -> bool:
        return replica_may_answer(
            Level.SESSION,
            covers_seq=other.seq(A),
            cut_at=0.0,
            tracker=other,
            collection_id=A,
            age_s=1.0,
            max_staleness_s=300.0,
            withheld=withheld,
        )

    one.begin(A)
    assert fresh(1) and not fresh(0)
    other.begin(A)
    assert fresh(2) and not fresh(1)
