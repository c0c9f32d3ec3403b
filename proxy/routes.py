"""Classify a request from its method and path alone, before any I/O.

Later stages route on the class (a replica may answer LOCAL_READ; a WRITE bumps the collection's
generation); today it labels metrics and logs. Anything not in the table is FORWARD: a path this
version does not know is passed to the primary, never refused.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote


class RouteClass(enum.Enum):
    LOCAL_READ = "local_read"  # a read a local replica may answer (query, get, count, lookups)
    WRITE = "write"  # changes data on the primary; always forwarded
    FORWARD = "forward"  # forwarded as is (other reads, unknown paths)
    OPS = "ops"  # the proxy's own endpoints (/healthz, /readyz, /metrics)


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteClass
    op: str
    tenant: str | None = None
    database: str | None = None
    # The collection as the path names it: a name for get/delete by name (BY_NAME); else an
    # id, in its canonical spelling when it is one (collection_id).
    collection: str | None = None


# The ops that name a collection by name; every other op with a collection names it by id.
BY_NAME = frozenset({"get_collection", "delete_collection"})
# A collection id as the primary parses it (Rust's uuid crate): hyphenated, simple (32 hex
# digits), braced or urn:uuid:, any case. Every spelling names the same collection on the
# record paths, so each must be checked (proxy/access/auth.py) and must find the same replica, cache
# entries and write books. Deliberately looser than the primary (a lone brace, some hyphens
# missing): what it lets through, the primary refuses with 400; what it refuses, the primary
# would not take either.
_ID = re.compile(
    r"(?:urn:uuid:|\{)?"
    r"([0-9a-f]{8})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{12})"
    r"\}?",
    re.IGNORECASE | re.ASCII,
)


def collection_id(sent: str) -> str | None:
    """The collection id a path segment names, in its canonical spelling (lower case,
    hyphenated), or None if the segment cannot be an id."""
    match = _ID.fullmatch(sent)
    return None if match is None else "-".join(match.groups()).lower()


_T = "/api/v2/tenants/{tenant}"
_D = _T + "/databases/{database}"
_C = _D + "/collections/{collection}"

# (method, path template, class, op). GET also covers HEAD.
_TABLE: tuple[tuple[str, str, RouteClass, str], ...] = (
    ("GET", "/healthz", RouteClass.OPS, "healthz"),
    ("GET", "/readyz", RouteClass.OPS, "readyz"),
    ("GET", "/metrics", RouteClass.OPS, "metrics"),
    ("GET", "/api/v2/heartbeat", RouteClass.LOCAL_READ, "heartbeat"),
    ("GET", "/api/v2/version", RouteClass.FORWARD, "version"),
    ("GET", "/api/v2/pre-flight-checks", RouteClass.FORWARD, "pre_flight_checks"),
    ("GET", "/api/v2/healthcheck", RouteClass.FORWARD, "healthcheck"),
    ("GET", "/api/v2/auth/identity", RouteClass.FORWARD, "identity"),
    ("POST", "/api/v2/reset", RouteClass.WRITE, "reset"),
    ("POST", "/api/v2/tenants", RouteClass.WRITE, "create_tenant"),
    ("GET", _T, RouteClass.FORWARD, "get_tenant"),
    ("PATCH", _T, RouteClass.WRITE, "update_tenant"),
    ("GET", _T + "/databases", RouteClass.FORWARD, "list_databases"),
    ("POST", _T + "/databases", RouteClass.WRITE, "create_database"),
    ("GET", _D, RouteClass.FORWARD, "get_database"),
    ("DELETE", _D, RouteClass.WRITE, "delete_database"),
    ("GET", _D + "/collections", RouteClass.LOCAL_READ, "list_collections"),
    ("POST", _D + "/collections", RouteClass.WRITE, "create_collection"),
    ("GET", _D + "/collections_count", RouteClass.LOCAL_READ, "count_collections"),
    ("GET", _D + "/collections/by-id/{collection}", RouteClass.LOCAL_READ, "get_collection_by_id"),
    ("GET", _C, RouteClass.LOCAL_READ, "get_collection"),
    ("PUT", _C, RouteClass.WRITE, "modify_collection"),
    ("DELETE", _C, RouteClass.WRITE, "delete_collection"),
    ("POST", _C + "/add", RouteClass.WRITE, "add"),
    ("POST", _C + "/upsert", RouteClass.WRITE, "upsert"),
    ("POST", _C + "/update", RouteClass.WRITE, "update"),
    ("POST", _C + "/delete", RouteClass.WRITE, "delete"),
    ("POST", _C + "/fork", RouteClass.WRITE, "fork"),
    ("POST", _C + "/get", RouteClass.LOCAL_READ, "get"),
    ("POST", _C + "/query", RouteClass.LOCAL_READ, "query"),
    ("GET", _C + "/count", RouteClass.LOCAL_READ, "count"),
    ("POST", _C + "/search", RouteClass.FORWARD, "search"),
    ("GET", _C + "/fork_count", RouteClass.FORWARD, "fork_count"),
    ("GET", _C + "/indexing_status", RouteClass.FORWARD, "indexing_status"),
)

UNKNOWN = Route(RouteClass.FORWARD, "unknown")


def _split(path: str) -> tuple[str, ...]:
    return tuple(path.strip("/").split("/"))


# Templates grouped by segment count: a request is compared only with templates of its length.
_BY_LENGTH: dict[int, list[tuple[str, tuple[str, ...], RouteClass, str]]] = {}
for _method, _template, _kind, _op in _TABLE:
    _parts = _split(_template)
    _BY_LENGTH.setdefault(len(_parts), []).append((_method, _parts, _kind, _op))


def classify(method: str, raw_path: str) -> Route:
    """Classify a request. ``raw_path`` is the path as sent (percent-encoded, no query)."""
    method = "GET" if method == "HEAD" else method
    return _classify(method, raw_path)


@lru_cache(maxsize=4096)
def _classify(method: str, raw_path: str) -> Route:
    # Split before decoding, so an encoded "/" inside a name cannot shift the segments.
    segments = tuple(unquote(s) for s in _split(raw_path))
    for want_method, template, kind, op in _BY_LENGTH.get(len(segments), ()):
        params = _match(template, segments)
        if params is not None and method == want_method:
            sent = params.get("collection")
            if sent is not None and op not in BY_NAME:
                params["collection"] = collection_id(sent) or sent
            return Route(kind, op, **params)
    return UNKNOWN


def _match(template: tuple[str, ...], segments: tuple[str, ...]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for want, got in zip(template, segments, strict=True):
        if want.startswith("{"):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params
