"""build_app(): routes (each wrapped by `observed`, the one place errors become responses),
worker wiring and lifecycle of one proxy. Nothing else lives here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from index.holder import ReplicaSet
from proxy import handlers
from proxy.access.auth import AUTH, Guard, Owner
from proxy.access.guards import Guards
from proxy.access.tls import TLS, server_context
from proxy.access.tls import reload as reload_tls
from proxy.config import Config
from proxy.errors import PrimaryRefused, UpstreamError, to_response
from proxy.ops import admin
from proxy.ops.metrics import Metrics
from proxy.ops.workers import (
    METRICS_INTERVAL_S,
    Worker,
    publish_metrics,
    publish_state,
    relay_writes,
)
from proxy.primary.sample import load_sample
from proxy.primary.upstream import Upstream
from proxy.replica.router import ReplicaRouter, ReplicaSource
from proxy.routes import classify
from proxy.state import (
    CONFIG,
    GUARDS,
    METRICS,
    ON_SIGHUP,
    ROUTE,
    ROUTER,
    SOURCE,
    STATE,
    UPSTREAM,
    WORKER,
    ProxyState,
    new_request_id,
    request_id,
    set_worker,
    stamp,
)
from sync.follower import StoreFollower
from sync.logstream import BuilderLog
from sync.scheduler import RebuildScheduler, SyncSettings
from sync.tailer import StorageTailer, StorageUnusable, TailerSettings, storage_problem

log = logging.getLogger(__name__)

LOOP_LAG_TICK_S = 0.005
WORKER_STATE_TICK_S = 0.2


def build_app(config: Config, primary_url: str, worker: Worker | None = None) -> web.Application:
    """The proxy as an aiohttp application, forwarding to ``primary_url``; ``worker`` when
    it is one of several worker processes (proxy/ops/workers.py)."""
    app = web.Application(client_max_size=config.max_body_bytes)
    metrics = Metrics()
    app[CONFIG] = config
    app[METRICS] = metrics
    app[STATE] = ProxyState()
    app[ON_SIGHUP] = []
    app[UPSTREAM] = Upstream(primary_url, config, metrics)
    app[GUARDS] = guards = Guards.from_config(config, metrics)
    ledger = None
    if worker is not None:
        app[WORKER], ledger = worker, worker.ledger
    app[ROUTER] = ReplicaRouter(
        config, lambda router: _replica_source(app, router), guards.gate.check_deadline, ledger
    )
    if config.tokens_file is not None:  # TokenFileError stops the start, with the reason
        app[AUTH] = Guard(Path(config.tokens_file), config.admin_token, _owner_of(app))
    context = server_context(config)
    if context is not None:
        app[TLS] = context
    app.cleanup_ctx.append(_reload_ctx)
    # Started in this order, stopped in reverse: the scheduler needs the upstream session.
    app.cleanup_ctx.extend(
        [_loop_lag_ctx, _upstream_ctx, _heartbeat_ctx, _sample_ctx, _replicas_ctx]
    )
    if worker is not None:
        app.cleanup_ctx.append(_worker_ctx(worker))
    routes = [
        ("GET", "/healthz", handlers.healthz),
        ("GET", "/readyz", handlers.readyz),
        ("GET", "/metrics", handlers.metrics),
        *admin.ROUTES,
        # Everything else, any method, including paths this version does not know. [\s\S],
        # not ".": a percent-encoded newline in a name is still a path (aiohttp matches the
        # decoded path, and "." stops at a newline: that was aiohttp's plain-text 404).
        ("*", "/{tail:[\\s\\S]*}", handlers.dispatch),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, observed(handler))
    return app


def _owner_of(app: web.Application) -> Owner:
    """How access control learns which tenant and database a collection id belongs to: its
    replica, else the primary (the record paths' tenant and database are not checked by
    Chroma 1.5.9, chroma-wire.md 14.11)."""

    async def owner(cid: str, tenant: str, database: str) -> tuple[str, str] | None:
        replica = app[ROUTER].replicas.get(cid)
        if replica is not None:
            model = replica.manifest.collection
            return str(model["tenant"]), str(model["database"])
        path = f"/api/v2/tenants/{tenant}/databases/{database}/collections/by-id/{cid}"
        status, raw = await app[UPSTREAM].call_raw("GET", path)
        if status == 404:
            return None
        if 400 <= status < 500:
            raise PrimaryRefused(status, raw)
        if status != 200:
            raise UpstreamError(f"looking the collection up answered {status}")
        model = orjson.loads(raw)
        return str(model["tenant"]), str(model["database"])

    return owner


async def _reload_ctx(app: web.Application) -> AsyncIterator[None]:
    """SIGHUP reloads the tokens file and the TLS certificate; the tokens file is also
    reloaded when it changes."""
    guard, context = app.get(AUTH), app.get(TLS)

    def on_sighup() -> None:
        if guard is not None:
            guard.reload("SIGHUP")
        if context is not None:
            reload_tls(context, app[CONFIG])
        for hook in app[ON_SIGHUP]:
            hook()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    watcher = None if guard is None else asyncio.create_task(guard.watch())
    yield
    loop.remove_signal_handler(signal.SIGHUP)
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _replica_source(app: web.Application, router: ReplicaRouter) -> ReplicaSource:
    """Who fills the replica set: the store (role replica) or this process' own builds."""
    config = app[CONFIG]
    worker = app.get(WORKER)
    if config.storage_mode and _storage_usable(config):
        assert config.primary_persist_path is not None
        builder = config.role == "builder"
        tailer_settings = TailerSettings(
            persist=Path(config.primary_persist_path),
            scratch=Path(config.data_dir) / "storage-copies" / str(os.getpid()),
            replicate=config.replicate_list,
            poll_interval_s=config.storage_poll_interval_s,
            overlay_max_rows=config.storage_overlay_max_rows,
            # A builder publishes its takes and serves the log after them to replicas.
            publish_to=config.snapshot_path if builder else None,
            keep_snapshots=config.keep_snapshots,
        )
        # A builder serves no reads itself: its replicas live outside the request path.
        replicas = ReplicaSet() if builder else router.replicas
        tailer = StorageTailer(replicas, tailer_settings, app[METRICS].on_retake)
        app[METRICS].storage.source = tailer.gauges
        return tailer
    settings = sync_settings(config, None if worker is None else worker.ledger.epoch)
    if config.role == "replica":
        # Of several workers, only the first tells the builder about writes (relay_writes).
        stream = None
        if config.builder_url is not None and config.admin_token is not None:
            stream = BuilderLog(router.replicas, config.builder_url, config.admin_token)
        first = worker is None or worker.index == 0
        return StoreFollower(router.replicas, settings, first, stream)
    metrics = app[METRICS]
    return RebuildScheduler(
        app[UPSTREAM], router.replicas, settings, router.tracker.seq, metrics.on_build
    )


