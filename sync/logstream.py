"""BuilderLog: a `replica` process following a storage-mode builder (issue 11 part 4).

The builder publishes each take of the primary's storage to the snapshot store
(sync/published.py) and keeps every log row it applies after it. A replica loads the take
(sync/follower.py) and hands it here: one long-poll per collection fetches the rows applied
since (``GET /admin/log/{id}?generation=G&offset=K&position=P&wait_s=W``, the admin token as
bearer) and applies them in the builder's order, so the replica holds the builder's graph
and overlay. The builder answers as soon as it has rows past ``offset`` or its position
passed ``position``; 410 means it no longer follows that take (it took the collection
again): the stream retries until the store scan loads the newer take and replaces it.

Strong and session reads ask the builder for the primary's newest log seq
(``/admin/log/position``, which also wakes its tailer) and wait until this replica has
applied that far (proxy/replica/router.py caught_up), as they do against a local tailer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import orjson

from index.holder import ReplicaSet
from index.live import LiveReplica

from .published import decode_ops
from .waiting import serves_position, until

log = logging.getLogger(__name__)

LONG_POLL_S = 10.0
RETRY_S = 1.0


@dataclass(eq=False)
class _Stream:
    live: LiveReplica
    generation: int
    offset: int = 0  # log rows of the builder's journal applied here
    task: asyncio.Task[None] | None = None


class BuilderLog:
    def __init__(self, replicas: ReplicaSet, builder_url: str, token: str) -> None:
        self._replicas = replicas
        self._url = builder_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._streams: dict[str, _Stream] = {}
        self._applied = asyncio.Condition()
        self._session: aiohttp.ClientSession | None = None
        # One thread applies: replays of one collection never overlap, and shutdown waits
        # for a replay under way before the graphs are freed.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="builder-log")
        self.last_error: str | None = None

    async def close(self) -> None:
        for stream in self._streams.values():
            if stream.task is not None:
                stream.task.cancel()
        for stream in list(self._streams.values()):
            if stream.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await stream.task
        await asyncio.to_thread(self._executor.shutdown, True)
        if self._session is not None:
            await self._session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=LONG_POLL_S + 10, connect=5)
            self._session = aiohttp.ClientSession(timeout=timeout, headers=self._headers)
        return self._session

    # --- what the follower and the request path use -------------------------------------------

    def generation(self, collection_id: str) -> int | None:
        """The take a collection follows (None: none)."""
        stream = self._streams.get(collection_id)
        return None if stream is None else stream.generation

    def follow(self, live: LiveReplica, generation: int) -> None:
        """Serve a loaded take and follow the builder's log after it (replacing any older
        take of the collection)."""
        cid = live.collection_id
        self.forget(cid)
        stream = self._streams[cid] = _Stream(live, generation)
        stream.task = asyncio.create_task(self._run(cid, stream), name=f"builder-log-{cid}")
        self._replicas.swap(live.renew_view())

    def forget(self, collection_id: str) -> None:
        stream = self._streams.pop(collection_id, None)
        if stream is not None and stream.task is not None:
            stream.task.cancel()

    async def position_now(self) -> int:
        """The primary's newest log seq, from the builder (which also looks at the log now)."""
        async with self._client().get(f"{self._url}/admin/log/position") as resp:
            if resp.status != 200:
                raise RuntimeError(f"the builder answered {resp.status} for its log position")
            return int((await resp.json())["position"])

    async def wait_applied(self, collection_id: str, seq: int, timeout_s: float) -> bool:
        """Wait until the collection's served view includes log position ``seq``."""
        return await until(
            self._applied,
            partial(serves_position, self._replicas, collection_id, seq),
            timeout_s,
            give_up=lambda: collection_id not in self._streams,
        )

    def status(self) -> dict[str, Any]:
        return {
            "builder_url": self._url,
            "last_error": self.last_error,
            "collections": {
                cid: {"generation": s.generation, "offset": s.offset, "position": s.live.position}
                for cid, s in self._streams.items()
            },
        }

    # --- one collection's stream -------------------------------------------------------------

    async def _run(self, cid: str, stream: _Stream) -> None:
        while True:
            try:
                found = await self._fetch(cid, stream)
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                self.last_error = f"{cid}: {exc}"
                log.warning("following the builder's log for %s: %s; retrying", cid, exc)
                await asyncio.sleep(RETRY_S)
                continue
            if found is None:  # the builder took the collection again: wait for that take
                await asyncio.sleep(RETRY_S)
                continue
            await self._apply(stream, *found)

    async def _fetch(self, cid: str, stream: _Stream) -> tuple[int, list[Any], float] | None:
        params = {
            "generation": str(stream.generation),
            "offset": str(stream.offset),
            "position": str(stream.live.position),
            "wait_s": str(LONG_POLL_S),
        }
        async with self._client().get(f"{self._url}/admin/log/{cid}", params=params) as resp:
            if resp.status == 410:
                return None
            body = await resp.read()
            if resp.status != 200:
                raise ValueError(f"the builder answered {resp.status}: {body[:200]!r}")
        data = orjson.loads(body)
        return int(data["position"]), decode_ops(data["ops"]), float(data["confirmed_at"])

    async def _apply(self, stream: _Stream, position: int, ops: list[Any], at: float) -> None:
        live = stream.live
        if ops:
            loop = asyncio.get_running_loop()
            view = await loop.run_in_executor(self._executor, live.apply, ops, position)
            stream.offset += len(ops)
            if self._streams.get(live.collection_id) is stream:
                self._replicas.swap(view)
        else:  # nothing new for the collection: its view holds up to ``position`` too
            live.position = live.view.position = position
        live.confirmed_at = at
        async with self._applied:
            self._applied.notify_all()
