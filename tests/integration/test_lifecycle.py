"""Process lifecycle: graceful SIGTERM, the embedded primary, and no orphans."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.helpers import (
    ProxyProcess,
    http_status,
    kill,
    pids_running,
    process_gone,
    wait_until,
)
from tests.integration.fake_primary import SLOW_STARTED, start_fake_primary


async def test_sigterm_drains_in_flight_request(tmp_path: Path) -> None:
    """SIGTERM: readiness goes off at once, the slow request in flight still completes with
    its full body, then the process exits 0 and stops listening."""
    primary = await start_fake_primary()
    args = ("--primary", str(primary.make_url("")), "--shutdown-delay-s", "1")
    proxy = await asyncio.to_thread(ProxyProcess, *args, log_dir=tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            slow = asyncio.create_task(_fetch(session, proxy.url + "/slow?s=3"))
            await asyncio.wait_for(primary.app[SLOW_STARTED].wait(), 10)
            proxy.signal(signal.SIGTERM)
            # The signal is handled asynchronously: readiness turns off within moments.
            for _ in range(100):
                async with session.get(proxy.url + "/readyz") as resp:
                    if resp.status == 503:
                        assert (await resp.json())["reason"] == "draining"
                        break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("/readyz never turned 503 after SIGTERM")
            assert not slow.done()
            status, body = await slow
        assert status == 200 and len(body) > 10_000
        assert await asyncio.to_thread(proxy.wait, 30) == 0
        assert http_status(proxy.url + "/healthz") is None
        assert "shutting down" in proxy.logs()
    finally:
        proxy.stop()
        await primary.close()


async def test_drain_timeout_bounds_shutdown(tmp_path: Path) -> None:
    """A request longer than drain_timeout_s does not hold the shutdown up."""
    primary = await start_fake_primary()
    args = ("--primary", str(primary.make_url("")), "--drain-timeout-s", "0.5")
    proxy = await asyncio.to_thread(ProxyProcess, *args, log_dir=tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            slow = asyncio.create_task(_fetch(session, proxy.url + "/slow?s=30"))
            await asyncio.wait_for(primary.app[SLOW_STARTED].wait(), 10)
            proxy.signal(signal.SIGTERM)
            assert await asyncio.to_thread(proxy.wait, 20) == 0
            # The cancelled request's client sees its connection closed.
            with contextlib.suppress(aiohttp.ClientError):
                await slow
    finally:
        proxy.stop()
        await primary.close()


async def _fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as resp:
        return resp.status, await resp.read()


def _snippet(banner: str) -> str:
    lines = banner.splitlines()
    start = lines.index("    import chromadb")
    return "\n".join(line.removeprefix("    ") for line in lines[start : start + 3])


def test_embedded_primary_with_sample_data(tmp_path: Path) -> None:
    """No --primary: the proxy starts `chroma run` itself, loads the sample, and the three
    lines of client code it prints work as printed. SIGTERM stops the primary too."""
    data = tmp_path / "data"
    proxy = ProxyProcess("--sample-data", "--data-dir", str(data), log_dir=tmp_path)
    try:
        assert "embedded primary" in proxy.banner.decode()
        snippet = _snippet(proxy.banner.decode())
        run = subprocess.run(
            [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "[['darkorange', 'orange', 'orangered']]"
        assert (data / "primary" / "chroma.sqlite3").exists()
        primaries = pids_running(f"--path {data / 'primary'}")
        assert len(primaries) == 1
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(30) == 0
        wait_until(lambda: process_gone(primaries[0]), 15, "embedded primary to exit")
        assert http_status(proxy.primary_url + "/api/v2/heartbeat") is None
    finally:
        proxy.stop()


def test_embedded_primary_keeps_data_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for _ in range(2):  # the second start finds the sample there and does not add it again
        proxy = ProxyProcess("--sample-data", "--data-dir", str(data), log_dir=tmp_path)
        try:
            col = f"{proxy.url}/api/v2/tenants/default_tenant/databases/default_database"
            assert http_status(col + "/collections/colors") == 200
        finally:
            assert proxy.stop() == 0
    assert "could not load" not in proxy.logs()


def test_no_orphan_primary_after_kill_9(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proxy = ProxyProcess("--data-dir", str(data), log_dir=tmp_path)
    try:
        primaries = pids_running(f"--path {data / 'primary'}")
        assert len(primaries) == 1
        kill(proxy.pid, signal.SIGKILL)
        wait_until(lambda: process_gone(primaries[0]), 15, "orphaned primary to exit")
    finally:
        proxy.stop()
        for pid in pids_running(f"--path {data / 'primary'}"):
            kill(pid)


def test_listen_address_in_use_fails_cleanly(tmp_path: Path) -> None:
    first = ProxyProcess("--data-dir", str(tmp_path / "a"), log_dir=tmp_path)
    try:
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "replica-proxy"),
                "serve",
                "--primary",
                first.primary_url,
                "--listen",
                f"127.0.0.1:{first.port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 1
        assert "cannot start" in run.stderr and "Traceback" not in run.stderr
    finally:
        assert first.stop() == 0