def _storage_usable(config: Config) -> bool:
    """Storage mode needs a Chroma 1.5 database it can read: without one it refuses to start
    (replica_source storage) or says why and exports instead (auto)."""
    assert config.primary_persist_path is not None
    problem = storage_problem(Path(config.primary_persist_path))
    if problem is None:
        log.info("replicas follow the primary's storage in %s", config.primary_persist_path)
        return True
    if config.replica_source == "storage":
        raise StorageUnusable(f"replica_source storage: {problem}")
    log.warning("storage mode is not possible (%s); replicas are exported over HTTP", problem)
    return False


def sync_settings(config: Config, write_ledger: str | None = None) -> SyncSettings:
    return SyncSettings(
        store=config.snapshot_path,
        replicate=config.replicate_list if config.replicas else (),
        page_rows=config.export_page_rows,
        export_concurrency=config.export_concurrency,
        build_threads=config.build_threads,
        refresh_interval_s=config.refresh_interval_s,
        debounce_s=config.rebuild_debounce_s,
        keep_snapshots=config.keep_snapshots,
        serve=config.role != "builder",
        validate=(config.validate_queries, config.validate_min_recall),
        poll_interval_s=config.store_poll_interval_s,
        write_ledger=write_ledger,
    )


def observed(handler: Handler) -> Handler:
    """``handler`` made to classify, time, count and stamp every request: the one place
    errors become responses. (A response streamed from the primary is prepared inside the
    handler: forward.py stamps it.) A wrapper on each route rather than an aiohttp middleware,
    which would add two coroutine layers to every request."""

    async def handle(request: web.Request) -> web.StreamResponse:
        metrics = request.app[METRICS]
        route = classify(request.method, request.rel_url.raw_path)
        request[ROUTE] = route
        new_request_id(request)
        metrics.in_flight += 1
        started = time.perf_counter()
        status = "aborted"  # what the metrics say if the handler is cancelled
        try:
            try:
                resp = await handler(request)
            except web.HTTPException as exc:
                stamp(request, exc.headers)
                raise
            except Exception as exc:
                resp = to_response(exc, request_id(request))
            if not resp.prepared:
                stamp(request, resp.headers)
            status = str(resp.status)
            return resp
        finally:
            metrics.in_flight -= 1
            elapsed = time.perf_counter() - started
            metrics.observe(route, status, request.get(SOURCE, "proxy"), elapsed)

    return handle


