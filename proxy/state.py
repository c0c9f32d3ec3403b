"""Typed keys for what the app and each request carry, and the proxy's mutable status."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

from aiohttp import web

from proxy.access.guards import Guards
from proxy.config import Config
from proxy.ops.metrics import Metrics
from proxy.ops.workers import Worker
from proxy.primary.upstream import Upstream
from proxy.replica.router import ReplicaRouter
from proxy.routes import Route


@dataclass(slots=True)
class ProxyState:
    """What /readyz reports. Written by the heartbeat task and the shutdown sequence only."""

    primary_up: bool = False
    draining: bool = False

    def not_ready_reason(self) -> str | None:
        if self.draining:
            return "draining"
        if not self.primary_up:
            return PRIMARY_DOWN
        return None


PRIMARY_DOWN = "primary not answering heartbeats"


CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", ProxyState)
UPSTREAM = web.AppKey("upstream", Upstream)
ROUTER = web.AppKey("router", ReplicaRouter)
GUARDS = web.AppKey("guards", Guards)
WORKER = web.AppKey("worker", Worker)  # only with several worker processes
# Run on SIGHUP after this process's own reloads: worker 0 passes the signal on to the others
# (they run in sessions of their own, so `kill -HUP` of the proxy's pid reaches worker 0 only).
ON_SIGHUP = web.AppKey("on_sighup", list[Callable[[], None]])

# Per-request values (request[KEY]).
ROUTE = web.RequestKey("route", Route)
REQUEST_ID = web.RequestKey("request_id", str)
SOURCE = web.RequestKey("source", str)  # who answered: "primary" or "proxy" (later "replica")

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


# Ids this process makes: a random per-process prefix and a counter, unique across restarts
# and replicas without a syscall per request.
_PREFIX = os.urandom(4).hex()
_counter = itertools.count(1)


def new_request_id(request: web.BaseRequest) -> str:
    """Give the request its id: the client's X-Request-Id if it is sane, else a new one."""
    sent = request.headers.get("X-Request-Id")
    if sent is not None and _CLIENT_ID.fullmatch(sent):
        rid = sent
    else:
        rid = f"{_PREFIX}{next(_counter):08x}"
    request[REQUEST_ID] = rid
    return rid


def request_id(request: web.BaseRequest) -> str:
    rid = request.get(REQUEST_ID)
    return new_request_id(request) if rid is None else rid


# Set once in a process that is one of several workers (proxy/ops/workers.py).
_worker: str | None = None


def set_worker(index: int) -> None:
    global _worker
    _worker = str(index)


def stamp(request: web.BaseRequest, headers: MutableMapping[str, str]) -> None:
    """Every response names its request id, who answered and (with several) which worker."""
    headers["X-Request-Id"] = request_id(request)
    headers["X-Proxy-Source"] = request.get(SOURCE, "proxy")
    if _worker is not None:
        headers["X-Proxy-Worker"] = _worker
