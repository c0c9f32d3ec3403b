"""LogMarks (proxy/replica/consistency.py): the log position that covers a proxy's writes is known
only once every look-up begun after them has finished."""

from __future__ import annotations

from proxy.replica.consistency import PENDING, LogMarks


def test_nothing_written_means_no_mark() -> None:
    assert LogMarks().mark("c") is None


def test_a_mark_is_pending_until_the_last_look_up_ends() -> None:
    marks = LogMarks()
    marks.wrote("c")
    marks.wrote("c")
    assert marks.mark("c") == PENDING
    # The second look-up (begun after the second write) ends first, with the higher seq.
    marks.learned("c", 12, started_at=2.0)
    assert marks.mark("c") == PENDING  # the first write's look-up is still running
    marks.learned("c", 10, started_at=1.0)
    assert marks.mark("c") == (12, 2.0)


def test_a_failed_look_up_leaves_no_mark() -> None:
    marks = LogMarks()
    marks.wrote("c")
    marks.learned("c", 5, started_at=1.0)
    marks.wrote("c")
    marks.learned("c", None, started_at=2.0)
    assert marks.mark("c") is None  # reads then look the log up themselves
    assert marks.mark("other") is None
