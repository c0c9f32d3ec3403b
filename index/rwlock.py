"""A readers/writer lock for threads, writers first.

hnswlib is not safe for a search and an insert at the same time (nmslib/hnswlib#562), and a
storage-mode replica's graph takes the primary's log tail in place (index/live.py). Searches
run in the search threads (proxy/replica/batching.py) and hold the read side for one hnswlib
call; the log replay holds the write side for one batch of rows. A waiting writer stops new
readers, so a steady stream of searches cannot keep the log from being applied.

(aiorwlock is for coroutines on one loop; these readers are threads.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        # For /metrics: how long writers waited for readers, in total.
        self.write_waits = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            if self._writing or self._readers:
                self.write_waits += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()
