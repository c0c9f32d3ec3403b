"""Free replaced replicas in a thread of their own, a piece at a time.

A 100k-row replica is some 300k Python objects (ids, documents, metadata dicts, the id -> row
map) plus hnswlib's per-node link lists; dropping the last reference frees them all in one go,
holding the GIL for 13 ms on an idle machine and ~30 ms under load. Dropped on the event loop
(where a swap happens) that is a stall every reader sees.

So a replaced replica is handed to the reaper instead. Requests in flight may still hold it:
the reaper waits until it holds the only reference, then takes the replica apart in chunks of
RELEASE_CHUNK objects (between chunks the interpreter can hand the GIL back to the event loop),
and finally asks glibc to return the freed heap to the OS (RSS back to one replica's size).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
import time
from typing import Any

POLL_S = 0.05
RELEASE_CHUNK = 2048


def _load_malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_malloc_trim = _load_malloc_trim()


class Reaper:
    def __init__(self) -> None:
        self._pending: list[Any] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Replicas replaced but still held by a request in flight (or leaked)."""
        return len(self._pending)

    def retire(self, replica: Any) -> None:
        with self._lock:
            self._pending.append(replica)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(POLL_S)
            with self._lock:
                if not self._pending:
                    self._thread = None
                    return
                replica = self._take_unshared()
            if replica is not None:
                _dismantle(replica)
                del replica
                if _malloc_trim is not None:
                    _malloc_trim(0)

    def _take_unshared(self) -> Any:
        for i in range(len(self._pending)):
            # 2 = the list's reference + getrefcount's argument: nobody else holds it.
            if sys.getrefcount(self._pending[i]) <= 2:
                return self._pending.pop(i)
        return None


def _dismantle(replica: Any) -> None:
    """Free a replica's Python objects a chunk at a time (see the module docstring). A part
    somebody else still holds (a test keeping an export's records, say) is left whole."""
    if getattr(replica, "shares_parts", False):
        return  # a storage-mode view: its parts live on in the next view (index/live.py)
    records, row_of, columns = replica.records, replica.row_of, replica.columns
    replica.records = replica.row_of = replica.columns = None
    parts: list[Any] = [row_of]
    if _sole(records):
        parts += [records.ids, records.documents, records.uris, records.metadatas]
    if _sole(columns):
        for column in columns:
            parts += [column.str_index, column.contains]
    del records, columns
    for part in parts:
        _drain(part)
    del parts
    replica.index = None  # hnswlib's link lists: ~6 ms of C++ frees, in this thread


def _sole(obj: Any) -> bool:
    # 3 = the caller's variable + this parameter + getrefcount's argument.
    return obj is not None and sys.getrefcount(obj) <= 3


def _drain(items: list[Any] | dict[Any, Any]) -> None:
    if isinstance(items, list):
        while items:
            del items[-RELEASE_CHUNK:]
        return
    while items:
        for _ in range(min(RELEASE_CHUNK, len(items))):
            items.popitem()


REAPER = Reaper()
