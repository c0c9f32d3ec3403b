"""Which rebuild requests a build already running satisfies, and which must queue another."""

from __future__ import annotations

import asyncio
from pathlib import Path

from index.holder import ReplicaSet
from sync.scheduler import (
    WANTED,
    RebuildScheduler,
    SyncSettings,
    Wanted,
    ask_for,
    take_wanted,
)


def _scheduler(tmp_path: Path) -> RebuildScheduler:
    settings = SyncSettings(
        store=tmp_path, replicate=(), page_rows=250, export_concurrency=1, build_threads=1,
        refresh_interval_s=60.0, debounce_s=0.0, keep_snapshots=2,
    )  # fmt: skip
    # Never started: no export runs, only the request bookkeeping is exercised.
    return RebuildScheduler(None, ReplicaSet(), settings, write_seq=lambda cid: 0)  # type: ignore[arg-type]


async def test_a_write_during_a_build_queues_another_build(tmp_path: Path) -> None:
    scheduler = _scheduler(tmp_path)
    scheduler.building = "c1"  # its export started before the write below
    scheduler.request("c1", "t", "d")  # a refresh or discovery: the running build answers it
    assert scheduler.status()["queued"] == []
    scheduler.notify_write("c1")
    await asyncio.sleep(0.05)  # the debounce (0 s) fires
    assert scheduler.status()["queued"] == ["c1"]


async def test_an_admin_rebuild_during_a_build_queues_another(tmp_path: Path) -> None:
    scheduler = _scheduler(tmp_path)
    scheduler.building = "c1"
    scheduler.request("c1", "t", "d", hnsw={"ef_search": 50}, even_if_building=True)
    scheduler.request("c1", "t", "d", even_if_building=True)  # queued once, not twice
    assert scheduler.status()["queued"] == ["c1"]


def test_on_demand_requests_pass_through_the_store_once(tmp_path: Path) -> None:
    cid = "0b9d6f5e-1c2a-4e3b-9f00-123456789abc"
    ask_for(tmp_path, Wanted(cid, "default_tenant", "db one"))
    ask_for(tmp_path, Wanted(cid, "default_tenant", "db one"))  # asked twice: built once
    (tmp_path / WANTED / "not-a-uuid").write_bytes(b'{"tenant": "t", "database": "d"}')
    (tmp_path / WANTED / "0b9d6f5e-1c2a-4e3b-9f00-000000000000").write_bytes(b"garbage")
    assert take_wanted(tmp_path) == [Wanted(cid, "default_tenant", "db one")]
    assert list((tmp_path / WANTED).iterdir()) == []  # taken, and the junk dropped
    assert take_wanted(tmp_path) == []
    rebuild = Wanted(cid, "t", "d", rebuild=True, hnsw={"ef_search": 300})
    ask_for(tmp_path, rebuild)
    assert take_wanted(tmp_path) == [rebuild]