def _worker_ctx(worker: Worker) -> Callable[[web.Application], AsyncIterator[None]]:
    """One of several worker processes: say so in every response, keep this worker's state
    and metrics where the others see them, and (the first worker) have writes that the
    others forwarded rebuilt, as its own are."""
    set_worker(worker.index)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        router, state, config = app[ROUTER], app[STATE], app[CONFIG]

        def ready() -> bool:
            return not state.draining and (not config.replicas or router.scheduler.ready)

        ledger = worker.ledger
        jobs = [
            publish_state(ledger, worker.index, ready, WORKER_STATE_TICK_S),
            publish_metrics(app[METRICS], worker, METRICS_INTERVAL_S),
        ]
        scheduler = router.scheduler
        # The others' writes reach the builder here (in storage mode each worker tails the
        # primary's log itself).
        if worker.index == 0 and config.replicas and not isinstance(scheduler, StorageTailer):
            jobs.append(relay_writes(ledger, scheduler, router.replicas, WORKER_STATE_TICK_S))
        tasks = [asyncio.create_task(job) for job in jobs]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    return ctx


async def _loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
    """Measure how late the event loop wakes up: a stall (a long computation or a call that
    holds the GIL) delays every request in flight by as much."""
    task = asyncio.create_task(_watch_loop_lag(app[METRICS]), name="loop-lag")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _watch_loop_lag(metrics: Metrics) -> None:
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(LOOP_LAG_TICK_S)
        metrics.on_loop_lag(max(0.0, loop.time() - started - LOOP_LAG_TICK_S))


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    async with app[UPSTREAM]:
        yield


async def _heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    """Probe the primary in the background; /readyz and primary_up follow the last answer."""
    await _probe(app)  # so /readyz is right from the first request
    task = asyncio.create_task(_heartbeat_loop(app), name="primary-heartbeat")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _heartbeat_loop(app: web.Application) -> None:
    while True:
        await asyncio.sleep(app[CONFIG].heartbeat_interval_s)
        try:
            await _probe(app)
        except Exception:  # a failed probe must never end the loop
            log.exception("heartbeat probe failed")


async def _probe(app: web.Application) -> None:
    state = app[STATE]
    up = await app[UPSTREAM].heartbeat()
    if up != state.primary_up:
        log.log(
            logging.INFO if up else logging.WARNING,
            "primary %s is %s",
            app[UPSTREAM].base_url,
            "up" if up else "DOWN",
        )
    state.primary_up = up
    app[METRICS].primary_up.set(1 if up else 0)


async def _replicas_ctx(app: web.Application) -> AsyncIterator[None]:
    router = app[ROUTER]
    if not app[CONFIG].replicas:
        yield
        return
    async with router.scheduler:
        yield
    await router.close()


async def _sample_ctx(app: web.Application) -> AsyncIterator[None]:
    if app[CONFIG].sample_data:
        await load_sample(app[UPSTREAM])
    yield


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, bytes, milliseconds, source, request id."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %s %.1fms src=%s rid=%s',
            request.remote,
            request.method,
            request.path_qs,
            response.status,
            response.body_length,
            time * 1000,
            request.get(SOURCE, "proxy"),
            request_id(request),
        )
