"""Run the proxy until SIGTERM/SIGINT, then shut down gracefully.

Shutdown order, as a load balancer needs it: readiness off -> keep serving for
``shutdown_delay_s`` (the balancer notices) -> stop accepting, let in-flight requests finish for
up to ``drain_timeout_s`` -> close the upstream pool -> stop the embedded primary. A second
signal skips the wait. With ``workers`` > 1 (proxy/ops/workers.py) the first process passes each
signal on to the others, which drain the same way, and waits for them before it stops the
embedded primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy import __version__
from proxy.access.tls import TLS
from proxy.app import AccessLogger, build_app
from proxy.config import Config
from proxy.errors import malformed_request_response
from proxy.ops.ledger import LISTENING, Ledger
from proxy.ops.workers import Worker, Workers, first_worker, until_orphaned
from proxy.primary.embedded import EmbeddedPrimary
from proxy.primary.sample import NAME as SAMPLE_NAME
from proxy.state import CONFIG, METRICS, ON_SIGHUP, ROUTER, STATE
from sync.tailer import StorageTailer

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
            if config.primary_persist_path is None:  # storage mode can read its files
                config = dataclasses.replace(config, primary_persist_path=str(embedded.path))
        first = None
        if config.workers > 1:
            first = first_worker(config)
            stack.callback(shutil.rmtree, first.run_dir, True)
            stack.callback(first.ledger.close)
        app = build_app(config, primary_url, first)
        runner = await _listen(app, config, reuse_port=first is not None)
        workers = None
        if first is not None:
            workers = Workers(config, primary_url, _address(config, runner), first)
            workers.start()
            app[ON_SIGHUP].append(workers.reload)
            supervisor = asyncio.create_task(workers.supervise(), name="worker-supervisor")
            stack.push_async_callback(_cancel, supervisor)
            await _until_listening(first.ledger, config.workers, config.embedded_start_timeout_s)
        _announce(config, runner, primary_url, embedded is not None, _replica_source(app))
        on_signal = workers.signal if workers is not None else None
        await _wait_for_signal(on_signal)
        await _drain(app, runner, config, on_signal)
        if workers is not None:
            await workers.wait(config.drain_timeout_s + 5.0)


async def serve_worker(config: Config, worker: Worker) -> None:
    """Workers 1..N-1 (proxy/ops/workers.py): the same app, on the same port, sharing the ledger.
    They stop on a signal from worker 0, or on their own when it died without sending one."""
    assert config.primary_url is not None
    parent = os.getppid()
    try:
        app = build_app(config, config.primary_url, worker)
        runner = await _listen(app, config, reuse_port=True)
        log.info("worker %d (pid %d) serving on %s", worker.index, os.getpid(), config.listen)
        signalled = asyncio.create_task(_wait_for_signal(None))
        orphaned = asyncio.create_task(until_orphaned(parent))
        await asyncio.wait({signalled, orphaned}, return_when=asyncio.FIRST_COMPLETED)
        for task in (signalled, orphaned):
            await _cancel(task)
        if orphaned.done() and not orphaned.cancelled():
            log.warning("worker 0 (pid %d) is gone; shutting down", parent)
        await _drain(app, runner, config, None)
    finally:
        worker.ledger.close()
        if os.getppid() != parent:  # nobody else is left to clean up
            shutil.rmtree(worker.run_dir, ignore_errors=True)


class _Connection(RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse (over a header limit,
    malformed) in Chroma's error shape rather than as plain text."""

    def __init__(self, manager: web.Server, *, limits: tuple[int, int], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.limits = limits  # max_header_bytes, max_headers

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        # Logged without the exception's text: it quotes the offending line, maybe a token.
        log.info("malformed request from %s: %s", request.remote, type(exc).__name__)
        return malformed_request_response(exc, *self.limits)


class _Server(web.Server):
    limits: tuple[int, int]

    def __call__(self) -> RequestHandler:
        return _Connection(self, limits=self.limits, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    def __init__(self, app: web.Application, config: Config, **kwargs: Any) -> None:
        self.limits = (config.max_header_bytes, config.max_headers)
        super().__init__(
            app,
            max_line_size=config.max_header_bytes,
            max_field_size=config.max_header_bytes,
            max_headers=config.max_headers,
            **kwargs,
        )

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # its connections are _Connections; nothing else changes
        assert isinstance(server, _Server)
        server.limits = self.limits
        return server


async def _listen(app: web.Application, config: Config, *, reuse_port: bool) -> web.AppRunner:
    runner = _Runner(
        app,
        config,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("proxy.access") if config.access_log else None,
        shutdown_timeout=config.drain_timeout_s,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        config.host,
        config.port,
        backlog=1024,
        reuse_address=True,
        reuse_port=reuse_port or None,
        ssl_context=app.get(TLS),
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def _address(config: Config, runner: web.AppRunner) -> str:
    """The listen address with the port actually bound (the configured one may be 0)."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"{host}:{_bound_port(runner)}"


async def _until_listening(ledger: Ledger, workers: int, timeout_s: float) -> None:
    """The banner says the proxy serves: wait until every worker has bound the port."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while min(ledger.states(workers)) < LISTENING:
        if loop.time() > deadline:
            log.warning("not every worker listens after %gs: %s", timeout_s, ledger.states(workers))
            return
        await asyncio.sleep(0.05)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _bound_port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


def _replica_source(app: web.Application) -> str:
    config = app[CONFIG]
    if not config.replicas:
        return "off (every request is forwarded)"
    if isinstance(app[ROUTER].scheduler, StorageTailer):
        published = (
            f", takes published to {config.snapshot_path}" if config.role == "builder" else ""
        )
        return f"the primary's own files and log in {config.primary_persist_path}{published}"
    if config.builder_url is not None:
        return f"a builder's snapshots in {config.snapshot_path}, takes followed through its log"
    return f"exports of the primary (role {config.role})"


def _announce(
    config: Config, runner: web.AppRunner, primary_url: str, embedded: bool, source: str
) -> None:
    """The start-up banner on stdout: where to connect, where replicas come from, and
    something to try."""
    port = _bound_port(runner)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    kind = "embedded" if embedded else "remote"
    workers = f" with {config.workers} workers" if config.workers > 1 else ""
    scheme = "https" if config.tls_cert_file else "http"
    ssl_arg = ", ssl=True" if config.tls_cert_file else ""
    lines = [
        f"replica-proxy {__version__} serving on {scheme}://{host}:{port}{workers} "
        f"-> {kind} primary {primary_url}",
        f"Replicas: {source}",
        "Try it from Python (pip install chromadb==1.5.9):",
        "    import chromadb",
        f'    client = chromadb.HttpClient(host="{host}", port={port}{ssl_arg})',
    ]
    if config.sample_data:
        lines[-1] = f'    col = chromadb.HttpClient(host="{host}", port={port}{ssl_arg})'
        lines[-1] += f'.get_collection("{SAMPLE_NAME}")'
        lines.append('    print(col.query(query_embeddings=[[1.0, 0.5, 0.0]], n_results=3)["ids"])')
    else:
        lines.append("    print(client.heartbeat(), client.list_collections())")
    lines.append("Health: /healthz  Ready: /readyz  Metrics: /metrics  Stop: Ctrl-C")
    print("\n".join(lines), flush=True)


async def _wait_for_signal(on_signal: Callable[[], None] | None) -> None:
    """Until SIGTERM or SIGINT; ``on_signal`` passes it on (to the other workers)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _both(stop.set, on_signal))
    await stop.wait()


def _both(first: Callable[[], None], then: Callable[[], None] | None) -> Callable[[], None]:
    def call() -> None:
        first()
        if then is not None:
            then()

    return call


async def _drain(
    app: web.Application,
    runner: web.AppRunner,
    config: Config,
    on_signal: Callable[[], None] | None,
) -> None:
    app[STATE].draining = True
    app[METRICS].draining.set(1)
    in_flight = app[METRICS].in_flight
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
        loop.add_signal_handler(sig, _both(force.set, on_signal))
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
