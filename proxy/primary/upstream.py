"""The only caller of the primary: one pooled aiohttp session, bounded and timed out.

aiohttp errors are translated into proxy errors here, once (see errors.py), so the rest of the
proxy never sees an aiohttp client exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict
from yarl import URL

from proxy.access.tls import primary_context
from proxy.config import Config
from proxy.errors import UpstreamCircuitOpen, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.ops.metrics import Metrics

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
# What can go wrong talking to the primary; translate() turns each into an UpstreamError.
_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
# Nobody took the connection: the primary is down whatever the request was.
_UNREACHABLE = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# The connection broke under a request (reset, closed, body cut short).
_DROPPED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError)
# Any other failure of a request is judged by one heartbeat (Upstream._blame): at most one in
# flight, waited for at most PROBE_TIMEOUT_S, its answer reused for PROBE_REUSE_S after it.
PROBE_TIMEOUT_S = 2.0
PROBE_REUSE_S = 1.0

# RFC 9110 section 7.6.1: hop-by-hop fields, plus the ones named in Connection, are not forwarded.
# Proxy-Authorization is for this hop too; Expect was already honoured towards the client
# (aiohttp answered 100-continue when the body was read).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "trailer",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {"host", "expect"}
# The proxy frames the response itself (content_length or chunked), and aiohttp's server writes
# its own Date/Server only when the handler sets none, so those pass through unchanged.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


def end_to_end(headers: Mapping[str, str], drop: frozenset[str]) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop fields (and those listed in ``Connection``)."""
    named = {
        token.strip().lower()
        for value in headers.getall("connection", [])  # type: ignore[attr-defined]
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low not in drop and low not in named:
            out.add(name, value)
    return out


def request_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return end_to_end(headers, _REQUEST_DROP)


def response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return end_to_end(headers, _RESPONSE_DROP)


class Breaker:
    """Circuit breaker: after ``failures`` consecutive failures to reach the primary, fail fast
    for ``open_s``; then let one trial request through (half-open): success closes it, failure
    opens it again. Only transport failures count (an error status means the primary is up),
    and of those only the primary's: see Upstream._blame."""

    CLOSED, OPEN, HALF_OPEN = 0, 1, 2

    def __init__(self, failures: int, open_s: float, metrics: Metrics) -> None:
        self.failures, self.open_s = failures, open_s
        self.state = self.CLOSED
        self._consecutive = 0
        self._until = 0.0
        self._trial_started: float | None = None
        self._metrics = metrics

    def check(self) -> None:
        """Raise UpstreamCircuitOpen unless a request may go to the primary now."""
        if self.state == self.CLOSED:
            return
        now = time.monotonic()
        if self.state == self.OPEN and now >= self._until:
            self._set(self.HALF_OPEN)
        if self.state == self.HALF_OPEN and (
            self._trial_started is None or now - self._trial_started > self.open_s
        ):
            self._trial_started = now  # this request is the trial
            return
        retry = max(self._until - now, 1.0)
        raise UpstreamCircuitOpen("primary failing; not tried for a while", retry, "breaker")

    def success(self) -> None:
        self._consecutive = 0
        self._trial_started = None
        if self.state != self.CLOSED:
            log.info("primary answers again: circuit closed")
            self._set(self.CLOSED)

    def failure(self) -> None:
        self._consecutive += 1
        self._trial_started = None
        if self.state == self.HALF_OPEN or (
            self.state == self.CLOSED and self._consecutive >= self.failures
        ):
            self._until = time.monotonic() + self.open_s
            if self.state == self.CLOSED:
                log.warning("primary failed %d times in a row: circuit open", self._consecutive)
                self._metrics.breaker_trips.inc()
            self._set(self.OPEN)

    def _set(self, state: int) -> None:
        self.state = state
        self._metrics.breaker_state.set(state)


class Upstream:
    """Pooled HTTP client for the primary at ``base_url``. Use as an async context manager."""

    def __init__(self, base_url: str, config: Config, metrics: Metrics) -> None:
        self.base_url = base_url.rstrip("/")
        self._config = config
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self.breaker = Breaker(config.breaker_failures, config.breaker_open_s, metrics)
        # The heartbeat that judges failed requests (_blame), and when it last answered.
        self._probe: asyncio.Task[bool] | None = None
        self._probe_done_at = 0.0

    async def __aenter__(self) -> Upstream:
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self._config.connect_timeout_s,
            sock_read=self._config.read_timeout_s or None,
        )
        connector = aiohttp.TCPConnector(
            limit=self._config.max_upstream_connections,
            limit_per_host=0,
            ssl=primary_context(self._config),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            # Pass bodies and headers through untouched: no decompression, and no default
            # User-Agent/Accept/Content-Type added where the client sent none.
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            read_bufsize=CHUNK_BYTES,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream used outside its context"
        return self._session

    async def send(
        self,
        method: str,
        path_qs: str,
        headers: Mapping[str, str],
        body: AsyncIterable[bytes] | bytes | None = None,
        probe: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send one request and return the response with its body unread.

        The caller must ``release()`` the response. A request without a body is retried once on
        a connection the primary had already closed (a stale pooled keep-alive connection);
        requests with a body are never retried, since it has been consumed. ``probe`` requests
        (heartbeats) go out even while the circuit is open: they are how it learns to close.
        """
        # encoded=True: send the path and query exactly as the client sent them.
        url = URL(self.base_url + path_qs, encoded=True)
        if not probe:
            self.breaker.check()
        attempts = 2 if body is None else 1
        for attempt in range(attempts):
            try:
                resp = await self.session.request(
                    method, url, headers=headers, data=body, allow_redirects=False
                )
            except aiohttp.ServerDisconnectedError as exc:
                if attempt + 1 < attempts:
                    continue
                await self._blame(exc, probe)
                raise self.translate(exc, headers.get("X-Request-Id", "")) from exc
            except _FAILURES as exc:
                await self._blame(exc, probe)
                raise self.translate(exc, headers.get("X-Request-Id", "")) from exc
            self.breaker.success()
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    async def _blame(self, exc: BaseException, probe: bool) -> None:
        """Count a failed request against the primary, or not (issue 12).

        A dropped or timed-out request may be that one request's doing: Chroma 1.5.9 drops the
        connection of GET /api/v2/collections/{crn} (a handler panic, chroma-wire.md 14.9) and
        stays up. Counting those let one client open the breaker on everybody, so such a
        failure counts only if the primary's heartbeat fails too; if the heartbeat answers,
        the primary is well (which also ends a half-open trial). A connection nobody took,
        or a failed heartbeat itself, says the primary is down and counts at once."""
        if probe or isinstance(exc, _UNREACHABLE) or not await self._answers_heartbeat():
            self.breaker.failure()
        else:
            self.breaker.success()

    async def _answers_heartbeat(self) -> bool:
        """Whether the primary answers its heartbeat. One probe serves every failure around
        it: a burst of bad requests sends one heartbeat, not one each."""
        probe = self._probe
        if probe is None or (
            probe.done() and time.monotonic() - self._probe_done_at >= PROBE_REUSE_S
        ):
            probe = self._probe = asyncio.create_task(self._heartbeat_probe(), name="probe")
        # shield: a client that hangs up must not cancel the probe others are waiting on.
        return await asyncio.shield(probe)

    async def _heartbeat_probe(self) -> bool:
        """One heartbeat that leaves the breaker alone: the request it judges is what counts
        (heartbeat() counts itself)."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                async with self.session.get(self.base_url + "/api/v2/heartbeat") as resp:
                    await resp.read()
                    return resp.status == 200
        except _FAILURES:
            return False
        finally:
            self._probe_done_at = time.monotonic()

    async def iter_body(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """Yield the response body as it arrives, translating read failures."""
        try:
            async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                yield chunk
        except _FAILURES as exc:
            raise self.translate(exc, resp.request_info.headers.get("X-Request-Id", "")) from exc

    async def call_raw(
        self,
        method: str,
        path: str,
        payload: Any = None,
        timeout_s: float | None = None,
        probe: bool = False,
    ) -> tuple[int, bytes]:
        """One exchange for the proxy's own use (exports, sample data, heartbeats): JSON out,
        status and raw body back."""
        body = None if payload is None else orjson.dumps(payload)
        # Chroma refuses bodies without this content type, and the Python client sends it always.
        headers = {"Content-Type": "application/json"}
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self.send(method, path, headers, body, probe)
                try:
                    raw = await resp.read()
                finally:
                    resp.release()
        except UpstreamError:
            raise
        except _FAILURES as exc:
            raise self.translate(exc) from exc
        return resp.status, raw

    async def call_json(
        self,
        method: str,
        path: str,
        payload: Any = None,
        timeout_s: float | None = None,
        probe: bool = False,
    ) -> tuple[int, Any]:
        status, raw = await self.call_raw(method, path, payload, timeout_s, probe)
        return status, (orjson.loads(raw) if raw else None)

    async def heartbeat(self) -> bool:
        """True if the primary answered its heartbeat with 200."""
        try:
            status, _ = await self.call_json(
                "GET", "/api/v2/heartbeat", timeout_s=self._config.connect_timeout_s, probe=True
            )
        except (UpstreamError, orjson.JSONDecodeError):
            return False
        return status == 200

    def translate(self, exc: BaseException, rid: str = "") -> UpstreamError:
        """The proxy error for an aiohttp failure. Its message names no address (every
        client would learn where the primary is, issue 12): the log has the address and the
        cause, under the request id ``rid`` that the client's error also carries."""
        err: UpstreamError
        if isinstance(exc, asyncio.TimeoutError):
            reason, err = "timeout", UpstreamTimeout("the primary timed out")
        elif isinstance(exc, aiohttp.ClientConnectorError):
            reason, err = "connect", UpstreamUnavailable("the primary is unreachable")
        elif isinstance(exc, _DROPPED):
            reason, err = "disconnect", UpstreamUnavailable("the primary dropped the connection")
        else:
            reason, err = "disconnect", UpstreamUnavailable("the primary's answer was unusable")
        log.warning("rid=%s primary %s: %s: %r", rid or "-", self.base_url, err, exc)
        self._metrics.upstream_errors.labels(reason).inc()
        return err
