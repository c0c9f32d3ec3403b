"""Ledger: what the worker processes of one proxy share, in a file each of them maps.

* The consistency gate's write bookkeeping (the consistency.Writes interface), so that a read
  on any worker knows of a write that any other forwarded: read-your-writes across workers,
  and cache entries invalidated in all of them.
* Each worker's state (starting, listening, ready), for /readyz and the start-up banner.

Layout: a header (writes settled, the all-collections counter and its time), the worker
states, and three arrays indexed by a stable hash of the collection id (crc32, not Python's
per-process hash): writes in flight, writes done, wall time of the last one. Two collections
that share a slot see each other's writes: their reads are more cautious (forwarded, cache
missed), never less.

Writers take an flock on the file (a write is forwarded to the primary anyway: a microsecond
more is nothing); readers take no lock. A write's end stores "done" and its time before it
lowers "in flight", so a reader that sees nothing in flight sees the write counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from proxy.config import MAX_WORKERS

SLOTS = 1 << 16
_MAGIC = 0x52505731  # "RPW1"
# int64 magic, int64 total, int64 global seq, float64 global time, 8 bytes epoch (random: tells
# this ledger's counts from another's), int64 worker states; then the three per-slot arrays.
_HEADER_BYTES = 40 + 8 * MAX_WORKERS
SIZE = _HEADER_BYTES + 3 * 8 * SLOTS

STARTING, LISTENING, READY = 0, 1, 2


class Ledger:
    """Create one with Ledger.create; other processes get its descriptor (pass_fds) and
    Ledger.open("/proc/self/fd/N"), which gives them their own open file description: flock
    does not exclude holders of one description from each other."""

    def __init__(self, fd: int, *, create: bool = False) -> None:
        self.fd = fd  # owned: closed by close()
        try:
            if create:
                os.ftruncate(fd, SIZE)  # zero-filled: nothing written, "never" times
            elif os.fstat(fd).st_size != SIZE:
                raise ValueError("not a replica-proxy ledger")
            self._map = mmap.mmap(fd, SIZE)
        except BaseException:
            os.close(fd)
            raise
        header = np.frombuffer(self._map, np.int64, 3, 0)
        if create:
            header[0] = _MAGIC
            self._map[32:40] = os.urandom(8)
        elif header[0] != _MAGIC:
            del header
            self.close()
            raise ValueError("not a replica-proxy ledger")
        self.epoch = self._map[32:40].hex()
        self._counts = header[1:]  # [total, global seq]
        self._global_at = np.frombuffer(self._map, np.float64, 1, 24)
        self._workers = np.frombuffer(self._map, np.int64, MAX_WORKERS, 40)
        self._in_flight = np.frombuffer(self._map, np.int64, SLOTS, _HEADER_BYTES)
        self._done = np.frombuffer(self._map, np.int64, SLOTS, _HEADER_BYTES + 8 * SLOTS)
        self._ended_at = np.frombuffer(self._map, np.float64, SLOTS, _HEADER_BYTES + 16 * SLOTS)
        self._slots: dict[str, int] = {}

    @classmethod
    def create(cls, directory: Path) -> Ledger:
        """A new ledger in ``directory``, unlinked at once: nothing is left behind, however
        the processes end."""
        fd, name = tempfile.mkstemp(prefix="replica-proxy-", suffix=".ledger", dir=directory)
        os.unlink(name)
        return cls(fd, create=True)

    @classmethod
    def open(cls, path: Path) -> Ledger:
        return cls(os.open(path, os.O_RDWR))

    def close(self) -> None:
        # The numpy views must go before the map can close.
        for name in ("_counts", "_global_at", "_workers", "_in_flight", "_done", "_ended_at"):
            self.__dict__.pop(name, None)
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self.fd)

    def _slot(self, collection_id: str) -> int:
        slot = self._slots.get(collection_id)
        if slot is None:
            slot = self._slots[collection_id] = zlib.crc32(collection_id.encode()) % SLOTS
        return slot

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    # --- worker states (each worker writes only its own) -----------------------------------

    def set_state(self, worker: int, state: int) -> None:
        self._workers[worker] = state

    def states(self, workers: int) -> list[int]:
        return [int(s) for s in self._workers[:workers]]

    # --- the consistency.Writes interface ---------------------------------------------------

    @property
    def total(self) -> int:
        return int(self._counts[0])

    def begin(self, collection_id: str) -> None:
        slot = self._slot(collection_id)
        with self._locked():
            self._in_flight[slot] += 1

    def end(self, collection_id: str | None) -> None:
        with self._locked():
            if collection_id is not None:
                slot = self._slot(collection_id)
                self._done[slot] += 1
                self._ended_at[slot] = time.time()
                if self._in_flight[slot] > 0:
                    self._in_flight[slot] -= 1
            self._counts[0] += 1

    def bump_all(self) -> None:
        with self._locked():
            self._global_at[0] = time.time()
            self._counts[1] += 1

    def seq(self, collection_id: str) -> int:
        return int(self._done[self._slot(collection_id)] + self._counts[1])

    def busy(self, collection_id: str) -> bool:
        return bool(self._in_flight[self._slot(collection_id)] > 0)

    def in_flight(self, collection_id: str) -> int:
        """Writes in flight in every worker (and any collection sharing the slot)."""
        return int(self._in_flight[self._slot(collection_id)])

    def last_write_at(self, collection_id: str) -> float:
        return max(float(self._ended_at[self._slot(collection_id)]), float(self._global_at[0]))
