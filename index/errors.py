"""Errors of the index package.

IndexError_ (root)
 ├── NotLocal                  the replica cannot answer this request exactly: forward it
 ├── Superseded                the log moved the graph past this view: use the current one
 ├── ReplayFailed              a log row could not be applied: take the collection again
 └── SnapshotError             a snapshot on disk is unusable
      ├── SnapshotFormatError  manifest missing/unreadable or of another format version
      ├── SnapshotCorrupt      a file is missing, of the wrong size, or fails its sha256
      └── ValidationFailed     the index loads but does not find what exact search finds
"""

from __future__ import annotations


class IndexError_(Exception):
    """Root of the index package's errors."""


class NotLocal(IndexError_):
    """Raised while parsing or evaluating a request the replica cannot answer exactly as the
    primary would (an invalid filter, an operator or edge case not replicated). The caller
    forwards the request instead; the primary then answers, errors included."""


class SnapshotError(IndexError_):
    """A snapshot cannot be used; the serving replica is left as it was."""


class SnapshotFormatError(SnapshotError, ValueError):
    pass


class SnapshotCorrupt(SnapshotError, ValueError):
    pass


class ValidationFailed(SnapshotError, ValueError):
    pass


class Superseded(IndexError_):
    """A storage-mode view (index/live.py) was searched after the log replay moved its graph
    on; the request starts again on the collection's current view."""


class ReplayFailed(IndexError_):
    """A log row could not be replayed into a storage-mode replica (index/live.py), which is
    then no longer trusted: the tailer takes the collection again from storage."""
