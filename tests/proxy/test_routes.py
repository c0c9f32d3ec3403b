from __future__ import annotations

import pytest

from proxy.routes import Route, RouteClass, classify

D = "/api/v2/tenants/default_tenant/databases/default_database"
UUID = "4e5edbcc-8705-45cb-bcaf-0bfa2898ec6b"
C = f"{D}/collections/{UUID}"
READ, WRITE, FWD, OPS = (
    RouteClass.LOCAL_READ,
    RouteClass.WRITE,
    RouteClass.FORWARD,
    RouteClass.OPS,
)


@pytest.mark.parametrize(
    ("method", "path", "kind", "op"),
    [
        ("POST", f"{C}/query", READ, "query"),
        ("POST", f"{C}/get", READ, "get"),
        ("GET", f"{C}/count", READ, "count"),
        ("HEAD", f"{C}/count", READ, "count"),
        ("GET", f"{D}/collections", READ, "list_collections"),
        ("GET", f"{D}/collections_count", READ, "count_collections"),
        ("GET", f"{D}/collections/demo", READ, "get_collection"),
        ("GET", f"{D}/collections/by-id/{UUID}", READ, "get_collection_by_id"),
        ("GET", "/api/v2/heartbeat", READ, "heartbeat"),
        ("POST", f"{C}/add", WRITE, "add"),
        ("POST", f"{C}/upsert", WRITE, "upsert"),
        ("POST", f"{C}/update", WRITE, "update"),
        ("POST", f"{C}/delete", WRITE, "delete"),
        ("POST", f"{D}/collections", WRITE, "create_collection"),
        ("PUT", C, WRITE, "modify_collection"),
        ("DELETE", f"{D}/collections/demo", WRITE, "delete_collection"),
        ("POST", "/api/v2/reset", WRITE, "reset"),
        ("POST", "/api/v2/tenants", WRITE, "create_tenant"),
        ("POST", "/api/v2/tenants/t1/databases", WRITE, "create_database"),
        ("DELETE", "/api/v2/tenants/t1/databases/db", WRITE, "delete_database"),
        ("POST", f"{C}/fork", WRITE, "fork"),
        ("GET", "/api/v2/pre-flight-checks", FWD, "pre_flight_checks"),
        ("GET", "/api/v2/auth/identity", FWD, "identity"),
        ("GET", "/api/v2/tenants/default_tenant", FWD, "get_tenant"),
        ("POST", f"{C}/search", FWD, "search"),
        ("GET", f"{C}/indexing_status", FWD, "indexing_status"),
        ("GET", "/healthz", OPS, "healthz"),
        ("GET", "/metrics", OPS, "metrics"),
    ],
)
def test_known_routes(method: str, path: str, kind: RouteClass, op: str) -> None:
    route = classify(method, path)
    assert (route.kind, route.op) == (kind, op)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/heartbeat"),  # the deprecated v1 API: the primary answers 410
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/nope"),
        ("GET", "/"),
        ("PATCH", f"{C}/query"),  # a known path with a method it does not take
        ("POST", "/healthz"),
        ("POST", f"{C}/query/extra"),
        ("OPTIONS", f"{C}/query"),
        ("GET", "/api/v2/tenants//databases/db/collections"),  # empty segment
    ],
)
def test_unknown_is_forwarded(method: str, path: str) -> None:
    assert classify(method, path) == Route(FWD, "unknown")


def test_parameters_are_decoded_per_segment() -> None:
    route = classify("GET", "/api/v2/tenants/my%20tenant/databases/db/collections/a.b-c")
    assert route == Route(READ, "get_collection", "my tenant", "db", "a.b-c")
    # An encoded slash stays inside its segment rather than shifting the path.
    route = classify("GET", "/api/v2/tenants/t/databases/db/collections/a%2Fb")
    assert route.op == "get_collection" and route.collection == "a/b"


def test_record_route_carries_collection_id() -> None:
    route = classify("POST", f"{C}/query")
    assert (route.tenant, route.database, route.collection) == (
        "default_tenant",
        "default_database",
        UUID,
    )


def test_collection_named_by_id_is_a_name_lookup() -> None:
    # "by-id" is a valid collection name; only by-id/<id> is the id lookup.
    assert classify("GET", f"{D}/collections/by-id").op == "get_collection"


@pytest.mark.parametrize(
    "spelling",
    [UUID.upper(), UUID.replace("-", ""), "{" + UUID + "}", "urn:uuid:" + UUID],
)
def test_every_spelling_of_an_id_is_the_same_collection(spelling: str) -> None:
    """The primary takes each of these for the same collection, so the replica, the cache and
    read-your-writes' books must too (an add through one spelling, then a query through
    another, was answered from a cache entry without the new row)."""
    for method, op in (("POST", "add"), ("POST", "query"), ("GET", "count")):
        path = f"{D}/collections/{spelling}/{op}"
        assert classify(method, path).collection == UUID
    assert classify("GET", f"{D}/collections/by-id/{spelling}").collection == UUID
    # A name that looks like an id stays the name it is.
    assert classify("GET", f"{D}/collections/{spelling}").collection == spelling
