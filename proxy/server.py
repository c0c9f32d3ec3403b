"""Run the proxy until SIGTERM/SIGINT, then shut down gracefully.

Shutdown order, as a load balancer needs it: readiness off -> keep serving for
``shutdown_delay_s`` (the balancer notices) -> stop accepting, let in-flight requests finish for
up to ``drain_timeout_s`` -> close the upstream pool -> stop the embedded primary. A second
signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from aiohttp import web

from . import __version__
from .app import AccessLogger, build_app
from .config import Config
from .embedded import EmbeddedPrimary
from .sample import NAME as SAMPLE_NAME
from .state import METRICS, STATE

log = logging.getLogger(__name__)


async def serve(config: Config) -> None:
    async with contextlib.AsyncExitStack() as stack:
        primary_url = config.primary_url
        embedded = None
        if primary_url is None:
            embedded = EmbeddedPrimary(Path(config.data_dir), config.embedded_start_timeout_s)
            log.info("starting embedded Chroma primary (data in %s)", embedded.path)
            await stack.enter_async_context(embedded)
            primary_url = embedded.url
        app = build_app(config, primary_url)
        runner = web.AppRunner(
            app,
            access_log_class=AccessLogger,
            access_log=logging.getLogger("proxy.access") if config.access_log else None,
            shutdown_timeout=config.drain_timeout_s,
        )
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, backlog=1024, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        _announce(config, runner, primary_url, embedded is not None)
        await _wait_for_signal()
        await _drain(app, runner, config)


def _bound_port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


def _announce(config: Config, runner: web.AppRunner, primary_url: str, embedded: bool) -> None:
    """The start-up banner on stdout: where to connect, and something to try."""
    port = _bound_port(runner)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    kind = "embedded" if embedded else "remote"
    lines = [
        f"replica-proxy {__version__} serving on http://{host}:{port} "
        f"-> {kind} primary {primary_url}",
        "Try it from Python (pip install chromadb==1.5.9):",
        "    import chromadb",
        f'    client = chromadb.HttpClient(host="{host}", port={port})',
    ]
    if config.sample_data:
        lines[-1] = f'    col = chromadb.HttpClient(host="{host}", port={port}).get_collection('
        lines[-1] += f'"{SAMPLE_NAME}")'
        lines.append('    print(col.query(query_embeddings=[[1.0, 0.5, 0.0]], n_results=3)["ids"])')
    else:
        lines.append("    print(client.heartbeat(), client.list_collections())")
    lines.append("Health: /healthz  Ready: /readyz  Metrics: /metrics  Stop: Ctrl-C")
    print("\n".join(lines), flush=True)


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _drain(app: web.Application, runner: web.AppRunner, config: Config) -> None:
    app[STATE].draining = True
    app[METRICS].draining.set(1)
    in_flight = app[METRICS].registry.get_sample_value("replica_proxy_requests_in_flight") or 0
    log.info(
        "shutting down: readiness off; draining %d in-flight request(s) after %gs, "
        "for at most %gs (signal again to stop now)",
        in_flight,
        config.shutdown_delay_s,
        config.drain_timeout_s,
    )
    force = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, force.set)
    waiter = asyncio.create_task(force.wait())
    delay = asyncio.create_task(asyncio.sleep(config.shutdown_delay_s))
    await asyncio.wait({delay, waiter}, return_when=asyncio.FIRST_COMPLETED)
    delay.cancel()
    cleanup = asyncio.create_task(runner.cleanup())
    await asyncio.wait({cleanup, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not cleanup.done():
        log.warning("second signal: cancelling in-flight requests")
        cleanup.cancel()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cleanup
    log.info("stopped")
