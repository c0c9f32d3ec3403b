"""Waiting on an asyncio.Condition for a predicate, with a deadline: how strong and session
reads wait for their replica to apply the log (sync/tailer.py, sync/logstream.py), and how a
builder's log stream long-polls (StorageTailer.ops_since)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from index.holder import ReplicaSet
from index.live import LiveView


async def until(
    condition: asyncio.Condition,
    done: Callable[[], bool],
    timeout_s: float,
    give_up: Callable[[], bool] = lambda: False,
    nudge: Callable[[], None] | None = None,
) -> bool:
    """Wait (woken by ``condition.notify_all``) until ``done()``; False after ``timeout_s`` or
    once ``give_up()``. ``nudge`` runs before each wait (e.g. to poll now, not next tick)."""
    deadline = time.monotonic() + timeout_s
    async with condition:
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or give_up():
                return False
            if nudge is not None:
                nudge()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(condition.wait(), left)
    return True


def serves_position(replicas: ReplicaSet, collection_id: str, seq: int) -> bool:
    """The view requests are given (not its owner, whose position moves before the new view
    is swapped in) includes log position ``seq``."""
    view = replicas.get(collection_id)
    return isinstance(view, LiveView) and view.position >= seq
